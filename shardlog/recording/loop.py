"""The recorder's life: start (root, lock, store, control socket), the main loop, stop.

A part of :class:`shardlog.recording.recorder.Recorder` (a base class of it, using the
recorder's own attributes, set by ``Recorder.__init__``). One thread does everything: the
loop connects (with backoff), runs paho's network loop (which calls the recorder's
``on_message``), flushes when a batch's time is up, polls the control socket between
batches, and about once a heartbeat does housekeeping and rewrites the stats file (the
supervisor's heartbeat). SIGTERM/SIGINT only set a flag; the loop then flushes,
acknowledges and disconnects keeping the session.

Exit codes follow sysexits: 0 stopped cleanly, 70 internal error, 73 the root cannot be
created, 75 the branch is locked by another recorder, 78 configuration error.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from paho.mqtt.enums import MQTTErrorCode

from shardlog.config.routing import subscription
from shardlog.config.schema import ConfigError
from shardlog.control.channel import ControlSocket
from shardlog.control.operations import Operations
from shardlog.counters import write_stats
from shardlog.recording.lock import LockBusy, ShardLock
from shardlog.topics import TopicError, safe_join, topic_to_relpath

if TYPE_CHECKING:
    from shardlog.config.schema import Broker, Shard
    from shardlog.counters import Counters
    from shardlog.recording.client import BufferedClient, StockClient
    from shardlog.recording.sinks import Sink
    from shardlog.writing.compressor import Compressor
    from shardlog.writing.store import Store

log = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 0, 70, 73, 75, 78


class RecorderLoop:
    """The life-cycle half of a recorder (see the module docstring)."""

    # set by Recorder.__init__
    shard: Shard
    broker: Broker
    counters: Counters
    store: Store | None
    sink: Sink
    client: BufferedClient | StockClient | None
    ops: Operations
    control_path: str | None
    stats_file: str | None
    parent_pid: int | None
    heartbeat: float
    pending: int
    routes: dict[bytes, Any]
    stop_requested: bool
    expect_session: bool
    backoff: float
    # methods of Recorder and BrokerSession
    install_hooks: Callable[[], object]
    open_store: Callable[[str, str], Compressor | None]
    _make_client: Callable[[], BufferedClient | StockClient]
    _recall_session: Callable[[str, str], bool]
    _recheck_inflight: Callable[[float], None]
    _check_connack: Callable[[float], None]
    _connect: Callable[[], None]
    _disconnect: Callable[[], None]
    _lost_connection: Callable[[], None]
    _flush_deadline: Callable[[], float | None]
    _due: Callable[[float], bool]
    _deadline_flush: Callable[[float], None]
    flush: Callable[..., None]

    # -- setup ----------------------------------------------------------------------------

    def _prepare_root(self) -> tuple[str, str]:
        os.makedirs(self.shard.root, exist_ok=True)
        root_real = os.path.realpath(self.shard.root)
        branch = self.shard.branch
        branch_root = safe_join(root_real, topic_to_relpath(branch)) if branch else root_real
        os.makedirs(branch_root, exist_ok=True)
        self.expect_session = self._recall_session(root_real, branch_root)
        if not os.access(branch_root, os.W_OK):
            raise PermissionError(13, "not writable", branch_root)
        return root_real, branch_root

    # -- the main loop -------------------------------------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True  # only a flag: the main loop does the work

    def run(self) -> int:
        shard = self.shard
        try:
            self.install_hooks()
            self.client = self._make_client()  # its TLS context: a bad file is a config error
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EX_CONFIG
        try:
            root_real, branch_root = self._prepare_root()
        except (OSError, TopicError) as exc:
            log.error("cannot use root %s: %s", shard.root, exc)
            return EX_CANTCREAT
        lock = ShardLock(branch_root)
        try:
            lock.acquire(shard.lock_wait)
        except LockBusy as exc:
            log.error("%s", exc)
            return EX_TEMPFAIL
        except OSError as exc:
            log.error("cannot take the shard lock in %s: %s", branch_root, exc)
            return EX_CANTCREAT
        try:
            return self._run_locked(root_real, branch_root)
        finally:
            lock.release()

    def _run_locked(self, root_real: str, branch_root: str) -> int:
        _raise_fd_limit(self.shard.max_open_files + 64)
        compressor = self.open_store(root_real, branch_root)
        channel = None
        if self.control_path:
            try:
                channel = ControlSocket(self.control_path)
            except OSError as exc:
                log.error("cannot open the control socket %s: %s (control commands will fail)",
                          self.control_path, exc)
        self.ops = Operations(self.ops.rec, channel)  # the recorder, as Recorder.__init__ gave it
        self.ops.clean_leftovers()
        assert self.store is not None
        self.store.start_preparer()  # new topics' directories and files: off the hot path
        self.store.start_recent_writer()  # +recent.json too
        self.sink.start()  # a journal's materializer
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("recording %s into %s (pid %d)", subscription(self.shard.branch), branch_root, os.getpid())
        try:
            self._loop()
            self._shutdown()
        finally:
            if channel is not None:
                channel.close()
            self.sink.close()
            if compressor is not None:
                compressor.stop(timeout=30.0)
            self._write_stats()
        log.info("stopped: %d messages, %d acknowledged, %d quarantined",
                 self.counters.messages, self.counters.acked, self.counters.quarantined)
        return EX_OK

    def _loop(self) -> None:
        client = self.client
        assert client is not None
        next_connect = 0.0
        next_tick = 0.0
        while not self.stop_requested:
            now = time.monotonic()
            if client.socket() is None and now >= next_connect:
                # the next attempt if this one fails, even after the TCP connect (a TLS or login
                # refusal ends the connection inside connect()): only a CONNACK resets the backoff
                next_connect = now + self.backoff
                self.backoff = min(self.backoff * 2, self.broker.reconnect_max)
                try:
                    self._connect()
                except (OSError, ValueError) as exc:
                    log.warning("cannot reach broker %s:%s: %s; retrying in %.1fs",
                                self.broker.host, self.broker.port, exc, next_connect - now)
            if client.socket() is not None:
                self._check_connack(now)
            if client.socket() is not None:
                timeout = min(0.1, max(0.0, self.ops.next_poll - now))  # inf without a control socket
                deadline = self._flush_deadline()
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
                rc = client.loop(timeout)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.buffered:
                    rc = client.read_buffered()
                    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                        client.loop_write()  # the acks queued by flushes inside callbacks
                if client.socket() is None:  # ended, whatever rc says (paho may close it itself)
                    self._lost_connection()
                    next_connect = max(next_connect, time.monotonic() + 0.5)
            else:
                time.sleep(min(0.1, max(0.0, next_connect - now)))  # waiting to reconnect
            now = time.monotonic()
            if self._due(now):
                self._deadline_flush(now)
            if now >= self.ops.next_poll:
                self.ops.poll(now)  # control commands, between batches
            if now >= next_tick:
                next_tick = now + self.heartbeat
                self._tick(now)

    def _tick(self, now: float) -> None:
        """About once a heartbeat: housekeeping, stats (the heartbeat), parent check."""
        self._housekeeping(now)
        self.counters.pending = self.pending
        self._write_stats()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.error("supervisor (pid %d) is gone; stopping", self.parent_pid)
            self.stop_requested = True

    def _housekeeping(self, now: float) -> None:
        self.counters.topics_cached = len(self.routes)
        self.sink.housekeeping(now, self.counters)
        self._recheck_inflight(now)

    def _shutdown(self) -> None:
        """Flush, acknowledge, disconnect keeping the session, then let the sink finish
        (the stale +recent.json files; a journal's topic files catch up for a few seconds)."""
        if self.pending:
            self.flush(wait=True)
        if self.pending:
            log.error("stopping with %d record(s) not written (%s); the broker keeps them unacknowledged",
                      self.pending, self.sink.problem)
        self._disconnect()
        self.sink.shutdown()

    def _write_stats(self) -> None:
        if self.stats_file is None:
            return
        self.counters.updated_ts = time.time_ns() // 1000
        try:
            write_stats(self.stats_file, self.counters)
        except OSError as exc:
            log.warning("cannot write stats file %s: %s", self.stats_file, exc)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("file descriptor limit %d is below max_open_files + 64 (%d)", new, wanted)
