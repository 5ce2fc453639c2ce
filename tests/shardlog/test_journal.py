"""The journal (journal.enabled): its files, the materializer, and exact recovery.

The recovery claim (shardlog/writing/materializer.py): a journal record reaches its topic file
exactly once, whatever point the process is killed at. Proved here by SIGKILLing a real
materializing process at random points over 100,000 topics and comparing every topic file
with the journal, record by record; and end to end through a real mosquitto.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import msgspec
import pytest

from shardlog.config.load import parse_map
from shardlog.counters import Counters
from shardlog.records import encode_record
from shardlog.writing import journal
from shardlog.writing.journal import Checkpoint, JournalReader, JournalWriter, Position
from shardlog.writing.materializer import NEW_PER_STEP, Materializer
from shardlog.writing.store import Store
from tests.helpers import FastPublisher, RecorderProc, wait_for, write_map

T0 = time.time_ns() // 1000  # records of now: a year-old first record would rotate by max_age
SCALE = int(os.environ.get("SHARDLOG_TEST_SCALE", "1"))
REPO = Path(__file__).resolve().parents[2]


# -- pure parts ------------------------------------------------------------------------------


def test_pure_helpers() -> None:
    assert journal.segment_numbers(["+journal.00000002.log", "+journal.00000010.log", "+journal.x.log",
                                    "+journal.checkpoint", "x"]) == [2, 10]
    assert journal.record_ts(b'{"ts":1763815800123456,"qos":1,"retain":false,"payload":1}\n') == 1763815800123456
    assert journal.complete(b"a\nb\nc") == 4 and journal.complete(b"abc") == 0
    assert journal.parse_checkpoint(b"3 120 99\n") == Checkpoint(Position(3, 120), 99)
    assert journal.parse_checkpoint(b"garbage") is None and journal.parse_checkpoint(b"") is None
    # lag: within one segment, and across finished ones (their sizes known)
    assert journal.lag_bytes(Position(2, 500), Position(2, 100), {}) == 400
    assert journal.lag_bytes(Position(4, 10), Position(2, 100), {2: 300, 3: 1000}) == 200 + 1000 + 10


def line(topic: str, ts: int, i: int) -> bytes:
    return json.dumps(topic).encode() + b"\t" + encode_record(ts, 1, False, b'{"i":%d}' % i)


def test_writer_cuts_a_torn_line_and_the_reader_crosses_segments(tmp_path: Path) -> None:
    w = JournalWriter(str(tmp_path), 1024, False, None)
    lines = [line(f"t/{i % 7}", T0 + i, i) for i in range(200)]
    for k in range(0, 200, 10):
        w.write(b"".join(lines[k:k + 10]))
    assert w.segment > 3  # rolled over at 1 KiB
    w.write(b'"t/1"\t{"ts":9')  # a write torn by a crash (no newline)
    w.close()
    w2 = JournalWriter(str(tmp_path), 1024, False, None)
    assert w2.last_ts == T0 + 199  # the torn piece is cut, the last whole record's ts kept
    r = JournalReader(str(tmp_path), Position(1, 0))
    got = b""
    while True:
        data, _ = r.read(300, w2.end)
        if not data:
            break
        got += data
    assert got == b"".join(lines)
    # a checkpoint in a segment that is gone: the writer starts after it, ts never go back
    w2.close()
    for p in tmp_path.glob("+journal.*.log"):
        p.unlink()
    w3 = JournalWriter(str(tmp_path), 1024, False, Checkpoint(Position(9, 40), T0 + 500))
    assert w3.segment == 10 and w3.last_ts == T0 + 500
    w3.close()


# -- the materializer in process ------------------------------------------------------------


def make_store(root: Path, **settings: object) -> tuple[Store, Counters]:
    smap = parse_map({"defaults": {"root": str(root), **settings},
                      "shards": [{"name": "s", "prefix": "#"}]}, env={})
    c = Counters(shard="s")
    real = os.path.realpath(root)
    return Store(smap.shards[0], real, real, c), c


def write_journal(root: Path, records: int, topics: int, segment_bytes: int = 64 << 20) -> dict[str, list[bytes]]:
    """A journal of ``records`` round-robin over ``topics``; the records each topic must get."""
    root.mkdir(parents=True, exist_ok=True)
    w = JournalWriter(str(root), segment_bytes, False, None)
    want: dict[str, list[bytes]] = defaultdict(list)
    batch = []
    for i in range(records):
        topic = f"j/{i % topics:06d}"
        rec = encode_record(T0 + i, 1, False, b'{"i":%d}' % i)
        want[topic].append(rec)
        batch.append(json.dumps(topic).encode() + b"\t" + rec)
        if len(batch) == 5000:
            w.write(b"".join(batch))
            batch = []
    if batch:
        w.write(b"".join(batch))
    w.close()
    return want


def materialize(root: Path, live: bool = False, **settings: object) -> Counters:
    store, c = make_store(root, **settings)
    store.start_preparer()
    cp = journal.read_checkpoint(str(root))
    w = JournalWriter(str(root), 64 << 20, False, cp)
    m = Materializer(store, w, cp, 4096, 12_000)
    if live:
        m.replay_end = m.reader.pos
    m.start()
    m.stop()
    assert m.catch_up()
    store.close()
    w.close()
    return c


def topic_files(root: Path) -> dict[str, list[bytes]]:
    got: dict[str, list[bytes]] = {}
    for p in root.rglob("+log.jsonl"):
        got[p.parent.relative_to(root).as_posix()] = p.read_bytes().splitlines(keepends=True)
    return got


def test_materializes_every_record_once_in_order_then_deletes_the_journal(tmp_path: Path) -> None:
    root = tmp_path / "data"
    want = write_journal(root, 6000, 300, segment_bytes=64 * 1024)
    c = materialize(root, live=True)
    assert topic_files(root) == want and c.messages == 6000
    recent = json.loads((root / "j" / "000007" / "+recent.json").read_bytes())
    assert [r["payload"]["i"] for r in recent] == [i * 300 + 7 for i in range(14, 20)]
    cp = journal.read_checkpoint(str(root))
    assert cp is not None and cp.last_ts == T0 + 5999
    left = journal.segment_numbers(os.listdir(root))
    assert 1 not in left and min(left) == cp.pos.segment  # those wholly before it are deleted
    # a second start replays nothing twice
    materialize(root)
    assert topic_files(root) == want


def test_replay_skips_what_is_on_disk_and_writes_the_rest(tmp_path: Path) -> None:
    """A crash after some topic files were written and before the checkpoint: the files
    hold a prefix of each topic's records (cut at any record); replay completes them."""
    root = tmp_path / "data"
    want = write_journal(root, 3000, 50)
    materialize(root, live=True)
    (root / journal.CHECKPOINT).unlink()  # as if killed before the first checkpoint
    rng = random.Random(7)
    for topic, recs in want.items():
        keep = rng.randrange(len(recs) + 1)
        (root / topic / "+log.jsonl").write_bytes(b"".join(recs[:keep]))
    (root / "j" / "000003" / "+log.jsonl").write_bytes(b"".join(want["j/000003"][:5]) + b'{"ts":17')  # torn
    materialize(root)
    assert topic_files(root) == want


