"""shardlog.history and the verbs topics/tail/cat/export: real recordings made by a
real shard from a real mosquitto, read back; plus unit tests of the reading
functions on segment files written with encode_record."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shardlog import history
from shardlog.ondisk.segments import segment_name
from shardlog.reading import follow as reading_follow
from shardlog.reading import lines as reading_lines
from shardlog.reading import ranges as reading_ranges
from shardlog.reading.files import bounded_lines
from shardlog.records import decode_record, encode_record
from shardlog.topics import topic_to_relpath
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

T0 = 1_763_815_800_000_000


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, timeout=timeout,
                          check=False)


def raw_records(topic_dir: Path) -> list[bytes]:
    """Every complete line of a topic directory, read without shardlog.history."""
    names = sorted((p.name for p in topic_dir.iterdir() if p.name.startswith("+log.0")),
                   key=lambda n: int(n.split(".")[1]))
    out: list[bytes] = []
    for name in [*names, "+log.jsonl"]:
        p = topic_dir / name
        if not p.exists() or name.endswith(".tmp"):
            continue
        data = gzip.decompress(p.read_bytes()) if name.endswith(".gz") else p.read_bytes()
        out.extend(x for x in data.splitlines(keepends=True) if x.endswith(b"\n"))
    return out


def rotated(topic_dir: Path) -> list[str]:
    return sorted(p.name for p in topic_dir.iterdir() if p.name.startswith("+log.0") and not p.name.endswith(".tmp"))


def record(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc], **settings: object) -> RecorderProc:
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}], **settings)
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    return rec


def publish_and_wait(publisher: Publisher, rec: RecorderProc, msgs: list[tuple[str, bytes, int]]) -> None:
    before = (rec.stats().acked if rec.stats() else 0)  # type: ignore[union-attr]
    publisher.publish_many(msgs)
    wait_for(lambda: (s := rec.stats()) and s.acked >= before + len(msgs), 60,
             f"{len(msgs)} acknowledgements (log: {rec.stderr_path})")


SMALL_GZ = {"rotate": {"max_bytes": "1KiB", "max_age": None}, "compress": "gzip"}


def seq_msgs(topic: str, start: int, n: int) -> list[tuple[str, bytes, int]]:
    return [(topic, json.dumps({"seq": i, "pad": "x" * 20}).encode(), 1) for i in range(start, start + n)]


# -- real recordings ------------------------------------------------------------------------

def test_tail_across_rotated_and_gzipped_segments(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                  recorders: list[RecorderProc]) -> None:
    rec = record(tmp_path, broker, recorders, **SMALL_GZ)
    root = tmp_path / "data"
    publish_and_wait(publisher, rec, seq_msgs("sensors/t1", 0, 150))
    d = root / "sensors" / "t1"
    wait_for(lambda: any(n.endswith(".gz") for n in rotated(d)), 30, "a gzipped segment")
    assert rec.stop() == 0
    segs = rotated(d)
    assert len(segs) >= 3 and any(n.endswith(".gz") for n in segs), segs
    per_segment = len(raw_records(d)) // (len(segs) + 1)
    n = 3 * per_segment + 5  # reaches back over at least 3 segments
    got = history.tail(root, "sensors/t1", n)
    assert [json.loads(r.payload)["seq"] for r in got] == list(range(150 - n, 150))
    assert [r.payload for r in history.tail(root, "sensors/t1", 1000)] == [m[1] for m in seq_msgs("x", 0, 150)]
    # the verb: JSON lines of the stored records with a topic member
    r = run_cli("tail", str(root), "sensors/t1", "-n", str(n))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines(keepends=True)
    assert [json.loads(x)["topic"] for x in lines] == ["sensors/t1"] * n
    stored = raw_records(d)[-n:]
    assert [b"{" + x.split(b",", 1)[1] for x in lines] == stored


def test_cat_since_until_exact_at_the_boundaries(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                 recorders: list[RecorderProc]) -> None:
    rec = record(tmp_path, broker, recorders, **SMALL_GZ)
    root = tmp_path / "data"
    msgs = []
    for i in range(120):
        msgs.append((f"plant/{'ab'[i % 2]}", json.dumps({"seq": i, "pad": "y" * 20}).encode(), 1))
    msgs.append(("plant/a/deep", b"not json, text", 1))
    msgs.append(("plantother", b"outside the branch", 1))
    publish_and_wait(publisher, rec, msgs)
    assert rec.stop() == 0
    walk_order = {"plant/a": 0, "plant/a/deep": 1, "plant/b": 2}  # ties: topic directory order
    everything = sorted(
        ((json.loads(x)["ts"], t, x) for t in walk_order for x in raw_records(root / t)),
        key=lambda e: (e[0], walk_order[e[1]]))
    assert len(everything) == 121
    assert len(rotated(root / "plant" / "a")) >= 3
    stamps = [e[0] for e in everything]
    since, until = stamps[30], stamps[90]  # boundaries are recorded ts values
    want = [(t, x) for ts, t, x in everything if since <= ts < until]
    got = [(t, rec) for t, rec in history.read(root, "plant", since=since, until=until)]
    assert [(t, r.ts) for t, r in got] == [(t, json.loads(x)["ts"]) for t, x in want]
    assert [r.payload for _t, r in got] == [decode_record(x).payload for _t, x in want]
    assert got[0][1].ts == since and all(r.ts < until for _t, r in got)
    # whole branch, no range: everything under plant, none of plantother, in time order
    allrecs = list(history.read(root, "plant"))
    assert len(allrecs) == 121 and [r.ts for _t, r in allrecs] == sorted(r.ts for _t, r in allrecs)
    # the verb, jsonl: exact lines with a topic member
    iso_since = history_iso(since)
    r = run_cli("cat", str(root), "plant", "--since", iso_since, "--until", str(until))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines(keepends=True)
    assert [(json.loads(x)["topic"], b"{" + x.split(b",", 1)[1]) for x in out] == want
    # csv, quoted by the csv module
    r = run_cli("cat", str(root), "plant/a", "--format", "csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout.decode("utf-8"), newline="")))
    assert len(rows) == 61
    assert {row["topic"] for row in rows} == {"plant/a", "plant/a/deep"}
    assert [row["payload"] for row in rows if row["topic"] == "plant/a/deep"] == ["not json, text"]
    assert json.loads(rows[0]["payload"])["seq"] == 0


def history_iso(ts_us: int) -> str:
    import datetime as dt

    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (epoch + dt.timedelta(microseconds=ts_us)).isoformat(timespec="microseconds")


def test_follow_sees_records_written_after_rotation(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                    recorders: list[RecorderProc]) -> None:
    rec = record(tmp_path, broker, recorders, **SMALL_GZ)
    root = tmp_path / "data"
    publish_and_wait(publisher, rec, seq_msgs("live/x", 0, 20))
    d = root / "live" / "x"
    before = len(rotated(d))
    stop = threading.Event()
    seen: list[int] = []
    gen = history.follow(root, "live/x", poll=0.02, stop=stop)  # positioned at the end now

    def consume() -> None:
        for r in gen:
            seen.append(json.loads(r.payload)["seq"])

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    try:
        for start in range(20, 120, 20):  # in steps, so follow runs across several rotations
            publish_and_wait(publisher, rec, seq_msgs("live/x", start, 20))
            wait_for(lambda s=start: len(seen) >= s, 20, f"follow to see records up to {start}")
        wait_for(lambda: len(seen) >= 100, 20, "follow to see all 100 new records")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert seen == list(range(20, 120))
    assert len(rotated(d)) >= before + 3, "no rotation happened while following"
    assert rec.stop() == 0


def test_tail_follow_verb_prints_then_follows(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                              recorders: list[RecorderProc]) -> None:
    rec = record(tmp_path, broker, recorders, **SMALL_GZ)
    root = tmp_path / "data"
    publish_and_wait(publisher, rec, seq_msgs("cli/f", 0, 30))
    p = subprocess.Popen([sys.executable, "-m", "shardlog", "tail", str(root), "cli/f", "-n", "3", "--follow",
                          "--poll", "0.02"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    got: list[int] = []

    def reader() -> None:
        assert p.stdout is not None
        for line in p.stdout:
            got.append(json.loads(line)["payload"]["seq"])

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        wait_for(lambda: len(got) >= 3, 20, "the last 3 records")
        publish_and_wait(publisher, rec, seq_msgs("cli/f", 30, 40))
        wait_for(lambda: len(got) >= 43, 20, "the followed records")
    finally:
        p.terminate()
        p.wait(10)
        t.join(10)
    assert got == list(range(27, 70))
    assert rec.stop() == 0


def test_export_sqlite_row_count_and_pandas(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                            recorders: list[RecorderProc]) -> None:
    pd = pytest.importorskip("pandas", reason="pandas is not installed (pip install -e '.[test]' brings it)")
    rec = record(tmp_path, broker, recorders, **SMALL_GZ)
    root = tmp_path / "data"
    msgs = [(f"chat/room{i % 3}", json.dumps({"user": f"u{i % 5}", "text": f"hi {i}", "n": i}).encode(), 1)
            for i in range(200)]
    msgs += [("chat/room0", b"plain text", 1), ("chat/raw", b"\xff\x00\x01", 1),
             ("chat/room1", b'{"user": "x", "nested": {"a": 1}, "Text": "upper"}', 1)]
    msgs += [("elsewhere", b'{"user": "no"}', 1)]
    publish_and_wait(publisher, rec, msgs)
    assert rec.stop() == 0
    out = tmp_path / "out.sqlite"
    r = run_cli("export", str(root), "chat", "--to", str(out))
    assert r.returncode == 0, r.stderr
    con = sqlite3.connect(out)
    df = pd.read_sql("SELECT * FROM records", con)
    con.close()
    assert len(df) == len(msgs) - 1
    assert {"topic", "ts", "qos", "retain", "payload", "payload_json", "payload.user", "payload.text",
            "payload.n"} <= set(df.columns)
    row = df[df["payload.n"] == 7].iloc[0]
    assert row["topic"] == "chat/room1" and row["payload.user"] == "u2" and row["payload.text"] == "hi 7"
    assert bytes(df[df["topic"] == "chat/raw"].iloc[0]["payload"]) == b"\xff\x00\x01"
    assert pd.isna(df[df["topic"] == "chat/raw"].iloc[0]["payload_json"])
    assert list(df["ts"]) == sorted(df["ts"])
    odd = df[df["payload.user"] == "x"].iloc[0]
    assert "payload.nested" not in df.columns and json.loads(odd["payload_json"])["nested"] == {"a": 1}
    assert [c for c in df.columns if c.startswith("payload.Text")] == ["payload.Text~2"]
    # refuses to overwrite; 66 for a prefix with nothing recorded
    assert run_cli("export", str(root), "chat", "--to", str(out)).returncode == 73
    assert run_cli("export", str(root), "nothing/here", "--to", str(tmp_path / "x.sqlite")).returncode == 66
    assert not (tmp_path / "x.sqlite").exists()


def test_topics_decodes_hostile_and_hashed_names(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                 recorders: list[RecorderProc]) -> None:
    rec = record(tmp_path, broker, recorders)
    root = tmp_path / "data"
    long_level = "L" * 300
    names = ["a/../b", "/lead", "a/./b", "x//y", "100%/ok", "sp ace/ü", f"h/{long_level}/z", f"h/{long_level}",
             "plain"]
    publish_and_wait(publisher, rec, [(t, b'{"k": 1}', 1) for t in names] + [("plain", b"2", 1)])
    assert rec.stop() == 0
    assert sorted(i.topic for i in history.topics(root)) == sorted(names)
    assert sorted(i.topic for i in history.topics(root, "h")) == [f"h/{long_level}", f"h/{long_level}/z"]
    long = {i.topic: i for i in history.topics(root, "plain", long=True)}
    assert long["plain"].records == 2 and long["plain"].bytes > 0
    assert long["plain"].last_ts == json.loads(raw_records(root / "plain")[-1])["ts"]
    r = run_cli("topics", str(root), "--json")
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(x)["topic"] for x in r.stdout.splitlines()) == sorted(names)
    assert history.tail(root, "a/../b", 1)[0].value == {"k": 1}
    assert [t for t, _r in history.read(root, "/lead")] == ["/lead"]


def test_exit_codes(tmp_path: Path) -> None:
    assert run_cli("tail", str(tmp_path / "missing"), "x").returncode == 66
    (tmp_path / "root").mkdir()
    r = run_cli("tail", str(tmp_path / "root"), "no/such")
    assert r.returncode == 66 and b"no records for topic 'no/such'" in r.stderr
    assert run_cli("cat", str(tmp_path / "root"), "no").returncode == 66
    assert run_cli("cat", str(tmp_path / "root"), "x", "--since", "yesterday").returncode == 64
    assert run_cli("tail").returncode == 64
    assert run_cli("topics", str(tmp_path / "missing")).returncode == 66
    assert run_cli("topics", str(tmp_path / "root"), "nothing/here").returncode == 66
    r = run_cli("topics", str(tmp_path / "root"))
    assert r.returncode == 0 and r.stdout == b""
    assert run_cli("tail", str(tmp_path / "root"), "x", "-n", "-1").returncode == 64


# -- unit tests on files written directly ------------------------------------------------

def write_topic(root: Path, topic: str, segments: list[list[int]], current: list[int], compress: tuple[int, ...] = (),
                torn: bytes = b"") -> Path:
    d = root / topic_to_relpath(topic)
    d.mkdir(parents=True, exist_ok=True)
    for seq, tss in enumerate(segments, 1):
        data = b"".join(encode_record(ts, 1, False, b'{"ts_": %d}' % ts) for ts in tss)
        if seq in compress:
            (d / segment_name(seq, True)).write_bytes(gzip.compress(data))
        else:
            (d / segment_name(seq)).write_bytes(data)
    (d / "+log.jsonl").write_bytes(b"".join(encode_record(ts, 1, False, b'{"ts_": %d}' % ts) for ts in current)
                                  + torn)
    return d


def test_tail_of_200000_lines_reads_a_bounded_number_of_bytes(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "+log.jsonl", "wb") as f:
        f.write(b"".join(encode_record(T0 + i, 0, False, b'{"i": %d}' % i) for i in range(200_000)))
        f.write(b'{"ts":1,"qos":0,"retain":false,"payload":{"torn')  # a crash mid-write
    assert (d / "+log.jsonl").stat().st_size > 8_000_000
    read_bytes = []
    real = reading_lines._pread

    def counting(fd: int, n: int, off: int) -> bytes:
        data = real(fd, n, off)
        read_bytes.append(len(data))
        return data

    monkeypatch.setattr(reading_lines, "_pread", counting)
    got = history.tail(tmp_path, "big", 6)
    assert [r.value for r in got] == [{"i": i} for i in range(199_994, 200_000)]
    assert sum(read_bytes) <= 2 * reading_lines.BLOCK
    read_bytes.clear()
    got = history.tail(tmp_path, "big", 5000)
    assert [r.value["i"] for r in got] == list(range(195_000, 200_000))
    assert sum(read_bytes) <= 5000 * 100 + 2 * reading_lines.BLOCK


def test_tail_lines_longer_than_a_block_and_across_segments(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir()
    big = [b'{"big": "%s"}' % (b"x" * (reading_lines.BLOCK * 3 + i)) for i in range(3)]
    (d / segment_name(1, True)).write_bytes(gzip.compress(encode_record(T0, 1, False, b"first")))
    (d / segment_name(2)).write_bytes(encode_record(T0 + 1, 1, False, b"second"))
    (d / "+log.jsonl").write_bytes(b"".join(encode_record(T0 + 2 + i, 1, True, p) for i, p in enumerate(big)))
    got = history.tail(tmp_path, "t", 10)
    assert [r.payload for r in got] == [b"first", b"second", *big]
    assert [r.payload for r in history.tail(tmp_path, "t", 2)] == big[1:]
    assert history.tail(tmp_path, "t", 0) == []
    # only rotated segments, no current one
    (d / "+log.jsonl").unlink()
    assert [r.payload for r in history.tail(tmp_path, "t", 1)] == [b"second"]


def test_read_skips_segments_outside_the_range_without_decompressing(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    # segments 1 and 3 are gzip files damaged after their first records: reading one whole warns
    d = write_topic(tmp_path, "r", [[], [T0 + 10000, T0 + 10001], []], [T0 + 30000, T0 + 30001], compress=(1, 3))
    for seq, base in ((1, T0), (3, T0 + 20000)):
        lines = b"".join(encode_record(base + i, 1, False, b'{"pad": "%s"}' % os.urandom(64).hex().encode())
                         for i in range(5000))
        damaged = gzip.compress(lines)
        (d / segment_name(seq, True)).write_bytes(damaged[: len(damaged) - 200])
    list(history.read(tmp_path, "r"))
    assert [r.getMessage().split(": ")[0] for r in caplog.records if "damaged gzip" in r.getMessage()] == \
        [str(d / segment_name(1, True)), str(d / segment_name(3, True))]
    caplog.clear()
    got = [r.ts - T0 for _t, r in history.read(tmp_path, "r", since=T0 + 10001, until=T0 + 20000)]
    assert got == [10001]
    assert [r.ts - T0 for _t, r in history.read(tmp_path, "r", since=T0 + 30001)] == [30001]
    assert [r.ts for _t, r in history.read(tmp_path, "r", since=T0 + 40000)] == []
    assert not [r for r in caplog.records if "damaged gzip" in r.getMessage()]  # never decompressed


def test_read_merges_topics_in_time_order_and_skips_a_torn_line(tmp_path: Path) -> None:
    write_topic(tmp_path, "m/a", [[T0 + 1, T0 + 4]], [T0 + 7], torn=b'{"ts":9')
    write_topic(tmp_path, "m/b", [], [T0 + 2, T0 + 5, T0 + 8])
    write_topic(tmp_path, "m", [], [T0 + 3, T0 + 6])
    write_topic(tmp_path, "mm", [], [T0 + 0])
    got = [(t, r.ts - T0) for t, r in history.read(tmp_path, "m")]
    assert got == [("m/a", 1), ("m/b", 2), ("m", 3), ("m/a", 4), ("m/b", 5), ("m", 6), ("m/a", 7), ("m/b", 8)]
    since = "2025-11-22T12:50:00.000004+00:00"
    assert history.parse_time(since) == T0 + 4
    assert [r.ts - T0 for _t, r in history.read(tmp_path, "m", since=since, until=T0 + 6)] == [4, 5]
    import datetime as dt
    assert history.parse_time(dt.datetime(2025, 11, 22, 12, 50, 0, 4)) == T0 + 4
    assert history.parse_time("2025-11-22T12:50:00.000004Z") == T0 + 4
    assert [i.topic for i in history.topics(tmp_path)] == ["m", "m/a", "m/b", "mm"]
    with pytest.raises(history.TopicNotFound):
        history.read(tmp_path, "nothing")


def test_segments_of_lists_rotated_then_current(tmp_path: Path) -> None:
    d = write_topic(tmp_path, "s", [[T0], [T0 + 1], [T0 + 2]], [T0 + 3], compress=(1,))
    (d / segment_name(2, True)).write_bytes(b"half a compression")  # a crash mid-compress: plain wins
    assert [os.path.basename(p) for p in history.segments_of(str(d))] == [
        segment_name(1, True), segment_name(2), segment_name(3), "+log.jsonl"]


def test_export_unit_hostile_keys(tmp_path: Path) -> None:
    d = tmp_path / "e"
    d.mkdir()
    payloads = [b'{"a": 1, "A": 2, "q\\"uote": "x", "n\\u0000ul": true, "big": 123456789012345678901234567890}',
                b'{"a": 2.5, "z": null, "list": [1]}', b"[1, 2]", b'"just a string"']
    (d / "+log.jsonl").write_bytes(b"".join(encode_record(T0 + i, 0, False, p) for i, p in enumerate(payloads)))
    out = tmp_path / "e.sqlite"
    assert history.export_sqlite(tmp_path, "e", out) == 4
    con = sqlite3.connect(out)
    cols = [r[1] for r in con.execute("PRAGMA table_info(records)")]
    assert cols == ["topic", "ts", "qos", "retain", "payload", "payload_json", "props", "payload.a", "payload.A~2",
                    'payload.q"uote', "payload.n\\u0000ul", "payload.big", "payload.z"]
    rows = con.execute('SELECT "payload.a", "payload.A~2", "payload.big", payload_json, payload '
                       "FROM records").fetchall()
    assert rows[0][:3] == (1, 2, "123456789012345678901234567890")
    assert rows[1][0] == 2.5 and rows[2][3] == "[1, 2]" and rows[3][3] == '"just a string"'
    assert [bytes(r[4]) for r in rows] == payloads
    con.close()
    with pytest.raises(FileExistsError):
        history.export_sqlite(tmp_path, "e", out)
    assert history.export_sqlite(tmp_path, "e", tmp_path / "r.sqlite", since=T0 + 1, until=T0 + 3) == 2
    con = sqlite3.connect(tmp_path / "r.sqlite")
    assert [r[0] - T0 for r in con.execute("SELECT ts FROM records")] == [1, 2]
    con.close()


def test_follower_survives_rotation_and_a_cut_torn_tail(tmp_path: Path) -> None:
    d = write_topic(tmp_path, "f", [], [T0, T0 + 1], torn=b'{"ts":')
    cur = d / "+log.jsonl"
    fo = reading_follow._Follower(str(d))  # at the end: the two records there are not followed

    def ts_of(lines: list[bytes]) -> list[int]:
        return [decode_record(x).ts - T0 for x in lines]

    assert fo.poll() == []
    # the restarted recorder cuts the torn tail back, then appends
    with open(cur, "r+b") as f:
        f.truncate(cur.stat().st_size - len(b'{"ts":'))
    with open(cur, "ab") as f:
        f.write(encode_record(T0 + 2, 1, False, b"2"))
    assert ts_of(fo.poll()) == [2]
    with open(cur, "ab") as f:
        f.write(encode_record(T0 + 3, 1, False, b"3"))
    os.rename(cur, d / segment_name(1))  # rotation: the renamed file got one more record first
    assert ts_of(fo.poll()) == [3]
    cur.write_bytes(encode_record(T0 + 4, 1, False, b"4") + encode_record(T0 + 5, 1, False, b"5"))
    assert ts_of(fo.poll()) == [4, 5]
    with open(cur, "ab") as f:
        f.write(encode_record(T0 + 6, 1, False, b"6"))
    assert ts_of(fo.poll()) == [6]
    fo.close()


@pytest.mark.parametrize("block", [1, 2, 7, 64])
def test_backwards_reading_matches_forward_splitting(tmp_path: Path, block: int,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(reading_lines, "BLOCK", block)
    path = tmp_path / "f"

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=30),
           st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")))
    def check(lines: list[bytes], torn: bytes) -> None:
        data = b"".join(x + b"\n" for x in lines) + torn
        path.write_bytes(data)
        fd = os.open(path, os.O_RDONLY)
        try:
            got = list(reading_lines._lines_backwards(fd, len(data)))
            # a line holding a NUL byte is no record: both directions skip it
            assert got == [x + b"\n" for x in reversed(lines) if b"\0" not in x]
            assert got[::-1] == list(bounded_lines(io.BytesIO(data).read, "f"))
            assert reading_lines._complete_end(fd, len(data)) == len(data) - len(torn)
        finally:
            os.close(fd)

    check()


def test_read_since_bisects_a_large_segment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "big"
    d.mkdir()
    with open(d / "+log.jsonl", "wb") as f:
        f.write(b"".join(encode_record(T0 + i // 3, 0, False, b'{"i": %d}' % i) for i in range(200_000)))
    read_bytes: list[int] = []
    real = reading_lines._pread
    monkeypatch.setattr(reading_lines, "_pread", lambda fd, n, off: read_bytes.append(n) or real(fd, n, off))
    got = [r.value["i"] for _t, r in history.read(tmp_path, "big", since=T0 + 66_000, until=T0 + 66_002)]
    assert got == list(range(198_000, 198_006))
    assert sum(read_bytes) < 40 * reading_lines.BLOCK  # a bisection, not a scan with _pread


@pytest.mark.parametrize("block", [1, 16, 100])
def test_read_since_until_is_exact_with_equal_timestamps(tmp_path: Path, block: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(reading_lines, "BLOCK", block)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, 30), min_size=1, max_size=40).map(sorted),
           st.integers(0, 8), st.integers(-1, 32), st.integers(-1, 32))
    def check(stamps: list[int], split: int, since: int, until: int) -> None:
        d = tmp_path / "eq"
        if d.exists():
            for p in d.iterdir():
                p.unlink()
        k = min(split, len(stamps))
        ts = [T0 + x for x in stamps]
        write_topic(tmp_path, "eq", [ts[:k]] if k else [], ts[k:])
        got = [(r.ts - T0, r.payload) for _t, r in history.read(tmp_path, "eq", since=T0 + since, until=T0 + until)]
        want = [(s, b'{"ts_": %d}' % (T0 + s)) for s in stamps if since <= s < until]
        assert got == want

    check()


def test_read_merges_more_topics_than_open_files_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in range(10):
        write_topic(tmp_path, f"many/t{k}", [[T0 + k, T0 + 20 + k]], [T0 + 40 + k, T0 + 40 + k, T0 + 70])
    want = [(t, r.ts, r.payload) for t, r in history.read(tmp_path, "many")]
    assert len(want) == 50 and [x[1] for x in want] == sorted(x[1] for x in want)
    monkeypatch.setattr(reading_ranges, "_fd_budget", lambda: 3)
    assert [(t, r.ts, r.payload) for t, r in history.read(tmp_path, "many")] == want
    got = [(t, r.ts) for t, r in history.read(tmp_path, "many", since=T0 + 45, until=T0 + 71)]
    assert got == [(f"many/t{k}", T0 + 40 + k) for k in range(5, 10) for _ in (0, 1)] + \
        [(f"many/t{k}", T0 + 70) for k in range(10)]


@pytest.mark.parametrize("compressed", [False, True])
def test_follower_opening_a_file_rotated_under_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  compressed: bool) -> None:
    """The race: +log.jsonl is opened, then rotated (and compressed) before the follower
    lists the directory. It must still read every later segment, in order."""
    d = write_topic(tmp_path, "race", [[T0]], [T0 + 1])
    cur = d / "+log.jsonl"
    real_listdir = reading_follow._safe_listdir
    fired = []

    def rotate_then_list(path: str) -> list[str]:
        if not fired:
            fired.append(1)
            with open(cur, "ab") as f:
                f.write(encode_record(T0 + 2, 1, False, b"2"))
            os.rename(cur, d / segment_name(2))
            if compressed:
                (d / segment_name(2, True)).write_bytes(gzip.compress((d / segment_name(2)).read_bytes()))
                (d / segment_name(2)).unlink()
            cur.write_bytes(encode_record(T0 + 3, 1, False, b"3"))
            os.rename(cur, d / segment_name(3))  # and one more rotation
            cur.write_bytes(encode_record(T0 + 4, 1, False, b"4"))
        return real_listdir(path)

    monkeypatch.setattr(reading_follow, "_safe_listdir", rotate_then_list)
    fo = reading_follow._Follower(str(d), at_end=False)
    lines = fo.poll()
    lines += fo.poll()
    fo.close()
    assert [decode_record(x).ts - T0 for x in lines] == [1, 2, 3, 4]
