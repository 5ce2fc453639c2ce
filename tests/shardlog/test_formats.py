"""Write formats (shardlog/ondisk/formats.py): the pure encode/read/repair functions, then real
recordings by a real shard from a real mosquitto in every format, read back by the
history tools, across rotation, gzip, SIGKILL and restarts."""

from __future__ import annotations

import base64
import csv
import gzip
import io
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog import history
from shardlog.config.load import parse_map
from shardlog.config.schema import ConfigError
from shardlog.ondisk import formats
from shardlog.ondisk.formats import FORMATS
from shardlog.reading import follow as reading_follow
from shardlog.records import decode_record, encode_record
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

T0 = 1_763_815_800_000_000
KEYS = list(FORMATS)
REPO = Path(__file__).resolve().parents[2]


def segment_after_flushes(fmt: formats.Format, batches: list[list[bytes]]) -> list[bytes]:
    """The segment's bytes after each flush of ``batches`` (envelope lines), as the store
    writes them: ``pack`` at ``size - len(closer)``."""
    data = b""
    states = []
    for lines in batches:
        items = [fmt.item(x) for x in lines]
        assert all(i is not None for i in items)
        out = fmt.pack(items, len(data))  # type: ignore[arg-type]
        off = len(data) - len(fmt.closer) if data else 0
        data = data[:off] + out
        states.append(data)
    return states


def lines_of(data: bytes) -> list[bytes]:
    return [x for x in data.splitlines(keepends=True) if x.endswith(b"\n")]


def check_valid(fmt: formats.Format, data: bytes) -> None:
    """``data`` is a whole valid segment of its format."""
    if not data:
        return
    if fmt.key.endswith("json"):
        assert isinstance(json.loads(data), list)
    elif fmt.key == "csv":
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        assert rows[0] == list(formats.CSV_COLUMNS) and all(len(r) == 5 for r in rows)
    else:
        for x in data.splitlines():
            json.loads(x)


payloads = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                 lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                 max_leaves=6).map(lambda v: json.dumps(v, indent=None).encode()),
    st.just(b'{\n  "pretty": [1,\r\n 2]\n}'),
)
messages = st.lists(st.tuples(st.integers(0, 2), st.booleans(), payloads), min_size=1, max_size=12)


def envelope_lines(msgs: list[tuple[int, bool, bytes]]) -> list[bytes]:
    return [encode_record(T0 + i, q, r, p) for i, (q, r, p) in enumerate(msgs)]


def split(lines: list[bytes], cuts: list[int]) -> list[list[bytes]]:
    out, last = [], 0
    for c in sorted({min(c, len(lines)) for c in cuts} | {len(lines)}):
        if c > last:
            out.append(lines[last:c])
            last = c
    return out


# -- pure functions ---------------------------------------------------------------------

