"""The embedded broker: ``broker.embedded: true`` in the shard map.

``shardlog supervise`` starts it as a child process (``python -m supervisor.broker
CONFIG.toml``, spawned with ``sys.executable`` like the recorders, never forked) before
the shards, waits until its port accepts connections, restarts it if it dies, and stops
it last, after the recorders have flushed and disconnected.

The broker is iotcore (PyPI), a wheel wrapping rumqttd, a Rust MQTT broker: no system
package, nothing to compile. Its quirks, all handled here: it listens on 0.0.0.0 unless
told otherwise (we bind the map's loopback host), MQTT 5 needs its own listener (the
map's ``port`` speaks the map's ``protocol``; ``embedded_port_311`` adds a 3.1.1 one),
payloads are capped at 20 KiB by default (raised to the shards' largest ``max_payload``),
and its routing logs a line per message at ERROR (silenced unless ``--log-level debug``).
Sessions and queues live in memory only: a broker restart forgets them, which is why
production uses a real broker with persistence (mosquitto).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from shardlog.config import Broker, ShardMap
from supervisor.shards.process import Child, ExitInfo, Spawn, send

log = logging.getLogger(__name__)

#: the name supervise logs the embedded broker under
NAME = "embedded-broker"


def listen_host(b: Broker) -> str:
    """The address to bind: loopback (config validation guarantees host is loopback)."""
    host = b.host.strip("[]")
    return "127.0.0.1" if host.lower().startswith("localhost") or host.startswith("ip6-") else host


def _addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def max_payload(smap: ShardMap) -> int:
    """What the broker accepts: the largest payload any shard records (at least 1 MiB)."""
    return max([1 << 20] + [int(s.max_payload) for s in smap.shards])


def config_toml(smap: ShardMap) -> str:
    """rumqttd's configuration for the map's broker."""
    b = smap.broker
    host = listen_host(b)
    inflight = max(100, int(b.receive_maximum))
    conn = (f"connection_timeout_ms = 60000\nmax_payload_size = {max_payload(smap)}\n"
            f"max_inflight_count = {inflight}\ndynamic_filters = true\n")
    listeners = []
    main_kind = "v5" if b.mqtt5 else "v4"
    listeners.append((main_kind, b.port))
    if b.embedded_port_311 is not None:
        listeners.append(("v4", b.embedded_port_311))
    out = ["# written by shardlog supervise for broker.embedded: true", "id = 0", "",
           "[router]", "id = 0", "max_connections = 10010", f"max_outgoing_packet_count = {inflight}",
           "max_segment_size = 104857600", "max_segment_count = 10", ""]
    for i, (kind, port) in enumerate(listeners, 1):
        out += [f"[{kind}.{i}]", f'name = "{kind}-{i}"', f'listen = "{_addr(host, port)}"',
                "next_connection_delay_ms = 1", f"[{kind}.{i}.connections]", conn]
    return "\n".join(out)


def argv(config_path: str, log_level: str, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "supervisor.broker", config_path, "--log-level", log_level,
            "--parent-pid", str(parent_pid)]


def accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Does something accept TCP connections on host:port? (loopback: answers at once)"""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ports_taken(smap: ShardMap) -> list[str]:
    """The embedded broker's listen addresses that something else already answers on.

    Checked before the first start: a broker that cannot bind would be restarted for
    ever, while the shards quietly recorded whatever broker holds the port."""
    b = smap.broker
    host = listen_host(b)
    ports = [b.port] + ([b.embedded_port_311] if b.embedded_port_311 is not None else [])
    return [_addr(host, port) for port in ports if accepts(host, port)]


# -- the supervisor's side ------------------------------------------------------------------------

#: restart backoff of the embedded broker: initial, longest
BACKOFF_INITIAL, BACKOFF_MAX = 0.5, 10.0
#: a broker that does not accept connections this long after its start is killed and restarted
READY_TIMEOUT = 15.0


