"""Hooks end to end: real mosquitto, real `shardlog record` / `shardlog supervise` processes,
SIGKILL mid-stream, hooks that raise, return garbage, leave the branch and hang."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shardlog.records import decode_record
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map
from tests.supervisor.helpers import SupervisorProc, make_map

HOOKS = '''
import time

def tag(m):
    """Transform: plain messages become JSON; s/split/K becomes two records, K/a and K/b.
    0.5 ms of CPU a message (not a sleep: a loaded machine oversleeps), so that the SIGKILL
    of the test lands mid-stream."""
    until = time.perf_counter() + 0.0005
    while time.perf_counter() < until:
        pass
    if m.topic.startswith("s/split/"):
        return [m._replace(topic=m.topic + "/a"),
                m._replace(topic=m.topic + "/b", payload=b'"b' + m.payload + b'"')]
    return m.with_json({"n": int(m.payload), "hooked": True})

def picky(m):
    if m.payload.startswith(b"bad"):
        raise ValueError("bad reading " + m.payload.decode())
    if m.payload == b"garbage":
        return 42
    if m.payload == b"escape":
        return m._replace(topic="elsewhere/x")
    return m

def slow(m):
    if m.payload == b"sleep":
        time.sleep(60)
    if m.payload == b"spin":
        while True:
            pass
    return m
'''


def hooks_dir(tmp_path: Path) -> Path:
    d = tmp_path / "hk"
    d.mkdir()
    (d / "e2e_hooks.py").write_text(HOOKS)
    return d


def records(root: Path) -> dict[str, list[bytes]]:
    """topic -> the payloads recorded for it (topics here are plain: directory = topic)."""
    out: dict[str, list[bytes]] = {}
    for f in root.rglob("+log.jsonl"):
        topic = str(f.parent.relative_to(root))
        out[topic] = [decode_record(line).payload for line in f.read_bytes().splitlines(keepends=True)]
    return out


def quarantined(root: Path) -> list[dict]:
    return [json.loads(line) for f in root.rglob("+quarantine.jsonl") for line in f.read_bytes().splitlines()]


def test_sigkill_mid_stream_with_transforming_and_dropping_hooks_loses_nothing(
        tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc]) -> None:
    n = 3000
    m = write_map(tmp_path / "m.yaml", broker.port, [{"name": "s", "prefix": "s"}],
                  hooks=[{"use": "drop", "args": {"topics": ["s/noise/#"]}}, "e2e_hooks:tag"],
                  hooks_path=str(hooks_dir(tmp_path)), batch={"max_messages": 200})
    root = tmp_path / "data"
    plain = {json.dumps({"n": i, "hooked": True}, separators=(",", ":")).encode()
             for i in range(0, n, 3)}
    split = set(range(2, n, 3))

    def complete() -> bool:
        recs = records(root)
        got_plain = {p for t, ps in recs.items() if t.startswith("s/t") for p in ps}
        got_a = {int(p) for t, ps in recs.items() if t.endswith("/a") for p in ps}
        got_b = {int(p[2:-1]) for t, ps in recs.items() if t.endswith("/b") for p in ps}
        return plain <= got_plain and split <= got_a and split <= got_b

    rec = RecorderProc(m, "s", tmp_path).start()
    recorders.append(rec)
    kinds = ["s/t{}", "s/noise/{}", "s/split/{}"]  # i % 3: plain, dropped, fanned out
    msgs = [(kinds[i % 3].format(i % 30), str(i).encode(), 1) for i in range(n)]
    pub = Publisher(broker.port)
    sender = threading.Thread(target=pub.publish_many, args=(msgs,), daemon=True)
    sender.start()
    wait_for(lambda: (s := rec.stats()) is not None and s.messages >= 300, 30, "300 records before the kill")
    rec.kill()
    first = rec.stats()
    assert not complete(), "the kill came after the whole stream was written: not mid-stream"
    rec2 = RecorderProc(m, "s", tmp_path).start()
    recorders.append(rec2)
    sender.join(120)
    pub.close()
    assert not sender.is_alive(), "the publisher did not finish"
    wait_for(complete, 60, f"every hooked message on disk (log: {rec2.stderr_path})")
    assert rec2.stop() == 0
    recs = records(root)
    assert not any(t.startswith("s/noise") for t in recs), "dropped messages were written"
    assert not any(t.startswith("s/split/") and t.count("/") == 2 for t in recs), "a split original was written"
    for t, ps in recs.items():  # the transform ran on every record, once (duplicates allowed)
        if t.startswith("s/t"):
            assert all(json.loads(p)["hooked"] is True for p in ps)
    assert quarantined(root) == []
    final = rec2.stats()
    assert first is not None and final is not None and final.hook_errors == 0 and final.hook_dropped > 0
    print(f"killed after {first.messages} records; the restart wrote {final.messages}, "
          f"dropped {final.hook_dropped}, {final.redelivered} redelivered")


def test_failing_hooks_are_quarantined_counted_and_reported_by_the_supervisor(
        tmp_path: Path, broker: Mosquitto, publisher: Publisher, supervisors: list[SupervisorProc]) -> None:
    m = make_map(tmp_path / "shards.yaml", broker.port,
                 [{"name": "s", "prefix": "s", "hook_timeout": "500ms",
                   "hooks": ["e2e_hooks:picky", "e2e_hooks:slow", {"use": "drop", "args": {"topics": ["s/drop"]}}],
                   "hooks_path": str(hooks_dir(tmp_path))},
                  {"name": "elsewhere", "prefix": "elsewhere", "root": str(tmp_path / "other")}])
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start()
    pid = sup.running("s")["pid"]
    bad = [b"bad1", b"garbage", b"escape", b"sleep", b"spin"]
    publisher.publish_many([("s/x", p, 1) for p in [b"1", bad[0], b"2", bad[1], bad[2], bad[3], b"3",
                                                      bad[4], b"4"]] + [("s/drop", b"5", 1)])
    st = sup.wait_shard("s", lambda s: (s["counters"] or {}).get("acked") == 10, 30,
                        "all 10 messages acknowledged")
    c = st["counters"]
    assert st["pid"] == pid and st["restarts"] == 0, "the shard must keep running"
    assert (c["messages"], c["hook_errors"], c["hook_dropped"], c["quarantined"]) == (4, 5, 1, 5), c
    assert records(tmp_path / "data")["s/x"] == [b"1", b"2", b"3", b"4"]
    q = quarantined(tmp_path / "data")
    assert [base64.b64decode(r["payload"]) for r in q] == bad  # the raw bytes, as they came
    reasons = [r["reason"] for r in q]
    assert reasons[0] == "hook e2e_hooks:picky: ValueError: bad reading bad1"
    assert reasons[1].startswith("hook e2e_hooks:picky: returned int 42")
    assert "produced topic 'elsewhere/x': owned by shard 'elsewhere'" in reasons[2]
    assert all(r.startswith("hook e2e_hooks:slow: timed out") for r in reasons[3:]), reasons
    assert not (tmp_path / "other").exists() or records(tmp_path / "other") == {}
    text = sup.get("/metrics")
    assert text is not None
    values = {(s.name, s.labels.get("shard")): s.value for f in text_string_to_metric_families(text.decode())
              for s in f.samples}
    assert values[("shardlog_hook_errors_total", "s")] == 5
    assert values[("shardlog_hook_dropped_total", "s")] == 1
    assert values[("shardlog_hook_errors_total", "elsewhere")] == 0
    log = sup.log()  # the recorder's stderr goes to the supervisor's
    assert "[s]" in log or " s " in log or "s:" in log
    assert "hook e2e_hooks:picky: ValueError: bad reading bad1" in log and "e2e_hooks:slow: timed out" in log


def test_a_hook_that_cannot_be_imported_is_a_config_error(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("shards:\n  - name: s\n    prefix: s\n    hooks: [cbor_to_json, no_such_module_xyz:f]\n")
    for verb in (["check", str(m)], ["record", str(m), "--shard", "s"]):
        r = subprocess.run([sys.executable, "-m", "shardlog", *verb], capture_output=True, text=True, timeout=60)
        assert r.returncode == 78, r
        assert "shards[0].hooks[1]: cannot import 'no_such_module_xyz:f': ModuleNotFoundError" in r.stderr
    m.write_text("shards:\n  - {name: s, prefix: s, hooks: [cbor_to_json, {use: sample, args: {every: 1s}}]}\n")
    r = subprocess.run([sys.executable, "-m", "shardlog", "check", str(m)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 78 and "shards[0].hooks[1].args: Object contains unknown field `every`" in r.stderr