@pytest.mark.parametrize("key", ["jsonl", "json", "csv"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msgs=messages, cuts=st.lists(st.integers(1, 12), max_size=4))
def test_envelope_formats_read_back_every_record(key: str, msgs: list[tuple[int, bool, bytes]],
                                                 cuts: list[int]) -> None:
    fmt = FORMATS[key]
    lines = envelope_lines(msgs)
    states = segment_after_flushes(fmt, split(lines, cuts))
    for data in states:  # valid after every flush
        check_valid(fmt, data)
    got = list(fmt.envelopes(lines_of(states[-1])))
    assert [decode_record(x)[:4] for x in got] == [(T0 + i, q, r, p) for i, (q, r, p) in enumerate(msgs)]
    # read backwards, line by line, it is the same
    assert list(fmt.envelopes(reversed(lines_of(states[-1])))) == got[::-1]


@pytest.mark.parametrize("key", ["payload.jsonl", "payload.json"])
@settings(max_examples=60, deadline=None)
@given(msgs=messages)
def test_payload_formats_store_the_json_payload_alone(key: str, msgs: list[tuple[int, bool, bytes]]) -> None:
    fmt = FORMATS[key]
    lines = envelope_lines(msgs)
    kept = []
    for line, (_q, _r, p) in zip(lines, msgs, strict=True):
        item = fmt.item(line)
        try:
            value = json.loads(p)
        except (ValueError, UnicodeDecodeError):
            assert item is None, p  # not JSON: never stored (the store quarantines it)
            continue
        if item is None:  # JSON for Python but not for strict msgspec (e.g. a lone surrogate)
            continue
        assert json.loads(item) == value
        if b"\n" not in p and b"\r" not in p:
            assert item == p + b"\n"  # exactly as published
        kept.append(line)
    if not kept:
        return
    data = segment_after_flushes(fmt, [[x] for x in kept])[-1]
    check_valid(fmt, data)
    assert list(fmt.items(lines_of(data))) == [fmt.item(x) for x in kept]
    recs = [decode_record(x) for x in fmt.envelopes(lines_of(data), 42)]
    assert {(r.ts, r.qos, r.retain) for r in recs} == {(42, 0, False)}  # ts: the segment's mtime


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(0, 2**62), qos=st.integers(0, 2), retain=st.booleans(), payload=payloads)
def test_csv_row_round_trip(ts: int, qos: int, retain: bool, payload: bytes) -> None:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(formats.csv_row(ts, qos, retain, payload))
    line = buf.getvalue().encode()
    assert line.count(b"\n") == 1  # one row, one physical line
    assert formats.parse_csv_line(line) == (ts, qos, retain, payload)
    row = next(csv.reader(io.StringIO(buf.getvalue())))
    if row[4] == "":
        assert row[3].encode() == payload  # text as published
    else:
        assert base64.b64decode(row[3]) == payload


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(0, 2**62), qos=st.integers(0, 2), retain=st.booleans(), payload=payloads)
def test_csv_row_of_an_envelope_line(ts: int, qos: int, retain: bool, payload: bytes) -> None:
    """The store's fast path (a JSON payload cut out of the line) and the csv module agree
    on what the row means, and the row is one line."""
    row = formats._csv_row_of_line(encode_record(ts, qos, retain, payload))
    assert row.endswith(b"\r\n") and row.count(b"\n") == 1
    assert formats.parse_csv_line(row) == (ts, qos, retain, payload)


@pytest.mark.parametrize("key", KEYS)
@settings(max_examples=40, deadline=None)
@given(msgs=st.lists(st.tuples(st.integers(0, 1), st.booleans(),
                               st.integers(0, 10**6).map(lambda i: b'{"i":%d}' % i)), min_size=2, max_size=8),
       first=st.integers(1, 7), data=st.data())
def test_repair_of_a_write_torn_anywhere(key: str, msgs: list[tuple[int, bool, bytes]], first: int,
                                         data: st.DataObject) -> None:
    """A crash mid-write leaves the old segment with a prefix of the new bytes written over
    its end; repair gives a valid segment holding every old record and a prefix of the new."""
    fmt = FORMATS[key]
    lines = envelope_lines(msgs)
    first = min(first, len(lines) - 1)
    old, new = segment_after_flushes(fmt, [lines[:first], lines[first:]])
    off = len(old) - len(fmt.closer)
    written = new[off:]
    k = data.draw(st.integers(0, len(written)), label="bytes written")
    torn = old[:off] + written[:k] + old[off + k:]
    keep, suffix = formats.repair(fmt, torn)
    fixed = torn[:keep] + suffix
    check_valid(fmt, fixed)
    items = list(fmt.items(lines_of(fixed)))
    want = [fmt.item(x) for x in lines]
    assert len(items) >= first and items == want[: len(items)]
    if torn in (old, new):
        assert (keep, suffix) == (len(torn), b"")  # an intact segment is left alone


@pytest.mark.parametrize("key", KEYS)
def test_repair_of_garbage_and_of_a_torn_first_write(key: str) -> None:
    fmt = FORMATS[key]
    lines = envelope_lines([(1, False, b'{"a":1}'), (0, True, b"[2]")])
    (seg,) = segment_after_flushes(fmt, [lines])
    keep, suffix = formats.repair(fmt, seg + b"\x00\x00garbage\n\x00")
    assert seg.startswith(seg[:keep]) and (seg[:keep] + suffix) == seg
    for k in range(1, len(seg) - len(fmt.closer) - len(lines[-1])):  # torn in the first line(s)
        keep, suffix = formats.repair(fmt, seg[:k])
        check_valid(fmt, seg[:keep] + suffix)


def test_payload_item_of_text_and_binary_is_none() -> None:
    assert formats.payload_item(encode_record(T0, 1, False, b"plain text")) is None
    assert formats.payload_item(encode_record(T0, 1, False, b"\xff\x00")) is None
    assert formats.payload_item(encode_record(T0, 1, False, b"")) is None
    assert formats.payload_item(encode_record(T0, 1, False, b'{"a": [1, 2]}')) == b'{"a": [1, 2]}\n'
    assert formats.payload_item(encode_record(T0, 1, False, b'{"a":\n"b"}')) == b'{"a": "b"}\n'