def test_a_burst_of_new_topics_is_taken_in_steps_and_known_topics_go_on(tmp_path: Path) -> None:
    """A chunk of the journal full of new topics: one step takes up NEW_PER_STEP of them
    (the rest wait, set aside, in order), and the known topic's records among them are all
    written by that step, before the new topics are prepared."""
    root = tmp_path / "data"
    root.mkdir()
    store, c = make_store(root)
    store.start_preparer()
    w = JournalWriter(str(root), 64 << 20, False, None)
    m = Materializer(store, w, None, 100_000, 200_000)
    first = line("known/k", T0, -1)
    w.write(first)
    assert m.catch_up() and (root / "known" / "k" / "+log.jsonl").exists()
    burst, ts = [], T0 + 1
    for i in range(3 * NEW_PER_STEP):
        if i % 100 == 0:
            burst.append(line("known/k", ts, i))
            ts += 1
        burst.append(line(f"new/{i:05d}", ts, i))
        ts += 1
    w.write(b"".join(burst))
    m.step()
    assert sum(1 for k in m.states if k.startswith(b'"new/')) == NEW_PER_STEP
    assert list(m.deferred)[0] == b'"new/%05d"' % NEW_PER_STEP and len(m.deferred) == 2 * NEW_PER_STEP
    on_disk = (root / "known" / "k" / "+log.jsonl").read_bytes().splitlines(keepends=True)
    want_known = [b.split(b"\t", 1)[1] for b in [first] + burst if b.startswith(b'"known/')]
    assert on_disk == want_known, "the known topic waited for the new ones"
    assert m.done < w.end  # the checkpoint stays before the records set aside
    assert m.catch_up() and m.done == w.end and not m.blocked
    store.close()
    w.close()
    got = topic_files(root)
    assert len(got) == 1 + 3 * NEW_PER_STEP and c.messages == 1 + len(burst)
    assert got["new/05999"] == [burst[-1].split(b"\t", 1)[1]]


