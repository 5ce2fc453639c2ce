"""shardlog.reading.sql (history.connect, `shardlog sql`) and the Parquet export: the records view
against history.read (the reference reader) over segments of every write format,
plain, rotated, gzipped and torn, hostile topic names; pruning checked against the
unpruned view; a real recording from a real shard; Parquet read back with pandas."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog import history
from shardlog.ondisk import formats
from shardlog.ondisk.segments import TOPIC_FILE, segment_name
from shardlog.reading import sql
from shardlog.records import encode_record
from shardlog.topics import topic_to_relpath
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

T0 = 1_763_815_800_000_000


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, timeout=timeout,
                          check=False)


def write_segment(root: Path, topic: str, key: str, seq: int | None, recs: list[tuple[int, int, bool, bytes]],
                  gz: bool = False, torn: bytes = b"") -> Path:
    """One segment of ``topic`` in format ``key`` as the recorder writes it (formats' pack)."""
    d = root / topic_to_relpath(topic)
    d.mkdir(parents=True, exist_ok=True)
    fmt = formats.FORMATS[key]
    items = [x for r in recs if (x := fmt.item(encode_record(*r))) is not None]
    data = fmt.pack(items, 0) + torn if items else torn
    name = fmt.current if seq is None else segment_name(seq, gz, key)
    (d / name).write_bytes(gzip.compress(data) if gz else data)
    return d


PAYLOADS = [b'{"user": "ann", "n": 1}', b"plain text", b"\xff\x00binary", b"", b"null", b"[1, 2.5]",
            b'{"nested": {"a": [1]}, "n": -3}', b'{"a": 1,\n "b": 2}', b"a,b\"c", b"7", b'"s"', b"tab\there"]


def build_tree(root: Path) -> None:
    """Every write format, rotated + gzipped + current + torn, hostile names."""
    ts = iter(range(T0, T0 + 10_000_000, 1000))
    def recs(n: int) -> list[tuple[int, int, bool, bytes]]:
        return [(next(ts), i % 3, i % 4 == 0, PAYLOADS[i % len(PAYLOADS)]) for i in range(n)]
    write_segment(root, "plant/a", "jsonl", 1, recs(5), gz=True)
    write_segment(root, "plant/a", "jsonl", 2, recs(5))
    write_segment(root, "plant/a", "jsonl", None, recs(6), torn=b'{"ts":17638158')
    write_segment(root, "plant/arr", "json", 1, recs(4), gz=True)
    write_segment(root, "plant/arr", "json", None, recs(5), torn=b',\n{"ts":1,"qos"')  # a crash mid-append
    write_segment(root, "plant/c", "csv", 3, recs(7), gz=True)
    write_segment(root, "plant/c", "csv", None, recs(7), torn=b"176381580,1,tr")
    write_segment(root, "plant/p", "payload.jsonl", 1, recs(6))
    write_segment(root, "plant/p", "payload.json", None, recs(6))
    write_segment(root, "glob*", "jsonl", None, recs(3))        # DuckDB would glob this name ...
    write_segment(root, "globby", "jsonl", None, recs(4))       # ... onto this sibling
    write_segment(root, "odd/%/..//it's [1]", "jsonl", 2, recs(3), gz=True)
    long = "x" * 300  # a hashed level: the topic comes from its +topic file
    d = write_segment(root, f"long/{long}", "csv", None, recs(3))
    (d / TOPIC_FILE).write_text(f"long/{long}", encoding="utf-8")


def by_history(root: Path, prefix: str = "", since: int | None = None, until: int | None = None) -> list[tuple]:
    return sorted((t, r.ts, r.qos, r.retain, json.dumps(r.value, sort_keys=True))
                  for t, r in history.read(root, prefix, since, until))


def by_sql(con, where: str = "") -> list[tuple]:
    rows = con.execute(f"SELECT topic, ts_us, qos, retain, payload FROM records {where}").fetchall()
    return sorted((t, ts, q, r, json.dumps(json.loads(p), sort_keys=True)) for t, ts, q, r, p in rows)


def test_records_view_equals_history_read_in_every_format(tmp_path: Path) -> None:
    build_tree(tmp_path)
    con = history.connect(tmp_path)
    want = by_history(tmp_path)
    assert len(want) == 58  # 64 written, less the 6 non-JSON payloads a payload-only segment never holds
    assert by_sql(con) == want
    # the topic is decoded by shardlog.topics, glob characters read no sibling
    topics = dict(con.execute("SELECT topic, count(*) FROM records GROUP BY ALL").fetchall())
    assert topics["glob*"] == 3 and topics["globby"] == 4
    assert topics["odd/%/..//it's [1]"] == 3 and topics["long/" + "x" * 300] == 3
    # enc and payload as the record line holds them; ts is a TIMESTAMPTZ in µs (an instant, UTC)
    enc = dict(con.execute("SELECT coalesce(enc, '-'), count(*) FROM records WHERE topic = 'plant/a' "
                           "GROUP BY ALL").fetchall())
    assert set(enc) == {"-", "utf8", "base64"}
    t, text = con.execute("SELECT ts, payload->>'$' FROM records WHERE enc = 'base64' LIMIT 1").fetchone()
    assert t.microsecond % 1000 == 0 and text == "/wBiaW5hcnk="
    kinds = dict(con.execute("DESCRIBE records").fetchall()[i][:2] for i in range(7))
    assert kinds == {"topic": "VARCHAR", "ts": "TIMESTAMP WITH TIME ZONE", "ts_us": "BIGINT", "qos": "UTINYINT",
                     "retain": "BOOLEAN", "enc": "VARCHAR", "payload": "JSON"}


def test_prefix_and_time_pushdown_never_drop_a_matching_record(tmp_path: Path) -> None:
    rng = random.Random(7)
    ts = T0
    for t in range(12):
        topic = f"site/b{t % 3}/dev{t}" if t % 4 else f"site/b{t % 3}"
        keys = ["jsonl", "json", "csv"]
        for seq in range(1, 7):
            recs = []
            for _ in range(rng.randint(0, 6)):
                ts += rng.choice([0, 1, 1000, 250_000])  # equal ts across a segment boundary too
                recs.append((ts, 1, False, b'{"i": %d}' % ts))
            if recs:
                write_segment(tmp_path, topic, rng.choice(keys), seq, recs, gz=rng.random() < 0.5)
        ts = T0 + rng.randint(0, 2_000_000)
    stamps = [r[1] for r in by_history(tmp_path)]
    full = history.connect(tmp_path)
    all_files = len(sql.segment_files(tmp_path))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prefix=st.sampled_from(["", "site", "site/b1", "site/b1/dev7", "site/b2/dev5"]),
           since=st.one_of(st.none(), st.sampled_from(stamps), st.integers(T0 - 10, max(stamps) + 10)),
           until=st.one_of(st.none(), st.sampled_from(stamps), st.integers(T0 - 10, max(stamps) + 10)))
    def check(prefix: str, since: int | None, until: int | None) -> None:
        con = history.connect(tmp_path, prefix, since, until)
        cond = []
        if prefix:
            cond.append(f"(topic = '{prefix}' OR starts_with(topic, '{prefix}/'))")
        if since is not None:
            cond.append(f"ts_us >= {since}")
        if until is not None:
            cond.append(f"ts_us < {until}")
        where = "WHERE " + " AND ".join(cond) if cond else ""
        assert by_sql(con) == by_sql(full, where) == by_history(tmp_path, prefix, since, until)
        con.close()

    check()
    # and pruning does prune: a narrow window reads a few files of all
    mid = stamps[len(stamps) // 2]
    assert len(sql.segment_files(tmp_path, "", mid, mid + 1)) < all_files / 3


def test_sql_verb_formats_and_exit_codes(tmp_path: Path) -> None:
    build_tree(tmp_path)
    q = "SELECT topic, ts, qos, enc, payload FROM records WHERE topic = 'plant/a' ORDER BY ts_us"
    js = run_cli("sql", str(tmp_path), q, "--format", "json")
    assert js.returncode == 0, js.stderr
    rows = [json.loads(x) for x in js.stdout.splitlines()]
    want = [(t, r) for t, r in history.read(tmp_path, "plant/a")]
    assert [r["payload"] for r in rows] == [r.value for _, r in want]
    assert rows[0]["ts"].endswith("Z") and history.parse_time(rows[0]["ts"]) == want[0][1].ts
    csv_ = run_cli("sql", str(tmp_path), "SELECT topic, count(*) AS n FROM records GROUP BY ALL ORDER BY topic",
                   "--prefix", "plant")
    assert csv_.returncode == 0, csv_.stderr  # not a terminal: CSV by default
    # payload-only: the JSON ones
    assert csv_.stdout.decode().splitlines() == ["topic,n", "plant/a,16", "plant/arr,9", "plant/c,14", "plant/p,6"]
    table = run_cli("sql", str(tmp_path), "SELECT count(*) AS n FROM records", "--format", "table",
                    "--since", str(T0), "--until", str(T0 + 5000))
    assert table.returncode == 0 and table.stdout.decode().split() == ["n", "5", "(1", "row)"], table
    assert run_cli("sql", str(tmp_path), "SELECT nope FROM records").returncode == 65
    assert run_cli("sql", str(tmp_path / "missing"), "SELECT 1").returncode == 66
    assert run_cli("sql", str(tmp_path), "SELECT 1", "--prefix", "nothing/here").returncode == 66
    assert run_cli("sql", str(tmp_path), "SELECT 1", "--since", "yesterday").returncode == 64


def test_parquet_export_typed_columns_read_with_pandas(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_segment(root, "room/a", "jsonl", 1, [(T0 + 1, 1, False, b'{"user": "ann", "n": 1, "ok": true}'),
                                              (T0 + 2, 1, False, b'{"user": "bob", "n": 2, "x": 1.5}')], gz=True)
    write_segment(root, "room/a", "csv", None, [(T0 + 3, 0, True, b'{"User": "cy", "x": 2, "deep": {"a": 1}}'),
                                               (T0 + 4, 0, False, b"not json")])
    write_segment(root, "room/b", "json", None, [(T0 + 5, 2, False, b'{"mixed": 1, "big": 18446744073709551615}'),
                                                (T0 + 6, 2, False, b'{"mixed": "one", "ok": false}')])
    write_segment(root, "other", "jsonl", None, [(T0 + 7, 1, False, b'{"n": 9}')])
    out = tmp_path / "room.parquet"
    r = run_cli("export", str(root), "room", "--to", str(out))
    assert r.returncode == 0, r.stderr
    assert b"exported 6 records" in r.stderr
    df = pd.read_parquet(out, dtype_backend="numpy_nullable")
    assert len(df) == len(list(history.read(root, "room"))) == 6
    assert list(df.columns[:8]) == ["topic", "ts", "qos", "retain", "enc", "payload", "props", "user_properties"]
    assert df["props"].isna().all() and df["user_properties"].isna().all()  # no MQTT 5 properties here
    dtypes = {c: str(df[c].dtype) for c in df.columns[8:]}
    assert dtypes == {"payload.user": "string", "payload.n": "Int64", "payload.ok": "boolean", "payload.x": "Float64",
                      "payload.User~2": "string", "payload.mixed": "string", "payload.big": "string"}, dtypes
    assert str(df["ts"].dtype) == "datetime64[us, UTC]" and df["ts"].iloc[0].value // 1000 == T0 + 1
    assert df["payload.n"].tolist()[:2] == [1, 2] and df["payload.x"].tolist()[1:3] == [1.5, 2.0]
    assert df["payload.mixed"].dropna().tolist() == ["1", "one"]
    assert df["payload.big"].dropna().tolist() == ["18446744073709551615"]
    assert json.loads(df["payload"].iloc[2]) == {"User": "cy", "x": 2, "deep": {"a": 1}}
    assert df["enc"].dropna().tolist() == ["utf8"]
    assert run_cli("export", str(root), "room", "--to", str(out)).returncode == 73  # exists
    assert run_cli("export", str(root), "room", "--to", str(out), "--force").returncode == 0
    assert run_cli("export", str(root), "nothing", "--to", str(tmp_path / "n.parquet")).returncode == 66
    assert not (tmp_path / "n.parquet").exists()


def test_sql_over_a_real_recording(tmp_path: Path, broker: Mosquitto, publisher: Publisher,
                                   recorders: list[RecorderProc]) -> None:
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}],
                  rotate={"max_bytes": "1KiB", "max_age": None}, compress="gzip")
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    msgs = [(f"chat/r{i % 3}", json.dumps({"seq": i, "pad": "p" * 20}).encode(), 1) for i in range(200)]
    msgs += [("chat/r0", b"\x00\xffraw", 1), ("chat/r1", b"hello, text", 1), ("other/x", b"{}", 1)]
    publisher.publish_many(msgs)
    wait_for(lambda: (s := rec.stats()) and s.acked >= len(msgs), 60, f"{len(msgs)} acks (log: {rec.stderr_path})")
    root = tmp_path / "data"
    wait_for(lambda: any(p.name.endswith(".gz") for p in (root / "chat" / "r0").iterdir()), 30, "a gzipped segment")
    assert rec.stop() == 0
    r = run_cli("sql", str(root), "SELECT topic, payload->>'seq' AS seq, enc FROM records ORDER BY ts_us",
                "--prefix", "chat", "--format", "json")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(rows) == 202 and {x["topic"] for x in rows} == {"chat/r0", "chat/r1", "chat/r2"}
    assert sorted(int(x["seq"]) for x in rows if x["seq"] is not None) == list(range(200))
    assert sorted(x["enc"] or "" for x in rows if x["seq"] is None) == ["base64", "utf8"]
    assert by_sql(history.connect(root, "chat")) == by_history(root, "chat")


