#!/usr/bin/env python3
"""Where one shard's time goes: the drain benchmark's shardlog side under cProfile.

    python bench/profile_recorder.py                    # 200,000 messages, 1,000 topics
    python bench/profile_recorder.py --messages 500000 --out /tmp/shard.prof --top 30

Same private broker and workload as bench/throughput.py (drain mode): the backlog is
queued for the shard's offline session, then ``python -m cProfile -o OUT -m shardlog
record ...`` drains it; SIGTERM makes the recorder return normally, so cProfile writes
its file. Prints the top functions by own time (tottime) and by cumulative time, plus
a few grouped totals (socket reads, paho packet handling, on_message, encode_record,
store.flush, acks). cProfile adds a fixed cost per Python call, so it inflates code
that makes many small calls; read the shares, not the absolute times.
"""

from __future__ import annotations

import argparse
import io
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput as tp

#: (label, predicate over (file, line, function)) for the grouped summary; own time
GROUPS = [
    ("socket recv/send (C)", lambda f, ln, fn: "method 'recv'" in fn or "method 'send'" in fn),
    ("select (C)", lambda f, ln, fn: "select" in fn and f == "~"),
    ("paho client.py (Python code)", lambda f, ln, fn: f.endswith("paho/mqtt/client.py")),
    ("paho other modules", lambda f, ln, fn: "paho/mqtt/" in f and not f.endswith("client.py")),
    ("shardlog recorder (recording/recorder.py, loop.py, session.py)",
     lambda f, ln, fn: f.endswith(("shardlog/recording/recorder.py", "shardlog/recording/loop.py",
                                   "shardlog/recording/session.py"))),
    ("shardlog records.py", lambda f, ln, fn: f.endswith("shardlog/records.py")),
    ("shardlog store.py", lambda f, ln, fn: f.endswith("shardlog/writing/store.py")),
    ("os.write / open / close / replace (C)",
     lambda f, ln, fn: f == "~" and any(x in fn for x in ("posix.write", "posix.open", "posix.close",
                                                           "posix.replace", "posix.fstat"))),
    ("threading (locks, conditions)", lambda f, ln, fn: f.endswith("threading.py")
     or "_thread" in fn),
]

#: functions whose cumulative time is worth naming (suffix of "file:function")
CUMULATIVE = [
    ("RecorderLoop._loop", "recording/loop.py", "_loop"),
    ("paho Client.loop", "client.py", "loop"),
    ("paho Client.loop_read", "client.py", "loop_read"),
    ("paho _packet_read", "client.py", "_packet_read"),
    ("paho _handle_publish", "client.py", "_handle_publish"),
    ("paho _handle_on_message", "client.py", "_handle_on_message"),
    ("Recorder.on_message", "recorder.py", "on_message"),
    ("encode_record", "records.py", "encode_record"),
    ("Recorder.flush", "recorder.py", "flush"),
    ("Store.flush", "store.py", "flush"),
    ("RecentFiles._write (+recent.json)", "recent.py", "_write"),
    ("Client.ack (all acks)", "client.py", "ack"),
    ("RecorderLoop._tick", "recording/loop.py", "_tick"),
]


def summarize(prof: Path, top: int, wall: float, messages: int) -> str:
    st = pstats.Stats(str(prof))
    total = st.total_tt  # type: ignore[attr-defined]
    out = io.StringIO()
    out.write(f"profiled run: {messages:,} messages drained in {wall:.1f}s under cProfile "
              f"({messages / wall:,.0f} msg/s); profiled time {total:.1f}s "
              f"= {total * 1e6 / messages:.1f} us per message\n\n")
    stats: dict = st.stats  # type: ignore[attr-defined]

    out.write("grouped own time (tottime):\n")
    for label, pred in GROUPS:
        t = sum(v[2] for (f, ln, fn), v in stats.items() if pred(f, ln, fn))
        out.write(f"  {label:<40} {t:8.2f}s {100 * t / total:5.1f}%  {t * 1e6 / messages:6.2f} us/msg\n")

    out.write("\ncumulative time of the main steps:\n")
    for label, fsuffix, func in CUMULATIVE:
        hits = [(v[3], v[1]) for (f, ln, fn), v in stats.items() if f.endswith(fsuffix) and fn == func]
        if hits:
            ct = max(h[0] for h in hits)
            calls = max(h[1] for h in hits)
            out.write(f"  {label:<28} {ct:8.2f}s {100 * ct / total:5.1f}%  calls {calls:>10,}  "
                      f"{calls / messages:6.2f}/msg\n")

    for key, title in (("tottime", "own time"), ("cumulative", "cumulative time")):
        buf = io.StringIO()
        pstats.Stats(str(prof), stream=buf).strip_dirs().sort_stats(key).print_stats(top)
        text = buf.getvalue()
        start = text.find("   ncalls")
        out.write(f"\ntop {top} by {title}:\n{text[start:] if start >= 0 else text}")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--messages", type=int, default=200_000)
    p.add_argument("--topics", type=int, default=1_000)
    p.add_argument("--payload-size", type=int, default=150)
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5")
    p.add_argument("--src", type=Path, default=tp.REPO)
    p.add_argument("--set", dest="map_set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, help="keep the .prof file here (default: a temp file)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--tmpdir", default=None)
    p.add_argument("--warm", action="store_true", help="every topic on disk first (bench/throughput.py --warm)")
    args = p.parse_args(argv)
    args.keep = False
    sys.path.insert(0, str(args.src))
    out = args.out or Path(tempfile.mkdtemp(prefix="shardlog-prof-")) / "shardlog.prof"
    out = out.resolve()
    tp.say(f"building {args.messages:,} packets over {args.topics:,} topics ...")
    work = tp.Workload(args.messages, args.topics, args.payload_size)
    try:
        res = tp.measure("shardlog", "drain", 1, work, args, python_args=["-m", "cProfile", "-o", str(out)])
    finally:
        for d in tp.TO_DELETE:
            shutil.rmtree(d, ignore_errors=True)
    if not out.exists():
        tp.say(f"no profile written at {out}")
        return 1
    print(summarize(out, args.top, res.seconds, res.messages))
    tp.say(f"profile kept in {out} (python -m pstats {out})")
    return 0 if res.ok else 1


if __name__ == "__main__":
    sys.exit(main())
