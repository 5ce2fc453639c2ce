#!/usr/bin/env python3
"""``shardlog sql`` against plain DuckDB ``read_json`` over the same files, same query, same run.

    python bench/sql.py                                  # 10,000,000 records over 1,000 topics, 5 runs each
    python bench/sql.py --records 200000 --topics 100 --runs 1   # a smoke test
    python bench/sql.py --root /var/tmp/sqlbench --keep  # reuse a generated tree next time
    python bench/sql.py --in-process                     # also both inside one process (no start-up)

The tree is written straight to disk in the recorder's format (``encode_record`` lines,
``site/bNN/devNNNN`` topics, one record every millisecond round-robin over the topics):
per topic 3 rotated segments (the oldest gzipped, as ``compress: gzip`` leaves them) and
the current ``+log.jsonl``. Payloads are JSON objects ``{"v": <float>, "seq": <int>}``.

Each query runs as a whole process, alternating the two contenders run by run:

- ``shardlog``: ``python -m shardlog sql ROOT QUERY --format csv > /dev/null`` (listing,
  pruning, topic decoding, the view, the query, the output);
- ``duckdb``: ``python -c`` with DuckDB alone: ``read_json('ROOT/**/+log*.jsonl*',
  filename=true)``, the topic cut out of the file name with ``regexp_extract`` (what
  one writes by hand; it does not decode escaped levels), the same query, fetched.

Queries: a full scan (count and average per topic) and a one-minute window near the end
(``--since``/``--until`` for shardlog, which prunes segments; a WHERE on ts for plain DuckDB).
``--in-process`` adds the same two queries run inside the script (``history.connect``,
listing and view included, against a plain DuckDB connection), without Python start-up.
Reported: medians (and min/max) of wall time and the ratio; progress on stderr, a markdown
table on stdout.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardlog.ondisk.segments import segment_name  # noqa: E402
from shardlog.records import encode_record  # noqa: E402

T0 = 1_763_815_800_000_000
SEGMENTS = 4  # 3 rotated (the first gzipped) + the current one


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def topic_of(i: int) -> str:
    return f"site/b{i % 20:02d}/dev{i:04d}"


def generate(root: Path, records: int, topics: int) -> None:
    per = records // topics
    start = time.monotonic()
    for t in range(topics):
        d = root / topic_of(t)
        d.mkdir(parents=True, exist_ok=True)
        # record k of topic t is global record k*topics + t, at T0 + that many ms
        lines = [encode_record(T0 + (k * topics + t) * 1000, 1, False,
                               b'{"v": %d.%02d, "seq": %d}' % (k % 97, t % 100, k))
                 for k in range(per)]
        bounds = [len(lines) * s // SEGMENTS for s in range(SEGMENTS + 1)]
        for s in range(SEGMENTS):
            data = b"".join(lines[bounds[s]:bounds[s + 1]])
            if s == SEGMENTS - 1:
                (d / "+log.jsonl").write_bytes(data)
            elif s == 0:
                (d / segment_name(s + 1, True)).write_bytes(gzip.compress(data, 1))
            else:
                (d / segment_name(s + 1)).write_bytes(data)
        if t % 50 == 49 or t == topics - 1:
            done = (t + 1) * per
            rate = done / (time.monotonic() - start)
            say(f"generated {done:,}/{per * topics:,} records ({rate:,.0f}/s)")


FULL = "SELECT topic, count(*) AS n, avg(CAST(payload->>'v' AS DOUBLE)) AS v FROM records GROUP BY topic ORDER BY topic"
PLAIN_VIEW = ("CREATE VIEW records AS SELECT regexp_extract(filename, '^{root}/(.*)/\\+log[^/]*$', 1) AS topic, "
              "make_timestamp(ts) AS ts, ts AS ts_us, qos, retain, enc, payload "
              "FROM read_json('{root}/**/+log*.jsonl*', "
              "format='newline_delimited', columns={{'ts': 'BIGINT', 'qos': 'UTINYINT', 'retain': 'BOOLEAN', "
              "'enc': 'VARCHAR', 'payload': 'JSON'}}, filename=true)")


def run(argv: list[str]) -> tuple[float, bytes]:
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, check=False)
    took = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(argv[:4])}...\n{r.stderr.decode()[-2000:]}")
    return took, r.stdout


def in_process(root: Path, queries: dict[str, str], lo: int, hi: int,
               args: argparse.Namespace) -> list[tuple[str, dict[str, list[float]]]]:
    """The same queries in this process: ``history.connect`` (listing and view included in
    each run) against a DuckDB connection with the plain view, interleaved."""
    import duckdb

    from shardlog import history

    out = []
    for name, q in queries.items():
        times: dict[str, list[float]] = {"shardlog": [], "duckdb": []}
        window = name != "full scan"
        for i in range(args.runs):
            for who in ("shardlog", "duckdb") if i % 2 == 0 else ("duckdb", "shardlog"):
                t = time.perf_counter()
                if who == "shardlog":
                    con = history.connect(root, "", lo if window else None, hi if window else None)
                else:
                    con = duckdb.connect()
                    con.execute("SET enable_progress_bar_print = false")
                    con.execute(PLAIN_VIEW.format(root=str(root)))
                rows = con.execute(q).fetchall()
                times[who].append(time.perf_counter() - t)
                con.close()
                if len(rows) != args.topics:
                    raise SystemExit(f"{who} {name} (in process): {len(rows)} rows, expected {args.topics}")
                say(f"{name} in process, run {i + 1}/{args.runs}: {who} {times[who][-1]:.2f} s")
        out.append((f"{name} (in process)", times))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=10_000_000)
    ap.add_argument("--topics", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--root", type=Path, help="where to write the tree (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the tree (and reuse one that is there)")
    ap.add_argument("--in-process", action="store_true",
                    help="also time history.connect against plain DuckDB inside this process (no start-up)")
    args = ap.parse_args()
    root = (args.root or Path(tempfile.mkdtemp(prefix="shardlog-sqlbench-"))).resolve()
    marker = root / f"+bench-{args.records}-{args.topics}"
    try:
        if not marker.exists():
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True)
            say(f"writing {args.records:,} records over {args.topics:,} topics below {root}")
            generate(root, args.records, args.topics)
            marker.write_text("")
        size = sum(f.stat().st_size for f in root.rglob("+log*"))
        say(f"tree: {size / 1e6:,.0f} MB on disk")
        total_ms = args.records
        lo = T0 + (total_ms - 60_000) * 1000  # the last minute of the recording
        hi = T0 + total_ms * 1000
        window = f"SELECT topic, count(*) AS n, avg(CAST(payload->>'v' AS DOUBLE)) AS v FROM records " \
                 f"WHERE ts_us >= {lo} AND ts_us < {hi} GROUP BY topic ORDER BY topic"
        py = sys.executable
        plain_view = PLAIN_VIEW.format(root=str(root))
        cases = {
            "full scan": (
                [py, "-m", "shardlog", "sql", str(root), FULL, "--format", "csv"],
                [py, "-c", f"import duckdb; c = duckdb.connect(); c.execute('SET enable_progress_bar_print = false'); "
                           f"c.execute({plain_view!r}); "
                           f"rows = c.execute({FULL!r}).fetchall(); print(len(rows))"]),
            "last minute": (
                [py, "-m", "shardlog", "sql", str(root), window, "--format", "csv",
                 "--since", str(lo), "--until", str(hi)],
                [py, "-c", f"import duckdb; c = duckdb.connect(); c.execute('SET enable_progress_bar_print = false'); "
                           f"c.execute({plain_view!r}); "
                           f"rows = c.execute({window!r}).fetchall(); print(len(rows))"]),
        }
        results = []
        if args.in_process:
            results.extend(in_process(root, {"full scan": FULL, "last minute": window}, lo, hi, args))
        for name, (ours, plain) in cases.items():
            times: dict[str, list[float]] = {"shardlog": [], "duckdb": []}
            for i in range(args.runs):
                for who, argv in (("shardlog", ours), ("duckdb", plain)) if i % 2 == 0 else \
                        (("duckdb", plain), ("shardlog", ours)):
                    took, out = run(argv)
                    lines = out.decode().splitlines()
                    rows = len(lines) - 1 if who == "shardlog" else int(lines[-1])
                    if rows != args.topics:
                        raise SystemExit(f"{who} {name}: {rows} rows, expected {args.topics}")
                    times[who].append(took)
                    say(f"{name} run {i + 1}/{args.runs}: {who} {took:.2f} s")
            results.append((name, times))
        print(f"\n{args.records:,} records, {args.topics:,} topics, {size / 1e6:,.0f} MB, {args.runs} runs each, "
              f"load average {os.getloadavg()[0]:.1f}\n")
        print("| query | `shardlog sql` median (min-max) | plain DuckDB `read_json` median (min-max) | ratio |")
        print("| --- | ---: | ---: | ---: |")
        for name, times in results:
            a, b = statistics.median(times["shardlog"]), statistics.median(times["duckdb"])
            print(f"| {name} | {a:.2f} s ({min(times['shardlog']):.2f}-{max(times['shardlog']):.2f}) | "
                  f"{b:.2f} s ({min(times['duckdb']):.2f}-{max(times['duckdb']):.2f}) | {a / b:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