_CHILD = """
import os, sys, time
from shardlog.config.load import parse_map
from shardlog.recording.loop import _raise_fd_limit
from shardlog.counters import Counters
from shardlog.writing import journal
from shardlog.writing.journal import JournalWriter
from shardlog.writing.materializer import NEW_PER_STEP, Materializer
from shardlog.writing.store import Store
root = sys.argv[1]
smap = parse_map({"defaults": {"root": root, "max_open_files": 4096},
                  "shards": [{"name": "s", "prefix": "#"}]}, env={})
_raise_fd_limit(4096 + 64)
c = Counters(shard="s")
store = Store(smap.shards[0], os.path.realpath(root), os.path.realpath(root), c)
store.start_preparer()
cp = journal.read_checkpoint(root)
w = JournalWriter(root, 64 << 20, False, cp)
m = Materializer(store, w, cp, 8192, 12000)
m.start()
print("started", flush=True)
while m.done < w.end and m.thread.is_alive():
    print(c.messages, flush=True)  # records this run wrote: the test kills at a random count
    time.sleep(0.01)
m.stop()
m.catch_up()
store.close()
print("done", flush=True)
"""


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    """100,000 topics, 2 records each; the materializing process is SIGKILLed at random
    points (mid-creation of directories, mid-write, mid-checkpoint: wherever it is), then
    restarted, until one run finishes. Every topic file must equal its journal records."""
    topics = 100_000 * SCALE
    root = tmp_path / "data"
    want = write_journal(root, 2 * topics, topics)
    rng = random.Random(int(os.environ.get("SHARDLOG_TEST_SEED", "12")))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    kills = 0
    for _attempt in range(30):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(root)],
                                stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"started\n"
        # killed once this run has written a random number of records (mid-flush, between
        # topics, while +recent.json or the checkpoint is being replaced...), 5 times
        kill_after = rng.randrange(1, 40_000) if kills < 5 else None
        out = b""
        for raw in proc.stdout:
            if raw == b"done\n":
                out = raw
                break
            if kill_after is not None and int(raw) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                break
        rc = proc.wait(600)
        if rc == -signal.SIGKILL:
            kills += 1
            continue
        assert rc == 0 and out == b"done\n", f"the materializer exited with {rc}"
        break
    else:
        pytest.fail("the materializer never finished")
    assert kills == 5, "every kill should have hit a running materializer"
    got = topic_files(root)
    assert len(got) == topics
    bad = [t for t, recs in want.items() if got.get(t) != recs]
    assert not bad, f"{len(bad)} topic file(s) differ from the journal, e.g. {bad[0]}: {got.get(bad[0])}"


# -- end to end: a real broker, a real recorder, real signals --------------------------------


def test_a_journaled_shard_killed_mid_stream_loses_nothing(tmp_path: Path, broker, recorders) -> None:
    """QoS 1 messages over 2,000 topics; the journaled recorder is SIGKILLed three times at
    random points of the stream and restarted: every message is in its topic file, and
    the duplicates are no more than the broker redelivered."""
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "j", "prefix": "j"}],
                  journal={"enabled": True})
    rec = RecorderProc(m, "j", tmp_path)
    recorders.append(rec)
    rec.start()
    n, topics = 30_000, 2_000
    pub = FastPublisher(broker.port, client_id=f"jpub-{os.getpid()}")
    rng = random.Random(5)
    kill_at = sorted(rng.sample(range(2_000, n - 2_000), 3))
    redelivered = 0
    sent = 0
    try:
        for k in [*kill_at, n]:
            pub.publish_many([(f"j/{i % topics}", b'{"i":%d}' % i) for i in range(sent, k)])
            sent = k
            if k < n:
                # this run has written stats after a flush (so they count what it got redelivered)
                wait_for(lambda: (rec.stats() or Counters()).acked > 0, 30, "the run to acknowledge")
                rec.kill()
                redelivered += (rec.stats() or Counters()).redelivered
                rec.start()
        pub.wait_acked(120)
    finally:
        pub.close()
    data = tmp_path / "data"

    def all_there() -> bool:
        s = rec.stats()
        return s is not None and s.journal_lag_bytes == 0 and s.pending == 0 and s.acked > 0 and \
            sum(len(p.read_bytes().splitlines()) for p in data.rglob("+log.jsonl")) >= n
    wait_for(all_there, 60, f"every message in its topic file (log: {rec.stderr_path})")
    assert rec.stop() == 0
    seen: dict[int, int] = defaultdict(int)
    for p in data.rglob("+log.jsonl"):
        topic = p.parent.relative_to(data).as_posix()
        prev = -1
        for ln in p.read_bytes().splitlines():
            i = json.loads(ln)["payload"]["i"]
            assert topic == f"j/{i % topics}"
            assert i > prev or seen[i] > 0, f"{topic}: {i} after {prev}: out of order"
            prev = max(prev, i)
            seen[i] += 1
    missing = [i for i in range(n) if not seen[i]]
    assert not missing, f"{len(missing)} message(s) lost, e.g. {missing[:5]}"
    dups = sum(v - 1 for v in seen.values())
    total_redelivered = redelivered + (rec.stats() or Counters()).redelivered
    assert dups <= total_redelivered, f"{dups} duplicates, but the broker redelivered {total_redelivered}"
    assert "Traceback" not in rec.log()


