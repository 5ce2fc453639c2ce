#!/usr/bin/env python3
"""A sensor fleet, live: many topics published at a paced rate, and how far the files trail.

    python bench/live_load.py                                  # 100,000 topics, 20,000 msg/s, 120 s
    python bench/live_load.py --topics 10000 --rate 5000 --seconds 30 --tmpdir /mnt/ext4j
    python bench/live_load.py --set defaults.journal.enabled=true

One shard (``shardlog record``, QoS 1, the map's defaults plus ``--set``) on a private
mosquitto, as in bench/throughput.py. First every topic is created (one untimed message
each, ``sensors/dNNNNNN``: the fleet has spoken before). Then a paced QoS 1 publisher
sends ``--rate`` msg/s round-robin over the topics for ``--seconds``, and a probe topic
(``probe/p``) 50 times a second, each payload carrying its send time. Measured where the
user reads:

* **publish-to-file lag**: a watcher tails the probe's ``+log.jsonl`` every 5 ms and takes,
  for each new record, now minus its send time: median, p99, max, per 10 s window too;
* **the files' backlog**: records published minus records in their topic files (the
  shard's ``messages`` counter) at the end of the publishing, and the seconds after it until
  every record is in its file;
* **+recent.json**: the shard's ``recent_lag`` (seconds since the oldest change not yet in
  its +recent.json) and ``recent_stale`` (files behind), sampled every second; the seconds
  after the last record until every +recent.json is current;
* **RSS** of the shard, sampled every second: first and last minute.

Progress goes to stderr; a markdown summary to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp
from new_topics import connect, packet  # raw QoS 1 PUBLISH packets, a publisher socket

PROBE = b"probe/p"
PROBE_HZ = 50


def names(topics: int) -> list[bytes]:
    return [b"sensors/d%06d" % i for i in range(topics)]


class Paced(threading.Thread):
    """``rate`` msg/s round-robin over ``topics`` plus the probe at PROBE_HZ, for ``seconds``."""

    def __init__(self, port: int, topics: list[bytes], rate: float, seconds: float, size: int) -> None:
        super().__init__(daemon=True)
        self.sock = connect(port, b"bench-fleet")
        self.topics = topics
        self.rate = rate
        self.seconds = seconds
        self.pad = b"x" * max(0, size - 40)
        self.sent = 0
        self.probes = 0
        self.behind = 0.0  # the most the publisher fell behind its schedule (s)

    def run(self) -> None:
        t0 = time.monotonic()
        mid = 0
        topics, n_topics = self.topics, len(self.topics)
        while True:
            el = time.monotonic() - t0
            if el >= self.seconds:
                break
            due = int(el * self.rate)
            out = []
            now = time.time()
            while self.sent < due and len(out) < 2000:
                mid = mid % 65535 + 1
                out.append(packet(topics[self.sent % n_topics], b'{"t":%.6f,"v":"%s"}' % (now, self.pad), mid))
                self.sent += 1
            self.behind = max(self.behind, (due - self.sent) / self.rate)
            if self.probes < int(el * PROBE_HZ):
                mid = mid % 65535 + 1
                out.append(packet(PROBE, b'{"t":%.6f}' % now, mid))
                self.probes += 1
            if out:
                self.sock.sendall(b"".join(out))
            else:
                time.sleep(0.001)


class ProbeWatcher(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.offset = 0
        self.rest = b""
        self.lags: list[tuple[float, float]] = []  # (monotonic time seen, lag s)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            try:
                with open(self.path, "rb") as f:
                    f.seek(self.offset)
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            now, mono = time.time(), time.monotonic()
            self.offset += len(data)
            *lines, self.rest = (self.rest + data).split(b"\n")
            for line in lines:
                self.lags.append((mono, now - json.loads(line)["payload"]["t"]))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))] if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topics", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=20_000, help="msg/s over the topics (the probe comes on top)")
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--payload-size", type=int, default=100)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--src", type=Path, default=tp.REPO)
    p.add_argument("--set", dest="map_set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--tmpdir", default=None)
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="shardlog-live-", dir=args.tmpdir))
    broker = tp.Broker(base)
    side = tp.Shardlog(base, args.protocol, args.src, args.map_set, heartbeat=0.2)
    topics = names(args.topics)
    watcher = None
    try:
        side.write_map(broker.port)
        side.start(broker.port, 0)
        tp.wait_until(side.subscribed, 60, "shardlog to subscribe", 0.02)
        tp.say(f"creating {len(topics):,} topics (one untimed message each) ...")
        sock = connect(broker.port, b"bench-create")
        for i in range(0, len(topics), 5000):
            sock.sendall(b"".join(packet(t, b'{"t":0}', (i + k) % 65535 + 1)
                                  for k, t in enumerate(topics[i:i + 5000])))
        tp.wait_until(lambda: (side._alive(), s := side.stats()) and s is not None
                      and s.messages >= len(topics) and s.recent_stale == 0, args.timeout,
                      "every topic created", 0.1)
        sock.close()
        base_msgs = side.stats().messages
        tp.say(f"created; publishing {args.rate:,.0f} msg/s over {len(topics):,} topics for {args.seconds:.0f}s")
        watcher = ProbeWatcher(side.root / "probe" / "p" / "+log.jsonl")
        watcher.start()
        pub = Paced(broker.port, topics, args.rate, args.seconds, args.payload_size)
        samples: list[tuple[float, int, float, int, int]] = []  # (t, records in files, recent_lag, stale, rss)
        t0 = time.monotonic()
        pub.start()
        next_say = t0 + 10
        while pub.is_alive():
            time.sleep(1.0)
            s = side.stats()
            now = time.monotonic()
            if s is not None:
                samples.append((now - t0, s.messages - base_msgs, s.recent_lag, s.recent_stale, side.rss()))
            if now >= next_say:
                next_say += 10
                recent = [lag for t, lag in watcher.lags if t >= now - 10]
                median = statistics.median(recent) if recent else float("nan")
                tp.say(f"{now - t0:.0f}s: sent {pub.sent:,}, in files {samples[-1][1]:,}; probe lag (last 10 s) "
                       f"median {median:.3f}s p99 {pct(recent, 0.99):.3f}s; "
                       f"recent_lag {samples[-1][2]:.1f}s ({samples[-1][3]:,} stale); "
                       f"RSS {samples[-1][4] / 2**20:.0f} MiB")
        t_end = time.monotonic()
        total = pub.sent + pub.probes
        s = side.stats()
        backlog_at_end = total - (s.messages - base_msgs)
        tp.wait_until(lambda: side.stats().messages - base_msgs >= total, args.timeout, "every record in its file",
                      0.05)
        files_after = time.monotonic() - t_end
        tp.wait_until(lambda: side.stats().recent_stale == 0, args.timeout, "every +recent.json current", 0.05)
        recent_after = time.monotonic() - t_end
        watcher.stop.set()
        lags = [lag for _, lag in watcher.lags]
        rss = [r for *_, r in samples]
        minute = max(1, min(60, len(rss) // 2))
        side.stop()
        ok, check = True, ""
        lines = sum(1 for d in (side.root / "sensors").iterdir() for _ in open(d / "+log.jsonl", "rb"))
        if lines < len(topics) + pub.sent:
            ok, check = False, f"only {lines:,} of {len(topics) + pub.sent:,} sensor records on disk"
        print(f"| workload | published | publisher behind (max) | probe lag median / p99 / max | "
              f"not in files at the end | all in files after | recent_lag max | all +recent.json after | "
              f"RSS first / last minute |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
              f"| {len(topics):,} topics, {args.rate:,.0f} msg/s, {args.seconds:.0f} s "
              f"{' '.join(args.map_set)} | {pub.sent:,} | {pub.behind:.2f} s | "
              f"{statistics.median(lags):.3f} / {pct(lags, 0.99):.3f} / {max(lags):.3f} s | {backlog_at_end:,} | "
              f"{files_after:.1f} s | {max(x[2] for x in samples):.1f} s | {recent_after:.1f} s | "
              f"{statistics.median(rss[:minute]) / 2**20:.0f} / {statistics.median(rss[-minute:]) / 2**20:.0f} MiB |")
        tp.say(f"done: probe lag median {statistics.median(lags):.3f}s p99 {pct(lags, 0.99):.3f}s "
               f"max {max(lags):.3f}s; "
               f"{backlog_at_end:,} records not in their files when the publisher stopped, all in after "
               f"{files_after:.1f}s; every +recent.json current after {recent_after:.1f}s; {check or 'all on disk'}")
        return 0 if ok else 1
    finally:
        if watcher is not None:
            watcher.stop.set()
        if getattr(side, "proc", None) is not None and side.proc.poll() is None:
            side.proc.kill()
            side.proc.wait()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
