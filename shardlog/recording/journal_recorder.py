"""A recorder that acknowledges after one sequential journal write (``journal.enabled``).

The recording thread routes each message (cached per topic), appends its record to
the batch, and at the end of the batch writes the batch to the journal with one
``write`` (``fsync``: and one ``fdatasync``) and acknowledges every message of it, in
order. The topic files are written behind it by the materializer thread
(shardlog/writing/materializer.py). So the cost of acknowledging does not grow with the
number of topics; the topic files follow as fast as the file system allows, at most
``journal.max_lag`` bytes behind (past that the shard stops acknowledging and the
broker keeps the rest, as when the disk is full).

The delivery promise of docs/design.md ("The delivery promise") holds with "written"
meaning "in the journal": a record is acknowledged only after it is in the journal (and
synced, with fsync), and a journal record reaches its topic file exactly once, across
kills and restarts.
"""

from __future__ import annotations

import contextlib
import logging
import time
import typing
from collections.abc import Iterator

import msgspec

from shardlog.recording.recorder import Recorder
from shardlog.recording.session import _BROKER_DROPPED, _DISCARD
from shardlog.records import encode_quarantine, encode_record
from shardlog.topics import TopicError, topic_from_bytes
from shardlog.writing import journal
from shardlog.writing.compressor import Compressor
from shardlog.writing.journal import JournalWriter
from shardlog.writing.materializer import Materializer
from shardlog.writing.topic_state import TopicState

log = logging.getLogger(__name__)
_time_ns = time.time_ns
_encode = msgspec.json.encode

#: topics routed in memory (~200 bytes each); past it the oldest quarter is forgotten
MAX_ROUTES = 200_000
#: at a stop, how long the materializer may go on filling the topic files
STOP_CATCH_UP = 5.0
#: before a control operation: the topic files must catch up with the journal this fast
OPERATION_CATCH_UP = 5.0
#: records that may wait for their new topics (set aside, ~0.25 KB each; at most the recorder's
#: max_waiting of them with a topic state, ~1.5 KB, waiting for the preparer): known topics keep
#: being written through a burst of this many new topics (materializer.py, NEW_PER_STEP;
#: without a journal a shard cannot: receive_maximum caps its unacknowledged messages)
MAX_WAITING = 200_000
_QUARANTINE = journal.QUARANTINE_KEY + b"\t"


