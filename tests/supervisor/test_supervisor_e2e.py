"""``shardlog supervise`` end to end: real mosquitto, real recorder processes, real signals.

Every wait is a poll with a deadline (helpers.wait_for); the only sleeps pace the
publisher so that its flow spans what a test does to the shards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from supervisor.serve.status import StatusDoc, json_schema
from tests.supervisor.helpers import (
    Flow,
    SupervisorProc,
    client_id,
    drain_session,
    free_port,
    make_map,
    payload_ids,
    read_records,
    topic_dir,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "supervisor.md"


def start(supervisors: list[SupervisorProc], map_path: Path, tmp_path: Path, wait_ready: bool = True,
          **kw: Any) -> SupervisorProc:
    sup = SupervisorProc(map_path, tmp_path, **kw)
    supervisors.append(sup)
    return sup.start(wait_ready=wait_ready)


def test_two_roots_and_nested_prefixes_route_each_topic_once(broker, publisher, supervisors, tmp_path: Path) -> None:
    r1, r2 = tmp_path / "disk1", tmp_path / "disk2"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "chat", "prefix": "chat", "root": str(r1)},
        {"name": "vip", "prefix": "chat/vip", "root": str(r2)},
        {"name": "rest", "prefix": "#", "root": str(r2)},
    ])
    sup = start(supervisors, m, tmp_path)
    for name in ("chat", "vip", "rest"):
        sup.running(name)
    topics = {"chat/room1": "chat", "chat": "chat", "chat/vip": "vip", "chat/vip/x/y": "vip",
              "chat/vipx": "chat", "other/t": "rest", "top": "rest"}
    roots = {"chat": r1, "vip": r2, "rest": r2}
    msgs = [(t, json.dumps({"i": i}).encode(), 1) for i in range(20) for t in topics]
    publisher.publish_many(msgs)
    for topic, owner in topics.items():
        wait_for(lambda t=topic, o=owner: len(read_records(roots[o], t)) == 20, 10, f"20 records of {topic}")
    for topic, owner in topics.items():
        assert sorted(r["payload"]["i"] for r in read_records(roots[owner], topic)) == list(range(20))
    # nothing anywhere else: chat never wrote the vip branch, vip and rest never wrote chat's
    assert not (r1 / "chat" / "vip").exists()
    assert not topic_dir(r2, "chat/room1").exists() and not topic_dir(r1, "other/t").exists()
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("disk*/**/+log.jsonl"))
    assert len(written) == len(topics), written
    # chat/vip and chat/vip/x/y reach chat too: acknowledged and discarded, not written
    wait_for(lambda: sup.shard("chat")["counters"]["discarded"] == 40, 5, "chat's discarded counter")
    wait_for(lambda: sum(s["counters"]["messages"] for s in sup.shards().values()) == 20 * len(topics), 5,
             "the shards' message counters to add up to what was published")
    shards = sup.shards()
    assert shards["chat"]["root"] == str(r1) and shards["vip"]["root"] == str(r2)


def test_sigkill_under_flow_is_back_within_2s_and_nothing_is_lost(broker, supervisors, tmp_path: Path) -> None:
    ra, rb = tmp_path / "ra", tmp_path / "rb"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a", "root": str(ra)},
        {"name": "b", "prefix": "b", "root": str(rb)},
    ])
    sup = start(supervisors, m, tmp_path)
    a0, b0 = sup.running("a"), sup.running("b")
    flow = Flow(broker.port, ["a", "b"], count=3000, batch=50, pause=0.03)
    b_pids: set[int] = set()
    watching = True

    def watch_b() -> None:  # b's pid, sampled all along
        while watching:
            s = sup.shard("b")
            if s is not None and s["pid"]:
                b_pids.add(s["pid"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_b, daemon=True)
    watcher.start()
    flow.start()
    wait_for(lambda: (sup.shard("a")["counters"] or {}).get("messages", 0) > 300, 20, "a to record a while")
    assert flow.sent < flow.count, "the flow ended before the kill; make it longer"
    os.kill(a0["pid"], signal.SIGKILL)
    killed = time.monotonic()
    a1 = sup.running("a", timeout=2.0, not_pid=a0["pid"])
    back = time.monotonic() - killed
    assert flow.is_alive(), "the flow ended before the shard came back; make it longer"
    flow.finish()
    want = list(range(3000))
    wait_for(lambda: set(payload_ids(ra, flow.topics("a"))) >= set(want), 30, "every message of a on disk")
    wait_for(lambda: set(payload_ids(rb, flow.topics("b"))) >= set(want), 30, "every message of b on disk")
    watching = False
    watcher.join()
    b1 = sup.shard("b")
    assert b_pids == {b0["pid"]} and b1["restarts"] == 0 and b1["pid"] == b0["pid"]
    assert b1["counters"]["started_ts"] == b0["counters"]["started_ts"]
    assert sorted(payload_ids(rb, flow.topics("b"))) == want  # b: exactly once
    a_ids = payload_ids(ra, flow.topics("a"))
    assert set(a_ids) == set(want)  # a: all, duplicates allowed after a SIGKILL
    assert a1["restarts"] == 1 and a1["last_exit"]["signal"] == "SIGKILL"
    assert back < 2.0
    print(f"shard a back {back:.2f}s after SIGKILL; {len(a_ids) - 3000} duplicate(s)")


def test_sigstop_is_detected_and_replaced_within_the_heartbeat_timeout(broker, supervisors, tmp_path: Path) -> None:
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"},
    ], supervisor={"heartbeat_timeout": "1s"})
    sup = start(supervisors, m, tmp_path)
    a0, b0 = sup.running("a"), sup.running("b")
    os.kill(a0["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        a1 = sup.running("a", timeout=6.0, not_pid=a0["pid"])
    finally:
        try:
            os.kill(a0["pid"], signal.SIGCONT)
        except ProcessLookupError:
            pass
    took = time.monotonic() - stopped
    # 1 s timeout + up to one 0.25 s tick, SIGABRT exits at once, 0.2 s backoff, recorder start
    assert took < 1.0 + 3.0, took
    assert a1["last_exit"]["signal"] == "SIGABRT" and "hung" in a1["last_exit"]["reason"]
    assert a1["restarts"] == 1
    wait_for(lambda: not os.path.exists(f"/proc/{a0['pid']}"), 5, "the hung recorder to be gone")
    log = sup.log()
    assert "Fatal Python error: Aborted" in log  # faulthandler's traceback of the hung recorder
    assert f"shard a (pid {a0['pid']}) sent no heartbeat" in log
    b1 = sup.shard("b")
    assert b1["pid"] == b0["pid"] and b1["restarts"] == 0
    print(f"SIGSTOPped shard replaced after {took:.2f}s")


_EXITED = re.compile(r"^(\S+ \S+) .*shard bad \(pid \d+\) exited: exit 73 .*; restart (\d+) in ([\d.]+)s$")
_STARTED = re.compile(r"^(\S+ \S+) .*started shard bad \(pid \d+\)")


def _ts(stamp: str) -> float:
    return time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(stamp[20:23]) / 1000


def test_crash_at_once_backs_off_then_fails_and_the_other_shard_records(broker, supervisors,
                                                                        tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("a regular file: the root below it gives ENOTDIR (exit 73)\n")
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "good", "prefix": "g", "root": str(tmp_path / "good")},
        {"name": "bad", "prefix": "x", "root": str(tmp_path / "afile" / "data")},
    ], supervisor={"restart": {"backoff_initial": "200ms", "backoff_max": "800ms", "max_restarts": 4,
                               "window": "60s", "failed_retry": "1h"}})
    sup = start(supervisors, m, tmp_path, wait_ready=False)
    good0 = sup.running("good")
    flow = Flow(broker.port, ["g"], count=2000, batch=20, pause=0.02)
    flow.start()
    bad = sup.wait_shard("bad", lambda s: s["state"] == "failed", 20, "failed")
    flow.finish()
    wait_for(lambda: set(payload_ids(tmp_path / "good", flow.topics("g"))) == set(range(2000)), 20,
             "every message of good on disk")
    # the schedule: 0.2 s doubling to 0.8 s, each shortened by at most 20 %, then failed
    exits, starts = [], []
    for line in sup.log().splitlines():
        if (mt := _EXITED.match(line)) is not None:
            exits.append((_ts(mt.group(1)), int(mt.group(2)), float(mt.group(3))))
        elif (mt := _STARTED.match(line)) is not None:
            starts.append(_ts(mt.group(1)))
    assert [n for _, n, _ in exits] == [1, 2, 3, 4]
    for (t_exit, n, delay), base in zip(exits, [0.2, 0.4, 0.8, 0.8], strict=True):
        assert 0.8 * base - 0.01 <= delay <= base + 0.01, (n, delay)
        t_start = starts[n]  # starts[0] is the first start
        assert t_start - t_exit >= delay - 0.01, (n, t_start - t_exit, delay)
    assert len(starts) == 5
    assert bad["restarts"] == 4 and bad["pid"] is None
    assert bad["last_exit"]["code"] == 73 and "max_restarts 4" in bad["reason"]
    assert bad["next_start_in"] > 3000
    # `shardlog status` says so, and exits non-zero
    out = subprocess.run([sys.executable, "-m", "shardlog", "status", str(m)], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 1, out
    row = next(line for line in out.stdout.splitlines() if line.startswith("bad "))
    assert "failed" in row and "max_restarts" in row
    assert "FAILED shard(s): bad" in out.stderr
    out = subprocess.run([sys.executable, "-m", "shardlog", "status", str(m), "--json"], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 1 and {s["name"]: s for s in json.loads(out.stdout)["shards"]}["bad"]["state"] == "failed"
    good1 = sup.shard("good")
    assert good1["pid"] == good0["pid"] and good1["restarts"] == 0 and good1["state"] == "running"


def test_status_reports_an_unreachable_supervisor(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    out = subprocess.run([sys.executable, "-m", "shardlog", "status", "--url", url], capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 69
    assert f"no supervisor answers at {url}" in out.stderr and "Traceback" not in out.stderr


def test_sighup_adds_removes_changes_and_keeps_unchanged_pids(broker, publisher, supervisors,
                                                             tmp_path: Path) -> None:
    shards = [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}, {"name": "c", "prefix": "c"}]
    m = make_map(tmp_path / "shards.yaml", broker.port, shards)
    sup = start(supervisors, m, tmp_path)
    before = {n: sup.running(n)["pid"] for n in ("a", "b", "c")}
    make_map(m, broker.port, [{"name": "a", "prefix": "a"}, {"name": "c", "prefix": "c", "recent": 2},
                              {"name": "d", "prefix": "d"}])
    sup.signal(signal.SIGHUP)
    d = sup.running("d")
    c = sup.running("c", not_pid=before["c"])
    wait_for(lambda: "b" not in sup.shards(), 10, "b to be removed")
    assert sup.shard("a")["pid"] == before["a"] and sup.shard("a")["restarts"] == 0
    for pid in (before["b"], before["c"]):
        wait_for(lambda p=pid: not os.path.exists(f"/proc/{p}"), 5, f"pid {pid} to be gone")
    assert sup.status()["supervisor"]["reloads"] == 1
    # stop first, then start: the old c was gone before the new c started (one client id at a time)
    log = sup.log()
    assert log.index(f"shard c (pid {before['c']}) stopped for its new configuration") < \
        log.index(f"started shard c (pid {c['pid']})")
    # the new c runs with the new settings, the new d records
    publisher.publish_many([(f"{t}/x", json.dumps({"i": i}).encode(), 1) for i in range(5) for t in "acd"])
    for t in "acd":
        wait_for(lambda t=t: len(read_records(tmp_path / "data", f"{t}/x")) == 5, 10, f"records of {t}/x")
    recent = topic_dir(tmp_path / "data", "c/x") / "+recent.json"
    wait_for(lambda: recent.exists() and len(json.loads(recent.read_text())) == 2,
             10, "c's +recent.json to hold 2 records (its new setting)")
    # a bad map is logged and ignored
    m.write_text(m.read_text().replace("prefix: d", "prefix: d/#"))
    sup.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, keeping the running map" in sup.log(), 10, "the bad reload to be logged")
    after = sup.shards()
    assert {n: s["pid"] for n, s in after.items()} == {"a": before["a"], "c": c["pid"], "d": d["pid"]}
    assert sup.status()["supervisor"]["reloads"] == 1


class NotifySocket:
    """A stand-in for systemd's notify socket: collects what the supervisor sends."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self.running = True
        self.thread = threading.Thread(target=self._recv, daemon=True)
        self.thread.start()

    def _recv(self) -> None:
        while self.running:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
            except OSError:
                return

    def lines(self) -> list[str]:
        return [line for m in list(self.messages) for line in m.split("\n")]

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


