"""The recorder's life: start (root, lock, store, control socket), the main loop, stop.

:class:`RecorderLoop` has the shard's parts and drives them, each a class of its own:
the :class:`~shardlog.recording.recorder.Recorder` (the per-message path, buffers,
flushes and acknowledgements), the :class:`~shardlog.recording.session.BrokerSession` (the
client, connecting, the session's callbacks), which delivers messages to the recorder,
and the control :class:`~shardlog.control.operations.Operations`. One thread does
everything: the loop connects (with the session's backoff), runs paho's network loop
(which calls the recorder's ``on_publish``), flushes when a batch's time is up (and lets
the recorder's in-flight probe change the batch size), polls the control socket between
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
from types import FrameType
from typing import TYPE_CHECKING

from paho.mqtt.enums import MQTTErrorCode

from shardlog.config.routing import subscription
from shardlog.config.schema import ConfigError
from shardlog.control.channel import ControlSocket
from shardlog.control.operations import Operations
from shardlog.counters import write_stats
from shardlog.recording.lock import LockBusy, ShardLock
from shardlog.recording.session import BrokerSession
from shardlog.topics import TopicError, safe_join, topic_to_relpath

if TYPE_CHECKING:
    from shardlog.config.schema import Shard
    from shardlog.recording.recorder import Recorder

log = logging.getLogger(__name__)

EX_OK, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 0, 70, 73, 75, 78


def prepare_root(shard: Shard) -> tuple[str, str]:
    """The shard's root and branch directories, created: (the root's real path, the branch's).
    Raises OSError (PermissionError if the branch is not writable) or TopicError."""
    os.makedirs(shard.root, exist_ok=True)
    root_real = os.path.realpath(shard.root)
    branch = shard.branch
    branch_root = safe_join(root_real, topic_to_relpath(branch)) if branch else root_real
    os.makedirs(branch_root, exist_ok=True)
    if not os.access(branch_root, os.W_OK):
        raise PermissionError(13, "not writable", branch_root)
    return root_real, branch_root


def _cap_note(cap: int, batch_max: int) -> str:
    return (f"the broker sends at most {cap} unacknowledged messages (its in-flight cap, below "
            f"batch.max_messages {batch_max}): flushing every {cap} messages instead of "
            f"waiting batch.max_delay; raise the cap on the broker for throughput (docs/brokers.md)")


class RecorderLoop:
    """One shard's recorder process, from start to stop (see the module docstring)."""

    def __init__(self, rec: Recorder, *, stats_file: str | None = None, parent_pid: int | None = None,
                 heartbeat: float = 1.0, control_path: str | None = None) -> None:
        self.rec = rec
        self.shard = rec.shard
        self.broker = rec.broker
        self.counters = rec.counters
        self.stats_file = stats_file
        self.parent_pid = parent_pid
        self.heartbeat = heartbeat
        self.control_path = control_path  # the supervisor's control socket for this shard
        self.stop_requested = False
        self.exit_code = EX_OK  # EX_SOFTWARE once a worker thread died (_housekeeping)
        self.session = BrokerSession(rec.smap, rec.shard, rec.counters, rec.router, rec.routes, rec,
                                     stopping=self.stopping, write_stats=self.write_stats)
        self.ops = Operations(rec, None)  # with the control socket once started (_run_locked)

    # -- the main loop -------------------------------------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True  # only a flag: the main loop does the work

    def stopping(self) -> bool:
        return self.stop_requested

    def run(self) -> int:
        shard = self.shard
        try:
            self.rec.install_hooks()
            self.session.make_client()  # its TLS context: a bad file is a config error
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EX_CONFIG
        try:
            root_real, branch_root = prepare_root(shard)
        except (OSError, TopicError) as exc:
            log.error("cannot use root %s: %s", shard.root, exc)
            return EX_CANTCREAT
        self.session.recall(root_real, branch_root)
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
        rec = self.rec
        _raise_fd_limit(self.shard.max_open_files + 64)
        compressor = rec.open_store(root_real, branch_root)
        channel = None
        if self.control_path:
            try:
                channel = ControlSocket(self.control_path)
            except OSError as exc:
                log.error("cannot open the control socket %s: %s (control commands will fail)",
                          self.control_path, exc)
        self.ops = Operations(rec, channel)
        self.ops.clean_leftovers()
        assert rec.store is not None
        rec.store.start_preparer()  # new topics' directories and files: off the hot path
        rec.store.start_recent_writer()  # +recent.json too
        rec.sink.start()  # a journal's materializer
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("recording %s into %s (pid %d)", subscription(self.shard.branch), branch_root, os.getpid())
        try:
            self._loop()
            self._shutdown()
        finally:
            if channel is not None:
                channel.close()
            rec.sink.close()
            if compressor is not None:
                compressor.stop(timeout=30.0)
            self.write_stats()
        log.info("stopped: %d messages, %d acknowledged, %d quarantined",
                 self.counters.messages, self.counters.acked, self.counters.quarantined)
        return self.exit_code

    def _loop(self) -> None:
        rec, session, client = self.rec, self.session, self.session.client
        assert client is not None
        next_connect = 0.0
        next_tick = 0.0
        while not self.stop_requested:
            now = time.monotonic()
            if client.socket() is None and now >= next_connect:
                # the next attempt if this one fails, even after the TCP connect (a TLS or login
                # refusal ends the connection inside connect()): only a CONNACK resets the backoff
                next_connect = now + session.next_backoff()
                try:
                    session.connect()
                except (OSError, ValueError) as exc:
                    log.warning("cannot reach broker %s:%s: %s; retrying in %.1fs",
                                self.broker.host, self.broker.port, exc, next_connect - now)
            if client.socket() is not None:
                session.check_connack(now)
            if client.socket() is not None:
                timeout = min(0.1, max(0.0, self.ops.next_poll - now))  # inf without a control socket
                deadline = rec.flush_deadline()
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
                rc = client.loop(timeout)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.buffered:
                    rc = client.read_buffered()
                    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                        client.loop_write()  # the acks queued by flushes inside callbacks
                if client.socket() is None:  # ended, whatever rc says (paho may close it itself)
                    session.lost()
                    next_connect = max(next_connect, time.monotonic() + 0.5)
            else:
                time.sleep(min(0.1, max(0.0, next_connect - now)))  # waiting to reconnect
            now = time.monotonic()
            if rec.due(now):
                self._deadline_flush(now)
            if now >= self.ops.next_poll:
                self.ops.poll(now)  # control commands, between batches
            if now >= next_tick:
                next_tick = now + self.heartbeat
                self._tick(now)

    def _tick(self, now: float) -> None:
        """About once a heartbeat: housekeeping, stats (the heartbeat), parent check."""
        self._housekeeping(now)
        self.counters.pending = self.rec.pending
        self.write_stats()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.error("supervisor (pid %d) is gone; stopping", self.parent_pid)
            self.stop_requested = True

    def _housekeeping(self, now: float) -> None:
        rec = self.rec
        self.counters.topics_cached = len(rec.routes)
        rec.sink.housekeeping(now, self.counters)
        dead = rec.sink.dead_thread()
        if dead is not None and not self.stop_requested:
            # the shard cannot go on as it should: stop it, so the supervisor restarts it (what
            # is not acknowledged, the broker redelivers); its exit code and log say why
            log.error("the %s thread died: stopping with exit code %d to be restarted", dead, EX_SOFTWARE)
            self.counters.errors += 1
            self.exit_code = EX_SOFTWARE
            self.stop_requested = True
        # let one batch grow past a cap found, to see if it still holds
        if rec.probe.recheck(now, self.counters.acked):
            rec.set_batch_step(rec.probe.step())

    def _shutdown(self) -> None:
        """Flush, acknowledge, disconnect keeping the session, then let the sink finish
        (the stale +recent.json files; a journal's topic files catch up for a few seconds)."""
        rec = self.rec
        if rec.pending:
            rec.flush(wait=True)
        if rec.pending:
            log.error("stopping with %d record(s) not written (%s); the broker keeps them unacknowledged",
                      rec.pending, rec.sink.problem)
        self.session.disconnect()
        rec.sink.shutdown()

    def write_stats(self) -> None:
        if self.stats_file is None:
            return
        self.counters.updated_ts = time.time_ns() // 1000
        try:
            write_stats(self.stats_file, self.counters)
        except OSError as exc:
            log.warning("cannot write stats file %s: %s", self.stats_file, exc)

    # -- the broker's in-flight cap (brokercheck.InflightProbe, the recorder's) ------------

    def _deadline_flush(self, now: float) -> None:
        step = self.rec.deadline_flush(now)
        if step is not None:
            self._inflight_step(step)

    def _inflight_step(self, step: int) -> None:
        """The probe changed how many messages a batch may hold: a test begun, a cap found,
        kept after a test, or dropped."""
        rec = self.rec
        rec.set_batch_step(step)
        cap, known = rec.probe.cap, self.counters.inflight_cap
        if cap is not None and known is None:
            self.counters.inflight_cap = cap
            self.session.note(_cap_note(cap, rec.batch_max))
        elif cap is None and known is not None:
            self.counters.inflight_cap = None
            notes = self.counters.broker_notes
            if (text := _cap_note(known, rec.batch_max)) in notes:
                notes.remove(text)
            log.warning("the broker sent more than %d unacknowledged messages at once: it has no such "
                        "in-flight cap (any more); flushing by batch.max_messages %d again", known,
                        rec.batch_max)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("file descriptor limit %d is below max_open_files + 64 (%d)", new, wanted)
