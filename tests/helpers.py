"""Test helpers: a real mosquitto on a free loopback port, a publisher, recorder
processes, and polling with deadlines (never sleeps as synchronisation)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from shardlog.counters import Counters, read_stats

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


def http_get(url: str, timeout: float = 5) -> bytes | None:
    """The body of a GET, or None when nothing answers (yet) or it is not a 2xx."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()
    except (urllib.error.URLError, OSError):
        return None


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


def write_map(path: Path, port: int, shards: list[dict[str, Any]], broker_keys: dict[str, Any] | None = None,
              **defaults: Any) -> Path:
    """A shard map for the broker on ``port`` (``broker_keys``: more of its ``broker`` section)."""
    doc = {
        "broker": {"host": "127.0.0.1", "port": port, "client_id_prefix": f"t{os.getpid()}-{path.parent.name}-",
                   **fallback_broker_settings(port), **(broker_keys or {})},
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


def gate_preparer(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold every new topic's preparation (shardlog.writing.preparer.Preparer) until the event is set."""
    from shardlog.writing.preparer import Preparer

    gate = threading.Event()
    prepare = Preparer.prepare
    monkeypatch.setattr(Preparer, "prepare", lambda self, st: (gate.wait(30), prepare(self, st))[1])
    return gate


class SocketpairClient:
    """A recorder's own client on one end of a socketpair (no broker, no network): what it
    acknowledges. ``rec`` is a shardlog.recording.recorder.Recorder with its store open."""

    def __init__(self, rec: Any) -> None:
        from shardlog.recording.loop import RecorderLoop

        session = RecorderLoop(rec).session  # its client delivers to rec
        self.client = session.make_client()
        self.a, self.b = socket.socketpair()
        self.client._sock = self.a
        self.client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
        rec.connection_up(self.client, False)  # as at a CONNACK: rec acknowledges through it

    def pubacks(self) -> list[int]:
        """The packet ids of the PUBACKs sent since the last call, in order."""
        self.client.loop_write()
        self.b.setblocking(False)
        data = b""
        try:
            while chunk := self.b.recv(1 << 16):
                data += chunk
        except BlockingIOError:
            pass
        assert len(data) % 4 == 0 and all(data[i:i + 2] == b"\x40\x02" for i in range(0, len(data), 4))
        return [int.from_bytes(data[i + 2:i + 4], "big") for i in range(0, len(data), 4)]

    def close(self) -> None:
        self.a.close()
        self.b.close()


def _mqtt_str(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _mqtt_packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([first]) + bytes(length) + body


class FastPublisher:
    """A raw-socket MQTT 3.1.1 QoS 1 publisher: PUBLISHes pipelined up to ``window``
    unacknowledged, PUBACKs read as they come. paho's publisher tops out near 3,000 msg/s
    on a loaded 2-core machine; this one is limited by the broker. Single-threaded; use it
    from one thread (e.g. a :class:`FastFlow`)."""

    def __init__(self, port: int, client_id: str = "fast-publisher", window: int = 2000,
                 tls: ssl.SSLContext | None = None, username: str | None = None,
                 password: str | None = None) -> None:
        self.window = window
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        #: over TLS, decrypted bytes can wait inside the SSL object where select() cannot see them
        self.sock: socket.socket = tls.wrap_socket(sock, server_hostname="localhost") if tls else sock
        # CONNECT: protocol MQTT v4, clean session, keepalive 0 (no pings needed)
        flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
        payload = _mqtt_str(client_id.encode())
        payload += _mqtt_str(username.encode()) if username is not None else b""
        payload += _mqtt_str(password.encode()) if password is not None else b""
        self.sock.sendall(_mqtt_packet(0x10, _mqtt_str(b"MQTT") + bytes([4, flags, 0, 0]) + payload))
        connack = self._read_exact(4)
        assert connack[0] == 0x20 and connack[3] == 0, f"broker refused the connection: {connack!r}"
        self.sock.setblocking(False)
        self.buf = bytearray()
        self.next_id = 1
        self.inflight: set[int] = set()
        self.acked = 0
        self.unsolicited = 0  # PUBLISHes the broker sent this publisher, which subscribes to nothing

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the broker closed the connection")
            data += chunk
        return data

    def _read_acks(self, wait: float) -> None:
        pending = getattr(self.sock, "pending", None)
        if not (pending and pending()):  # a caller's deadline may have passed: max(0, wait)
            ready, _, _ = select.select([self.sock], [], [], max(0.0, wait))
            if not ready:
                return
        try:
            chunk = self.sock.recv(1 << 16)
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return  # a TLS record not complete yet
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        self.buf += chunk
        buf, i = self.buf, 0
        while len(buf) - i >= 4:  # nearly every packet is a 4-byte PUBACK
            if buf[i] == 0x40 and buf[i + 1] == 2:
                self.inflight.discard((buf[i + 2] << 8) | buf[i + 3])
                self.acked += 1
                i += 4
                continue
            # a QoS 0 PUBLISH nobody subscribed to (amqtt sends retained messages to publishers)
            assert buf[i] in (0x30, 0x31), f"unexpected packet from the broker: {bytes(buf[i:i + 4])!r}"
            n, shift, j = 0, 0, i + 1
            while j < len(buf) and buf[j] & 0x80:
                n |= (buf[j] & 0x7F) << shift
                shift, j = shift + 7, j + 1
            if j >= len(buf) or j + 1 + (n | (buf[j] << shift)) > len(buf):
                break  # the rest of it comes with the next read
            i = j + 1 + (n | (buf[j] << shift))
            self.unsolicited += 1
        del buf[:i]

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                select.select([self.sock], [self.sock], [], 1.0)
                self._read_acks(0)

    def publish_many(self, messages: list[tuple[str | bytes, bytes]], retain: bool = False) -> None:
        """Send QoS 1 PUBLISHes (pipelined; returns once they are written, not acknowledged)."""
        first = 0x33 if retain else 0x32
        out = bytearray()
        for topic, payload in messages:
            while len(self.inflight) >= self.window:
                if out:
                    self._send(bytes(out))
                    out.clear()
                self._read_acks(1.0)
            pid = self.next_id
            self.next_id = pid % 65535 + 1
            assert pid not in self.inflight, "packet id wrapped onto an unacknowledged publish"
            self.inflight.add(pid)
            t = topic.encode() if isinstance(topic, str) else topic
            out += _mqtt_packet(first, _mqtt_str(t) + pid.to_bytes(2, "big") + payload)
        if out:
            self._send(bytes(out))
        self._read_acks(0)

    def wait_acked(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.inflight:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{len(self.inflight)} publishes not acknowledged after {timeout:.0f}s")
            self._read_acks(0.1)

    def close(self) -> None:
        try:
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        except OSError:
            pass
        self.sock.close()


class FastFlow(threading.Thread):
    """Publishes ``count`` QoS 1 messages ``{"i": n}`` per branch at ``rate`` msg/s in all
    (paced in 10 ms steps), with a :class:`FastPublisher`, in a thread. The same interface
    as tests.supervisor.helpers.Flow (``sent``, ``topics``, ``finish``)."""

    def __init__(self, port: int, branches: list[str], count: int, rate: float,
                 topics_per_branch: int = 4) -> None:
        super().__init__(daemon=True)
        self.branches = branches
        self.count = count
        self.rate = rate
        self.tpb = topics_per_branch
        self.sent = 0  # per branch, written to the broker (acknowledged at finish)
        self.error: BaseException | None = None
        self.elapsed = 0.0
        self.pub = FastPublisher(port, client_id=f"fastflow-{os.getpid()}-{id(self)}")

    def topics(self, branch: str) -> list[str]:
        return [f"{branch}/t{k}" for k in range(self.tpb)]

    def run(self) -> None:
        try:
            t0 = time.monotonic()
            per_step = max(1, int(self.rate * 0.01 / len(self.branches)))  # per branch per 10 ms
            i = 0
            while i < self.count:
                due = t0 + (i / per_step) * 0.01
                delay = due - time.monotonic()
                if delay > 0:
                    self.pub._read_acks(delay)
                    continue
                end = min(self.count, i + per_step)
                self.pub.publish_many([(f"{b}/t{n % self.tpb}", b'{"i": %d}' % n)
                                       for n in range(i, end) for b in self.branches])
                i = self.sent = end
            self.pub.wait_acked(120)
            self.elapsed = time.monotonic() - t0
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 120) -> None:
        self.join(timeout)
        assert not self.is_alive(), "the publisher did not finish"
        self.pub.close()
        if self.error is not None:
            raise self.error


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``shardlog ARGV`` in this process, as the console script runs it: (exit code, stdout,
    stderr). A SystemExit (argparse, load_or_exit) is its code. Much faster than a subprocess
    for walking many argument lists; tests keep a few real subprocess runs beside it."""
    import contextlib
    import io
    import logging

    from shardlog.cli.main import main

    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)  # verbs write to .buffer
    err = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level  # daemon verbs call setup_logging
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            root.handlers[:], root.level = handlers, level
    out.flush()
    return rc, out.buffer.getvalue().decode("utf-8", "replace"), err.getvalue()
