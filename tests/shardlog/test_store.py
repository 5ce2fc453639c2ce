"""The store on a real file system, without a broker: rotation, numbering across
restarts, retention, compression, +recent.json, torn-tail repair, the fd cap, and a
full disk (a real size-limited tmpfs)."""

from __future__ import annotations

import base64
import errno
import gzip
import json
import os
import subprocess
import threading
from pathlib import Path

import pytest

from shardlog.config.load import parse_map
from shardlog.config.schema import Shard
from shardlog.counters import Counters
from shardlog.records import encode_record
from shardlog.writing.compressor import Compressor
from shardlog.writing.preparer import Preparer
from shardlog.writing.store import Store
from shardlog.writing.topic_state import TopicState
from shardlog.writing.topicfiles import TopicFiles
from tests.helpers import wait_for

T0 = 1_763_815_800_000_000  # µs


def shard(**over: object) -> Shard:
    return parse_map({"shards": [{"name": "s", "prefix": "#", **over}]}, env={}).shards[0]


def make(root: Path, compress: bool = False, **over: object) -> tuple[Store, Counters]:
    c = Counters()
    sh = shard(**over)
    comp = Compressor(c) if compress else None
    return Store(sh, str(root.resolve()), str(root.resolve()), c, comp), c


def put(store: Store, states: dict[str, TopicState], topic: str, n: int, start: int = 0,
        now_us: int = T0, size: int = 100) -> list[bytes]:
    st = states.get(topic) or states.setdefault(topic, store.new_state(topic))
    lines = []
    for i in range(start, start + n):
        payload = json.dumps({"i": i, "pad": "x" * max(0, size - 20)}).encode()
        line = encode_record(now_us + i, 1, False, payload)
        store.add(st, line, i + 1)
        lines.append(line)
    return lines


def segments_of(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("+log."))


def read_all(d: Path) -> list[bytes]:
    out = []
    for name in segments_of(d):
        if name == "+log.jsonl":
            continue
        data = gzip.decompress((d / name).read_bytes()) if name.endswith(".gz") else (d / name).read_bytes()
        out.extend(data.splitlines(keepends=True))
    out.extend((d / "+log.jsonl").read_bytes().splitlines(keepends=True))
    return out


def test_size_rotation_numbering_continues_across_restarts(tmp_path: Path) -> None:
    store, c = make(tmp_path, rotate={"max_bytes": "4KiB", "max_age": None})
    states: dict[str, TopicState] = {}
    written = put(store, states, "a/b", 100)
    assert store.flush(T0, 0.0) == set()
    d = tmp_path / "a" / "b"
    segs = segments_of(d)
    assert segs[0] == "+log.00000001.jsonl" and segs[-1] == "+log.jsonl" and c.rotations == len(segs) - 1
    for name in segs:
        assert (d / name).stat().st_size <= 4096
    store.close()
    # a new process (a new store) continues the numbering and never overwrites
    store2, _ = make(tmp_path, rotate={"max_bytes": "4KiB", "max_age": None})
    written += put(store2, {}, "a/b", 100, start=100)
    store2.flush(T0, 0.0)
    segs2 = segments_of(d)
    assert set(segs) - {"+log.jsonl"} <= set(segs2)
    numbers = [int(n.split(".")[1]) for n in segs2 if n != "+log.jsonl"]
    assert numbers == list(range(1, len(numbers) + 1))
    assert read_all(d) == written  # nothing lost, nothing reordered, nothing duplicated


def test_age_rotation(tmp_path: Path) -> None:
    store, _ = make(tmp_path, rotate={"max_bytes": None, "max_age": "1h"})
    states: dict[str, TopicState] = {}
    put(store, states, "t", 3)
    store.flush(T0, 0.0)
    put(store, states, "t", 3, start=3, now_us=T0 + 10 * 60 * 10**6)
    store.flush(T0 + 10 * 60 * 10**6, 1.0)
    assert segments_of(tmp_path / "t") == ["+log.jsonl"]
    put(store, states, "t", 3, start=6, now_us=T0 + 3601 * 10**6)
    store.flush(T0 + 3601 * 10**6, 2.0)
    assert segments_of(tmp_path / "t") == ["+log.00000001.jsonl", "+log.jsonl"]
    assert len((tmp_path / "t" / "+log.jsonl").read_bytes().splitlines()) == 3


