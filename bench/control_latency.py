#!/usr/bin/env python3
"""How long a control command takes, end to end: ``POST /control/<op>`` to the reply.

    python bench/control_latency.py              # 50 of each, idle and while messages flow
    python bench/control_latency.py --n 200

Starts a private mosquitto and a real supervisor with one shard (the tests' helpers), records a
few topics, then times rotate, move (and back) and delete of a small topic over HTTP, first with
no traffic, then while a publisher sends QoS 1 messages to other topics of the same shard. The
recorder looks at its control socket every 50 ms between batches, so the median is dominated by
that polling, not by the file system work (the reply's ``ms`` field).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from supervisor.control.cli import post_control
from tests.helpers import Mosquitto, Publisher, wait_for
from tests.supervisor.helpers import SupervisorProc, make_map, read_records


def timed(url: str, op: str, body: dict) -> tuple[float, float]:
    t0 = time.perf_counter()
    r = post_control(url, op, body)
    assert r["ok"], r
    return (time.perf_counter() - t0) * 1000, float(r.get("ms", 0.0))


def run(url: str, n: int, root: Path, pub: Publisher) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {"rotate": [], "move": [], "delete": []}
    for i in range(n):
        pub.publish_many([("a/bench/x", json.dumps({"i": i}).encode(), 1)])
        wait_for(lambda: read_records(root, "a/bench/x"), 10, "a/bench/x recorded")
        out["rotate"].append(timed(url, "rotate", {"prefix": "a/bench"}))
        out["move"].append(timed(url, "move", {"src": "a/bench", "dst": "a/bench2"}))
        out["delete"].append(timed(url, "delete", {"prefix": "a/bench2"}))
    return out


def report(label: str, res: dict[str, list[tuple[float, float]]]) -> None:
    for op, xs in res.items():
        total = sorted(x[0] for x in xs)
        inner = sorted(x[1] for x in xs)
        p95 = total[int(len(total) * 0.95) - 1]
        print(f"{label:8s} {op:7s} n={len(xs):4d}  round trip median {statistics.median(total):6.1f} ms  "
              f"p95 {p95:6.1f} ms  max {total[-1]:6.1f} ms;  in the recorder median {statistics.median(inner):5.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardlog-bench-") as tmp:
        work = Path(tmp)
        (work / "broker").mkdir()
        broker = Mosquitto(work / "broker")
        broker.start()
        sup = None
        try:
            root = work / "data"
            m = make_map(work / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(root))
            sup = SupervisorProc(m, work).start()
            sup.running("a")
            pub = Publisher(broker.port, "bench-pub")
            report("idle", run(sup.url, args.n, root, pub))
            stop = threading.Event()
            sent = [0]

            def flow() -> None:
                p = Publisher(broker.port, "bench-flow")
                while not stop.is_set():
                    p.publish_many([(f"a/flow/t{i % 10}", json.dumps({"i": i}).encode(), 1) for i in range(100)])
                    sent[0] += 100
                p.close()

            th = threading.Thread(target=flow, daemon=True)
            th.start()
            wait_for(lambda: sent[0] > 500, 20, "the flow to start")
            t0 = time.monotonic()
            report("flowing", run(sup.url, args.n, root, pub))
            rate = sent[0] / (time.monotonic() - t0)
            stop.set()
            th.join(30)
            print(f"(the flow sent about {rate:.0f} QoS 1 messages/s meanwhile)")
            pub.close()
        finally:
            if sup is not None:
                sup.kill_all()
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