class JournalRecorder(Recorder):
    """``states`` maps a topic's bytes to its journal key (``"topic"\\t``), _DISCARD,
    _BROKER_DROPPED or the reason it cannot be stored; the topic states themselves
    are the materializer's."""

    writer: JournalWriter
    materializer: Materializer

    def __init__(self, *args: typing.Any, **kwargs: typing.Any) -> None:
        super().__init__(*args, **kwargs)
        self.lines: list[bytes] = []        # journal lines of the batch
        self.problem: str | None = None     # why the journal is not written right now
        self.max_lag = self.shard.journal.max_lag

    # -- setup and teardown ------------------------------------------------------------------

    def open_store(self, root_real: str, branch_root: str) -> Compressor | None:
        compressor = super().open_store(root_real, branch_root)
        assert self.store is not None
        cp = journal.read_checkpoint(branch_root)
        j = self.shard.journal
        self.writer = JournalWriter(branch_root, j.segment_bytes, self.shard.fsync != "never", cp)
        self.materializer = Materializer(self.store, self.writer, cp, self.max_states,
                                         max(MAX_WAITING, self.max_waiting), soft_lag=j.max_lag // 16,
                                         max_preparing=self.max_waiting)
        self.store.report_degraded = self._report  # type: ignore[method-assign]
        return compressor

    def _started(self) -> None:
        self.materializer.start()

    def _close_store(self) -> None:
        self.materializer.stop()
        super()._close_store()
        self.writer.close()

    def _shutdown(self) -> None:
        """Journal and acknowledge the batch, disconnect keeping the session, then give
        the topic files a few seconds to catch up (the rest follows at the next start)."""
        if self.lines:
            self.flush()
        if self.lines:
            log.error("stopping with %d record(s) not journaled (%s); the broker keeps them "
                      "unacknowledged", len(self.lines), self.problem)
        self._disconnect()
        m = self.materializer
        m.stop()
        if not m.catch_up(time.monotonic() + STOP_CATCH_UP):
            log.warning("stopping with %d journal byte(s) not yet in the topic files; they are "
                        "written at the next start", m.lag_bytes())
        assert self.store is not None
        self.store.sweep_recent(time.monotonic(), force=True)

    # -- the hot path ---------------------------------------------------------------------------

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                   props: bytes = b"") -> None:
        key = self.states.get(topic)
        if key.__class__ is bytes and len(payload) <= self.max_payload:
            w = self.writer
            ts = _time_ns() // 1000
            if ts <= w.last_ts:  # strictly increasing: what makes replay exact
                ts = w.last_ts + 1
            w.last_ts = ts
            if qos:
                self.acks.append(mid)
            c = self.counters
            c.last_message_ts = ts
            if dup:
                c.redelivered += 1
            self.lines.append(key + encode_record(ts, qos, retain, payload, props))  # type: ignore[operator]
            self.pending += 1
            if self.pending == 1:
                self.batch_started = time.monotonic()
            if self.pending >= self.batch_max and self.problem is None:
                self.flush()
            return
        if key is None:
            key = self._resolve(topic)
        elif key is _BROKER_DROPPED:
            self._broker_dropped(payload)
            return
        w = self.writer
        ts = max(_time_ns() // 1000, w.last_ts + 1)
        w.last_ts = ts
        if qos:
            self.acks.append(mid)
        c = self.counters
        c.last_message_ts = ts
        if dup:
            c.redelivered += 1
        name = self.shard.name
        if key is _DISCARD:
            c.discarded += 1
        elif key.__class__ is not bytes:  # a reason: the topic cannot be stored
            self.lines.append(_QUARANTINE + encode_quarantine(ts, name, str(key), topic, qos, retain, payload, props))
        elif len(payload) > self.max_payload:
            self.lines.append(_QUARANTINE + encode_quarantine(
                ts, name, f"payload of {len(payload)} bytes exceeds max_payload", topic, qos, retain, payload, props))
        else:
            self.lines.append(key + encode_record(ts, qos, retain, payload, props))  # type: ignore[operator]
        self.pending += 1
        if self.pending == 1:
            self.batch_started = time.monotonic()
        if self.pending >= self.batch_max and self.problem is None:
            self.flush()

    def _resolve(self, raw: bytes) -> bytes | str:  # type: ignore[override]
        """Topic bytes -> its journal key, _DISCARD, or a reason to quarantine (not cached)."""
        try:
            topic = topic_from_bytes(raw)
        except TopicError as exc:
            return f"topic not storable: {exc}"
        if self._not_mine(topic):
            self.states[raw] = _DISCARD  # type: ignore[assignment]
            return _DISCARD
        assert self.store is not None
        try:
            self.store.topic_path(topic)  # the path checks, nothing on disk (no state: the materializer's)
        except TopicError as exc:
            return f"topic not storable: {exc}"
        key = _encode(topic) + b"\t"
        self.states[raw] = key  # type: ignore[assignment]
        return key

    # -- journaling and acknowledging -------------------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Journal the batch, then acknowledge it. ``wait``: and fill the topic files
        with everything journaled (for control operations). A batch of a tenth of
        batch.max_messages or more (25,000 msg/s and up, by default: a backlog draining)
        tells the materializer to give way for a moment (materializer.py, SATURATED)."""
        now = time.monotonic()
        if self.lines:
            problem = self._lagging()
            if problem is None:
                busy = len(self.lines) >= self.batch_max // 10
                try:
                    self.writer.write(b"".join(self.lines))
                except OSError as exc:
                    problem = f"journal: {exc.strerror or exc}"
                else:
                    self.lines = []
                    if busy:
                        self.writer.full_at = now
                    self.materializer.wake.set()
            self._set_problem(problem)
        if self.lines:
            self.next_retry = now + 1.0  # the acks wait with their records
        else:
            ack, self.acks = self.acks, []
            if ack and self.connected and self.client is not None:
                self.client.ack_many(ack)
                self.counters.acked += len(ack)
        self.pending = len(self.lines)
        self.batch_started = now
        if len(self.states) > MAX_ROUTES:
            self._trim_states()
        if wait:
            with self.materializer.paused():
                self.materializer.catch_up()

    def _lagging(self) -> str | None:
        lag = self.materializer.lag_bytes()
        if lag > self.max_lag:
            return (f"the topic files are {lag} journal bytes behind (journal.max_lag "
                    f"{self.max_lag}): not acknowledging until they catch up")
        return None

    def _set_problem(self, problem: str | None) -> None:
        if problem and self.problem is None:
            log.error("%s; will retry", problem)
            self.counters.errors += 1
        elif problem is None and self.problem is not None:
            log.warning("journaling again after: %s", self.problem)
        self.problem = problem
        assert self.store is not None
        self._report(self.store.degraded_reason)

    def _report(self, store_problem: str | None) -> None:
        """The shard is degraded while the journal or the topic files cannot be written."""
        problem = self.problem or store_problem
        self.counters.degraded = problem is not None
        self.counters.degraded_reason = problem

    def _flush_deadline(self) -> float | None:
        if not self.pending:
            return None
        if self.problem is not None:
            return self.next_retry
        return self.batch_started + self.probe.delay  # max_delay, longer for a test of a broker cap

    def _lost_connection(self) -> None:
        self.connected = False
        self.counters.connected = False
        self.counters.subscribed = False
        self.acks = []  # the broker redelivers them; the journaled lines stay

    def _trim_states(self) -> None:
        """Forget the oldest quarter of the routes (they are recomputed on the next message)."""
        drop = [k for k, v in self.states.items() if v is not _BROKER_DROPPED][:len(self.states) // 4]
        for k in drop:
            del self.states[k]

    # -- the materializer's side, for control operations and stats ---------------------------------

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[str | None]:  # type: ignore[override]
        """Everything journaled is in the topic files, and the materializer waits. If the
        files cannot catch up within OPERATION_CATCH_UP (the heartbeat must go on), it
        yields why."""
        self.flush()
        m = self.materializer
        with m.paused():
            if m.catch_up(time.monotonic() + OPERATION_CATCH_UP):
                yield None
            else:
                yield (f"the topic files are {m.lag_bytes()} journal bytes behind"
                       + (f" ({self.store.degraded_reason})" if self.store and self.store.degraded_reason else "")
                       + "; try again when they have caught up (stats journal_lag_bytes)")

    def topic_states(self) -> dict[bytes, TopicState | str]:
        return self.materializer.states

    def state_key(self, topic: str) -> bytes:
        return _encode(topic)

    def _housekeeping(self, now: float) -> None:
        m = self.materializer
        self.counters.topics_cached = len(m.states)
        self.counters.journal_lag_bytes = m.lag_bytes()
