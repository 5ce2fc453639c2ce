#!/usr/bin/env python3
"""How fast a journal becomes topic files: the materializer alone, in process, no broker.

    python bench/materialize.py                                # 200,000 records, 100,000 topics
    python bench/materialize.py --topics 1000 --records 1000000
    python bench/materialize.py --set max_open_files=1024 --set recent=0   # variants, side by side
    python bench/materialize.py --profile                      # cProfile of one run (top 25)

A journal of N records round-robin over T topics (bench/a/room0000000, ..., the payloads of
bench/throughput.py) is written first; then a Materializer (shardlog/writing/materializer.py) turns it
into topic files with Store.flush as the recorder's thread does, and the clock runs until
every record is in its topic file and the checkpoint is written. Each --set VALUE adds a
variant (the shard-map defaults key=value, e.g. ``max_open_files=1024``); variants run
interleaved, --runs times each, every one in a fresh directory. Reported: records/s, CPU
seconds per 1M records (user+system, the share of system), peak RSS growth.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from shardlog.config.load import parse_map  # noqa: E402
from shardlog.counters import Counters  # noqa: E402
from shardlog.recording.loop import _raise_fd_limit  # noqa: E402
from shardlog.records import encode_record  # noqa: E402
from shardlog.writing import journal  # noqa: E402
from shardlog.writing.journal import JournalWriter  # noqa: E402
from shardlog.writing.materializer import Materializer  # noqa: E402
from shardlog.writing.store import Store  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog " * 2


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_journal(root: Path, records: int, topics: int) -> None:
    writer = JournalWriter(str(root), 64 << 20, False, None)
    keys = [b'"bench/%s/room%07d"\t' % (b"ab"[i % 2:i % 2 + 1], i) for i in range(topics)]
    ts = time.time_ns() // 1000
    batch: list[bytes] = []
    for seq in range(records):
        payload = b'{"user":"u%03d","seq":%d,"text":"%s"}' % (seq % 1000, seq, TEXT.encode())
        batch.append(keys[seq % topics] + encode_record(ts + seq, 1, False, payload))
        if len(batch) == 5000:
            writer.write(b"".join(batch))
            batch = []
    if batch:
        writer.write(b"".join(batch))
    writer.close()


def run_once(base: Path, records: int, topics: int, settings: dict[str, object],
             profile: bool, replay: bool = False) -> tuple[float, float, float, int]:
    root = Path(tempfile.mkdtemp(dir=base))
    make_journal(root, records, topics)
    doc = {"defaults": {"root": str(root), **settings}, "shards": [{"name": "all", "prefix": "#"}]}
    shard = parse_map(yaml.safe_load(yaml.safe_dump(doc)), base_dir=str(root)).shard("all")
    _raise_fd_limit(shard.max_open_files + 64)  # as the recorder does
    counters = Counters(shard="all")
    store = Store(shard, os.path.realpath(root), os.path.realpath(root), counters)
    store.start_preparer()
    cp = journal.read_checkpoint(str(root))
    writer = JournalWriter(str(root), 64 << 20, False, cp)
    m = Materializer(store, writer, cp, shard.max_open_files * 2, 12_000)
    if not replay:  # a journal written while the shard runs: nothing to check against the files
        m.replay_end = m.reader.pos
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0, c0 = time.monotonic(), os.times()
    prof = cProfile.Profile() if profile else None
    if prof:  # the materializer's thread (cProfile sees one thread)
        run = m._run
        m.thread._target = lambda: prof.runcall(run)  # type: ignore[attr-defined]
    m.start()  # the thread, as in a recorder; wait until every record is written
    while counters.messages < records:
        time.sleep(0.002)
    m.stop()
    m.catch_up()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    t1, c1 = time.monotonic(), os.times()
    store.close()
    writer.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    return t1 - t0, c1.user - c0.user, c1.system - c0.system, rss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--topics", type=int, default=100_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--set", dest="variants", action="append", default=[], metavar="KEY=VALUE",
                   help="a variant: shard-map defaults KEY=VALUE (repeatable; comma-separate several)")
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--profile", action="store_true", help="cProfile one run of the last variant")
    p.add_argument("--replay", action="store_true",
                   help="as after a crash: every record is checked against its topic file first")
    a = p.parse_args()
    variants: list[tuple[str, dict[str, object]]] = [("defaults", {})]
    for v in a.variants:
        settings: dict[str, object] = {}
        for item in v.split(","):
            key, _, value = item.partition("=")
            settings[key] = yaml.safe_load(value)
        variants.append((v, settings))
    base = Path(tempfile.mkdtemp(prefix="materialize-", dir=a.tmpdir))
    results: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name, _ in variants}
    try:
        if a.profile:
            run_once(base, a.records, a.topics, variants[-1][1], True, a.replay)
            return 0
        for run in range(1, a.runs + 1):
            for name, settings in variants:
                wall, user, sys_, rss = run_once(base, a.records, a.topics, settings, False, a.replay)
                results[name].append((wall, user, sys_, rss))
                say(f"run {run} {name}: {a.records / wall:,.0f} records/s, "
                    f"{(user + sys_) / a.records * 1e6:.1f} CPU s/1M ({100 * sys_ / max(user + sys_, 1e-9):.0f}% "
                    f"system), RSS +{rss / 1024:.0f} MiB")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"{a.records:,} records over {a.topics:,} topics, {a.runs} run(s) each, medians:\n")
    print("| variant | records/s | min - max | CPU s per 1M (system) | RSS growth |")
    print("|---|---:|---:|---:|---:|")
    for name, rs in results.items():
        rates = [a.records / r[0] for r in rs]
        cpu = statistics.median((r[1] + r[2]) / a.records * 1e6 for r in rs)
        sys_share = statistics.median(100 * r[2] / max(r[1] + r[2], 1e-9) for r in rs)
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f} - {max(rates):,.0f} | "
              f"{cpu:.1f} ({sys_share:.0f} %) | {statistics.median(r[3] for r in rs) / 1024:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