def test_sigterm_flushes_every_acknowledged_message_and_exits_0(broker, supervisors, tmp_path: Path) -> None:
    ra, rb = tmp_path / "ra", tmp_path / "rb"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a", "root": str(ra)},
        {"name": "b", "prefix": "b", "root": str(rb)},
    ], batch={"max_messages": 200, "max_delay": "500ms"})  # big buffers: SIGTERM must flush them
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        sup = SupervisorProc(m, tmp_path, env={"NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"})
        supervisors.append(sup)
        sup.start(wait_ready=False)
        wait_for(lambda: "READY=1" in notify.lines(), 20, "READY=1")
        shards = sup.shards()
        assert all(s["state"] == "running" and s["counters"]["subscribed"] for s in shards.values())
        flow = Flow(broker.port, ["a", "b"], count=3000, batch=100, pause=0.02)
        flow.start()
        wait_for(lambda: all((s["counters"] or {}).get("messages", 0) > 500 for s in sup.shards().values()),
                 20, "both shards to record a while")
        t0 = time.monotonic()
        sup.signal(signal.SIGTERM)
        rc = sup.wait(15)
        took = time.monotonic() - t0
        wait_for(lambda: sum(line == "WATCHDOG=1" for line in notify.lines()) >= 2, 5, "WATCHDOG=1 pings")
        lines = notify.lines()
    finally:
        notify.close()
    assert rc == 0, sup.log()[-3000:]
    assert took < 10
    assert "STOPPING=1" in lines and lines.index("READY=1") < lines.index("STOPPING=1")
    assert any(line.startswith("STATUS=2 shard(s): 2 running") for line in lines)
    flow.finish()
    log = sup.log()
    assert log.count("stopped: exit 0 (stopped cleanly)") == 2
    for shard, root in (("a", ra), ("b", rb)):
        on_disk = payload_ids(root, flow.topics(shard))  # read_records fails on a torn line
        assert len(on_disk) == len(set(on_disk)), "a clean stop writes nothing twice"
        assert len(on_disk) > 500
        # what the recorder did not acknowledge is still held by the broker for its session;
        # everything else (every acknowledged message) must be in the files
        missing = set(range(3000)) - set(on_disk)
        held = drain_session(broker.port, client_id(m, shard), missing)
        assert missing <= held, f"shard {shard}: {len(missing - held)} message(s) lost"
        print(f"shard {shard}: {len(on_disk)} on disk at SIGTERM, {len(missing)} still queued by the broker")


