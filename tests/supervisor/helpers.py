"""Helpers for the supervisor tests (imported as ``tests.supervisor.helpers``).

Unit tests drive :class:`supervisor.arbiter.loop.Arbiter` with a fake clock, fake
children and injected signals (no sleeps). End-to-end tests run the real
``python -m shardlog supervise`` against the real mosquitto of tests/conftest.py
and poll its ``/status`` with deadlines.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog.counters import Counters, write_stats
from shardlog.topics import topic_to_relpath
from tests.helpers import fallback_broker_settings, free_port, http_get, wait_for  # re-exported to the supervisor tests

# -- fakes for the arbiter ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = 1_700_000_000.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


class FakeChild:
    def __init__(self, pid: int, argv: list[str], spawner: FakeSpawner) -> None:
        self.pid = pid
        self.argv = argv
        # the embedded broker (python -m supervisor.broker) is a child without a shard
        self.shard = argv[argv.index("--shard") + 1] if "--shard" in argv else "embedded-broker"
        self.stats_file = argv[argv.index("--stats-file") + 1] if "--stats-file" in argv else ""
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.spawner = spawner

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is not None:
            return
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.returncode = -signal.SIGKILL

    def exit(self, code: int) -> None:
        self.returncode = code

    def beat(self, subscribed: bool = True, **counters: Any) -> None:
        """Rewrite the stats file as the recorder does (a distinct mtime each time)."""
        write_stats(self.stats_file, Counters(shard=self.shard, pid=self.pid, subscribed=subscribed,
                                              connected=subscribed, **counters))
        self.spawner.mtime += 1_000_000
        os.utime(self.stats_file, ns=(self.spawner.mtime, self.spawner.mtime))


class FakeSpawner:
    def __init__(self) -> None:
        self.children: list[FakeChild] = []
        self.next_pid = 50000
        self.mtime = 1_000_000_000_000_000_000
        self.fail: OSError | None = None

    def __call__(self, argv: list[str], env: dict[str, str]) -> FakeChild:
        if self.fail is not None:
            raise self.fail
        self.next_pid += 1
        child = FakeChild(self.next_pid, argv, self)
        self.children.append(child)
        return child

    def of(self, shard: str) -> list[FakeChild]:
        return [c for c in self.children if c.shard == shard]

    def live(self, shard: str) -> FakeChild:
        live = [c for c in self.of(shard) if c.returncode is None]
        assert len(live) == 1, f"{len(live)} live children of {shard}"
        return live[0]


# -- shard maps ------------------------------------------------------------------------------------


def make_map(path: Path, port: int, shards: list[dict[str, Any]], *, supervisor: dict[str, Any] | None = None,
             **defaults: Any) -> Path:
    sup = {
        "listen": f"127.0.0.1:{free_port()}",
        "heartbeat_timeout": "3s",
        "stop_timeout": "10s",
        "start_jitter": "50ms",
        "restart": {"backoff_initial": "200ms", "backoff_max": "2s", "healthy_after": "30s",
                    "max_restarts": 5, "window": "60s", "failed_retry": "5m"},
    }
    for k, v in (supervisor or {}).items():
        if isinstance(v, dict):
            sup[k] = {**sup.get(k, {}), **v}
        else:
            sup[k] = v
    doc = {
        "broker": {"host": "127.0.0.1", "port": port,
                   "client_id_prefix": f"t{os.getpid()}-{path.parent.name}-", **fallback_broker_settings(port)},
        "defaults": {"root": str(path.parent / "data"), "lock_wait": "2s", **defaults},
        "shards": shards,
        "supervisor": sup,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def client_id(map_path: Path, shard: str) -> str:
    return yaml.safe_load(map_path.read_text())["broker"]["client_id_prefix"] + shard


# -- the supervisor as a real process -------------------------------------------------------------


class SupervisorProc:
    def __init__(self, map_path: Path, workdir: Path, env: dict[str, str] | None = None,
                 extra: list[str] | None = None) -> None:
        self.map_path = map_path
        self.log_path = workdir / "supervisor.log"
        listen = yaml.safe_load(map_path.read_text())["supervisor"]["listen"]
        self.url = f"http://{listen}"
        self.env = {**os.environ, **(env or {})}
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> SupervisorProc:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "shardlog", "supervise", str(self.map_path),
                                      "--log-level", "info", *self.extra],
                                     stdout=subprocess.DEVNULL, stderr=self._log, env=self.env)
        if wait_ready:
            wait_for(lambda: self.alive() and (s := self.status()) is not None and s["supervisor"]["ready"],
                     30, f"the supervisor to be ready (log: {self.log_path})")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()[-5000:]}")
        return True

    def get(self, path: str) -> bytes | None:
        return http_get(self.url + path)

    def status(self) -> dict[str, Any] | None:
        body = self.get("/status")
        return json.loads(body) if body is not None else None

    def shards(self) -> dict[str, dict[str, Any]]:
        doc = self.status()
        assert doc is not None, "supervisor does not answer"
        return {s["name"]: s for s in doc["shards"]}

    def shard(self, name: str) -> dict[str, Any] | None:
        return self.shards().get(name)

    def wait_shard(self, name: str, pred: Any, timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            self.alive()
            doc = self.status()  # None until the supervisor listens
            s = next((s for s in doc["shards"] if s["name"] == name), None) if doc else None
            return s if s is not None and pred(s) else None
        return wait_for(check, timeout, f"shard {name}: {what} (log: {self.log_path})", interval=0.05)

    def running(self, name: str, timeout: float = 20, not_pid: int | None = None) -> dict[str, Any]:
        """Wait until ``name`` runs and has subscribed (with a pid other than ``not_pid``)."""
        return self.wait_shard(name, lambda s: s["state"] == "running" and s["pid"] != not_pid
                               and (s["counters"] or {}).get("subscribed"), timeout,
                               "running and subscribed" + (f" with a pid other than {not_pid}" if not_pid else ""))

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill_all(self) -> None:
        """Teardown: stop the supervisor, and then any recorder it left (its own children only)."""
        if self.proc is None:
            return
        pids = []
        try:
            pids = [s["pid"] for s in self.shards().values() if s["pid"]] if self.proc.poll() is None else []
        except AssertionError:
            pass
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            try:  # only a recorder of ours: check its command line names our map
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"shardlog" in cmd and b"record" in cmd:
                os.kill(pid, signal.SIGKILL)


# -- records on disk -------------------------------------------------------------------------------


def topic_dir(root: Path | str, topic: str) -> Path:
    return Path(root) / topic_to_relpath(topic)


def read_records(root: Path | str, topic: str) -> list[dict[str, Any]]:
    """Every record of ``topic`` under ``root`` (rotated segments first); fails on a torn line."""
    d = topic_dir(root, topic)
    files = sorted(glob.glob(str(d / "+log.*.jsonl"))) + [str(d / "+log.jsonl")]
    out = []
    for f in files:
        if not os.path.exists(f):
            continue
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                assert line.endswith("\n"), f"torn line in {f}: {line!r}"
                out.append(json.loads(line))
    return out


def payload_ids(root: Path | str, topics: list[str]) -> list[int]:
    return [r["payload"]["i"] for t in topics for r in read_records(root, t)]


# -- publishing while the test does other things -------------------------------------------------


class Flow(threading.Thread):
    """Publishes ``count`` QoS 1 messages ``{"i": n}`` per branch, paced in batches, in a thread."""

    def __init__(self, port: int, branches: list[str], count: int, batch: int = 50, pause: float = 0.02,
                 topics_per_branch: int = 4) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.branches = branches
        self.count = count
        self.batch = batch
        self.pause = pause
        self.tpb = topics_per_branch
        self.sent = 0  # per branch, published and acknowledged by the broker
        self.error: BaseException | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"flow-{os.getpid()}-{id(self)}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def topic(self, branch: str, i: int) -> str:
        return f"{branch}/t{i % self.tpb}"

    def topics(self, branch: str) -> list[str]:
        return [f"{branch}/t{k}" for k in range(self.tpb)]

    def run(self) -> None:
        try:
            for start in range(0, self.count, self.batch):
                infos = []
                for i in range(start, min(self.count, start + self.batch)):
                    for b in self.branches:
                        infos.append(self.client.publish(self.topic(b, i), json.dumps({"i": i}), 1))
                for info in infos:
                    info.wait_for_publish(30)
                    assert info.is_published()
                self.sent = min(self.count, start + self.batch)
                time.sleep(self.pause)  # pacing, so that the flow spans what the test does
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 60) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the publisher did not finish"
        self.client.disconnect()
        self.client.loop_stop()
        if self.error is not None:
            raise self.error


def drain_session(port: int, cid: str, wanted: set[int], timeout: float = 15) -> set[int]:
    """Resume the persistent session ``cid`` and collect the ``i`` of what the broker still held for it,
    until every id in ``wanted`` has come (or the timeout)."""
    got: set[int] = set()
    complete = threading.Event()
    if not wanted:
        complete.set()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)

    def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        got.add(json.loads(msg.payload)["i"])
        if wanted <= got:
            complete.set()

    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        complete.wait(timeout)  # the caller asserts on what came
    finally:
        c.disconnect()
        c.loop_stop()
    return got


# -- listening to the broker -------------------------------------------------------------------


class Listener:
    """A subscriber that keeps every message (topic, payload, properties) it gets."""

    def __init__(self, port: int, topics: list[str]) -> None:
        self.messages: list[tuple[str, bytes, Any, bool]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"listener-{os.getpid()}",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in topics])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert subscribed.wait(10), "the listener did not subscribe"

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, msg.payload, msg.properties, msg.retain))

    def last(self, topic: str) -> bytes | None:
        with self.lock:
            got = [p for t, p, _, _ in self.messages if t == topic]
        return got[-1] if got else None

    def reply(self, topic: str, ident: Any) -> tuple[dict[str, Any], Any] | None:
        with self.lock:
            for t, p, props, _ in self.messages:
                if t == topic:
                    try:
                        doc = json.loads(p)
                    except ValueError:
                        continue
                    if isinstance(doc, dict) and doc.get("id") == ident:
                        return doc, props
        return None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
