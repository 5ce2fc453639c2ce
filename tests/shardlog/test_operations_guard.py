"""delete and move touch only what shardlog wrote (issue 22, items 1 and 2): never across another
recorder's lock (below the target or above it), never a tree holding foreign files, links, odd
names or special files. Driven as tests/shardlog/test_operations.py drives a recorder: messages
through ``on_publish``, commands through ``Operations.handle``; every refusal leaves the disk as it
was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest

from shardlog.config.load import parse_map
from shardlog.control.operations import Operations
from shardlog.ondisk.segments import LOCK
from shardlog.recording.lock import ShardLock
from shardlog.recording.loop import prepare_root
from shardlog.recording.recorder import Recorder


def recorder(root: Path, prefix: str) -> Recorder:
    smap = parse_map({"shards": [{"name": "s", "prefix": prefix, "root": str(root)}]}, env={})
    r = Recorder(smap, smap.shards[0])
    r.open_store(*prepare_root(r.shard))
    r.ops = Operations(r, None)
    return r


def send(rec: Recorder, topic: str, *ids: int) -> None:
    for i in ids:
        rec.on_publish(topic.encode(), json.dumps({"i": i}).encode(), 1, i + 1, False, False)
    rec.flush()


def do(rec: Recorder, **req: str) -> dict:
    return rec.ops.handle(msgspec.json.encode(req))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture
def pair(tmp_path: Path):
    """Shard a (prefix a, root data) and, from another shard map, shard b (prefix b) whose root lies
    inside a's topic directories (data/a/x): each map passes check on its own. b holds its lock."""
    a = recorder(tmp_path / "data", "a")
    b = recorder(tmp_path / "data" / "a" / "x", "b")
    lock = ShardLock(b.store.branch_root)  # type: ignore[union-attr]
    assert lock.try_acquire()
    send(a, "a/x/mine", 1, 2)
    send(a, "a/y", 3)
    send(b, "b/t", 1, 2, 3)
    yield a, b
    lock.release()
    for r in (a, b):
        r.store.close()  # type: ignore[union-attr]


@pytest.mark.parametrize("req,why", [
    ({"op": "delete", "prefix": "a/x"}, "{b}/+shard.lock is another recorder's lock: its branch lies inside"),
    ({"op": "delete", "prefix": "a/x/b"}, "{b}/+shard.lock is another recorder's lock"),
    ({"op": "delete", "prefix": "a/x/b/t"}, "{b}/+shard.lock is another recorder's lock: this lies inside its branch"),
    ({"op": "move", "src": "a/x", "dst": "a/z"}, "{b}/+shard.lock is another recorder's lock: its branch lies inside"),
    ({"op": "move", "src": "a/x/b/t", "dst": "a/z"}, "lies inside its branch"),
    ({"op": "move", "src": "a/y", "dst": "a/x/b/new"}, "dst 'a/x/b/new': {b}/+shard.lock is another recorder's lock"),
    ({"op": "rotate", "prefix": "a/x/b/t"}, "lies inside its branch"),
])
def test_nothing_crosses_another_recorders_lock(pair, tmp_path: Path, req: dict, why: str) -> None:
    a, b = pair
    before = snapshot(tmp_path / "data")
    r = do(a, **req)
    assert not r["ok"] and why.replace("{b}", str(tmp_path / "data" / "a" / "x" / "b")) in r["reason"], r
    assert snapshot(tmp_path / "data") == before, "a refused command changed the disk"
    send(b, "b/t", 4)  # b records on, into its own files
    t = Path(b.store.branch_root) / "t" / "+log.jsonl"  # type: ignore[union-attr]
    assert [json.loads(ln)["payload"]["i"] for ln in t.read_text().splitlines()] == [1, 2, 3, 4]


def test_rotate_leaves_the_other_recorders_branch_alone(pair, tmp_path: Path) -> None:
    a, b = pair
    r = do(a, op="rotate", prefix="a/x")
    assert r["ok"] and r["topics"] == ["a/x/mine"], r
    assert sorted(p.name for p in (Path(b.store.branch_root) / "t").iterdir()) == ["+log.jsonl", "+recent.json"]  # type: ignore[union-attr]


