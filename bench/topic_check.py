#!/usr/bin/env python3
"""What checking a new topic costs the recording thread, per topic, in process.

    python bench/topic_check.py                 # 100,000 topics, 5 rounds

Times ``Store.topic_path`` (the path checks a journaled shard's recorder makes for a new
topic) next to ``Store.new_state`` (the same checks plus the TopicState the materializer
keeps), alternating, and prints the median µs per topic of each. Pure: nothing on disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardlog.config.load import parse_map
from shardlog.counters import Counters
from shardlog.writing.store import Store


def per_topic(fn: Callable[[str], object], topics: list[str]) -> float:
    t0 = time.perf_counter()
    for t in topics:
        fn(t)
    return (time.perf_counter() - t0) / len(topics) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--topics", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    root = tempfile.mkdtemp(prefix="shardlog-topic-check-")
    smap = parse_map({"defaults": {"root": root}, "shards": [{"name": "s", "prefix": "#"}]}, env={})
    store = Store(smap.shards[0], root, root, Counters(shard="s"))
    topics = [f"bench/{'ab'[i % 2]}/room{i:06d}" for i in range(args.topics)]
    got: dict[str, list[float]] = {"topic_path": [], "new_state": []}
    for r in range(args.rounds):
        for name in (("topic_path", "new_state") if r % 2 == 0 else ("new_state", "topic_path")):
            got[name].append(per_topic(getattr(store, name), topics))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    for name, xs in got.items():
        print(f"{name}: {statistics.median(xs):.2f} µs per topic (median of {len(xs)}; {min(xs):.2f}-{max(xs):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