class EmbeddedBroker:
    """The embedded broker as the arbiter's main loop sees it (only the loop touches it).

    ``step`` never blocks: it reaps the child, probes the port (a loopback connect answers
    at once), starts or restarts with backoff, and enforces the kill deadline."""

    def __init__(self, smap: ShardMap, config_path: str, spawn: Spawn, env: dict[str, str],
                 log_level: str, parent_pid: int) -> None:
        self.host = listen_host(smap.broker)
        self.port = smap.broker.port
        self.config_path = config_path
        with open(config_path, "w", encoding="utf-8") as f:
            f.write(config_toml(smap))
        self.spawn = spawn
        self.env = env
        self.log_level = log_level
        self.parent_pid = parent_pid
        self.child: Child | None = None
        self.ready = False
        self.started_at = 0.0
        self.next_start: float | None = 0.0
        self.delay = BACKOFF_INITIAL
        self.restarts = 0
        self.stopping = False
        self.kill_at: float | None = None
        self.last_exit: ExitInfo | None = None

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    @property
    def state(self) -> str:
        if self.child is None:
            return "stopped" if self.stopping or self.next_start is None else "backoff"
        if self.stopping:
            return "stopping"
        return "running" if self.ready else "starting"

    @property
    def listen(self) -> str:
        return _addr(self.host, self.port)

    def step(self, now: float, wall: float) -> None:
        if self.child is not None:
            code = self.child.poll()
            if code is not None:
                self._exited(code, now, wall)
        if self.child is not None and not self.ready:
            if accepts(self.host, self.port, 0.05):
                self.ready = True
                log.info("%s (pid %d) accepts connections on %s", NAME, self.child.pid,
                         _addr(self.host, self.port))
            elif now - self.started_at > READY_TIMEOUT and self.kill_at is None:
                log.error("%s (pid %d) does not accept connections on %s after %gs: killing it",
                          NAME, self.child.pid, _addr(self.host, self.port), READY_TIMEOUT)
                send(self.child, signal.SIGKILL)
                self.kill_at = None
        if self.child is not None and self.kill_at is not None and now >= self.kill_at:
            log.warning("%s (pid %d) still running after SIGTERM; SIGKILL", NAME, self.child.pid)
            send(self.child, signal.SIGKILL)
            self.kill_at = None
        if (self.child is None and not self.stopping and self.next_start is not None
                and now >= self.next_start):
            self._start(now)

    def _start(self, now: float) -> None:
        try:
            self.child = self.spawn(argv(self.config_path, self.log_level, self.parent_pid), self.env)
        except OSError as exc:
            log.error("cannot start %s: %s; retrying in %gs", NAME, exc, self.delay)
            self.next_start = now + self.delay
            self.delay = min(BACKOFF_MAX, self.delay * 2)
            return
        self.started_at = now
        self.next_start = None
        self.ready = False
        log.info("started %s (pid %d) on %s%s", NAME, self.child.pid, _addr(self.host, self.port),
                 f" (restart {self.restarts})" if self.restarts else "")

    def _exited(self, code: int, now: float, wall: float) -> None:
        assert self.child is not None
        pid = self.child.pid
        info = ExitInfo.from_returncode(code, wall)
        self.last_exit = info
        was_ready = self.ready and now - self.started_at >= 60
        self.child = None
        self.ready = False
        self.kill_at = None
        if self.stopping:
            log.info("%s (pid %d) stopped: %s", NAME, pid, info.reason)
            return
        if was_ready:  # it ran healthily for a while: start over from the initial delay
            self.delay = BACKOFF_INITIAL
        self.restarts += 1
        self.next_start = now + self.delay
        log.warning("%s (pid %d) exited: %s; restarting it in %gs (the shards reconnect by themselves)",
                    NAME, pid, info.reason, self.delay)
        self.delay = min(BACKOFF_MAX, self.delay * 2)

    def stop(self, now: float, timeout: float) -> None:
        """SIGTERM (once); SIGKILL after ``timeout``. Called after every shard has exited."""
        if self.stopping:
            return
        self.stopping = True
        self.next_start = None
        if self.child is not None:
            log.info("stopping %s (pid %d)", NAME, self.child.pid)
            send(self.child, signal.SIGTERM)
            self.kill_at = now + timeout

    def kill(self) -> None:
        self.stopping = True
        if self.child is not None:
            send(self.child, signal.SIGKILL)

    def next_due(self, now: float) -> float | None:
        if self.child is None:
            return self.next_start if not self.stopping else None
        if not self.ready:
            return now + 0.05  # probe the port again soon
        return self.kill_at


# -- the child process ----------------------------------------------------------------------------

EX_UNAVAILABLE, EX_CONFIG = 69, 78


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m supervisor.broker",
                                description="the embedded MQTT broker that shardlog supervise runs")
    p.add_argument("config", help="rumqttd TOML (written by shardlog supervise)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    a = p.parse_args(args)
    debug = a.log_level.lower() == "debug"
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {NAME}: %(message)s")
    # rumqttd logs every packet at ERROR through its tracing spans: silence it unless debugging
    # (must happen before the native module caches the level)
    logging.getLogger("rumqttd").setLevel(logging.DEBUG if debug else logging.CRITICAL)
    try:
        from iotcore.iotcore import IotCoreBroker
    except ImportError as exc:
        print(f"{NAME}: iotcore is not installed ({exc}); pip install 'iotcore>=0.4,<0.5', "
              "or set broker.embedded: false and run a broker", file=sys.stderr)
        return EX_CONFIG
    try:
        broker = IotCoreBroker(config_path=a.config)
        broker.check_ports()
    except OSError as exc:
        print(f"{NAME}: {exc} (another broker running? use it with broker.embedded: false)", file=sys.stderr)
        return EX_UNAVAILABLE
    except Exception as exc:  # noqa: BLE001 - a bad config from the native side
        print(f"{NAME}: cannot start: {exc}", file=sys.stderr)
        return EX_CONFIG
    # The native run_forever never returns and has no shutdown API: run it in a daemon
    # thread and let the main thread wait for SIGTERM/SIGINT (blocked in every thread, taken
    # with sigtimedwait) or the supervisor's death, then exit at once. Nothing is lost by
    # exiting: the broker holds nothing on disk.
    stop = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            broker.run_forever()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=serve, name="rumqttd", daemon=True).start()
    print(f"{NAME}: listening on {', '.join(broker.listeners())} (iotcore; pid {os.getpid()})",
          file=sys.stderr, flush=True)
    while True:
        info = signal.sigtimedwait(stop, 1.0)
        if errors:
            print(f"{NAME}: stopped: {errors[0]}", file=sys.stderr, flush=True)
            os._exit(EX_UNAVAILABLE)
        if info is not None:
            os._exit(0)
        if a.parent_pid and os.getppid() != a.parent_pid:
            os._exit(0)  # the supervisor is gone: do not outlive it


if __name__ == "__main__":
    sys.exit(main())