@pytest.mark.parametrize("key", ["jsonl", "json", "csv", "payload.jsonl"])
def test_a_segment_compressed_after_the_listing_is_read_again(tmp_path: Path, key: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    d = write_segment(tmp_path, "t", key, 1, [(T0 + i, 1, False, b'{"i": %d}' % i) for i in range(5)])
    write_segment(tmp_path, "t", "jsonl", None, [(T0 + 9, 1, False, b"{}")])
    files = sql.segment_files(tmp_path)
    plain = d / segment_name(1, False, key)
    assert [f.path for f in files][0] == str(plain)
    real_segment_files = sql.segment_files
    calls = []

    def compress_after_listing(*a: object, **kw: object) -> list[sql.SegmentFile]:
        got = real_segment_files(*a, **kw)  # type: ignore[arg-type]
        if not calls:  # the recorder compresses it right after our first listing
            (d / segment_name(1, True, key)).write_bytes(gzip.compress(plain.read_bytes()))
            os.unlink(plain)
        calls.append(1)
        return got

    monkeypatch.setattr(sql, "segment_files", compress_after_listing)
    cur = sql.query(tmp_path, "SELECT count(*) FROM records")
    assert cur.fetchone() == (6,) and len(calls) == 2


def run_on_terminal(*args: str) -> tuple[int, str]:
    """The CLI with stdout and stderr on a terminal (a pty), its output as the terminal shows it."""
    import pty

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shardlog", *args], stdin=subprocess.DEVNULL, stdout=slave,
                                stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed
                break
            if not data:
                break
            chunks.append(data)
        return proc.wait(60), b"".join(chunks).decode("utf-8", "replace")
    finally:
        os.close(master)


def test_on_a_terminal_sql_prints_a_table_and_export_a_progress_bar(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_segment(root, "t/a", "jsonl", None, [(T0 + i, 1, False, b'{"i": %d}' % i) for i in range(2000)])
    code, out = run_on_terminal("sql", str(root), "SELECT topic, count(*) AS n FROM records GROUP BY ALL")
    assert code == 0 and out.split() == ["topic", "n", "t/a", "2000", "(1", "row)"], out
    code, out = run_on_terminal("export", str(root), "t", "--to", str(tmp_path / "t.parquet"))
    assert code == 0 and "2,000/2,000 100%" in out and "exported 2000 records" in out, out
    assert len(pd.read_parquet(tmp_path / "t.parquet")) == 2000


def test_line_limit_from_file_sizes(tmp_path: Path) -> None:
    """DuckDB is told the largest file's content size (a .gz one's from its trailer), at least its 16 MiB."""
    big = tmp_path / "big.gz"
    big.write_bytes(gzip.compress(b"x" * 40_000_000))  # 40 MB in about 40 kB
    empty = tmp_path / "empty.gz"
    empty.write_bytes(gzip.compress(b""))
    assert sql._gz_size(str(big), big.stat().st_size) == 40_000_000
    assert sql._gz_size(str(empty), empty.stat().st_size) == 0
    assert sql.longest_line([0, 100]) == 16 * 1024 * 1024
    assert sql.longest_line([40_000_000]) == 40_000_001
    assert sql.longest_line([10 ** 12]) == sql.MAX_OBJECT
