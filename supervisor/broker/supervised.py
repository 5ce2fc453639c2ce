"""The embedded broker as the supervisor runs it (``broker.embedded: true`` in the shard map).

``shardlog supervise`` starts it as a child process (``python -m supervisor.broker
CONFIG.toml``, spawned with ``sys.executable`` like the recorders, never forked) before
the shards, waits until its port accepts connections, restarts it if it dies, and stops
it last, after the recorders have flushed and disconnected. Sessions and queues live in
memory only: a broker restart forgets them, which is why production uses a real broker
with persistence (mosquitto).
"""

from __future__ import annotations

import logging
import signal
import socket

from shardlog.config.schema import ShardMap
from supervisor.broker.config import NAME, address, argv, config_toml, listen_host
from supervisor.shards.process import Child, ExitInfo, Spawn, send

log = logging.getLogger(__name__)


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
    return [address(host, port) for port in ports if accepts(host, port)]


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
        return address(self.host, self.port)

    def step(self, now: float, wall: float) -> None:
        if self.child is not None:
            code = self.child.poll()
            if code is not None:
                self._exited(code, now, wall)
        if self.child is not None and not self.ready:
            if accepts(self.host, self.port, 0.05):
                self.ready = True
                log.info("%s (pid %d) accepts connections on %s", NAME, self.child.pid,
                         address(self.host, self.port))
            elif now - self.started_at > READY_TIMEOUT and self.kill_at is None:
                log.error("%s (pid %d) does not accept connections on %s after %gs: killing it",
                          NAME, self.child.pid, address(self.host, self.port), READY_TIMEOUT)
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
        log.info("started %s (pid %d) on %s%s", NAME, self.child.pid, address(self.host, self.port),
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
