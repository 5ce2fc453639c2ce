"""Control operations inside a recorder (shardlog.control.operations), driven without a network: messages
go in through ``on_publish``, commands through ``Operations.handle`` (what the control socket
delivers), and the files on disk are checked after each step."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import msgspec
import pytest

from shardlog.config.load import parse_map
from shardlog.control.channel import ControlSocket
from shardlog.control.operations import ASIDE, Operations
from shardlog.ondisk.segments import LOCK, QUARANTINE, TOPIC_FILE
from shardlog.recording.loop import prepare_root
from shardlog.recording.recorder import Recorder
from shardlog.topics import topic_to_relpath
from tests.helpers import wait_for


@pytest.fixture
def rec(tmp_path: Path) -> Recorder:
    smap = parse_map({"shards": [{"name": "a", "prefix": "a", "root": str(tmp_path / "data")},
                                 {"name": "vip", "prefix": "a/vip", "root": str(tmp_path / "data")},
                                 {"name": "rest", "prefix": "#", "root": str(tmp_path / "data")}],
                      "control": {"mqtt": True}}, env={})
    r = Recorder(smap, smap.shards[0])
    r.open_store(*prepare_root(r.shard))
    r.ops = Operations(r, None)
    yield r
    assert r.store is not None
    r.store.close()


def send(rec: Recorder, topic: str, *ids: int, flush: bool = True) -> None:
    for i in ids:
        rec.on_publish(topic.encode(), json.dumps({"i": i}).encode(), 1, i + 1, False, False)
    if flush:
        rec.flush()


def do(rec: Recorder, **req: str) -> dict:
    return rec.ops.handle(msgspec.json.encode(req))


def tdir(rec: Recorder, topic: str) -> Path:
    assert rec.store is not None
    return Path(rec.store.root) / topic_to_relpath(topic)


def ids(path: Path) -> list[int]:
    return [json.loads(line)["payload"]["i"] for line in path.read_bytes().splitlines()]


def test_rotate_versions_open_and_closed_topics_and_keeps_recent(rec: Recorder) -> None:
    send(rec, "a/x", 1, 2)
    send(rec, "a/x/y", 3)
    send(rec, "a/vip/v", 4)  # another shard's: discarded here
    rec.routes.clear()       # a/x/y and a/x no longer in memory: found on disk
    send(rec, "a/x", 5, flush=False)  # buffered: written before the rotation
    r = do(rec, op="rotate", prefix="a/x")
    assert r["ok"] and r["rotated"] == 2 and sorted(r["topics"]) == ["a/x", "a/x/y"], r
    assert ids(tdir(rec, "a/x") / "+log.00000001.jsonl") == [1, 2, 5]
    assert not (tdir(rec, "a/x") / "+log.jsonl").read_bytes()
    send(rec, "a/x", 6)
    rec.store.sweep_recent(0, force=True)
    assert [x["payload"]["i"] for x in json.loads((tdir(rec, "a/x") / "+recent.json").read_bytes())] == [1, 2, 5, 6]
    assert do(rec, op="rotate", prefix="a/x/y")["rotated"] == 0  # empty now: left alone
    assert do(rec, op="rotate", prefix="a")["rotated"] == 1       # only a/x has something new


def test_delete_removes_the_branch_and_later_messages_start_afresh(rec: Recorder) -> None:
    send(rec, "a/x", 1, 2)
    send(rec, "a/x/deep", 3)
    send(rec, "a/keep", 4)
    send(rec, "a/x", 5, flush=False)
    r = do(rec, op="delete", prefix="a/x")
    assert r["ok"] and r["removed"] and r["topics_closed"] == 2, r
    assert not tdir(rec, "a/x").exists() and ids(tdir(rec, "a/keep") / "+log.jsonl") == [4]
    assert rec.store is not None and not rec.store.open.keys() - {s for s in rec.routes.values()}
    send(rec, "a/x", 6)
    assert ids(tdir(rec, "a/x") / "+log.jsonl") == [6] and not tdir(rec, "a/x/deep").exists()
    wait_for(lambda: not list(Path(rec.store.root).glob(ASIDE + "*")), 10, "the aside tree to be removed")
    assert do(rec, op="delete", prefix="a/nothing") == {"ok": True, "removed": False,
                                                        "note": "nothing recorded under 'a/nothing'",
                                                        "ms": pytest.approx(0, abs=1000)}


def test_deleting_the_whole_branch_keeps_the_lock_and_quarantine(rec: Recorder) -> None:
    assert rec.store is not None
    branch = Path(rec.store.branch_root)
    (branch / LOCK).write_text("")
    (branch / QUARANTINE).write_text("")
    rec.ops.others = []  # as if a/vip were not a shard
    send(rec, "a", 1)
    send(rec, "a/x", 2)
    r = do(rec, op="delete", prefix="a")
    assert r["ok"] and r["removed"], r
    assert sorted(os.listdir(branch)) == sorted([LOCK, QUARANTINE])


def test_move_renames_and_new_messages_go_to_the_old_place(rec: Recorder) -> None:
    send(rec, "a/x", 1, 2)
    send(rec, "a/x/sub", 3)
    r = do(rec, op="move", src="a/x", dst="a/old/x")
    assert r["ok"] and r["moved"], r
    assert ids(tdir(rec, "a/old/x") / "+log.jsonl") == [1, 2]
    assert ids(tdir(rec, "a/old/x/sub") / "+log.jsonl") == [3]
    assert (tdir(rec, "a/old/x") / "+recent.json").exists()  # written before the move
    send(rec, "a/x", 4)
    assert ids(tdir(rec, "a/x") / "+log.jsonl") == [4] and ids(tdir(rec, "a/old/x") / "+log.jsonl") == [1, 2]


def test_move_rewrites_the_topic_files_of_hashed_names(rec: Recorder) -> None:
    long_level = "L" * 300
    send(rec, f"a/x/{long_level}/t", 1)
    r = do(rec, op="move", src="a/x", dst="a/y")
    assert r["ok"] and r["topic_files"] == 1
    hashed = tdir(rec, f"a/y/{long_level}")
    assert (hashed / TOPIC_FILE).read_text() == f"a/y/{long_level}"
    assert ids(hashed / "t" / "+log.jsonl") == [1]
    assert do(rec, op="rotate", prefix="a/y")["topics"] == [f"a/y/{long_level}/t"]


@pytest.mark.parametrize("req,why", [
    ({"op": "delete", "prefix": "b/x"}, "outside shard 'a'"),
    ({"op": "delete", "prefix": "a/vip/x"}, "outside shard 'a'"),
    ({"op": "delete", "prefix": "a"}, "spans the branches of other shards: a/vip"),
    ({"op": "delete", "prefix": "a/../b"}, "'..' level"),
    ({"op": "move", "src": "a/x", "dst": "a/x/y"}, "inside one another"),
    ({"op": "move", "src": "a/x", "dst": "a/exists"}, "exists already"),
    ({"op": "move", "src": "a/none", "dst": "a/z"}, "nothing recorded"),
    ({"op": "move", "src": "a/x", "dst": "a/link/y"}, "resolves outside the root"),
    ({"op": "format"}, "unknown op"),
])
def test_refusals_change_nothing(rec: Recorder, tmp_path: Path, req: dict, why: str) -> None:
    send(rec, "a/x", 1)
    send(rec, "a/exists", 2)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert rec.store is not None
    os.symlink(outside, Path(rec.store.root) / "a" / "link")  # planted by someone with access to the root
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    r = rec.ops.handle(msgspec.json.encode(req))
    assert not r["ok"] and why in r["reason"], r
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert not list(outside.iterdir())


def test_malformed_requests_on_the_socket_are_answered(rec: Recorder, tmp_path: Path) -> None:
    path = str(tmp_path / "a.ctl")
    ch = ControlSocket(path)
    rec.ops = Operations(rec, ch)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    client.bind("")
    client.settimeout(5)
    try:
        for data, why in ((b"{nope", "malformed request"), (b"[1]", "expected a JSON object")):
            client.sendto(data, path)
            rec.ops.poll(0.0)
            assert why in json.loads(client.recv(65536))["reason"]
        assert rec.ops.next_poll == pytest.approx(0.05)
    finally:
        client.close()
        ch.close()
    assert not os.path.exists(path)


def test_the_control_topic_is_never_recorded(tmp_path: Path) -> None:
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data")}],
                      "control": {"mqtt": True, "reply_topic": "answers/{host}"}}, env={})
    r = Recorder(smap, smap.shards[0])
    r.open_store(*prepare_root(r.shard))
    for t in ("shardlog/control/web1", "shardlog/control/web1/reply", "answers/web1", "shardlog/x"):
        send(r, t, 1)
    assert r.store is not None
    r.store.close()
    assert sorted(p.parent.relative_to(tmp_path / "data").as_posix()
                  for p in (tmp_path / "data").rglob("+log.jsonl")) == ["shardlog/x"]
    assert r.counters.discarded == 3


def test_what_a_stop_left_stale_follows_a_move_and_goes_with_a_delete(rec: Recorder) -> None:
    """+recent.left (the stale +recent.json files a stop had no time for) is written by the
    next start's thread: a topic deleted before that must not get its deleted records back
    (its directory made again meanwhile), and a moved topic's file goes to its new place."""
    assert rec.store is not None
    send(rec, "a/x", 1)
    send(rec, "a/y", 2)
    old = b'[{"ts":1,"qos":1,"retain":false,"payload":{"i":%d}}]\n'
    (tdir(rec, "a") / "+recent.left").write_bytes(
        b'"a/x"\t' + old % 10 + b'"a/y"\t' + old % 20)
    assert do(rec, op="delete", prefix="a/x")["removed"]
    assert do(rec, op="move", src="a/y", dst="a/z")["moved"]
    tdir(rec, "a/x").mkdir()  # made again (a topic speaking, a user's mkdir) before the thread runs
    rec.store.start_recent_writer()
    wait_for(lambda: not (tdir(rec, "a") / "+recent.left").exists(), 10, "the thread to write what was left")
    assert not (tdir(rec, "a/x") / "+recent.json").exists()
    assert json.loads((tdir(rec, "a/z") / "+recent.json").read_bytes())[0]["payload"]["i"] == 20
