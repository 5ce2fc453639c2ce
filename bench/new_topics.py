#!/usr/bin/env python3
"""A burst of new topics while known topics keep talking: burst rate and the latency
the known topics see.

    python bench/new_topics.py                              # 10,000 new topics, 3 runs
    python bench/new_topics.py --src ../other --src .       # before/after (another checkout), interleaved

One shard (``shardlog record``, QoS 1, the map's defaults) on a private mosquitto, as
in bench/throughput.py. A steady publisher sends ``--steady-rate`` msg/s round-robin
to ``--steady-topics`` known topics (``steady/tNN``), each payload carrying its send
time. After ``--warmup`` seconds, a second connection publishes one QoS 1 message to
each of ``--burst`` new topics (``burst/nNNNNN``) as fast as the broker takes them.

* **burst rate**: new topics per second, from the burst's first PUBLISH until the
  shard's stats file (heartbeat 0.1 s) counts every burst record written;
* **latency of the known topics**: a watcher polls their ``+log.jsonl`` files every
  millisecond and, for each new record, takes now minus the send time in its payload
  (publish -> broker -> shard -> written). Reported before the burst and during it:
  median, 99th percentile and maximum.

Every burst topic is checked on disk at the end (one record each).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp


def packet(topic: bytes, payload: bytes, mid: int) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + mid.to_bytes(2, "big") + payload
    return b"\x32" + tp._varint(len(body)) + body


def connect(port: int, cid: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(tp._connect_packet(cid))
    got = b""
    while len(got) < 4:
        part = sock.recv(4 - len(got))
        if not part:
            raise RuntimeError("broker closed the connection")
        got += part
    threading.Thread(target=_drain, args=(sock,), daemon=True).start()  # PUBACKs
    return sock


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 16):
            pass
    except OSError:
        pass


class Steady(threading.Thread):
    def __init__(self, port: int, topics: int, rate: float) -> None:
        super().__init__(daemon=True)
        self.sock = connect(port, b"bench-steady")
        self.topics = [b"steady/t%02d" % i for i in range(topics)]
        self.rate = rate
        self.sent = 0
        self.stop = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set():
            due = int((time.monotonic() - t0) * self.rate)
            while self.sent < due:
                i = self.sent
                payload = b'{"t":%.6f,"i":%d}' % (time.time(), i)
                self.sock.sendall(packet(self.topics[i % len(self.topics)], payload, i % 65535 + 1))
                self.sent += 1
            time.sleep(0.0005)


class Watcher(threading.Thread):
    """Latency of every steady record as it appears on disk, tagged with the phase."""

    def __init__(self, root: Path, topics: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.files = [root / t.decode() / "+log.jsonl" for t in topics]
        self.offsets = [0] * len(self.files)
        self.rest = [b""] * len(self.files)
        self.phase = "before"
        self.lat: dict[str, list[float]] = {"before": [], "burst": [], "after": []}
        self.seen = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(0.001)

    def poll(self) -> None:
        for k, f in enumerate(self.files):
            try:
                with open(f, "rb") as fh:
                    fh.seek(self.offsets[k])
                    data = fh.read()
            except FileNotFoundError:
                continue
            if not data:
                continue
            now = time.time()
            self.offsets[k] += len(data)
            data = self.rest[k] + data
            *lines, self.rest[k] = data.split(b"\n")
            for line in lines:
                rec = json.loads(line)
                self.lat[self.phase].append(now - rec["payload"]["t"])
                self.seen += 1


def summary(xs: list[float]) -> str:
    if not xs:
        return "no records"
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    return (f"median {1000 * statistics.median(xs):.1f} ms, p99 {1000 * p99:.1f} ms, "
            f"max {1000 * xs[-1]:.1f} ms ({len(xs):,} records)")


def one_run(src: Path, args: argparse.Namespace, run: int, extra: tuple[str, ...] = ()) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="shardlog-newtopics-", dir=args.tmpdir))
    broker = tp.Broker(base)
    side = tp.Shardlog(base, args.protocol, src, args.map_set + list(extra), heartbeat=0.1)
    steady = watcher = None
    try:
        side.write_map(broker.port)
        side.start(broker.port, 0)
        tp.wait_until(side.subscribed, 30, "shardlog to subscribe", 0.02)
        steady = Steady(broker.port, args.steady_topics, args.steady_rate)
        watcher = Watcher(side.root, steady.topics)
        steady.start()
        watcher.start()
        time.sleep(args.warmup)
        burst = [packet(b"burst/n%06d" % i, b'{"i":%d}' % i, i % 65535 + 1) for i in range(args.burst)]
        bsock = connect(broker.port, b"bench-burst")
        watcher.phase = "burst"
        cpu0 = tp.cpu_of(side.ps)
        t0 = time.monotonic()
        bsock.sendall(b"".join(burst))
        t_sent = time.monotonic()

        # stats.messages counts steady records too: burst done when messages >= burst + steady seen
        def done() -> bool:
            side._alive()
            s = side.stats()
            return bool(s and s.messages >= args.burst + watcher.seen)

        tp.wait_until(done, args.timeout, "the burst to be written", 0.005)
        t1 = time.monotonic()
        cpu = tp.cpu_of(side.ps) - cpu0
        watcher.phase = "after"
        time.sleep(1.0)
        steady.stop.set()
        watcher.stop.set()
        rss = side.rss()
        side.stop()
        missing = [i for i in range(args.burst)
                   if not (side.root / "burst" / f"n{i:06d}" / "+log.jsonl").exists()]
        res = {"src": str(src), "run": run, "burst_seconds": t1 - t0, "rate": args.burst / (t1 - t0),
               "publish_seconds": t_sent - t0, "cpu_s": cpu, "rss_mib": rss / 2**20,
               "before": summary(watcher.lat["before"]), "burst": summary(watcher.lat["burst"]),
               "after": summary(watcher.lat["after"]), "missing": len(missing),
               "burst_lat": watcher.lat["burst"], "before_lat": watcher.lat["before"]}
        tp.say(f"run {run} {src}: {args.burst:,} new topics in {t1 - t0:.2f}s = {res['rate']:,.0f} topics/s "
               f"(CPU {cpu:.1f}s, RSS {rss / 2**20:.0f} MiB, missing {len(missing)}); known topics: "
               f"before {res['before']}; during the burst {res['burst']}; after {res['after']}")
        bsock.close()
        return res
    finally:
        if steady is not None:
            steady.stop.set()
        if watcher is not None:
            watcher.stop.set()
        if getattr(side, "proc", None) is not None and side.proc.poll() is None:
            side.proc.kill()
            side.proc.wait()
        broker.stop()
        tp.TO_DELETE.append(base)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--burst", type=int, default=10_000, help="new topics, one message each")
    p.add_argument("--steady-topics", type=int, default=20)
    p.add_argument("--steady-rate", type=float, default=2000.0, help="msg/s over the known topics")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of steady traffic before the burst")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--src", type=Path, action="append", help="shardlog source dirs (repeatable)")
    p.add_argument("--set", dest="map_set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="another side: the first --src with these shard-map settings (repeatable)")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--tmpdir", default=None)
    args = p.parse_args(argv)
    srcs = [s.resolve() for s in (args.src or [tp.REPO])]
    sides: list[tuple[Path, tuple[str, ...]]] = [(s, ()) for s in srcs]
    sides += [(srcs[0], tuple(v.split(","))) for v in args.variant]
    results = []
    try:
        for run in range(1, args.runs + 1):
            for src, extra in (sides if run % 2 else list(reversed(sides))):
                res = one_run(src, args, run, extra)
                res["side"] = f"{src}" + (f" {' '.join(extra)}" if extra else "")
                results.append(res)
    finally:
        for d in tp.TO_DELETE:
            shutil.rmtree(d, ignore_errors=True)
    print(f"Burst of {args.burst:,} new topics (one QoS 1 message each) while {args.steady_topics} known "
          f"topics get {args.steady_rate:,.0f} msg/s; MQTT {args.protocol}; medians of {args.runs} run(s).\n")
    print("| shardlog | new topics/s (median) | min - max | known topics before: median / p99 / max ms "
          "| during the burst: median / p99 / max ms | CPU s | RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def pct(rs: list[dict], key: str) -> str:
        xs = sorted(x for r in rs for x in r[key])
        if not xs:
            return "-"
        return (f"{1000 * statistics.median(xs):.1f} / {1000 * xs[int(len(xs) * 0.99)]:.1f} / "
                f"{1000 * xs[-1]:.1f}")

    for name in dict.fromkeys(str(r["side"]) for r in results):
        rs = [r for r in results if r["side"] == name]
        rates = [r["rate"] for r in rs]
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f} - {max(rates):,.0f} "
              f"| {pct(rs, 'before_lat')} | {pct(rs, 'burst_lat')} | {statistics.median(r['cpu_s'] for r in rs):.1f} "
              f"| {statistics.median(r['rss_mib'] for r in rs):.0f} |")
    bad = [r for r in results if r["missing"]]
    for r in bad:
        print(f"- CHECK FAILED: run {r['run']} {r['side']}: {r['missing']} burst topics missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
