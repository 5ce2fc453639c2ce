#!/usr/bin/env python3
"""Write rate of the store per write format (no broker, no network): Store.add + flush.

    python bench/store_formats.py                       # every format, 300,000 records, 3 runs
    python bench/store_formats.py --formats jsonl,csv --records 100000 --runs 5
    PYTHONPATH=/path/to/other/checkout python bench/store_formats.py   # compare two checkouts

Records are envelope lines built once (150-byte JSON payloads) spread over ``--topics``
topics and flushed every 1,000 adds (the recorder's default batch), with recent: 6, into
a temporary directory. Prints records/s per format, median and range of the runs, and the
load average (the machine is shared: read ratios between formats, not absolute rates).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

from shardlog.config.load import parse_map
from shardlog.counters import Counters
from shardlog.records import encode_record
from shardlog.writing.store import Store

COMBOS = {"jsonl": ("jsonl", False), "json": ("json", False), "csv": ("csv", False),
          "payload.jsonl": ("jsonl", True), "payload.json": ("json", True)}


def run(key: str, records: int, topics: int) -> float:
    fmt, payload_only = COMBOS[key]
    root = tempfile.mkdtemp(prefix="shardlog-bench-")
    try:
        extra = {"format": fmt, "payload_only": payload_only} if key != "jsonl" else {}  # older checkouts
        shard = parse_map({"shards": [{"name": "a", "prefix": "#", "root": root, **extra}]}).shards[0]
        store = Store(shard, root, root, Counters())
        states = [store.new_state(f"bench/t{i}") for i in range(topics)]
        payload = b'{"user":"u042","seq":12345,"text":"' + b"x" * 110 + b'"}'
        lines = [encode_record(1763815800000000 + i, 1, False, payload) for i in range(topics)]
        t = time.perf_counter()
        for i in range(records):
            store.add(states[i % topics], lines[i % topics], i)
            if i % 1000 == 999:
                store.flush(1763815800000000 + i, time.monotonic())
        store.flush(1763815800000000 + records, time.monotonic())
        store.close()
        return records / (time.perf_counter() - t)
    finally:
        shutil.rmtree(root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--formats", default=",".join(COMBOS))
    p.add_argument("--records", type=int, default=300_000)
    p.add_argument("--topics", type=int, default=10)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    keys = args.formats.split(",")
    rates: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(args.runs):
        for k in keys:  # alternating order: load changes hit every format alike
            rates[k].append(run(k, args.records, args.topics))
    print(f"| format | records/s (median of {args.runs}) | range |")
    print("| --- | ---: | ---: |")
    for k in keys:
        r = rates[k]
        print(f"| {k} | {statistics.median(r):,.0f} | {min(r):,.0f}-{max(r):,.0f} |")
    print(f"\nload average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
