"""Test helpers: a real mosquitto on a free loopback port, a publisher, recorder
processes, and polling with deadlines (never sleeps as synchronisation)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from shardlog.stats import Counters, read_stats

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BrokerProcess:
    """A broker child process on 127.0.0.1:``port``; subclasses start it."""

    kind = "broker"
    port: int
    proc: subprocess.Popen[bytes] | None = None

    def exit_report(self) -> str:
        return ""

    def _accepts(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"{self.kind} exited: {self.exit_report()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


class Mosquitto(BrokerProcess):
    """A real broker with persistence and no queue limit, on 127.0.0.1:<free port>."""

    kind = "mosquitto"

    def __init__(self, workdir: Path, max_queued: int = 0, extra_conf: str = "") -> None:
        self.dir = workdir
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"
        (workdir / "db").mkdir(exist_ok=True)
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {workdir / 'db'}/\n"
            f"max_queued_messages {max_queued}\n"
            "max_inflight_messages 0\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + extra_conf
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not os.path.exists(MOSQUITTO):
            pytest.skip("needs mosquitto itself (apt-get install mosquitto; .ci/run installs it, so CI runs "
                        "this test); the iotcore fallback cannot stand in for what this test checks")
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        wait_for(self._accepts, 10, f"mosquitto to listen on port {self.port}")

    def exit_report(self) -> str:
        return self.proc.stderr.read().decode() if self.proc is not None and self.proc.stderr else ""


class Publisher:
    """A paho client that publishes and waits until the broker has every message."""

    def __init__(self, port: int, client_id: str = "test-publisher") -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish_many(self, messages: list[tuple[str | bytes, bytes, int]], retain: bool = False,
                     timeout: float = 120) -> None:
        infos = [self.client.publish(t, p, q, retain=retain) for t, p, q in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "the broker did not acknowledge a publish in time"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def fallback_broker_settings(port: int) -> dict[str, Any]:
    """Broker keys a test map needs for the broker on ``port``: none for mosquitto; for the
    iotcore fallback (tests/fallback_broker.py), no $SYS subscription (iotcore hangs up on one)."""
    from tests.fallback_broker import PORTS
    return {"sys_topics": False} if port in PORTS else {}


def write_map(path: Path, port: int, shards: list[dict[str, Any]], **defaults: Any) -> Path:
    doc = {
        "broker": {"host": "127.0.0.1", "port": port, "client_id_prefix": f"t{os.getpid()}-{path.parent.name}-",
                   **fallback_broker_settings(port)},
        "defaults": {"root": str(path.parent / "data"), **defaults},
        "shards": shards,
        "supervisor": {"listen": f"127.0.0.1:{free_port()}"},
    }
    path.write_text(yaml.safe_dump(doc))
    return path


class RecorderProc:
    """``python -m shardlog record`` as a real child process."""

    def __init__(self, map_path: Path, shard: str, workdir: Path) -> None:
        self.map_path = map_path
        self.shard = shard
        self.stats_file = workdir / f"{shard}.stats.json"
        self.stderr_path = workdir / f"{shard}.stderr.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_subscribed: bool = True) -> RecorderProc:
        if self.stats_file.exists():
            self.stats_file.unlink()
        self._err = open(self.stderr_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shardlog", "record", str(self.map_path), "--shard", self.shard,
             "--stats-file", str(self.stats_file), "--heartbeat", "0.2"],
            stdout=subprocess.DEVNULL, stderr=self._err)
        if wait_subscribed:
            wait_for(lambda: self._alive() and (s := self.stats()) is not None and s.subscribed,
                     20, f"recorder {self.shard} to subscribe (log: {self.stderr_path})")
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"recorder {self.shard} exited with {self.proc.returncode}:\n{self.log()}")
        return True

    def stats(self) -> Counters | None:
        return read_stats(str(self.stats_file))

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        self._err.close()
        return rc
