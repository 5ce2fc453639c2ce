#!/usr/bin/env python3
"""CPU cost of the recorder's per-message path, in process, without a broker.

    python bench/hotpath.py                       # 300,000 msgs, 1,000 topics, MQTT 5, 3 repeats
    python bench/hotpath.py --protocol 3.1.1 --topics 10
    python bench/hotpath.py --sides plain,hook,before --before-src /tmp/main-src --repeats 5
    valgrind --tool=callgrind python bench/hotpath.py --messages 50000 --repeats 1

A real :class:`Recorder` with its store in a temporary directory and a real
:class:`BufferedClient` on one end of a socketpair: the drain workload's PUBLISH
packets (the same as bench/throughput.py builds, QoS 1) are written into the other
end in 64 KiB pieces and read, parsed, recorded, flushed and acknowledged by the
recorder's own code (``read_buffered`` and ``flush``); the PUBACKs are read back
and counted. What is left out: the broker, ``select``, start-up and the heartbeat.
It reports process CPU seconds per 1M messages (user + system; medians of
``--repeats`` runs, each into a fresh directory after one warm-up that creates the
topics), which is steady enough on a loaded machine to compare two versions of the
hot path; use bench/throughput.py for the end-to-end figures.

``--sides`` compares, interleaved in one run: ``plain`` (the shard map as given),
``hook`` (the same with one trivial hook, bench_hooks.py's ``same``: what the hook
machinery costs per message) and ``before`` (the map as given, run by the source tree
``--before-src`` in a child process: e.g. main) and ``after`` (the same in a child
process, but run by ``--src``: compare it with ``before``, to see that a shard without
hooks did not slow down; both start afresh, with their own warm-up).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp


def build_stream(work: tp.Workload, protocol: str) -> bytes:
    data = b"".join(chunk for _, chunk in work.chunks)
    if protocol == "3.1.1":
        return data
    # MQTT 5: each PUBLISH gets an empty property list after its packet id
    out = bytearray()
    i = 0
    end = len(data)
    while i < end:
        j, length = _varint(data, i + 1)
        body = data[j:j + length]
        tlen = int.from_bytes(body[:2], "big")
        var = 2 + tlen + 2
        new = body[:var] + b"\x00" + body[var:]
        out += bytes([data[i]]) + tp._varint(len(new)) + new
        i = j + length
    return bytes(out)


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return i, value
        shift += 7


def run_once(stream: bytes, n: int, protocol: str, root: Path, map_set: list[str]) -> tuple[float, float]:
    import paho.mqtt.client as mqtt

    from shardlog.config.load import parse_map
    from shardlog.recording.recorder import Recorder

    raw = {"broker": {"protocol": 5 if protocol == "5" else "3.1.1"},
           "shards": [{"name": "all", "prefix": "#", "root": str(root)}]}
    for item in map_set:
        key, _, value = item.partition("=")
        import yaml
        tp._set_dotted(raw, key, yaml.safe_load(value))
    smap = parse_map(raw, env={})
    rec = Recorder(smap, smap.shards[0])
    install = getattr(rec, "install_hooks", None)  # absent in trees older than hooks
    chain = install() if install is not None else None
    try:
        from shardlog.recording.loop import RecorderLoop, prepare_root
    except ImportError:  # a tree older than issue 21's composed recorder (side 'before')
        rec.open_store(*rec._prepare_root())
        client = rec._make_client()
        rec.client, rec.connected = client, True
        due = rec._due
    else:
        rec.open_store(*prepare_root(rec.shard))
        client = RecorderLoop(rec).session.make_client()  # delivers to rec
        rec.connection_up(client, False)  # as at a CONNACK: rec acknowledges through it
        due = rec.due
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    client._sock = a
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    acked_bytes = 0
    piece = 64 * 1024
    c0 = os.times()
    t0 = time.monotonic()
    pos = 0
    while pos < len(stream) or rec.pending:
        if pos < len(stream):
            try:
                pos += b.send(stream[pos:pos + piece])
            except BlockingIOError:
                pass
        client.loop_read()
        if client.buffered:
            client.read_buffered()
        now = time.monotonic()
        if pos >= len(stream) or due(now):
            if rec.pending:
                rec.flush()
        if client.want_write():
            client.loop_write()
        try:
            while True:
                got = b.recv(1 << 20)
                if not got:
                    break
                acked_bytes += len(got)
        except BlockingIOError:
            pass
    while client.want_write():
        client.loop_write()
    try:
        while True:
            acked_bytes += len(b.recv(1 << 20))
    except BlockingIOError:
        pass
    c1 = os.times()
    wall = time.monotonic() - t0
    rec.store.close()  # type: ignore[union-attr]
    if chain is not None:
        chain.watchdog.stop()  # its thread and SIGALRM would tax the next side in this process
    a.close()
    b.close()
    if acked_bytes != 4 * n or rec.counters.messages != n:
        raise SystemExit(f"check failed: {acked_bytes // 4} PUBACKs, {rec.counters.messages} records of {n}")
    return (c1.user - c0.user) + (c1.system - c0.system), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=300_000)
    p.add_argument("--topics", type=int, default=1_000)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", dest="map_set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--src", type=Path, default=tp.REPO)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--sides", default="plain", help="comma-separated: plain, hook, before, after")
    p.add_argument("--before-src", type=Path, default=None, help="the source tree of side 'before'")
    args = p.parse_args(argv)
    sides = args.sides.split(",")
    if unknown := set(sides) - {"plain", "hook", "before", "after"}:
        raise SystemExit(f"unknown side(s): {', '.join(sorted(unknown))}")
    if "before" in sides and args.before_src is None:
        raise SystemExit("side 'before' needs --before-src DIR")
    sys.path.insert(0, str(args.src))
    work = tp.Workload(args.messages, args.topics)
    stream = build_stream(work, args.protocol)
    base = Path(tempfile.mkdtemp(prefix="shardlog-hotpath-", dir=args.tmpdir))
    try:
        # warm-up into one directory, then measure into the same one (topics exist: steady state)
        root = base / "data"
        hook_set = [*args.map_set, "defaults.hooks=[bench_hooks:same]",
                    f"defaults.hooks_path={Path(__file__).resolve().parent}"]
        sets = {"plain": args.map_set, "hook": hook_set}
        for side in sides:
            if side in sets:
                run_once(stream, args.messages, args.protocol, root, sets[side])
        cpus: dict[str, list[float]] = {side: [] for side in sides}
        rates: dict[str, list[float]] = {side: [] for side in sides}
        for i in range(args.repeats):
            for side in sides:
                if side not in sets:
                    cpu_per_m, rate = _child(args, args.before_src if side == "before" else args.src)
                else:
                    cpu, wall = run_once(stream, args.messages, args.protocol, root, sets[side])
                    cpu_per_m, rate = cpu * 1e6 / args.messages, args.messages / wall
                cpus[side].append(cpu_per_m)
                rates[side].append(rate)
                tp.say(f"run {i + 1} {side}: {cpu_per_m:.2f} CPU s per 1M msgs ({rate:,.0f} msg/s)")
        first = statistics.median(cpus[sides[0]])
        for side in sides:
            med = statistics.median(cpus[side])
            vs = f", x{med / first:.3f} of {sides[0]}" if side != sides[0] else ""
            print(f"hotpath {side}: {args.messages:,} msgs, {args.topics:,} topics, MQTT {args.protocol}: "
                  f"median {med:.2f} CPU s per 1M msgs (min {min(cpus[side]):.2f}, max {max(cpus[side]):.2f}; "
                  f"{statistics.median(rates[side]):,.0f} msg/s){vs}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


def _child(args: argparse.Namespace, src: Path) -> tuple[float, float]:
    """One measured run of the source tree ``src``, in a child (its own warm-up first)."""
    import re
    import subprocess

    cmd = [sys.executable, __file__, "--src", str(src), "--repeats", "1",
           "--messages", str(args.messages), "--topics", str(args.topics), "--protocol", args.protocol]
    for item in args.map_set:
        cmd += ["--set", item]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(src))).stdout
    m = re.search(r"median ([0-9.]+) CPU s per 1M msgs .*?; ([0-9,]+) msg/s", out)
    if m is None:
        raise SystemExit(f"{src}: no figure in its output:\n{out}")
    return float(m.group(1)), float(m.group(2).replace(",", ""))


if __name__ == "__main__":
    sys.exit(main())
