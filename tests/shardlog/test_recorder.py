"""The recorder process against a real mosquitto: delivery, crash safety, hostile
input, routing between shards, the lock, and a clean stop."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from shardlog.config.load import parse_map
from shardlog.recording.loop import prepare_root
from shardlog.recording.recorder import Recorder
from shardlog.records import decode_record
from shardlog.topics import HashedNameError, relpath_to_topic
from tests import hostile
from tests.fallback_broker import mosquitto_only
from tests.helpers import Mosquitto, Publisher, RecorderProc, SocketpairClient, gate_preparer, wait_for, write_map


def strict(line: bytes) -> dict:
    def no_constants(name: str) -> None:
        raise ValueError(name)
    return json.loads(line.decode("utf-8"), parse_constant=no_constants)


def topic_lines(topic_dir: Path) -> list[bytes]:
    """Every record of one topic directory, oldest segment first."""
    names = sorted(p.name for p in topic_dir.iterdir() if p.name.startswith("+log.") and p.name != "+log.jsonl")
    out: list[bytes] = []
    for name in [*names, "+log.jsonl"]:
        p = topic_dir / name
        if p.exists():
            out.extend(p.read_bytes().splitlines(keepends=True))
    return out


def topic_dirs(root: Path) -> dict[str, Path]:
    """Decoded topic -> its directory, for every directory holding a current segment."""
    found = {}
    for dirpath, _dirs, files in os.walk(root):
        if "+log.jsonl" in files:
            rel = os.path.relpath(dirpath, root)
            try:
                topic = relpath_to_topic(rel)
            except HashedNameError:
                topic = (Path(dirpath) / "+topic").read_text(encoding="utf-8")
            found[topic] = Path(dirpath)
    return found


def start(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc], shards: list[dict] | None = None,
          name: str = "all", **defaults: object) -> RecorderProc:
    m = write_map(tmp_path / "shards.yaml", broker.port, shards or [{"name": "all", "prefix": "#"}], **defaults)
    r = RecorderProc(m, name, tmp_path).start()
    recorders.append(r)
    return r


def test_20000_messages_over_1000_topics(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                         recorders: list[RecorderProc]) -> None:
    rec = start(tmp_path, broker, recorders)
    n_topics, per_topic = 1000, 20
    msgs = [(f"room/{t:04d}", json.dumps({"t": t, "seq": i}).encode(), 1)
            for i in range(per_topic) for t in range(n_topics)]
    publisher.publish_many(msgs)
    wait_for(lambda: (s := rec.stats()) and s.acked >= len(msgs), 60,
             f"{len(msgs)} acknowledgements (log: {rec.stderr_path})")
    assert rec.stop() == 0
    dirs = topic_dirs(tmp_path / "data")
    assert sorted(dirs) == [f"room/{t:04d}" for t in range(n_topics)]
    for t in range(n_topics):
        d = dirs[f"room/{t:04d}"]
        lines = topic_lines(d)
        assert [strict(x)["payload"] for x in lines] == [{"t": t, "seq": i} for i in range(per_topic)]
        recent = json.loads((d / "+recent.json").read_bytes())
        assert recent == [strict(x) for x in lines[-6:]]
    s = rec.stats()
    assert s is not None and s.messages == len(msgs) and s.acked == len(msgs) and s.quarantined == 0


def test_sigkill_mid_stream_loses_nothing(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                          recorders: list[RecorderProc]) -> None:
    rec = start(tmp_path, broker, recorders, rotate={"max_bytes": "16KiB", "max_age": None})
    total = 20_000
    msgs = [(f"s/{i % 50}", json.dumps({"seq": i}).encode(), 1) for i in range(total)]
    pub = threading.Thread(target=publisher.publish_many, args=(msgs,))
    pub.start()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 4000, 60, "the recorder to write 4000 messages")
    rec.kill()
    segments_before = {d: sorted(os.listdir(d)) for d in topic_dirs(tmp_path / "data").values()}
    rec.start()
    pub.join(120)
    wait_for(lambda: len(seqs_on_disk(tmp_path / "data")) >= total, 60, "every message on disk after restart")
    assert rec.stop() == 0
    lines = [x for d in topic_dirs(tmp_path / "data").values() for x in topic_lines(d)]
    seqs = [strict(x)["payload"]["seq"] for x in lines]  # every line strict JSON: no torn line
    assert set(seqs) == set(range(total))
    dups = len(seqs) - total
    s = rec.stats()
    assert s is not None and dups <= s.redelivered, (dups, s.redelivered)
    for d, before in segments_before.items():
        after = sorted(os.listdir(d))
        old = [x for x in before if x.startswith("+log.0")]
        assert set(old) <= set(after), "a rotated segment was renamed or lost"
        numbers = [int(x.split(".")[1]) for x in after if x.startswith("+log.0")]
        assert numbers == list(range(1, len(numbers) + 1)), "numbering did not continue"
        per_topic = [strict(x)["payload"]["seq"] for x in topic_lines(d)]
        first_seen = list(dict.fromkeys(per_topic))
        assert first_seen == sorted(first_seen), "records out of order within a topic"


def seqs_on_disk(root: Path) -> set[int]:
    out = set()
    for d in topic_dirs(root).values():
        for x in topic_lines(d):
            if x.endswith(b"\n"):
                out.add(json.loads(x)["payload"]["seq"])
    return out


def deliverable(topic: str) -> bool:
    """mosquitto refuses control characters and non-characters in topics (its UTF-8
    check) and never delivers client publishes to $-topics to a '#' subscriber."""
    return not topic.startswith("$") and not any(
        ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or ch in "\ufffe\uffff" for ch in topic)


def test_hostile_topics_and_payloads(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                     recorders: list[RecorderProc]) -> None:
    mosquitto_only(broker, "closes the connection of a client that publishes some of these topics")
    root = tmp_path / "deep" / "data"
    rec = start(tmp_path, broker, recorders, root=str(root), max_payload="11MiB")
    accepted = [t for t in hostile.HOSTILE_TOPICS if deliverable(t)]
    assert len(accepted) >= 50
    payloads = [*hostile.HOSTILE_PAYLOADS, hostile.big_payload(10 * 2**20)]
    publisher.publish_many([(t, b'{"hostile": true}', 1) for t in accepted]
                           + [("hostile/payloads", p, 1) for p in payloads])
    wait_for(lambda: (s := rec.stats()) and s.acked >= len(accepted) + len(payloads), 60, "all hostile messages")
    assert rec.stop() == 0
    # nothing outside the root
    for dirpath, _dirs, files in os.walk(tmp_path):
        for f in files:
            real = os.path.realpath(os.path.join(dirpath, f))
            assert real.startswith(str(root) + os.sep) or Path(dirpath).name in ("broker", "db") \
                or Path(dirpath) == tmp_path, f"file outside the root: {real}"
    dirs = topic_dirs(root)
    for t in accepted:
        assert t in dirs, f"topic {t!r} not stored (round trip failed)"
        assert [strict(x)["payload"] for x in topic_lines(dirs[t])] == [{"hostile": True}]
    stored = [decode_record(x).payload for x in topic_lines(dirs["hostile/payloads"])]
    assert stored == payloads
    for d in dirs.values():
        for x in topic_lines(d):
            strict(x)


def test_unstorable_topics_and_big_payloads_are_quarantined(tmp_path: Path, broker: Mosquitto,
                                                            publisher: Publisher,
                                                            recorders: list[RecorderProc]) -> None:
    rec = start(tmp_path, broker, recorders, max_payload="1KiB")
    long_topic = hostile.TOO_LONG_PATH_TOPICS[0]
    publisher.publish_many([("big", b"x" * 2048, 1), ("small", b"ok", 1), (long_topic, b"long", 1)])
    wait_for(lambda: (s := rec.stats()) and s.acked >= 3, 30, "three acknowledgements")
    assert rec.stop() == 0
    q = [json.loads(x) for x in (tmp_path / "data" / "+quarantine.jsonl").read_bytes().splitlines()]
    by_payload = {base64.b64decode(r["payload"]): r for r in q}
    assert "max_payload" in by_payload[b"x" * 2048]["reason"]
    assert base64.b64decode(by_payload[b"long"]["topic"]).decode() == long_topic
    assert rec.stats().quarantined == 2
    assert topic_lines(tmp_path / "data" / "small")


def test_nested_prefixes_write_each_message_once(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                 recorders: list[RecorderProc]) -> None:
    shards = [{"name": "chat", "prefix": "chat"}, {"name": "vip", "prefix": "chat/vip", "root": str(tmp_path / "vip")},
              {"name": "rest", "prefix": "#"}]
    m = write_map(tmp_path / "shards.yaml", broker.port, shards)
    recs = {n: RecorderProc(m, n, tmp_path).start() for n in ("chat", "vip", "rest")}
    recorders.extend(recs.values())
    topics = ["chat", "chat/a", "chat/vip", "chat/vip/x", "chatter", "other/x"]
    publisher.publish_many([(t, json.dumps({"t": t}).encode(), 1) for t in topics])
    wait_for(lambda: all((s := r.stats()) and s.acked >= n for r, n in
                         ((recs["chat"], 4), (recs["vip"], 2), (recs["rest"], 6))), 30, "all shards to ack")
    for r in recs.values():
        assert r.stop() == 0
    data, vip = topic_dirs(tmp_path / "data"), topic_dirs(tmp_path / "vip")
    assert sorted(data) == ["chat", "chat/a", "chatter", "other/x"] and sorted(vip) == ["chat/vip", "chat/vip/x"]
    assert recs["rest"].stats().discarded == 4 and recs["chat"].stats().discarded == 2
    assert (tmp_path / "data" / "chat" / "+shard.lock").exists() and (tmp_path / "data" / "+shard.lock").exists()


def test_second_recorder_of_a_branch_refuses(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc]) -> None:
    start(tmp_path, broker, recorders, lock_wait="300ms")
    r = subprocess.run([sys.executable, "-m", "shardlog", "record", str(tmp_path / "shards.yaml"), "--shard", "all"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 75
    assert "another recorder" in r.stderr and f"pid {recorders[0].proc.pid}" in r.stderr


def test_mqtt311_session_survives_sigkill(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                          recorders: list[RecorderProc]) -> None:
    mosquitto_only(broker, "speaks one protocol per port (MQTT 5 here), and this test uses 3.1.1")
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}])
    text = m.read_text().replace("broker:\n", "broker:\n  protocol: 3.1.1\n")
    m.write_text(text)
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    rec.kill()
    publisher.publish_many([("offline/x", json.dumps({"seq": i}).encode(), 1) for i in range(300)])
    rec.start()  # the broker kept the session and queued the messages
    wait_for(lambda: len(seqs_on_disk(tmp_path / "data")) >= 300, 30, "the queued messages")
    assert rec.stop() == 0


def test_broker_down_at_start_then_up(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc]) -> None:
    broker.stop()
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}])
    rec = RecorderProc(m, "all", tmp_path).start(wait_subscribed=False)
    recorders.append(rec)
    wait_for(lambda: "cannot reach broker" in rec.log(), 20, "a log line about the missing broker")
    broker.start()
    wait_for(lambda: (s := rec.stats()) and s.subscribed, 30, "the recorder to connect once the broker is up")
    p = Publisher(broker.port)
    p.publish_many([("late/x", b"1", 1)])
    p.close()
    wait_for(lambda: (s := rec.stats()) and s.acked >= 1, 20, "the message")
    assert rec.stop() == 0


def test_topics_a_broker_may_deliver_are_stored_or_quarantined(tmp_path: Path) -> None:
    """Control characters (which other brokers deliver) and invalid UTF-8 (which a broker
    should refuse): driven through on_message with real paho messages, no network."""
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data")}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    rec.open_store(*prepare_root(rec.shard))
    odd = [t for t in hostile.HOSTILE_TOPICS if not deliverable(t) and not t.startswith("$")]
    raw_topics = [t.encode() for t in odd] + hostile.INVALID_TOPIC_BYTES
    for i, raw in enumerate(raw_topics):
        msg = mqtt.MQTTMessage(mid=i + 1, topic=raw)
        msg.payload, msg.qos = b'{"n": %d}' % i, 1
        rec.on_message(None, None, msg)  # type: ignore[arg-type]
    rec.flush()
    assert rec.store is not None
    rec.store.close()
    dirs = topic_dirs(tmp_path / "data")
    assert sorted(dirs) == sorted(odd)
    q = [json.loads(x) for x in (tmp_path / "data" / "+quarantine.jsonl").read_bytes().splitlines()]
    assert sorted(base64.b64decode(r["topic"]) for r in q) == sorted(hostile.INVALID_TOPIC_BYTES)
    assert rec.counters.quarantined == len(hostile.INVALID_TOPIC_BYTES)
    for r in q:
        assert r["reason"].startswith("topic not storable")


def test_many_topics_stay_within_the_fd_cap(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                            recorders: list[RecorderProc]) -> None:
    import psutil

    rec = start(tmp_path, broker, recorders, max_open_files=16, max_topics=500, recent_interval=0)
    assert rec.proc is not None
    proc = psutil.Process(rec.proc.pid)
    baseline = proc.num_fds()
    n = 5000
    pub = threading.Thread(target=publisher.publish_many,
                           args=([(f"many/{i % 97}/{i}", b'{"i": %d}' % i, 1) for i in range(n)],))
    pub.start()
    peak = 0

    def done() -> bool:
        nonlocal peak
        peak = max(peak, proc.num_fds())
        s = rec.stats()
        return bool(s and s.acked >= n)

    wait_for(done, 60, f"{n} acknowledgements")
    pub.join(60)
    assert peak <= baseline + 16 + 4, f"{peak} descriptors open (baseline {baseline}, cap 16)"
    s = rec.stats()
    assert s is not None and s.topics_cached <= 500 + 1000  # max_topics, and a batch beyond it
    assert rec.stop() == 0
    assert len(topic_dirs(tmp_path / "data")) == n


def test_disk_full_degrades_and_resumes_without_loss(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                     recorders: list[RecorderProc]) -> None:
    mosquitto_only(broker, "closes the connection of a client that withholds acknowledgements, and "
                   "this test checks that a degraded shard stays connected")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs (needs root): {r.stderr.decode().strip()}")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * 1_900_000)  # ~150 KB left; the stream needs ~540 KB
        rec = start(tmp_path, broker, recorders, root=str(mnt / "data"), recent=0)
        total = 3000
        msgs = [(f"full/{i % 10}", json.dumps({"seq": i, "pad": "x" * 100}).encode(), 1) for i in range(total)]
        publisher.publish_many(msgs)
        s = wait_for(lambda: (s := rec.stats()) and s.degraded and s, 30, "the shard to report degraded")
        assert s.connected and s.acked < total and "No space left" in (s.degraded_reason or "")
        assert rec.proc is not None and rec.proc.poll() is None  # no crash, no exit
        for d in topic_dirs(mnt / "data").values():
            assert (d / "+log.jsonl").read_bytes().endswith(b"\n") or not (d / "+log.jsonl").stat().st_size
        filler.unlink()  # space comes back: everything is written, nothing lost
        wait_for(lambda: len(seqs_on_disk(mnt / "data")) >= total, 30, "every message after space came back")
        s = wait_for(lambda: (s := rec.stats()) and not s.degraded and s, 10, "the shard to leave degraded")
        assert rec.stop() == 0
        assert seqs_on_disk(mnt / "data") == set(range(total))
    finally:
        for rp in recorders:
            if rp.proc is not None and rp.proc.poll() is None:
                rp.proc.kill()
                rp.proc.wait(10)
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_records_waiting_for_new_topics_are_bounded(tmp_path: Path) -> None:
    """New topics' records wait (unacknowledged) for the preparer thread; past
    max_waiting the next flush waits for it, so memory stays bounded."""
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data"),
                                  "batch": {"max_messages": 10}}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    rec.open_store(*prepare_root(rec.shard))
    assert rec.store is not None
    rec.store.start_preparer()
    rec.sink.max_waiting = 50
    try:
        for i in range(49):
            rec.on_publish(b"new/%d" % i, b'{"i": %d}' % i, 1, i + 1, False, False)
        assert rec.pending >= 10  # flushed by count, but the last ten at least were held
        rec.on_publish(b"new/49", b'{"i": 49}', 1, 50, False, False)  # the 50th: this flush waits
        assert rec.pending == 0 and rec.acks == [] and rec.counters.messages == 50
        for i in range(50):
            assert (tmp_path / "data" / "new" / str(i) / "+log.jsonl").read_bytes().count(b"\n") == 1
    finally:
        rec.store.close()


def test_ids_of_waiting_topics_are_acked_once_after_their_write(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A real client on a socketpair (no broker): the PUBACKs sent. A known topic's ids are
    acked at once; a new topic's only after its records are written, each id exactly once, and
    every PUBACK in the order of the PUBLISHes (MQTT 5 4.6.0-2): a held id holds back later ones."""
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data")}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    rec.open_store(*prepare_root(rec.shard))
    assert rec.store is not None
    gate = gate_preparer(monkeypatch)
    pair = SocketpairClient(rec)
    pubacks = pair.pubacks
    try:
        rec.on_publish(b"known", b"{}", 1, 1, False, False)
        rec.flush(wait=True)  # known: prepared in this flush
        assert pubacks() == [1]
        rec.store.start_preparer()
        for i in range(100):  # 100 new topics, two records each, and the known topic
            rec.on_publish(b"new/%d" % i, b"{}", 1, 2 + 2 * i, False, False)
            rec.on_publish(b"new/%d" % i, b"{}", 1, 3 + 2 * i, False, False)
            rec.on_publish(b"known", b"{}", 1, 1000 + i, False, False)
        arrival = [m for i in range(100) for m in (2 + 2 * i, 3 + 2 * i, 1000 + i)]
        rec.flush()
        assert pubacks() == []  # new/0's id 2 came first: nothing may be acked before it
        assert rec.pending == 200 and rec.acks == [] and list(rec.unacked) == arrival
        rec.on_publish(b"new/0", b"{}", 1, 5000, False, False)
        rec.flush()
        assert pubacks() == [] and rec.pending == 201
        gate.set()
        rec.on_publish(b"known", b"{}", 1, 6000, False, False)
        rec.flush(wait=True)
        assert pubacks() == arrival + [5000, 6000]  # each once, after the write, in arrival order
        assert not rec.unacked and not rec.blocked
        assert rec.pending == 0 and rec.counters.messages == 303
        assert (tmp_path / "data" / "new" / "0" / "+log.jsonl").read_bytes().count(b"\n") == 3
    finally:
        gate.set()
        rec.store.close()
        pair.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death
