"""Does scraping the supervisor slow recording? (not a test; run it by hand)

    python bench/stats_cost.py [MESSAGES_PER_SHARD] [ROUNDS]

For each round and each mode (no scraping, /metrics + /status every second, /metrics ten times a
second): queue MESSAGES_PER_SHARD QoS 1 messages for each of two shards while they are stopped, start
`shardlog supervise`, and time how long the shards take to write them all, from the first record
written to the last (watching their stats files, not the HTTP endpoint). Prints messages/s per mode
and the difference to no scraping.
"""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests.helpers

import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from shardlog.counters import read_stats
from tests.helpers import Mosquitto
from tests.supervisor.helpers import SupervisorProc, make_map, wait_for

MODES = {"none": None, "1/s": 1.0, "10/s": 0.1}


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def run_once(workdir: Path, port: int, n: int, scrape_every: float | None) -> tuple[float, float]:
    """(messages/s, the supervisor's own CPU use in % of one core) while the shards drain."""
    m = workdir / "shards.yaml"
    sup = SupervisorProc(m, workdir)
    sup.log_path.unlink(missing_ok=True)  # one log per run: the run dir is read from it
    sup.start(wait_ready=False)
    try:
        run_dir = wait_for(lambda: re.search(r"run dir (\S+)\)", sup.log()), 20, "the run dir").group(1)
        if n == 0:  # the first run only creates the shards' persistent sessions
            wait_for(lambda: "ready:" in sup.log(), 30, "the shards to subscribe")
            return 0.0, 0.0
        me = psutil.Process(sup.pid)
        stop = threading.Event()
        scrapes = 0

        def scrape() -> None:
            nonlocal scrapes
            while not stop.wait(scrape_every):
                for path in ("/metrics", "/status"):
                    try:
                        urllib.request.urlopen(sup.url + path, timeout=5).read()
                        scrapes += 1
                    except OSError:
                        pass

        scraper = threading.Thread(target=scrape, daemon=True)
        if scrape_every is not None:
            scraper.start()

        first: list[float] = []

        def done() -> bool:
            total = 0
            for name in ("a", "b"):
                c = read_stats(f"{run_dir}/{name}.stats.json")
                total += c.messages if c is not None else 0
            if total and not first:
                first.append(time.monotonic())  # time from the first write: startup excluded
                first.append(_cpu(me))
            return total >= 2 * n

        wait_for(done, 300, "every queued message to be written", interval=0.01)
        elapsed = time.monotonic() - first[0]
        cpu = (_cpu(me) - first[1]) / elapsed * 100
        stop.set()
        return 2 * n / elapsed, cpu
    finally:
        sup.signal(signal.SIGTERM)
        sup.wait(30)


def publish(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 and wait until the broker acknowledged each (its queue keeps them)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="statsbench-pub", protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    for start in range(0, len(messages), 20000):  # message ids wrap at 65535
        infos = [c.publish(t, p, 1) for t, p in messages[start:start + 20000]]
        for info in infos:
            info.wait_for_publish(600)
    c.disconnect()
    c.loop_stop()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="shardlog-statsbench-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        try:
            make_map(work / "shards.yaml", broker.port,
                     [{"name": "a", "prefix": "a", "root": str(work / "ra")},
                      {"name": "b", "prefix": "b", "root": str(work / "rb")}],
                     supervisor={"heartbeat_timeout": "5s"})
            # create the persistent sessions once
            run_once(work, broker.port, 0, None)
            results: dict[str, list[float]] = {k: [] for k in MODES}
            cpus: dict[str, list[float]] = {k: [] for k in MODES}
            payload = json.dumps({"user": "ann", "text": "hello " * 8}).encode()
            for r in range(rounds):
                for mode, every in MODES.items():
                    publish(broker.port, [(f"{b}/room{i % 50}", payload) for i in range(n) for b in "ab"])
                    rate, cpu = run_once(work, broker.port, n, every)
                    results[mode].append(rate)
                    cpus[mode].append(cpu)
                    print(f"round {r + 1} scrape {mode:>5}: {rate:,.0f} msg/s, supervisor CPU {cpu:.2f}%",
                          flush=True)
        finally:
            broker.stop()
    base = statistics.median(results["none"])
    print(f"\n{2 * n:,} messages per run (two shards), median of {rounds}, {os.cpu_count()} CPUs:")
    for mode, rates in results.items():
        med = statistics.median(rates)
        print(f"  scrape {mode:>5}: {med:,.0f} msg/s ({(med - base) / base * 100:+.1f}% vs none), "
              f"supervisor CPU {statistics.median(cpus[mode]):.2f}% of one core")


if __name__ == "__main__":
    main()