def test_metrics_parse_and_status_validates_against_the_documented_schema(broker, publisher, supervisors,
                                                                          tmp_path: Path) -> None:
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"}, {"name": "rest", "prefix": "#", "root": str(tmp_path / "other")},
    ])
    sup = start(supervisors, m, tmp_path)
    sup.running("a")
    sup.running("rest")
    publisher.publish_many([(f"a/t{i % 3}", b'{"x": 1}', 1) for i in range(30)] +
                           [(f"z/t{i % 2}", b"text", 1) for i in range(10)])
    wait_for(lambda: (sup.shard("a")["counters"] or {}).get("messages") == 30
             and (sup.shard("rest")["counters"] or {}).get("messages") == 10, 10, "the counters")
    wait_for(lambda: all(s["process"] and s["disk"] for s in sup.shards().values()), 5, "the sampled figures")
    body = sup.get("/status")
    assert body is not None
    # the documented schema is the one in the code, and the live document validates against both
    schema = documented_schema()
    assert schema == json_schema(), "docs/supervisor.md is stale: regenerate with `python -m supervisor.serve.status`"
    try:  # a second, independent validator where installed (not a dependency of the test extra)
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.validate(json.loads(body), schema)
    doc = msgspec.json.decode(body, type=StatusDoc)
    a = next(s for s in doc.shards if s.name == "a")
    assert a.process is not None and a.process.rss > 0 and a.process.threads >= 1
    assert a.disk is not None and 0 < a.disk.free <= a.disk.total
    assert a.counters is not None and a.counters.messages == 30 and a.counters.connected
    assert a.uptime is not None and a.uptime > 0 and a.heartbeat_age is not None
    text = sup.get("/metrics")
    assert text is not None
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert all(name.startswith("shardlog_") for name in families)
    for f in families.values():
        for s in f.samples:
            assert "topic" not in s.labels
            if not f.name.startswith("shardlog_supervisor_"):
                assert "shard" in s.labels, s
            if f.type == "counter":
                assert s.name.endswith(("_total", "_created")), s
    msgs = {s.labels["shard"]: s.value for s in families["shardlog_messages"].samples if s.name.endswith("_total")}
    assert msgs == {"a": 30, "rest": 10}
    running = {s.labels["shard"] for s in families["shardlog_shard_state"].samples
               if s.labels["state"] == "running" and s.value == 1}
    assert running == {"a", "rest"}
    for name in ("shardlog_shard_cpu_seconds", "shardlog_shard_resident_memory_bytes", "shardlog_root_free_bytes",
                 "shardlog_shard_restarts", "shardlog_connected", "shardlog_last_message_timestamp_seconds",
                 "shardlog_recent_lag_seconds", "shardlog_recent_stale"):
        assert {s.labels["shard"] for s in families[name].samples} == {"a", "rest"}, name
    assert sup.get("/nope") is None  # 404


def documented_schema() -> dict[str, Any]:
    text = DOCS.read_text()
    m = re.search(r"<!-- status-schema:start -->\s*```json\n(.*?)```\s*<!-- status-schema:end -->", text, re.DOTALL)
    assert m is not None, f"no status schema block in {DOCS}"
    return json.loads(m.group(1))