def test_segment_names_and_format_of_names() -> None:
    from shardlog.ondisk.segments import parse_segment, rotated_segments, segment_name
    for key in KEYS:
        name = segment_name(7, key=key)
        assert name == f"+log.00000007.{key}"
        assert parse_segment(name) == (7, name, False)
        assert parse_segment(name + ".gz") == (7, name + ".gz", True)
        assert formats.of_name(name + ".gz") is FORMATS[key] is formats.of_name(FORMATS[key].current)
    assert parse_segment("+log.00000001.xml") is None
    assert [s.name for s in rotated_segments(["+log.00000002.csv", "+log.00000001.jsonl.gz", "+log.csv"])] == [
        "+log.00000001.jsonl.gz", "+log.00000002.csv"]


def test_config_format_fields() -> None:
    def shard(**kw: object) -> object:
        return parse_map({"defaults": {"format": "json"}, "shards": [{"name": "a", "prefix": "a", **kw}]}).shards[0]
    assert shard().format == "json" and shard().payload_only is False  # type: ignore[attr-defined]
    assert shard(format="csv").format == "csv"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"shards\[0\]\.format"):
        shard(format="xml")
    with pytest.raises(ConfigError, match=r"shards\[0\]\.payload_only: only with format jsonl or json"):
        shard(format="csv", payload_only=True)
    for example in (REPO / "shardlog" / "example.yaml", REPO / "shards.example.yaml"):
        text = example.read_text()
        assert "format: jsonl" in text and "payload_only: false" in text


def test_nginx_and_apache_serve_every_format() -> None:
    conf = (REPO / "deploy" / "nginx" / "shardlog.conf").read_text()
    assert "text/csv" in conf and "application/x-ndjson" in conf
    from shardlog.reading.nginx_routes import _PRIVATE_MAP
    pattern = re.search(r'"~(.*)"\s+1;', _PRIVATE_MAP).group(1)  # type: ignore[union-attr]
    assert pattern in conf
    private = re.compile(pattern)
    for key in KEYS:
        for name in (f"+log.{key}", f"+log.00000003.{key}", f"+log.00000003.{key}.gz"):
            assert not private.search(f"/chat/room/{name}"), name
    for name in ("+shard.lock", "+quarantine.jsonl", "+recent.json.spare", "+log.00000003.csv.gz.tmp"):
        assert private.search(f"/chat/{name}"), name
    assert ".csv" in (REPO / "deploy" / "apache" / "shardlog.conf").read_text()


# -- real recordings --------------------------------------------------------------------

COMBOS = {  # id: (format, payload_only)
    "jsonl": ("jsonl", False), "json": ("json", False), "csv": ("csv", False),
    "payload.jsonl": ("jsonl", True), "payload.json": ("json", True),
}


def start_recorder(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc], combo: str,
                   **settings: object) -> RecorderProc:
    fmt, payload_only = COMBOS[combo]
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}],
                  format=fmt, payload_only=payload_only, **settings)
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    return rec


def wait_acked(rec: RecorderProc, n: int) -> None:
    wait_for(lambda: (s := rec.stats()) and s.acked >= n, 60, f"{n} acknowledgements (log: {rec.stderr_path})")


def segment_files(d: Path) -> list[Path]:
    """Rotated segments (by number), then the current one."""
    rot = sorted((p for p in d.iterdir() if p.name.startswith("+log.0") and not p.name.endswith(".tmp")),
                 key=lambda p: int(p.name.split(".")[1]))
    return rot + [p for p in d.iterdir() if p.name in formats.CURRENTS]