def test_own_deletes_and_moves_still_work_beside_it(pair, tmp_path: Path) -> None:
    a, b = pair
    assert do(a, op="move", src="a/y", dst="a/old/y")["ok"]
    assert do(a, op="delete", prefix="a/old")["ok"]
    assert do(a, op="delete", prefix="a/x/mine")["ok"]
    assert (Path(b.store.branch_root) / LOCK).exists()  # type: ignore[union-attr]


def plant(root: Path, kind: str) -> None:
    d = root / "a" / "t"
    if kind == "foreign file":
        (d / "notes.txt").write_text("precious")
    elif kind == "symlink":
        outside = root.parent / "outside"
        outside.mkdir()
        (outside / "keep").write_text("precious")
        os.symlink(outside, d / "link")
    elif kind == "odd directory name":
        (d / "lost+found").mkdir()
    elif kind == "named pipe":
        os.mkfifo(d / "+pipe")


@pytest.mark.parametrize("kind,why", [
    ("foreign file", "notes.txt is not a file shardlog writes"),
    ("symlink", "link is a symbolic link, which shardlog never writes"),
    ("odd directory name", "lost+found is not a directory shardlog wrote"),
    ("named pipe", "+pipe is a named pipe"),
])
def test_a_tree_with_anything_foreign_in_it_is_neither_deleted_nor_moved(tmp_path: Path, kind: str, why: str) -> None:
    a = recorder(tmp_path / "data", "a")
    try:
        send(a, "a/t", 1)
        plant(tmp_path / "data", kind)
        before = snapshot(tmp_path)
        for req in ({"op": "delete", "prefix": "a/t"}, {"op": "move", "src": "a/t", "dst": "a/u"},
                    {"op": "delete", "prefix": "a"}):
            r = do(a, **req)
            assert not r["ok"] and why in r["reason"], (req, r)
            assert snapshot(tmp_path) == before
    finally:
        a.store.close()  # type: ignore[union-attr]


def test_a_directory_shardlog_never_wrote_is_not_deleted(tmp_path: Path) -> None:
    """A root whose branch holds a directory shardlog did not write (item 2: a root resolving to
    a system directory, where `rm etc` deleted /etc): only empty levels, or someone's files."""
    a = recorder(tmp_path / "data", "a")
    try:
        (tmp_path / "data" / "a" / "empty" / "sub").mkdir(parents=True)
        (tmp_path / "data" / "a" / "etc").mkdir()
        (tmp_path / "data" / "a" / "etc" / "passwd").write_text("root:x:0:0")
        before = snapshot(tmp_path)
        r = do(a, op="delete", prefix="a/empty")
        assert not r["ok"] and "holds no file shardlog wrote" in r["reason"], r
        r = do(a, op="delete", prefix="a/etc")
        assert not r["ok"] and "passwd is not a file shardlog writes" in r["reason"], r
        r = do(a, op="move", src="a/etc", dst="a/etc2")
        assert not r["ok"] and "passwd is not a file shardlog writes" in r["reason"], r
        assert snapshot(tmp_path) == before
    finally:
        a.store.close()  # type: ignore[union-attr]


def test_a_file_that_vanishes_during_the_walk_is_no_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compressor replaces a rotated segment by its .gz while the walk runs: the entry listed
    is gone when it is looked at, and the delete goes on."""
    from shardlog.control import guard

    a = recorder(tmp_path / "data", "a")
    try:
        send(a, "a/t", 1)
        seg = tmp_path / "data" / "a" / "t" / "+log.00000001.jsonl"
        seg.write_text("{}\n")
        real_scandir = os.scandir

        class Listed(list):  # what scandir returns: iterable, and a context manager
            def __enter__(self) -> Listed:
                return self

            def __exit__(self, *exc: object) -> None:
                return None

        def scandir_then_compress(path):  # os.scandir itself: patched for the whole process
            with real_scandir(path) as it:
                entries = Listed(it)
            if seg.exists():
                seg.unlink()
            return entries

        monkeypatch.setattr(guard.os, "scandir", scandir_then_compress)
        r = do(a, op="delete", prefix="a/t")
        assert r["ok"] and r["removed"], r
    finally:
        a.store.close()  # type: ignore[union-attr]