def test_age_rotation_survives_restart(tmp_path: Path) -> None:
    store, _ = make(tmp_path, rotate={"max_bytes": None, "max_age": "1h"})
    put(store, {}, "t", 2)
    store.flush(T0, 0.0)
    store.close()
    store2, _ = make(tmp_path, rotate={"max_bytes": None, "max_age": "1h"})
    put(store2, {}, "t", 1, start=2, now_us=T0 + 2 * 3600 * 10**6)
    store2.flush(T0 + 2 * 3600 * 10**6, 0.0)  # the first record's ts is read back from the file
    assert segments_of(tmp_path / "t") == ["+log.00000001.jsonl", "+log.jsonl"]


def test_retention_and_compression(tmp_path: Path) -> None:
    store, c = make(tmp_path, compress=True, rotate={"max_bytes": "2KiB", "max_age": None},
                    retention={"max_segments": 3})
    states: dict[str, TopicState] = {}
    written = put(store, states, "r", 200)
    store.flush(T0, 0.0)
    d = tmp_path / "r"
    assert store.compressor is not None
    wait_for(lambda: not any(n.endswith(".jsonl") and n != "+log.jsonl" for n in segments_of(d))
             and not any(n.endswith(".tmp") for n in os.listdir(d)), 10, "rotated segments to be gzipped")
    segs = segments_of(d)
    rotated = [n for n in segs if n != "+log.jsonl"]
    assert len(rotated) == 3 and all(n.endswith(".jsonl.gz") for n in rotated)
    assert c.deleted_segments > 0 and c.compressed >= 3
    kept = read_all(d)
    assert kept == written[len(written) - len(kept):]  # the newest records, in order
    store.compressor.stop(5)


def test_recent_file_holds_the_last_n_oldest_first(tmp_path: Path) -> None:
    store, _ = make(tmp_path, recent=4, recent_interval=0)
    states: dict[str, TopicState] = {}
    lines = put(store, states, "chat/room42", 10)
    store.flush(T0, 0.0)
    recent = json.loads((tmp_path / "chat" / "room42" / "+recent.json").read_bytes())
    assert recent == [json.loads(x) for x in lines[-4:]]
    # after a restart the recent buffer is rebuilt from the log, also across a rotation
    store.close()
    store2, _ = make(tmp_path, recent=4, recent_interval=0, rotate={"max_bytes": "1KiB", "max_age": None})
    more = put(store2, {}, "chat/room42", 12, start=10)  # rotates: current segment holds few lines
    store2.flush(T0, 0.0)
    recent = json.loads((tmp_path / "chat" / "room42" / "+recent.json").read_bytes())
    assert recent == [json.loads(x) for x in (lines + more)[-4:]]


def test_recent_interval_defers_but_close_writes(tmp_path: Path) -> None:
    store, _ = make(tmp_path, recent=2, recent_interval=60)
    states: dict[str, TopicState] = {}
    put(store, states, "t", 1)
    store.flush(T0, 100.0)  # first write is immediate
    lines = put(store, states, "t", 3, start=1)
    store.flush(T0, 101.0)  # within the interval: held back
    path = tmp_path / "t" / "+recent.json"
    assert len(json.loads(path.read_bytes())) == 1
    store.sweep_recent(161.0)
    assert json.loads(path.read_bytes()) == [json.loads(x) for x in lines[-2:]]


def test_a_sweep_stops_at_the_first_recent_file_the_disk_refuses(tmp_path: Path) -> None:
    """A full disk and many stale +recent.json: one refused write per sweep, not one per
    file (the first refusal in a row is counted in errors and logged); once the disk takes
    them again, they are all written."""
    store, c = make(tmp_path, recent=2, recent_interval=60)
    states: dict[str, TopicState] = {}
    for k in range(50):
        put(store, states, f"t/{k}", 1)
    store.flush(T0, 100.0)
    for k in range(50):
        put(store, states, f"t/{k}", 1, start=1)
    store.flush(T0, 101.0)  # held back by recent_interval: 50 stale
    assert len(store.recent.queue) == 50
    real, tries = store.files.write_recent, []

    def full(st: TopicState) -> None:
        tries.append(st)
        raise OSError(errno.ENOSPC, "No space left on device")

    store.files.write_recent = full  # type: ignore[method-assign]
    store.sweep_recent(161.0)
    store.sweep_recent(161.1)
    # one refused write per sweep, not one per file; the run of refusals counts one error
    assert len(tries) == 2 and c.errors == 1 and len(store.recent.queue) == 50
    store.files.write_recent = real  # type: ignore[method-assign]
    store.sweep_recent(161.2)
    assert not store.recent.queue
    assert all(len(json.loads((tmp_path / "t" / str(k) / "+recent.json").read_bytes())) == 2 for k in range(50))


