#!/usr/bin/env python3
"""CPU cost of the recorder's per-message path, in process, without a broker.

    python bench/hotpath.py                       # 300,000 msgs, 1,000 topics, MQTT 5, 3 repeats
    python bench/hotpath.py --protocol 3.1.1 --topics 10
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

    from shardlog.config import parse_map
    from shardlog.recorder import Recorder

    raw = {"broker": {"protocol": 5 if protocol == "5" else "3.1.1"},
           "shards": [{"name": "all", "prefix": "#", "root": str(root)}]}
    for item in map_set:
        key, _, value = item.partition("=")
        import yaml
        tp._set_dotted(raw, key, yaml.safe_load(value))
    smap = parse_map(raw, env={})
    rec = Recorder(smap, smap.shards[0])
    rec.open_store(*rec._prepare_root())
    client = rec._make_client()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    client._sock = a
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    rec.client = client
    rec.connected = True
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
        if pos >= len(stream) or rec._due(now):
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
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.src))
    work = tp.Workload(args.messages, args.topics)
    stream = build_stream(work, args.protocol)
    base = Path(tempfile.mkdtemp(prefix="shardlog-hotpath-", dir=args.tmpdir))
    try:
        # warm-up into one directory, then measure into the same one (topics exist: steady state)
        root = base / "data"
        run_once(stream, args.messages, args.protocol, root, args.map_set)
        cpus = []
        for i in range(args.repeats):
            cpu, wall = run_once(stream, args.messages, args.protocol, root, args.map_set)
            cpus.append(cpu * 1e6 / args.messages)
            tp.say(f"run {i + 1}: {cpus[-1]:.2f} CPU s per 1M msgs ({args.messages / wall:,.0f} msg/s)")
        print(f"hotpath: {args.messages:,} msgs, {args.topics:,} topics, MQTT {args.protocol}: "
              f"median {statistics.median(cpus):.2f} CPU s per 1M msgs (min {min(cpus):.2f}, max {max(cpus):.2f})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
