#!/usr/bin/env python3
"""Does an HTTP attack on the supervisor slow recording, or /status? (not a test; run it by hand)

    python bench/http_attack.py [--messages 30000] [--rounds 3]

A private mosquitto, a real `shardlog supervise` with one shard. Rounds alternate between quiet
and attacked; in each, a raw-socket publisher sends MESSAGES QoS 1 messages as fast as the broker
takes them and the clock runs until the shard's stats file counts them all (so the figure is the
recording rate, publisher and broker included). Meanwhile a probe in this process GETs /status 20
times a second (both modes). The attack runs in another process: 200 slowloris connections held
open (one more header line every 5 s), 4 clients pipelining GET /metrics without reading (opened
again every 5 s: the server closes them after its write timeout; issue 22), and every second 300
concurrent keep-alive clients each GET /status once plus every bad request of tests/http_attack.py
(1 MB header, garbage, oversized and non-JSON bodies, `..` paths). Prints medians and ratios, /status latency and the
supervisor's CPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.helpers

import psutil

from shardlog.counters import read_stats
from tests.helpers import FastPublisher, Mosquitto, wait_for
from tests.http_attack import (
    BAD_REQUESTS,
    Slowloris,
    concurrent_gets,
    exchange,
    get_status,
    pipeline_without_reading,
    summary,
)
from tests.supervisor.helpers import SupervisorProc, make_map


def attack(addr: tuple[str, int], stop: Any, counts: dict) -> None:
    slow = Slowloris(addr, 200)
    hogs = pipeline_without_reading(addr, 4, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    last_trickle = time.monotonic()
    rounds = 0
    try:
        while not stop.is_set():
            t0 = time.monotonic()
            for status, n in concurrent_gets(addr, 300, rounds=1).items():
                counts[status] = counts.get(status, 0) + n
            for _, data, _ in BAD_REQUESTS:
                status = exchange(addr, data) or 0
                counts[status] = counts.get(status, 0) + 1
            if time.monotonic() - last_trickle > 5:
                counts["slowloris_open"] = slow.trickle()
                for h in hogs:
                    h.close()
                hogs = pipeline_without_reading(addr, 4, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                last_trickle = time.monotonic()
            rounds += 1
            counts["rounds"] = rounds
            stop.wait(max(0.0, 1.0 - (time.monotonic() - t0)))
    finally:
        slow.close()
        for h in hogs:
            h.close()


def one_round(sup: SupervisorProc, stats_file: str, port: int, n: int, addr: tuple[str, int],
              attacked: bool, seq: int) -> dict:
    manager_counts: dict = multiprocessing.Manager().dict() if attacked else {}
    stop = multiprocessing.Event()
    proc = None
    if attacked:
        proc = multiprocessing.Process(target=attack, args=(addr, stop, manager_counts), daemon=True)
        proc.start()
        time.sleep(2.0)  # let the attack reach its steady state before the clock starts
    probe: list[float] = []
    probe_stop = threading.Event()

    def probing() -> None:
        while not probe_stop.is_set():
            status, dt = get_status(addr)
            probe.append(dt if status == 200 else float("inf"))
            probe_stop.wait(0.05)

    pt = threading.Thread(target=probing, daemon=True)
    pt.start()
    sup_proc = psutil.Process(sup.pid)
    cpu0 = sum(sup_proc.cpu_times()[:2])
    base = (read_stats(stats_file) or None)
    base_n = base.messages if base is not None else 0
    pub = FastPublisher(port, client_id=f"bench-http-{seq}")
    t0 = time.monotonic()
    pub.publish_many([(f"a/t{i % 10}", b'{"i": %d, "text": "the quick brown fox jumps over the lazy dog"}' % i)
                      for i in range(n)])
    pub.wait_acked(120)
    wait_for(lambda: (s := read_stats(stats_file)) is not None and s.messages >= base_n + n, 120,
             "the shard to record every message", interval=0.01)
    elapsed = time.monotonic() - t0
    cpu = sum(sup_proc.cpu_times()[:2]) - cpu0
    pub.close()
    probe_stop.set()
    pt.join(10)
    stop.set()
    if proc is not None:
        proc.join(30)
    return {"mode": "attack" if attacked else "quiet", "rate": n / elapsed, "seconds": elapsed,
            "supervisor_cpu": cpu / elapsed * 100, "status": summary(probe), "probes": len(probe),
            "attack": dict(manager_counts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=30000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardlog-bench-http-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        m = make_map(work / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(work / "data"))
        sup = SupervisorProc(m, work)
        try:
            sup.start()
            sup.running("a")
            host, port = sup.url.removeprefix("http://").rsplit(":", 1)
            addr = (host, int(port))
            doc = sup.shard("a")
            assert doc is not None
            # the supervisor's run dir holds the stats file; find it through the recorder's command line
            cmd = psutil.Process(doc["pid"]).cmdline()
            stats_file = cmd[cmd.index("--stats-file") + 1]
            results = []
            for r in range(args.rounds):
                for attacked in ((False, True) if r % 2 == 0 else (True, False)):
                    res = one_round(sup, stats_file, broker.port, args.messages, addr, attacked, len(results))
                    results.append(res)
                    print(f"round {r + 1} {res['mode']:6}: {res['rate']:8,.0f} msg/s, /status {res['status']} "
                          f"({res['probes']} probes), supervisor CPU {res['supervisor_cpu']:.1f}% "
                          f"{res['attack'] or ''}", flush=True)
            assert sup.shard("a")["restarts"] == 0
        finally:
            sup.kill_all()
            broker.stop()
    for mode in ("quiet", "attack"):
        rs = [r for r in results if r["mode"] == mode]
        print(f"{mode:6}: median {statistics.median(r['rate'] for r in rs):,.0f} msg/s "
              f"(min {min(r['rate'] for r in rs):,.0f}, max {max(r['rate'] for r in rs):,.0f}); /status median "
              f"{statistics.median(r['status']['median_ms'] for r in rs)} ms, p99 "
              f"{statistics.median(r['status']['p99_ms'] for r in rs)} ms; supervisor CPU "
              f"{statistics.median(r['supervisor_cpu'] for r in rs):.1f}%")
    q = statistics.median(r["rate"] for r in results if r["mode"] == "quiet")
    a = statistics.median(r["rate"] for r in results if r["mode"] == "attack")
    print(f"attack / quiet recording rate: {a / q:.2f}")


if __name__ == "__main__":
    main()