def test_torn_and_garbage_tail_is_cut_and_kept_aside(tmp_path: Path) -> None:
    store, _ = make(tmp_path)
    good = put(store, {}, "t", 5)
    store.flush(T0, 0.0)
    store.close()
    log = tmp_path / "t" / "+log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"ts":1,"qos":1,"retain":false,"payload":{"torn\x00\x00\n\x00garbage\n{"ts":2,"q')
    store2, c = make(tmp_path)
    more = put(store2, {}, "t", 2, start=5)
    store2.flush(T0, 0.0)
    assert log.read_bytes().splitlines(keepends=True) == good + more
    assert c.repaired == 1 and c.quarantined == 1
    q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
    assert q[0]["reason"].startswith("torn tail") and b"garbage" in base64.b64decode(q[0]["payload"])


def test_torn_huge_last_line(tmp_path: Path) -> None:
    store, _ = make(tmp_path)
    good = put(store, {}, "t", 3)
    store.flush(T0, 0.0)
    store.close()
    log = tmp_path / "t" / "+log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"ts":9,"qos":0,"retain":false,"payload":"' + b"x" * 300_000)  # no newline: torn
    store2, c = make(tmp_path)
    st = store2.new_state("t")
    store2.add(st, good[0], 0)
    store2.flush(T0, 0.0)
    assert log.read_bytes().splitlines(keepends=True) == good + [good[0]] and c.repaired == 1


def test_fd_cap_with_many_topics(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    store, c = make(tmp_path, max_open_files=16)
    states: dict[str, TopicState] = {}
    for i in range(3000):
        put(store, states, f"many/t{i}", 1)
        if i % 500 == 499:
            store.flush(T0, float(i))
            assert c.topics_open <= 16
            assert len(os.listdir("/proc/self/fd")) <= before + 16
    store.flush(T0, 9999.0)
    assert c.messages == 3000 and len(os.listdir(tmp_path / "many")) == 3000
    store.close()
    assert len(os.listdir("/proc/self/fd")) == before


def test_unstorable_topic_is_quarantined_not_lost(tmp_path: Path) -> None:
    store, c = make(tmp_path)
    (tmp_path / "afile").write_text("a file where a directory should be")
    states: dict[str, TopicState] = {}
    put(store, states, "afile/x", 2)
    put(store, states, "fine", 1)
    assert store.flush(T0, 0.0) == set()  # quarantined records count as written: acked
    assert c.quarantined == 2 and c.messages == 1
    q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
    assert all("cannot" in r["reason"] for r in q)


@pytest.fixture
def tiny_fs(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_holds_acks_writes_no_partial_line_and_recovers(tiny_fs: Path) -> None:
    store, c = make(tiny_fs, recent=0)
    states: dict[str, TopicState] = {}
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * 200_000)
    written: list[bytes] = []
    held: set[int] = set()
    for batch in range(20):
        written += put(store, states, "t", 50, start=batch * 50, size=200)
        held = store.flush(T0, float(batch))
        if held:
            break
    assert held, "the small file system never filled up"
    assert c.degraded and "t" in (c.degraded_reason or "")
    data = (tiny_fs / "t" / "+log.jsonl").read_bytes()
    assert data.endswith(b"\n")  # no partial line
    on_disk = data.splitlines(keepends=True)
    assert on_disk == written[: len(on_disk)] and len(on_disk) < len(written)
    assert held == {i + 1 for i in range(len(on_disk), len(written))}  # exactly the unwritten ones
    filler.unlink()  # space comes back
    assert store.flush(T0, 100.0) == set()
    assert not c.degraded
    assert (tiny_fs / "t" / "+log.jsonl").read_bytes().splitlines(keepends=True) == written


@pytest.mark.parametrize("mode", ["batch", "always"])
def test_fsync_modes_write_everything(tmp_path: Path, mode: str) -> None:
    store, c = make(tmp_path, fsync=mode, rotate={"max_bytes": "2KiB", "max_age": None})
    states: dict[str, TopicState] = {}
    written = put(store, states, "a/b", 50) + put(store, states, "a/b", 1, start=50)
    assert store.flush(T0, 0.0) == set()
    assert read_all(tmp_path / "a" / "b") == written and c.rotations > 0 and not c.degraded


def test_preparer_holds_new_topics_until_prepared_and_keeps_order(tmp_path: Path) -> None:
    """New topics are prepared in a background thread: their records wait (their ids
    are held, so not acknowledged) while a known topic's records are written at once."""
    store, c = make(tmp_path)
    store.start_preparer()
    states: dict[str, TopicState] = {}
    old = put(store, states, "old", 3)
    assert store.flush(T0, 0.0, wait=True) == set()  # wait: prepared in the flush
    old += put(store, states, "old", 2, start=3)
    new = {f"new/{i}": put(store, states, f"new/{i}", 2, start=10 * i + 100) for i in range(50)}
    held = store.flush(T0, 1.0)
    assert held == {i + 1 for i in range(100, 600) if i % 10 < 2}  # every new topic's ids
    assert (tmp_path / "old" / "+log.jsonl").read_bytes().splitlines(keepends=True) == old
    for i in range(50):  # more records while they wait: appended after the first ones
        new[f"new/{i}"] += put(store, states, f"new/{i}", 1, start=10 * i + 102)
    assert store.preparer is not None
    store.preparer.wait_idle()
    d = tmp_path / "new" / "0"
    # prepared: the directory and +log.jsonl, no +recent.json yet (readers never see an empty
    # one; its writer, off the recording thread, makes it with the first records)
    assert (d / "+log.jsonl").exists() and not (d / "+recent.json").exists()
    assert store.flush(T0, 2.0) == set()
    for topic, lines in new.items():
        assert (tmp_path / topic / "+log.jsonl").read_bytes().splitlines(keepends=True) == lines
    assert json.loads((d / "+recent.json").read_bytes())[-1]["payload"]["i"] == 102
    assert c.messages == 5 + 150 and not store.dirty
    store.close()


def test_preparer_repairs_and_quarantines_as_the_sync_path_does(tmp_path: Path) -> None:
    store, _ = make(tmp_path)
    good = put(store, {}, "t", 5)
    store.flush(T0, 0.0)
    store.close()
    log = tmp_path / "t" / "+log.jsonl"
    with open(log, "ab") as f:
        f.write(b'{"ts":1,"qos":1,"retain":false,"payload":{"torn\x00\n{"ts":2,"q')
    (tmp_path / "afile").write_text("a file where a directory should be")
    store2, c = make(tmp_path)
    store2.start_preparer()
    states: dict[str, TopicState] = {}
    more = put(store2, states, "t", 2, start=5)
    put(store2, states, "afile/x", 2, start=7)
    held = store2.flush(T0, 0.0)
    assert held == {6, 7, 8, 9}
    assert store2.preparer is not None
    store2.preparer.wait_idle()
    assert store2.flush(T0, 1.0) == set()  # quarantined records count as written
    assert store2.released == [6, 7, 8, 9]  # held before, written or quarantined now: ack them
    assert log.read_bytes().splitlines(keepends=True) == good + more
    assert c.repaired == 1 and c.quarantined == 3 and c.messages == 2
    q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
    assert sorted(r["reason"].split(" ")[0] for r in q) == ["cannot", "cannot", "torn"]
    store2.close()


def stalled_preparer(store: Store, monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Start the store's preparer with its thread held until the returned event is set."""
    gate = threading.Event()
    prepare = Preparer.prepare
    monkeypatch.setattr(Preparer, "prepare", lambda self, st: (gate.wait(30), prepare(self, st))[1])
    store.start_preparer()
    return gate


def test_waiting_topics_cost_a_flush_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Topics that wait for the preparer are out of the flush's list: a flush looks only
    at topics with new records (or handed back), and returns only ids it newly holds;
    the held ids come back in ``released`` once written, each exactly once."""
    store, c = make(tmp_path)
    gate = stalled_preparer(store, monkeypatch)
    looked: list[str] = []
    waits = Store._waits
    monkeypatch.setattr(Store, "_waits", lambda self, st, *a: (looked.append(st.topic), waits(self, st, *a))[1])
    states: dict[str, TopicState] = {}
    lines = {f"n/{i}": put(store, states, f"n/{i}", 2, start=2 * i) for i in range(1000)}
    assert store.flush(T0, 0.0) == set(range(1, 2001))
    assert len(looked) == 1000 and store.pending_records() == 2000 and not store.dirty
    looked.clear()
    for k in range(20):  # many flushes while 1,000 topics wait: none of them is looked at
        assert store.flush(T0, 1.0 + k) == set() and store.released == []
    assert looked == [] and store.pending_records() == 2000
    lines["n/7"] += put(store, states, "n/7", 1, start=5000)  # a waiting topic gets a record
    assert store.flush(T0, 30.0) == {5001}  # only the new id; n/7 alone is looked at
    assert looked == ["n/7"] and store.pending_records() == 2001
    gate.set()
    assert store.preparer is not None
    store.preparer.wait_idle()
    assert store.flush(T0, 40.0) == set()
    assert sorted(store.released) == list(range(1, 2001)) + [5001]  # every held id, once
    assert store.pending_records() == 0 and not store.waiting and c.messages == 2001
    for topic, want in lines.items():
        assert (tmp_path / topic / "+log.jsonl").read_bytes().splitlines(keepends=True) == want
    store.released = []  # taken (acknowledged) by the caller
    assert store.flush(T0, 50.0) == set() and store.released == []
    store.close()


def test_waiting_topic_is_not_evictable_and_forget_mids_clears_held(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = make(tmp_path)
    gate = stalled_preparer(store, monkeypatch)
    states: dict[str, TopicState] = {}
    want = put(store, states, "w", 3)
    assert store.flush(T0, 0.0) == {1, 2, 3}
    assert not store.evictable(states["w"])  # out of dirty, but its records wait
    store.forget_mids()  # the connection is gone: the broker redelivers, the lines stay
    gate.set()
    assert store.flush(T0, 1.0, wait=True) == set() and store.released == []
    assert (tmp_path / "w" / "+log.jsonl").read_bytes().splitlines(keepends=True) == want
    assert store.evictable(states["w"])  # written by the preparer, its descriptor closed
    store.close()


def test_preparer_writes_a_new_topics_first_records_itself(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The records a new topic had when it was handed to the preparer are written by its
    thread (the recording thread's write is not called for them); their ids are held until
    a flush takes the result, then released; records that arrived meanwhile follow them in
    the file, and later ones are flushed as any others (issue 21)."""
    store, c = make(tmp_path)
    gate = stalled_preparer(store, monkeypatch)
    writes: list[str] = []
    write = TopicFiles.write
    monkeypatch.setattr(TopicFiles, "write", lambda self, st, now: (writes.append(st.topic), write(self, st, now))[1])
    states: dict[str, TopicState] = {}
    want = {f"n/{i}": put(store, states, f"n/{i}", 2, start=10 * i) for i in range(20)}
    assert store.flush(T0, 0.0) == {10 * i + k + 1 for i in range(20) for k in range(2)}
    want["n/3"] += put(store, states, "n/3", 1, start=32)  # while it is being prepared
    assert store.flush(T0, 1.0) == {33} and store.pending_records() == 41
    gate.set()
    assert store.preparer is not None
    store.preparer.wait_idle()
    log = tmp_path / "n" / "5" / "+log.jsonl"
    assert log.read_bytes().splitlines(keepends=True) == want["n/5"]  # before any flush took it
    assert store.released == [] and c.messages == 0
    assert store.flush(T0, 2.0) == set()
    assert writes == ["n/3"]  # only the record that came during the preparation
    assert sorted(store.released) == sorted({10 * i + k + 1 for i in range(20) for k in range(2)} | {33})
    store.released = []
    assert c.messages == 41 and store.pending_records() == 0 and not store.waiting
    for i in range(20):  # later records: through the recording thread's write, behind them
        want[f"n/{i}"] += put(store, states, f"n/{i}", 1, start=10 * i + 5)
    assert store.flush(T0, 3.0) == set() and len(writes) == 21
    for topic, lines in want.items():
        assert (tmp_path / topic / "+log.jsonl").read_bytes().splitlines(keepends=True) == lines
    assert json.loads((tmp_path / "n" / "3" / "+recent.json").read_bytes())[-1]["payload"]["i"] == 35
    store.close()


@pytest.mark.parametrize("cut_refused", [False, True], ids=["cut-back", "cut-back-refused"])
def test_preparer_write_refused_leaves_them_to_the_recording_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   cut_refused: bool) -> None:
    """A write the disk refuses in the preparer thread leaves no partial line; its records
    go back, still held, in front of the newer ones, and the next flush writes them. When
    the disk refuses the cut back too, the recording thread's open cuts the partial line
    (quarantined) before it writes them."""
    import shardlog.writing.preparer as preparer_mod

    store, _ = make(tmp_path)
    gate = stalled_preparer(store, monkeypatch)
    real_write = os.write
    calls: list[int] = []

    def half_then_full(fd: int, data: bytes) -> int:  # half of it written, then ENOSPC
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(preparer_mod.os, "write", half_then_full, raising=True)
    real_truncate = os.ftruncate
    if cut_refused:
        def refused(fd: int, size: int) -> None:
            raise OSError(errno.EIO, "Input/output error")
        monkeypatch.setattr(preparer_mod.os, "ftruncate", refused)
    states: dict[str, TopicState] = {}
    want = put(store, states, "w", 3)
    assert store.flush(T0, 0.0) == {1, 2, 3}
    want += put(store, states, "w", 1, start=3)
    assert store.flush(T0, 1.0) == {4}
    gate.set()
    assert store.preparer is not None
    store.preparer.wait_idle()
    monkeypatch.setattr(preparer_mod.os, "write", real_write)
    monkeypatch.setattr(preparer_mod.os, "ftruncate", real_truncate)
    left = (tmp_path / "w" / "+log.jsonl").read_bytes()
    assert len(calls) == 2 and (left != b"" if cut_refused else left == b"")  # cut back, unless refused
    assert store.flush(T0, 2.0) == set() and store.released == [1, 2, 3, 4]
    assert (tmp_path / "w" / "+log.jsonl").read_bytes().splitlines(keepends=True) == want
    if cut_refused:  # the partial line: cut at the next open, kept in the quarantine
        q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
        assert [r["reason"] for r in q] == ["torn tail of w"]
    store.close()


def test_forget_mids_while_the_preparer_writes_releases_nothing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection went while a topic's first records were with the preparer: they are
    written, but their ids (of the old connection) are never released."""
    store, c = make(tmp_path)
    gate = stalled_preparer(store, monkeypatch)
    states: dict[str, TopicState] = {}
    want = put(store, states, "w", 2)
    assert store.flush(T0, 0.0) == {1, 2}
    store.forget_mids()
    gate.set()
    assert store.preparer is not None
    store.preparer.wait_idle()
    assert store.flush(T0, 1.0) == set() and store.released == [] and c.messages == 2
    assert (tmp_path / "w" / "+log.jsonl").read_bytes().splitlines(keepends=True) == want
    store.close()


def test_released_ids_survive_a_flush_that_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An fsync failure raises out of flush: ids released before it are kept for the caller."""
    store, _ = make(tmp_path, fsync="batch")
    gate = stalled_preparer(store, monkeypatch)
    states: dict[str, TopicState] = {}
    put(store, states, "w", 2)
    assert store.flush(T0, 0.0) == {1, 2}
    gate.set()
    assert store.preparer is not None
    store.preparer.wait_idle()
    monkeypatch.setattr(TopicFiles, "sync", lambda self, written: (_ for _ in ()).throw(OSError(5, "fsync failed")))
    with pytest.raises(OSError):
        store.flush(T0, 1.0)
    monkeypatch.undo()
    put(store, states, "w", 1, start=2)
    assert store.flush(T0, 2.0) == set() and store.released == [1, 2]  # not lost, not repeated
    store.close()


@pytest.mark.parametrize("prepared", [False, True], ids=["in the flush", "by the preparer"])
@pytest.mark.parametrize("kind", ["fifo", "fifo with a reader", "symlink out of the root", "directory"])
def test_a_current_segment_that_is_no_regular_file_is_quarantined_never_waited_on(
        tmp_path: Path, kind: str, prepared: bool) -> None:
    """A FIFO (with or without a reader), a symlink leading out of the root or a directory
    where +log.jsonl should be: the topic's records go to the quarantine file with the
    reason, the flush returns at once (no blocking open), nothing is written through it."""
    root = tmp_path / "root"
    (root / "t").mkdir(parents=True)
    seg = root / "t" / "+log.jsonl"
    outside = tmp_path / "outside.jsonl"
    reader = None
    if kind.startswith("fifo"):
        os.mkfifo(seg)
        if kind == "fifo with a reader":
            reader = os.open(seg, os.O_RDONLY | os.O_NONBLOCK)
    elif kind == "directory":
        seg.mkdir()
    else:
        outside.write_bytes(b"")
        seg.symlink_to(outside)
    store, c = make(root)
    if prepared:
        store.start_preparer()
    states: dict[str, TopicState] = {}
    lines = put(store, states, "t", 3)
    done = threading.Event()

    def flush() -> None:
        store.flush(T0, 0.0, wait=True)
        done.set()

    threading.Thread(target=flush, daemon=True).start()
    assert done.wait(10), "the flush hung on a segment that is no regular file"
    q = [json.loads(x) for x in (root / "+quarantine.jsonl").read_bytes().splitlines()]
    assert len(q) == 3 and all("not a regular file" in r["reason"] or "Is a directory" in r["reason"] for r in q), q
    assert [base64.b64decode(r["payload"]) for r in q] == lines
    if kind == "symlink out of the root":
        assert outside.read_bytes() == b"", "a record was written through the symlink, out of the root"
    if reader is not None:
        assert os.read(reader, 4096) == b""
        os.close(reader)
    store.close()


def test_a_waiting_flush_prepares_queued_topics_in_its_own_thread(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """While the preparer thread is busy (here: held on one topic), wait_idle prepares the
    other queued topics in the calling thread, and their records are in their files."""
    store, _ = make(tmp_path)
    gate = threading.Event()
    prepare = Preparer.prepare
    monkeypatch.setattr(Preparer, "prepare", lambda self, st: (
        threading.current_thread().name.startswith("preparer") and gate.wait(30), prepare(self, st))[1])
    store.start_preparer()
    states: dict[str, TopicState] = {}
    want = {f"q/{i}": put(store, states, f"q/{i}", 1, start=i) for i in range(30)}
    assert len(store.flush(T0, 0.0)) == 30
    assert store.preparer is not None
    waiter = threading.Thread(target=store.preparer.wait_idle)
    waiter.start()
    wait_for(lambda: sum(type(st.prep).__name__ == "Prepared" for st in states.values()) == 29, 20,
             "29 of the 30 topics prepared by the waiting thread (the preparer's is held)")
    gate.set()
    waiter.join(30)
    assert not waiter.is_alive() and store.flush(T0, 1.0) == set() and len(store.released) == 30
    for topic, lines in want.items():
        assert (tmp_path / topic / "+log.jsonl").read_bytes().splitlines(keepends=True) == lines
    store.close()


def test_a_write_that_cannot_be_cut_back_is_cut_at_the_next_open(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Half a batch written, then ENOSPC, and the disk refuses even the ftruncate that would
    cut it back: the partial line must not stay in the middle of the file. The topic is
    reopened as on its first open: the partial line is cut off and quarantined, the batch
    written again after the last whole record, and acknowledged then."""
    from shardlog.writing import topicfiles
    store, c = make(tmp_path)
    states: dict[str, TopicState] = {}
    want = put(store, states, "w", 1)
    assert store.flush(T0, 0.0) == set()
    real_write, real_truncate = os.write, os.ftruncate

    calls: list[int] = []

    def part_then_full(fd: int, data: bytes) -> int:  # a part of a line written, then ENOSPC
        calls.append(fd)
        if len(calls) == 1:
            return real_write(fd, bytes(data)[:len(data) // 2 + 5])
        raise OSError(errno.ENOSPC, "No space left on device")

    def refused(fd: int, size: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(topicfiles.os, "write", part_then_full)
    monkeypatch.setattr(topicfiles.os, "ftruncate", refused)
    want += put(store, states, "w", 2, start=1)
    assert store.flush(T0, 1.0) == {2, 3}
    monkeypatch.setattr(topicfiles.os, "write", real_write)
    monkeypatch.setattr(topicfiles.os, "ftruncate", real_truncate)
    torn = (tmp_path / "w" / "+log.jsonl").read_bytes()
    assert len(torn) > len(want[0]) and not torn.endswith(b"\n")  # the partial line is there
    assert store.flush(T0, 2.0) == set() and store.take_released() == [2, 3]
    assert (tmp_path / "w" / "+log.jsonl").read_bytes().splitlines(keepends=True) == want
    assert c.repaired == 1
    q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
    assert len(q) == 1 and q[0]["reason"] == "torn tail of w"
    store.close()