def test_control_operations_see_every_journaled_record_and_nothing_comes_back(tmp_path: Path) -> None:
    """A delete on a journaled shard: the topic files first catch up with the journal (so
    nothing journaled before it is written after it), and a restart replays nothing of
    the deleted branch."""
    from shardlog.control.operations import Operations
    from shardlog.recording.loop import prepare_root
    from shardlog.recording.recorder import Recorder

    def start() -> Recorder:
        smap = parse_map({"shards": [{"name": "a", "prefix": "a", "root": str(tmp_path / "data"),
                                      "journal": {"enabled": True}}]}, env={})
        r = Recorder(smap, smap.shards[0])
        r.open_store(*prepare_root(r.shard))
        assert r.store is not None
        r.store.start_preparer()
        r.sink.start()
        r.ops = Operations(r, None)
        return r

    def send(r: Recorder, topic: str, *ids: int) -> None:
        for i in ids:
            r.on_publish(topic.encode(), b'{"i":%d}' % i, 1, i, False, False)
        r.flush()

    def ids(topic: str) -> list[int]:
        p = tmp_path / "data" / topic / "+log.jsonl"
        return [json.loads(x)["payload"]["i"] for x in p.read_bytes().splitlines()] if p.exists() else []

    r = start()
    send(r, "a/x", 1, 2, 3)
    send(r, "a/keep", 4)
    with r.quiesced() as busy:
        assert busy is None
        assert ids("a/x") == [1, 2, 3]  # journaled a moment ago, in the files before the operation
        res = r.ops.handle(msgspec.json.encode({"op": "delete", "prefix": "a/x"}))
    assert res["ok"] and res["removed"], res
    send(r, "a/x", 5)
    wait_for(lambda: ids("a/x") == [5], 10, "the new record of a/x")
    r.sink.close()
    r2 = start()  # replays from the checkpoint: the deleted records do not come back
    with r2.quiesced() as busy:
        assert busy is None
        assert ids("a/x") == [5] and ids("a/keep") == [4]
    r2.sink.close()


def test_journal_refuses_what_it_cannot_replay_and_takes_hooks() -> None:
    from shardlog.config.schema import ConfigError
    with pytest.raises(ConfigError, match=r"shards\[0\]\.journal\.enabled: not with payload_only"):
        parse_map({"shards": [{"name": "s", "prefix": "#", "journal": {"enabled": True}, "payload_only": True}]},
                  env={})
    # hooks run in the recording thread before the journal (tests/shardlog/test_hooks.py)
    smap = parse_map({"shards": [{"name": "s", "prefix": "#", "journal": {"enabled": True}, "hooks": ["drop"]}]},
                     env={})
    assert smap.shards[0].journal.enabled and smap.shards[0].hooks


def test_a_journaled_shard_reports_its_stale_recent_files(tmp_path: Path) -> None:
    """recent_lag and recent_stale (stats, /metrics) count the materializer's +recent.json
    files too: a journaled shard used to report 0 stale whatever its files' state."""
    from shardlog.recording.loop import prepare_root
    from shardlog.recording.recorder import Recorder

    smap = parse_map({"shards": [{"name": "a", "prefix": "a", "root": str(tmp_path / "data"),
                                  "recent_interval": "1h", "journal": {"enabled": True}}]}, env={})
    r = Recorder(smap, smap.shards[0])
    r.open_store(*prepare_root(r.shard))
    r.sink.start()
    log_file = tmp_path / "data" / "a" / "x" / "+log.jsonl"

    def records() -> int:
        return len(log_file.read_bytes().splitlines()) if log_file.exists() else 0
    try:
        for i in (1, 2):  # the first +recent.json is written at once, the second is held (1h)
            r.on_publish(b"a/x", b'{"i":%d}' % i, 1, i, False, False)
            r.flush()
            wait_for(lambda i=i: records() == i, 10, f"record {i} in the topic file")
        c = r.counters

        def reported() -> bool:
            r.sink.housekeeping(time.monotonic(), c)
            return c.recent_stale == 1 and c.recent_lag > 0
        wait_for(reported, 10, "the held +recent.json reported stale, with its lag")
        recent = json.loads((log_file.parent / "+recent.json").read_bytes())
        assert [x["payload"]["i"] for x in recent] == [1]
    finally:
        r.sink.close()