@pytest.mark.parametrize("journal", [False, True], ids=["store", "journal"])
def test_a_dead_worker_thread_stops_the_shard_with_exit_70(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture, journal: bool) -> None:
    """A worker thread (here the compressor, killed by what its handlers do not catch) that
    dies is found at the next housekeeping: the shard stops with exit code 70, so the
    supervisor restarts it (status: "internal error"), and the log names the thread."""
    import time

    from shardlog.recording.loop import EX_SOFTWARE, RecorderLoop
    from shardlog.writing.compressor import Compressor

    smap = parse_map({"shards": [{"name": "a", "prefix": "a", "root": str(tmp_path / "data"), "compress": "gzip",
                                  "journal": {"enabled": journal}}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    loop = RecorderLoop(rec)
    compressor = rec.open_store(*prepare_root(rec.shard))
    assert compressor is not None and rec.store is not None
    rec.store.start_preparer()
    rec.store.start_recent_writer()
    rec.sink.start()
    try:
        loop._housekeeping(time.monotonic())
        assert not loop.stop_requested and rec.sink.dead_thread() is None
        monkeypatch.setattr(Compressor, "compress", staticmethod(lambda path: sys.exit(1)))
        compressor.submit(str(tmp_path / "nothing"))
        wait_for(lambda: not compressor.alive(), 10, "the compressor thread to die")
        loop._housekeeping(time.monotonic())
        assert loop.stop_requested and loop.exit_code == EX_SOFTWARE
        assert "the compressor thread died: stopping with exit code 70" in caplog.text
    finally:
        rec.sink.close()
