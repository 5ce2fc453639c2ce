"""The read verbs at the edges (issue 22, item 8): segments that are no regular file, a
truncated .gz, payloads nested 100,000 deep, a 400-digit ts, sparse segments of gigabytes
(bounded time and memory), a topic directory without read permission. Each: a clear
warning naming the path on stderr and exit 74 for what was left out, never a hang or a
traceback. The verbs run as real subprocesses (a FIFO would hang them: the timeout fails
the test)."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from shardlog import history
from shardlog.ondisk.segments import segment_name
from shardlog.reading import lines as reading_lines
from shardlog.records import encode_record

T0 = 1_763_815_800_000_000
EX_IOERR = 74
GiB = 1 << 30


def run_cli(*args: str, timeout: float = 60, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*prefix, sys.executable, "-m", "shardlog", *args], capture_output=True,
                          timeout=timeout, check=False)


def peak_rss_mib(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess[bytes], float, float]:
    """Run the verb in a fresh child of a fresh Python: (result, its peak RSS in MiB, seconds)."""
    code = ("import resource, subprocess, sys, time; t = time.monotonic(); "
            "r = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.stdout.buffer.write(b'%d %d %.3f\\n' % (r.returncode, "
            "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.monotonic() - t) + r.stderr)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "shardlog", *args],
                         capture_output=True, timeout=timeout, check=True).stdout
    head, _, err = out.partition(b"\n")
    rc, rss_kib, secs = head.split()
    return subprocess.CompletedProcess(args, int(rc), b"", err), int(rss_kib) / 1024, float(secs)


def recs(start: int, n: int) -> bytes:
    return b"".join(encode_record(T0 + i, 1, False, b'{"i": %d}' % i) for i in range(start, start + n))


def good_topic(root: Path, name: str = "good") -> None:
    (root / name).mkdir(parents=True)
    (root / name / "+log.jsonl").write_bytes(recs(0, 3))


def assert_warned(r: subprocess.CompletedProcess[bytes], *names: str) -> str:
    err = r.stderr.decode()
    assert r.returncode == EX_IOERR, (r.returncode, err)
    assert "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)
    return err


# -- not a regular file ----------------------------------------------------------------------

def _make(kind: str, path: Path) -> None:
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")  # a device: reads for ever


@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
@pytest.mark.parametrize("name", ["+log.jsonl", segment_name(1), segment_name(1, True)])
def test_a_segment_that_is_no_regular_file_is_skipped_with_a_warning(tmp_path: Path, kind: str, name: str) -> None:
    root = tmp_path / "r"
    good_topic(root)
    (root / "odd").mkdir()
    if name != "+log.jsonl":
        (root / "odd" / "+log.jsonl").write_bytes(recs(10, 2))
    bad = root / "odd" / name
    _make(kind, bad)
    expected = {"directory": "a directory", "fifo": "a FIFO", "device": "a character device"}[kind]
    for verb in (["tail", str(root), "odd"], ["cat", str(root), ""], ["cat", str(root), "odd"],
                 ["topics", "--long", str(root)], ["cat", "--format", "csv", str(root), ""],
                 ["sql", str(root), "SELECT count(*) FROM records"],
                 ["export", str(root), "", "--to", str(tmp_path / "x.sqlite"), "--force"],
                 ["export", str(root), "", "--to", str(tmp_path / "x.parquet"), "--force"]):
        if verb[0] == "tail" and name != "+log.jsonl":
            continue  # tail -n 6 is served by the current segment alone
        r = run_cli(*verb, timeout=30)
        err = assert_warned(r, f"{bad}: {expected}; skipped")
        assert err.count("; skipped") == 1, err  # said once
        if verb[:2] == ["cat", str(root)] and verb[2] == "":
            got = [json.loads(x) for x in r.stdout.splitlines()]
            assert [(d["topic"], d["payload"]["i"]) for d in got] == \
                [("good", 0), ("good", 1), ("good", 2)] + ([("odd", 10), ("odd", 11)] if name != "+log.jsonl" else [])


# -- a truncated .gz ---------------------------------------------------------------------------

def test_a_truncated_gz_segment_is_read_up_to_the_damage_with_an_error_naming_it(tmp_path: Path) -> None:
    d = tmp_path / "r" / "t"
    d.mkdir(parents=True)
    whole = gzip.compress(recs(0, 20_000))
    (d / segment_name(1, True)).write_bytes(whole[: len(whole) // 2])
    (d / "+log.jsonl").write_bytes(recs(20_000, 5))
    gz = str(d / segment_name(1, True))
    r = run_cli("cat", str(tmp_path / "r"), "t")
    assert_warned(r, f"{gz}: damaged gzip segment")
    got = [json.loads(x)["payload"]["i"] for x in r.stdout.splitlines()]
    assert 0 < got.index(20_000) < 20_000 and got[: got.index(20_000)] == list(range(got.index(20_000)))
    assert got[-5:] == list(range(20_000, 20_005))
    for verb in (["tail", str(tmp_path / "r"), "t", "-n", "10"], ["topics", "-l", str(tmp_path / "r")],
                 ["export", str(tmp_path / "r"), "t", "--to", str(tmp_path / "x.sqlite"), "--force"]):
        assert_warned(run_cli(*verb), gz)


# -- hostile records ---------------------------------------------------------------------------

def test_deep_payloads_print_and_a_400_digit_ts_is_a_per_record_warning(tmp_path: Path) -> None:
    d = tmp_path / "r" / "t"
    d.mkdir(parents=True)
    deep = b"[" * 100_000 + b"]" * 100_000
    (d / "+log.jsonl").write_bytes(
        encode_record(T0, 0, False, b"1")
        + b'{"ts":%d,"qos":1,"retain":false,"payload":%s}\n' % (T0 + 1, deep)
        + b'{"ts":' + b"9" * 400 + b',"qos":0,"retain":false,"payload":2}\n'
        + encode_record(T0 + 3, 0, False, b"3"))
    root = str(tmp_path / "r")
    r = run_cli("cat", root, "t")
    assert_warned(r, "a line that is no record left out", "at `$.ts`")
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[1].endswith(b'"payload":' + deep + b"}")
    r = run_cli("cat", "--format", "csv", root, "t")
    assert_warned(r, "at `$.ts`")
    assert deep.decode() in r.stdout.decode()
    r = run_cli("export", root, "t", "--to", str(tmp_path / "x.sqlite"))
    assert_warned(r, "at `$.ts`")
    with sqlite3.connect(tmp_path / "x.sqlite") as con:
        rows = con.execute("SELECT ts, payload_json FROM records ORDER BY ts").fetchall()
    assert [(ts - T0, p == deep.decode()) for ts, p in rows] == [(0, False), (1, True), (3, False)]
    r = run_cli("topics", "-l", root)
    assert r.returncode == 0 and r.stdout.decode().startswith("t\t4\t"), r.stderr
    r = run_cli("tail", root, "t", "-n", "4")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4, r.stderr
    assert [rec.ts - T0 for rec in history.tail(root, "t", 4)] == [0, 3]  # the API: warned, left out


# -- sparse segments: bounded time and memory --------------------------------------------------

def test_tail_of_a_10_gib_sparse_segment_reads_a_bounded_number_of_bytes(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "r" / "t"
    d.mkdir(parents=True)
    (d / segment_name(1)).write_bytes(recs(0, 10))
    cur = d / "+log.jsonl"
    cur.write_bytes(recs(10, 10))
    os.truncate(cur, 10 * GiB)  # a crash left a hole of NULs: no disk used
    read_bytes: list[int] = []
    real = reading_lines._pread

    def counting(fd: int, n: int, off: int) -> bytes:
        data = real(fd, n, off)
        read_bytes.append(len(data))
        return data

    monkeypatch.setattr(reading_lines, "_pread", counting)
    t = time.monotonic()
    got = history.tail(tmp_path / "r", "t", 3)
    assert time.monotonic() - t < 10
    assert [r.value["i"] for r in got] == [7, 8, 9]  # the segment before: the damaged one is left out, said
    assert sum(read_bytes) <= 4 * reading_lines.MAX_GARBAGE, sum(read_bytes)
    r, rss, secs = peak_rss_mib("tail", str(tmp_path / "r"), "t")
    assert_warned(r, f"{cur}: no line start in the")
    assert rss < 200 and secs < 20, (rss, secs)


def test_a_hole_in_the_middle_of_a_segment_is_skipped_by_tail_cat_and_export_in_bounded_memory(
        tmp_path: Path) -> None:
    d = tmp_path / "r" / "t"
    d.mkdir(parents=True)
    seg = d / segment_name(1)
    seg.write_bytes(recs(0, 5))
    os.truncate(seg, 4 * GiB)
    with open(seg, "ab") as f:
        f.write(b"\n" + recs(5, 5))
    (d / "+log.jsonl").write_bytes(recs(10, 2))
    root = str(tmp_path / "r")
    r = run_cli("tail", root, "t", "-n", "7")
    assert r.returncode == 0 and [json.loads(x)["payload"]["i"] for x in r.stdout.splitlines()] == list(range(5, 12))
    for verb in (["cat", root, "t"], ["export", root, "t", "--to", str(tmp_path / "x.sqlite"), "--force"],
                 ["sql", root, "SELECT count(*) AS n FROM records"],  # DuckDB reads a copy without the hole
                 ["export", root, "t", "--to", str(tmp_path / "x.parquet"), "--force"]):
        r, rss, secs = peak_rss_mib(*verb)
        assert_warned(r, f"{seg}: a line of {4 * GiB - len(recs(0, 5)) + 1} bytes at offset {len(recs(0, 5))} "
                      "holds a NUL byte")
        assert rss < 200 and secs < 60, (verb, rss, secs)
    with sqlite3.connect(tmp_path / "x.sqlite") as con:
        assert [ts - T0 for (ts,) in con.execute("SELECT ts FROM records ORDER BY ts")] == list(range(12))
    con = history.connect(root)
    assert [ts - T0 for (ts,) in con.execute("SELECT ts_us FROM records ORDER BY ts_us").fetchall()] == list(range(12))
    parquet = tmp_path / "x.parquet"
    assert duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{parquet}')").fetchone() == (12,)


# -- a topic directory without read permission -------------------------------------------------

_NO_DAC = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")


def test_an_unreadable_topic_directory_is_a_warning_and_exit_74(tmp_path: Path) -> None:
    root = tmp_path / "r"
    good_topic(root)
    good_topic(root, "locked")
    (root / "locked").chmod(0)
    # root reads everything: drop the capabilities that let it (the bits then apply to it too)
    prefix = _NO_DAC if os.geteuid() == 0 else ()
    try:
        for verb in (["topics", str(root)], ["cat", str(root), ""], ["sql", str(root), "SELECT count(*) FROM records"],
                     ["export", str(root), "", "--to", str(tmp_path / "x.sqlite"), "--force"]):
            r = run_cli(*verb, prefix=prefix)
            assert_warned(r, f"{root / 'locked'}: cannot be listed (Permission denied); left out")
        r = run_cli("topics", str(root), prefix=prefix)
        assert r.stdout == b"good\n"
    finally:
        (root / "locked").chmod(0o755)
    assert run_cli("topics", str(root), prefix=prefix).returncode == 0
