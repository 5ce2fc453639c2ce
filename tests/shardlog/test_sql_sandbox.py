"""`shardlog sql` confined to reading the root (issue 22, item 19): COPY ... TO (anywhere, the
root included), ATTACH + CREATE, read_text of a file outside the root, INSTALL/LOAD, SET are
refused by default (exit 77, nothing written) and run with --unsafe; `ts` is a TIMESTAMPTZ, so
"the last minute" is right whatever the host's TZ. Real subprocesses, a real DuckDB."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from shardlog import history
from shardlog.records import encode_record

EX_NOPERM = 74 + 3


def run_sql(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", "sql", *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, **(env or {})})


def make_root(tmp_path: Path, n: int = 3, base: int | None = None) -> Path:
    root = tmp_path / "root"
    (root / "t").mkdir(parents=True)
    base = base if base is not None else time.time_ns() // 1000 - 20_000_000  # 20 s ago
    (root / "t" / "+log.jsonl").write_bytes(
        b"".join(encode_record(base + i, 1, False, b'{"i": %d}' % i) for i in range(n)))
    return root


def test_writes_attach_outside_reads_and_extensions_are_refused_by_default_and_run_with_unsafe(
        tmp_path: Path) -> None:
    root = make_root(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    bogus = root / "bogus" / "+log.jsonl"
    (root / "bogus").mkdir()
    outside = tmp_path / "out.csv"
    db = tmp_path / "x.db"
    cases = [  # (query, refused by, what --unsafe makes of it)
        (f"COPY (SELECT ts_us AS ts, qos, retain, payload FROM records) TO '{bogus}' (FORMAT json)",
         "COPY statements are refused", lambda r: bogus.exists()),
        (f"COPY (SELECT * FROM records) TO '{outside}'", "COPY statements are refused", lambda r: outside.exists()),
        (f"ATTACH '{db}' AS x; CREATE TABLE x.t AS SELECT * FROM records", "ATTACH statements are refused",
         lambda r: db.exists()),
        (f"SELECT content FROM read_text('{secret}')", "Permission Error", lambda r: "the secret" in r.stdout),
        ("SELECT count(*) FROM read_text('/etc/passwd')", "Permission Error", lambda r: r.stdout.strip() != ""),
        ("INSTALL httpfs", "LOAD statements are refused", lambda r: "refused" not in r.stderr),
        ("LOAD parquet", "LOAD statements are refused", lambda r: r.returncode == 0),
        (f"EXPORT DATABASE '{tmp_path / 'exp'}'", "EXPORT statements are refused",
         lambda r: (tmp_path / "exp").exists()),
        ("SET memory_limit = '1GB'; SELECT 1", "the configuration has been locked",
         lambda r: r.returncode == 0),
        ("PRAGMA version", "PRAGMA statements are refused", lambda r: r.returncode == 0),
    ]
    for q, why, _unsafe_ok in cases:
        r = run_sql(str(root), q)
        assert r.returncode == EX_NOPERM and why in r.stderr and "Traceback" not in r.stderr, \
            (q, r.returncode, r.stderr)
        assert "--unsafe" in r.stderr, r.stderr
        assert not bogus.exists() and not outside.exists() and not db.exists() and not (tmp_path / "exp").exists()
    assert [t.topic for t in history.topics(root)] == ["t"]  # no bogus topic
    # reading the root still works, in-memory tables too
    r = run_sql(str(root), "CREATE TABLE m AS SELECT * FROM records; SELECT count(*) AS n FROM m")
    assert r.returncode == 0 and r.stdout == "n\n3\n", r.stderr
    for q, _why, unsafe_ok in cases:
        r = run_sql("--unsafe", str(root), q)
        assert "Permission Error" not in r.stderr and "refused" not in r.stderr, (q, r.stderr)
        assert unsafe_ok(r), (q, r.returncode, r.stdout, r.stderr)
    assert len(list(history.read(root, "bogus"))) == 3  # what --unsafe can do: a topic written by SQL


def test_history_connect_is_confined_too(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    con = history.connect(root)
    assert con.execute("SELECT count(*) FROM records").fetchone() == (3,)
    for q in (f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'", "SELECT * FROM read_text('/etc/passwd')",
              f"ATTACH '{tmp_path / 'x.db'}' AS x", "INSTALL httpfs"):
        with pytest.raises(duckdb.PermissionException):
            con.execute(q)
    with pytest.raises(duckdb.InvalidInputException, match="locked"):
        con.execute("SET enable_external_access = true")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "x.db").exists()
    free = history.connect(root, sandbox=False)
    free.execute(f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'")
    assert (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("tz", ["Asia/Tokyo", "America/Los_Angeles", "UTC"])
def test_ts_is_a_timestamptz_so_the_last_minute_is_right_in_any_host_zone(tmp_path: Path, tz: str) -> None:
    root = make_root(tmp_path, n=50)
    r = run_sql(str(root), "SELECT count(*) AS n FROM records WHERE ts > now() - INTERVAL 1 minute",
                env={"TZ": tz})
    assert r.returncode == 0 and r.stdout == "n\n50\n", (r.returncode, r.stdout, r.stderr)
    base = 1_763_815_800_123_456
    root2 = make_root(tmp_path / "2", n=1, base=base)
    r = run_sql(str(root2), "SELECT ts, typeof(ts) AS type, epoch_us(ts) = ts_us AS same FROM records",
                "--format", "json", env={"TZ": tz})
    assert r.returncode == 0 and r.stdout == \
        '{"ts": "2025-11-22T12:50:00.123456Z", "type": "TIMESTAMP WITH TIME ZONE", "same": true}\n', r.stdout
    r = run_sql(str(root2), "SELECT count(*) AS n FROM records WHERE ts = TIMESTAMPTZ '2025-11-22 12:50:00.123456Z'",
                env={"TZ": tz})
    assert r.stdout == "n\n1\n", r.stdout