def content(p: Path) -> bytes:
    return gzip.decompress(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes()


def mixed_payloads(n: int, payload_only: bool) -> list[bytes]:
    out = []
    for i in range(n):
        if i % 10 == 3 and not payload_only:
            out.append(f"text {i}, with \"quotes\"\nand a line break".encode())
        elif i % 10 == 7 and not payload_only:
            out.append(bytes([i % 256, 0, 255, 10, 13]))
        else:
            out.append(json.dumps({"seq": i, "pad": "x" * 20}).encode())
    return out


@pytest.mark.parametrize("combo", list(COMBOS))
def test_recorded_in_every_format_across_rotation_and_gzip(combo: str, tmp_path: Path, broker: Mosquitto,
                                                           publisher: Publisher,
                                                           recorders: list[RecorderProc]) -> None:
    fmt_key = FORMATS[("payload." if COMBOS[combo][1] else "") + COMBOS[combo][0]].key
    fmt = FORMATS[fmt_key]
    payload_only = fmt.payload_only
    rec = start_recorder(tmp_path, broker, recorders, combo, compress="gzip", recent=5,
                         rotate={"max_bytes": "1KiB", "max_age": None})
    root = tmp_path / "data"
    sent = mixed_payloads(120, payload_only)
    publisher.publish_many([("fmt/t", p, 1) for p in sent[:60]])
    publisher.publish_many([("fmt/t", p, 0) for p in sent[60:]], retain=False)
    extra = []
    if payload_only:  # a non-JSON payload: quarantined, counted, never in the file
        extra = [b"not json", b"\xff\xfe", b'{"pretty":\n  [1, 2]}']
        publisher.publish_many([("fmt/t", p, 1) for p in extra])
    d = root / "fmt" / "t"
    wait_for(lambda: (s := rec.stats()) and s.messages + s.quarantined >= len(sent) + len(extra), 60,
             f"every message written (log: {rec.stderr_path})")
    wait_for(lambda: any(p.name.endswith(".gz") for p in segment_files(d)), 30, "a gzipped segment")
    assert rec.stop() == 0
    if payload_only:
        assert rec.stats().quarantined == 2  # type: ignore[union-attr]
        sent = sent + [b'{"pretty":   [1, 2]}']  # line breaks between JSON tokens became spaces
    files = segment_files(d)
    assert len(files) >= 4 and any(p.name.endswith(".gz") for p in files), files
    assert all(formats.of_name(p.name) is fmt for p in files), [p.name for p in files]
    assert files[-1].name == fmt.current
    for p in files:  # every segment, rotated or current, plain or gzipped, is a valid file
        data = content(p)
        check_valid(fmt, data)
        if fmt.key == "csv":
            import pandas as pd
            frame = pd.read_csv(io.BytesIO(data), dtype={"payload": str, "enc": str}, keep_default_na=False)
            assert list(frame.columns) == list(formats.CSV_COLUMNS) and len(frame) == data.count(b"\n") - 1
    if payload_only:  # exactly the published JSON, one item per record
        stored = [x for p in files for x in fmt.items(lines_of(content(p)))]
        assert stored == [p + b"\n" for p in sent]
    # tail (backwards, across rotated and gzipped segments), cat, read, export
    assert [r.payload for r in history.tail(root, "fmt/t", 1000)] == sent
    assert [r.payload for r in history.tail(root, "fmt/t", 7)] == sent[-7:]
    got = [r for _t, r in history.read(root, "fmt/t")]
    assert [r.payload for r in got] == sent
    if not payload_only:
        assert [r.qos for r in got] == [1] * 60 + [0] * 60
        ts = [r.ts for r in got]
        assert ts == sorted(ts)
        mid = ts[50]
        assert [r.payload for _t, r in history.read(root, "fmt/t", since=mid, until=ts[90])] == \
            [r.payload for r in got if mid <= r.ts < ts[90]]
    else:  # ts: the mtime of the segment holding the record
        mtimes = {p.stat().st_mtime_ns // 1000 for p in files}
        assert {r.ts for r in got} <= mtimes and [r.qos for r in got] == [0] * len(sent)
    n = history.export_sqlite(root, "fmt", tmp_path / "out.sqlite")
    assert n == len(sent)
    from tests.shardlog.test_history import run_cli
    r = run_cli("cat", str(root), "fmt")  # the verb (tail's shares _tail_lines_dir with history.tail)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines(keepends=True)
    assert {json.loads(x)["topic"] for x in out} == {"fmt/t"}
    assert [decode_record(b"{" + x.split(b",", 1)[1]).payload for x in out] == sent
    info = next(history.topics(root, "fmt", long=True))
    assert info.records == len(sent)
    # +recent.json stays a JSON array of the last 5 records (payloads, for payload-only)
    recent = json.loads((d / "+recent.json").read_bytes())
    if payload_only:
        assert recent == [json.loads(p) for p in sent[-5:]]
    else:
        last = history.tail(root, "fmt/t", 5)
        assert [(r["ts"], r["qos"], r["payload"]) for r in recent] == [(x.ts, x.qos, x.value) for x in last]


SCALE = int(os.environ.get("SHARDLOG_TEST_SCALE", "1"))  # longer runs: SHARDLOG_TEST_SCALE=20


@pytest.mark.parametrize("combo", ["json", "csv", "payload.json"])  # jsonl: test_recorder.py
def test_sigkill_mid_stream_then_restart_every_format(combo: str, tmp_path: Path, broker: Mosquitto,
                                                      publisher: Publisher, recorders: list[RecorderProc]) -> None:
    fmt = FORMATS[("payload." if COMBOS[combo][1] else "") + COMBOS[combo][0]]
    rec = start_recorder(tmp_path, broker, recorders, combo, rotate={"max_bytes": "32KiB", "max_age": None},
                         batch={"max_messages": 50})
    total = 1500 * SCALE
    topics = [f"k/{i}" for i in range(4)]
    msgs = [(topics[i % 4], json.dumps({"seq": i}).encode(), 1) for i in range(total)]
    pub = threading.Thread(target=publisher.publish_many, args=(msgs[:total * 2 // 3],))
    pub.start()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 200, 60, "200 messages written")
    rec.kill()
    root = tmp_path / "data"
    for t in topics:  # the files parse right after the SIGKILL (no repair has run)
        d = root / t
        if d.exists():
            for p in segment_files(d):
                check_valid(fmt, content(p))
    rec.start()
    pub.join(120)
    publisher.publish_many(msgs[total * 2 // 3:])
    want = {json.loads(m[1])["seq"] for m in msgs}

    def seqs() -> set[int]:
        return {json.loads(r.payload)["seq"] for t in topics for r in history.tail(root, t, 10_000)}
    wait_for(lambda: seqs() >= want, 60, "every message after the restart")
    assert rec.stop() == 0
    for t in topics:
        files = segment_files(root / t)
        for p in files:
            check_valid(fmt, content(p))
        per_topic = [json.loads(r.payload)["seq"] for r in history.tail(root, t, 10_000)]
        first_seen = list(dict.fromkeys(per_topic))
        assert first_seen == sorted(first_seen), "records out of order within a topic"
        numbers = [int(p.name.split(".")[1]) for p in files[:-1]]
        assert numbers == list(range(1, len(numbers) + 1))


def _settles(path: Path, seen: os.stat_result, data: bytes, within: float = 0.2) -> bool:
    """Does a torn sample of ``path`` turn out to be a write still in progress: the file
    changes (size, mtime or bytes) or parses, within ``within`` seconds?"""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        now = os.stat(path)
        if (now.st_size, now.st_mtime_ns) != (seen.st_size, seen.st_mtime_ns):
            return True
        again = path.read_bytes()
        if again != data:
            return True
    return False


def test_json_segment_parses_after_every_flush_while_writing(tmp_path: Path, broker: Mosquitto,
                                                             publisher: Publisher,
                                                             recorders: list[RecorderProc]) -> None:
    """A reader sampling +log.json while the recorder appends: every sample taken between
    two flushes (size and mtime unchanged around the read) is a valid JSON array."""
    rec = start_recorder(tmp_path, broker, recorders, "json", rotate={"max_bytes": None, "max_age": None},
                         batch={"max_messages": 20})
    path = tmp_path / "data" / "w" / "+log.json"
    stop = threading.Event()
    stable: list[int] = []
    errors: list[str] = []

    def sample() -> None:
        while not stop.is_set():
            try:
                before = os.stat(path)
                data = path.read_bytes()
                after = os.stat(path)
            except FileNotFoundError:
                continue
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or len(data) != after.st_size:
                continue  # raced a flush: take another sample
            try:
                stable.append(len(json.loads(data)))
            except ValueError as exc:
                # a read can overlap a pwrite that has not yet moved the size or the mtime (the
                # kernel updates them around the copy): a torn sample is a failure only if the
                # file stays so, unchanged, after the write has had time to finish
                if not _settles(path, after, data):
                    errors.append(f"{exc}: ...{data[-80:]!r}")

    th = threading.Thread(target=sample)
    th.start()
    try:
        for k in range(10):
            publisher.publish_many([("w", json.dumps({"seq": k * 100 + i}).encode(), 1) for i in range(100)])
        wait_for(lambda: (s := rec.stats()) and s.messages >= 1000, 60, "1000 messages")
        wait_for(lambda: stable and stable[-1] == 1000, 30, "a sample with every record")
    finally:
        stop.set()
        th.join()
    assert not errors, errors[:3]
    assert len(set(stable)) >= 5, "the sampler saw too few distinct flushes"
    assert rec.stop() == 0


def test_format_change_on_restart_keeps_reading(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                                recorders: list[RecorderProc]) -> None:
    rec = start_recorder(tmp_path, broker, recorders, "jsonl")
    publisher.publish_many([("c", b'{"n":%d}' % i, 1) for i in range(5)])
    wait_acked(rec, 5)
    assert rec.stop() == 0
    recorders.clear()
    rec = start_recorder(tmp_path, broker, recorders, "csv")
    publisher.publish_many([("c", b'{"n":%d}' % i, 1) for i in range(5, 10)])
    wait_acked(rec, 5)
    assert rec.stop() == 0
    d = tmp_path / "data" / "c"
    assert sorted(p.name for p in d.iterdir() if p.name.startswith("+log")) == ["+log.00000001.jsonl", "+log.csv"]
    assert [json.loads(r.payload)["n"] for r in history.tail(tmp_path / "data", "c", 100)] == list(range(10))


@pytest.mark.parametrize("key", KEYS)
def test_store_repairs_a_torn_segment_on_open_and_quarantines_the_cut(key: str, tmp_path: Path) -> None:
    """The store's first open of a topic cuts a torn tail back (json: closes the array
    again), keeps the cut bytes in the quarantine file, and appends after it."""
    from shardlog.counters import Counters
    from shardlog.writing.store import Store
    fmt = FORMATS[key]
    fmt_name, payload_only = (key.split(".")[1], True) if key.startswith("payload.") else (key, False)
    shard = parse_map({"shards": [{"name": "a", "prefix": "#", "root": str(tmp_path), "format": fmt_name,
                                   "payload_only": payload_only, "recent": 3}]}).shards[0]
    lines = envelope_lines([(1, False, b'{"n":%d}' % i) for i in range(4)])
    old, new = segment_after_flushes(fmt, [lines[:2], lines[2:]])
    off = len(old) - len(fmt.closer)
    torn = old[:off] + new[off:off + 9]  # a crash 9 bytes into the second flush
    d = tmp_path / "t"
    d.mkdir()
    (d / fmt.current).write_bytes(torn)
    counters = Counters()
    store = Store(shard, str(tmp_path), str(tmp_path), counters)
    st_ = store.new_state("t")
    store.add(st_, encode_record(T0 + 9, 1, False, b'{"n":9}'), 0)
    assert store.flush(T0 + 9, 0.0) == set()
    store.close()
    data = (d / fmt.current).read_bytes()
    check_valid(fmt, data)
    keep, suffix = formats.repair(fmt, torn)
    assert keep < len(torn)
    kept = list(fmt.items(lines_of(torn[:keep] + suffix)))
    assert kept[:2] == [fmt.item(x) for x in lines[:2]]  # at least the first flush
    assert list(fmt.items(lines_of(data))) == [*kept, fmt.item(encode_record(T0 + 9, 1, False, b'{"n":9}'))]
    assert counters.repaired == 1 and counters.quarantined == 1
    q = json.loads((tmp_path / "+quarantine.jsonl").read_bytes())
    assert q["reason"] == "torn tail of t" and base64.b64decode(q["payload"]) == torn[len(torn) - len(
        base64.b64decode(q["payload"])):]
    recent = json.loads((d / "+recent.json").read_bytes())
    assert [r if payload_only else r["payload"] for r in recent] == [json.loads(
        decode_record(x).payload) for x in fmt.envelopes(lines_of(data))][-3:]


def test_payload_only_store_quarantines_a_non_json_payload(tmp_path: Path) -> None:
    from shardlog.counters import Counters
    from shardlog.writing.store import Store
    shard = parse_map({"shards": [{"name": "a", "prefix": "#", "root": str(tmp_path), "format": "json",
                                   "payload_only": True}]}).shards[0]
    counters = Counters()
    store = Store(shard, str(tmp_path), str(tmp_path), counters)
    st_ = store.new_state("p")
    for i, p in enumerate([b'{"a":1}', b"text", b"\x00\xff", b"[1,\n2]"]):
        store.add(st_, encode_record(T0 + i, 1, True, p), 10 + i)
    assert store.flush(T0 + 9, 0.0) == set()  # the quarantined ones are written too: acknowledged
    store.close()
    assert json.loads((tmp_path / "p" / "+log.payload.json").read_bytes()) == [{"a": 1}, [1, 2]]
    assert counters.quarantined == 2 and counters.messages == 2
    q = [json.loads(x) for x in (tmp_path / "+quarantine.jsonl").read_bytes().splitlines()]
    assert [base64.b64decode(x["payload"]) for x in q] == [b"text", b"\x00\xff"]
    assert {(x["ts"], x["qos"], x["retain"], x["reason"]) for x in q} == {
        (T0 + 1, 1, True, "payload is not JSON (payload_only shard)"),
        (T0 + 2, 1, True, "payload is not JSON (payload_only shard)")}


@pytest.mark.parametrize("key", KEYS)
def test_follower_reads_every_format_across_appends_and_rotation(key: str, tmp_path: Path) -> None:
    """The follower never consumes a json array's closing bracket, so an append written
    over it reads on cleanly; a rotation is followed into the new current segment."""
    fmt = FORMATS[key]
    d = tmp_path / "f"
    d.mkdir()
    cur = d / fmt.current
    lines = envelope_lines([(1, False, b'{"n":%d}' % i) for i in range(12)])
    fo = reading_follow._Follower(str(d), at_end=False)
    got: list[bytes] = []
    states = segment_after_flushes(fmt, [lines[:2], lines[2:3], lines[3:6]])
    for state, have in zip(states, (2, 3, 6), strict=True):
        fd = os.open(cur, os.O_WRONLY | os.O_CREAT)  # written in place, like the store's pwrite
        os.pwrite(fd, state, 0)
        os.close(fd)
        got += fo.poll()
        assert len(got) == have, got
    os.rename(cur, d / f"+log.00000001.{key}")
    for state in segment_after_flushes(fmt, [lines[6:9], lines[9:]]):
        fd = os.open(cur, os.O_WRONLY | os.O_CREAT)
        os.pwrite(fd, state, 0)
        os.close(fd)
        got += fo.poll()
    fo.close()
    assert [decode_record(x).payload for x in got] == [b'{"n":%d}' % i for i in range(12)]


@pytest.mark.parametrize("key", KEYS)
def test_store_rotation_and_retention_in_every_format(key: str, tmp_path: Path) -> None:
    from shardlog.counters import Counters
    from shardlog.writing.store import Store
    fmt = FORMATS[key]
    fmt_name, payload_only = (key.split(".")[1], True) if key.startswith("payload.") else (key, False)
    shard = parse_map({"shards": [{"name": "a", "prefix": "#", "root": str(tmp_path), "format": fmt_name,
                                   "payload_only": payload_only, "rotate": {"max_bytes": "1KiB"},
                                   "retention": {"max_segments": 2}}]}).shards[0]
    counters = Counters()
    store = Store(shard, str(tmp_path), str(tmp_path), counters)
    st_ = store.new_state("r")
    for i in range(200):
        store.add(st_, encode_record(T0 + i, 1, False, b'{"n":%d,"pad":"%s"}' % (i, b"x" * 30)), 0)
        if i % 7 == 0:
            store.flush(T0 + i, float(i))
    store.flush(T0 + 200, 200.0)
    store.close()
    names = sorted(p.name for p in (tmp_path / "r").iterdir() if p.name.startswith("+log"))
    assert len(names) == 3 and fmt.current in names, names
    rotated = [n for n in names if n != fmt.current]
    assert all(n.endswith("." + key) for n in rotated) and counters.deleted_segments == counters.rotations - 2
    for n in names:
        check_valid(fmt, (tmp_path / "r" / n).read_bytes())
    tail = history.tail(tmp_path, "r", 1000)
    assert [json.loads(r.payload)["n"] for r in tail] == list(range(200 - len(tail), 200))


@pytest.mark.parametrize("combo", ["json", "payload.json"])  # the line formats: test_history.py
def test_tail_then_follow_a_live_recording_across_rotations(combo: str, tmp_path: Path, broker: Mosquitto,
                                                            publisher: Publisher,
                                                            recorders: list[RecorderProc]) -> None:
    rec = start_recorder(tmp_path, broker, recorders, combo, compress="gzip",
                         rotate={"max_bytes": "1KiB", "max_age": None})
    root = tmp_path / "data"

    def msgs(start: int, n: int) -> list[tuple[str, bytes, int]]:
        return [("live/x", json.dumps({"seq": i, "pad": "x" * 20}).encode(), 1) for i in range(start, start + n)]
    publisher.publish_many(msgs(0, 20))
    wait_acked(rec, 20)
    d = root / "live" / "x"
    before = len(segment_files(d))
    stop = threading.Event()
    seen: list[int] = []
    gen = reading_follow._tail_and_follow(root, "live/x", 5, poll=0.02, stop=stop)

    def consume() -> None:
        for line in gen:
            seen.append(json.loads(decode_record(line).payload)["seq"])

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    try:
        for start in range(20, 120, 20):  # in steps, so following runs across several rotations
            publisher.publish_many(msgs(start, 20))
            wait_for(lambda s=start: len(seen) >= s - 15 + 20, 20, f"follow to see records up to {start + 20}")
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert seen == list(range(15, 120))
    assert len(segment_files(d)) >= before + 3, "no rotation happened while following"
    assert rec.stop() == 0


def test_nginx_serves_every_format_with_its_type(tmp_path: Path) -> None:
    """The shipped NGINX config, for real: segments of every format, current and rotated
    (plain or gzipped, asked for by their plain name), with their types and caching."""
    from tests.test_nginx import NGINX, shipped_nginx
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light; .ci/run installs it, so CI runs this)")
    from shardlog.counters import Counters
    from shardlog.writing.compressor import Compressor
    from shardlog.writing.store import Store
    data = tmp_path / "data"
    data.mkdir()
    for key in KEYS:
        fmt_name, payload_only = (key.split(".")[1], True) if key.startswith("payload.") else (key, False)
        shard = parse_map({"shards": [{"name": "a", "prefix": "#", "root": str(data), "format": fmt_name,
                                       "payload_only": payload_only}]}).shards[0]
        store = Store(shard, str(data), str(data), Counters())
        st_ = store.new_state(f"f/{key}")
        for i in range(3):
            store.add(st_, encode_record(T0 + i, 1, False, b'{"n":%d}' % i), 0)
            store.flush(T0 + i, float(i))
            if i < 2:
                store.files.rotate(st_, T0 + i)
        store.close()
        Compressor.compress(str(data / "f" / key / f"+log.00000001.{key}"))
    types = {"jsonl": "application/x-ndjson", "json": "application/json", "csv": "text/csv"}
    with shipped_nginx(tmp_path, {"root /srv/shardlog/data;": f"root {data};"}) as http:
        for key in KEYS:
            want = types[key.rsplit(".", 1)[-1]]
            for name, cache in ((f"+log.{key}", "no-cache"), (f"+log.00000002.{key}", "immutable"),
                                (f"+log.00000001.{key}", "immutable")):  # 1: served from its .gz
                status, h, body = http.get(f"/f/{key}/{name}", headers={"Accept-Encoding": "gzip"})
                assert status == 200, (name, status)
                assert h["content-type"].startswith(want) and cache in h["cache-control"], (name, h)
                if name.startswith("+log.00000001"):
                    assert h.get("content-encoding") == "gzip", name
                    body = gzip.decompress(body)
                check_valid(FORMATS[key], body)
        assert http.get("/+quarantine.jsonl")[0] == 404


@pytest.mark.parametrize("fmt_name", ["json", "csv"])
def test_rotate_operation_in_another_format(fmt_name: str, tmp_path: Path) -> None:
    """The control operation `rotate` finds topics by any format's current segment and
    versions it under its own extension, a complete file."""
    import msgspec

    from shardlog.control.operations import Operations
    from shardlog.recording.loop import prepare_root
    from shardlog.recording.recorder import Recorder
    smap = parse_map({"shards": [{"name": "a", "prefix": "a", "root": str(tmp_path / "data"),
                                  "format": fmt_name}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    rec.open_store(*prepare_root(rec.shard))
    rec.ops = Operations(rec, None)
    try:
        for i in range(3):
            rec.on_publish(b"a/x", b'{"i":%d}' % i, 1, i + 1, False, False)
        rec.flush()
        rec.routes.clear()  # found on disk, by its +log.<format>
        r = rec.ops.handle(msgspec.json.encode({"op": "rotate", "prefix": "a"}))
        assert r["ok"] and r["rotated"] == 1, r
    finally:
        assert rec.store is not None
        rec.store.close()
    d = tmp_path / "data" / "a" / "x"
    seg = d / f"+log.00000001.{fmt_name}"
    check_valid(FORMATS[fmt_name], seg.read_bytes())
    assert [json.loads(r.payload)["i"] for r in history.tail(tmp_path / "data", "a/x", 10)] == [0, 1, 2]
