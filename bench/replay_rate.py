#!/usr/bin/env python3
"""Replay rate of ``shardlog replay --speed max``, in records per second.

    python bench/replay_rate.py                       # 200,000 records, 100 topics, QoS 1 and QoS 0, 3 runs
    python bench/replay_rate.py --records 20000 --runs 1   # a smoke test
    python bench/replay_rate.py --window 100,1000     # compare in-flight windows (QoS 1)

A recording is written once with ``shardlog.records.encode_record`` (JSON object
payloads of about 50 bytes, one record every millisecond, round-robin over the
topics) into a temporary root. Every run gets a fresh private mosquitto
(/usr/sbin/mosquitto on a free 127.0.0.1 port, persistence off, no queue or
in-flight limits) with ``mosquitto_sub -C N`` subscribed to the branch, then runs
``python -m shardlog replay ROOT bench --broker mqtt://127.0.0.1:PORT --speed max``
(every record rewritten to the given QoS) and checks that the subscriber got all N.

Reported: the replay's own time (its summary line: from the first publish to the
last acknowledgement), records/s from that, the whole process's wall time (Python
start-up, reading and merging the segments included) and its CPU time (user+system,
the figure that matters when other processes share the cores). Progress on stderr,
a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardlog.records import encode_record  # noqa: E402 - the repo root is on sys.path only now

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
T0 = 1_763_815_800_000_000
SUMMARY_RE = re.compile(rb"replayed (\d+) records .* in ([0-9.]+) s")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_recording(root: Path, records: int, topics: int, qos: int) -> None:
    with contextlib.ExitStack() as stack:
        files = []
        for t in range(topics):
            d = root / "bench" / f"t{t:03d}"
            d.mkdir(parents=True, exist_ok=True)
            files.append(stack.enter_context(open(d / "+log.jsonl", "wb")))
        for i in range(records):
            payload = b'{"seq": %d, "value": %.3f, "unit": "C"}' % (i, 20 + (i % 1000) / 100)
            files[i % topics].write(encode_record(T0 + i * 1000, qos, False, payload))


def one_run(root: Path, records: int, window: int, workdir: Path) -> tuple[float, float, float]:
    """(replay seconds from its summary, process wall seconds, process CPU seconds)."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_inflight_messages 0\nset_tcp_nodelay true\n")
    broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sub = None
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)
        sub = subprocess.Popen([MOSQUITTO_SUB, "-p", str(port), "-q", "1", "-t", "bench/#", "-C", str(records)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        time.sleep(0.5)  # let the subscription be made (a benchmark, not a test)
        t = time.perf_counter()
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run([sys.executable, "-m", "shardlog", "replay", str(root), "bench", "--speed", "max",
                            "--window", str(window), "--broker", f"mqtt://127.0.0.1:{port}"],
                           capture_output=True, check=False, cwd=REPO)
        wall = time.perf_counter() - t
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
        if r.returncode != 0:
            raise RuntimeError(f"replay failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        m = SUMMARY_RE.search(r.stderr)
        if not m or int(m.group(1)) != records:
            raise RuntimeError(f"unexpected summary: {r.stderr.decode(errors='replace')}")
        out, _ = sub.communicate(timeout=60)
        got = out.count(b"\n")
        if got != records:
            raise RuntimeError(f"the subscriber got {got} of {records} messages")
        return float(m.group(2)), wall, cpu
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
            sub.wait()
        broker.terminate()
        broker.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--topics", type=int, default=100)
    ap.add_argument("--qos", default="1,0", help="comma-separated QoS levels to measure (default 1,0)")
    ap.add_argument("--window", default="1000", help="comma-separated --window values (default 1000)")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for qos in [int(q) for q in args.qos.split(",")]:
        with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
            root = Path(tmp) / "data"
            say(f"writing {args.records:,} records (QoS {qos}) over {args.topics} topics")
            write_recording(root, args.records, args.topics, qos)
            for window in [int(w) for w in args.window.split(",")]:
                inner, walls, cpus = [], [], []
                for run in range(args.runs):
                    work = Path(tmp) / f"run-{qos}-{window}-{run}"
                    work.mkdir()
                    sec, wall, cpu = one_run(root, args.records, window, work)
                    say(f"QoS {qos}, window {window}, run {run + 1}: {sec:.2f} s "
                        f"({args.records / sec:,.0f} records/s), process {wall:.2f} s, CPU {cpu:.2f} s")
                    inner.append(sec)
                    walls.append(wall)
                    cpus.append(cpu)
                sec, wall, cpu = statistics.median(inner), statistics.median(walls), statistics.median(cpus)
                rows.append((qos, window, sec, args.records / sec, wall, cpu))
    print(f"\n{args.records:,} records, {args.topics} topics, median of {args.runs} run(s)\n")
    print("| QoS | window | replay (first publish to last ack) | records/s | whole process | its CPU (user+sys) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for qos, window, sec, rate, wall, cpu in rows:
        print(f"| {qos} | {window} | {sec:.2f} s | {rate:,.0f} | {wall:.2f} s | {cpu:.2f} s |")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
