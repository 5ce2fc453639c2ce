"""Where a recorder's records go: the topic files directly (:class:`StoreSink`), or a
journal that the topic files follow (:class:`JournalSink`, ``journal.enabled``).

The recorder (shardlog/recording/recorder.py) has one per-message path for both: it routes
a topic to its sink's target once (``route``), then hands each record to ``add``. At the end
of a batch ``flush`` writes what the sink buffered and returns the message ids it could not
write yet; ``take_released`` lists the ids of earlier batches written since. The recorder
acknowledges in arrival order from those two answers alone, whatever the sink.

- StoreSink: a target is the topic's :class:`TopicState`; written means in the topic file.
- JournalSink: a target is the topic's journal key (``"topic"\\t``); written means in the
  journal (one sequential write per batch), and the materializer thread fills the topic files
  behind it (shardlog/writing/materializer.py; the delivery promise: docs/design.md).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import msgspec

from shardlog.config.schema import Shard
from shardlog.counters import Counters
from shardlog.records import encode_quarantine
from shardlog.writing import journal
from shardlog.writing.compressor import Compressor
from shardlog.writing.journal import JournalWriter
from shardlog.writing.materializer import Materializer
from shardlog.writing.store import Store
from shardlog.writing.topic_state import TopicState

log = logging.getLogger(__name__)
_encode = msgspec.json.encode

#: records the store lets wait for new topics' preparation before a flush waits for the
#: preparer (~1.5 KB a waiting topic): a burst of up to ~10,000 new topics does not wait
MAX_WAITING = 12_000
#: journal: records that may wait for their new topics (set aside, ~0.25 KB each): known
#: topics keep being written through a burst of this many new topics (materializer.py)
JOURNAL_MAX_WAITING = 200_000
#: journal: at a stop, how long the materializer may go on filling the topic files
STOP_CATCH_UP = 5.0
#: journal: before a control operation the topic files must catch up this fast
OPERATION_CATCH_UP = 5.0
_QUARANTINE = journal.QUARANTINE_KEY + b"\t"


def dead_thread(store: Store) -> str | None:
    """The name of a worker thread of ``store`` that died (None: all alive). Each catches what
    its work may raise; this is the net under them (the loop stops the shard: exit 70)."""
    for name, worker in (("preparer", store.preparer), ("+recent.json writer", store.recent),
                         ("compressor", store.compressor)):
        if worker is not None and not worker.alive():
            return name
    return None


class Stamps:
    """Record timestamps (µs), strictly increasing within a shard (what makes a journal's
    replay exact, and the order of a topic file's records unambiguous). The recorder's hot
    path reads and sets ``last`` inline."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last


class Sink(Protocol):
    """What the recorder uses of its sink."""

    @property
    def target(self) -> type:  # the class of a routed topic's target (TopicState, bytes): the hot path's check
        ...

    @property
    def store(self) -> Store: ...

    def add(self, target: Any, line: bytes, mid: int) -> None: ...  # one record (mid 0: nothing to ack)

    def route(self, topic: str) -> Any: ...  # raises TopicError if the topic cannot be stored

    def quarantine(self, ts_us: int, reason: str, topic: bytes, qos: int, retain: bool,
                   payload: bytes, mid: int, props: bytes = b"") -> None: ...

    @property
    def problem(self) -> str | None: ...  # why writes are refused now (then only retries flush)

    def flush(self, now_us: int, now_mono: float, pending: int, wait: bool = False) -> set[int]: ...

    def take_released(self) -> list[int]: ...

    def pending_records(self) -> int: ...

    def forget_mids(self) -> None: ...

    def evictable(self, target: Any) -> bool: ...

    def start(self) -> None: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...

    def quiesced(self, flush: Callable[[], None]) -> contextlib.AbstractContextManager[str | None]: ...

    def topic_states(self) -> dict[bytes, Any]: ...

    def state_key(self, topic: str) -> bytes: ...

    def housekeeping(self, now: float, counters: Counters) -> None: ...

    def dead_thread(self) -> str | None: ...  # a worker thread that died (sinks.dead_thread)


class StoreSink:
    """Records straight into the topic files (shardlog/writing/store.py)."""

    target = TopicState

    def __init__(self, store: Store, max_waiting: int, routes: dict[bytes, Any]) -> None:
        self.store = store
        self.routes = routes  # the recorder's: its TopicState targets are the topic states
        self.max_waiting = max_waiting
        self.add = store.add
        self.quarantine = store.quarantine
        self.take_released = store.take_released
        self.pending_records = store.pending_records
        self.forget_mids = store.forget_mids
        self.evictable = store.evictable

    def route(self, topic: str) -> TopicState:
        return self.store.new_state(topic)

    @property
    def problem(self) -> str | None:
        return self.store.degraded_reason

    def flush(self, now_us: int, now_mono: float, pending: int, wait: bool = False) -> set[int]:
        # past max_waiting records waiting for new topics, wait for the preparer: memory stays
        # bounded when new topics arrive faster than the disk creates them
        return self.store.flush(now_us, now_mono, wait or pending >= self.max_waiting)

    def start(self) -> None:
        pass

    def shutdown(self) -> None:
        self.store.sweep_recent(time.monotonic(), force=True)

    def close(self) -> None:
        self.store.close()

    def quiesced(self, flush: Callable[[], None]) -> contextlib.AbstractContextManager[str | None]:
        return contextlib.nullcontext()  # the recording thread is the store's only user (operations flush)

    def topic_states(self) -> dict[bytes, Any]:
        return self.routes

    def state_key(self, topic: str) -> bytes:
        return topic.encode()

    def housekeeping(self, now: float, counters: Counters) -> None:
        self.store.sweep_recent(now)
        self.store.report_recent(now, counters)

    def dead_thread(self) -> str | None:
        return dead_thread(self.store)


class _JournaledStore(Store):
    """The materializer's store: its write problems are merged with the journal's."""

    def __init__(self, *args: Any, report: Callable[[str | None], None], **kwargs: Any) -> None:
        self._report = report
        super().__init__(*args, **kwargs)

    def report_degraded(self, problem: str | None) -> None:
        self._report(problem)


class JournalSink:
    """Records into the journal, one write per batch; the materializer fills the topic
    files behind it (docs/journal.md)."""

    target = bytes

    def __init__(self, shard: Shard, root_real: str, branch_root: str, counters: Counters,
                 compressor: Compressor | None, stamps: Stamps, max_states: int, max_waiting: int,
                 batch_max: int) -> None:
        self.counters = counters
        self.stamps = stamps
        self.shard_name = shard.name
        self.lines: list[bytes] = []      # journal lines of the batch
        self.mids: list[int] = []         # their message ids
        self.held: list[int] = []         # ids an earlier flush could not journal (still in lines)
        self.released: list[int] = []
        self.journal_problem: str | None = None  # why the journal is not written right now
        self.max_lag = shard.journal.max_lag
        self.batch_max = batch_max
        self.store: Store = _JournaledStore(shard, root_real, branch_root, counters, compressor,
                                            report=self._report)
        cp = journal.read_checkpoint(branch_root)
        self.writer = JournalWriter(branch_root, shard.journal.segment_bytes, shard.fsync != "never", cp)
        stamps.last = max(stamps.last, self.writer.last_ts)
        self.materializer = Materializer(self.store, self.writer, cp, max_states,
                                         max(JOURNAL_MAX_WAITING, max_waiting),
                                         soft_lag=shard.journal.max_lag // 16, max_preparing=max_waiting)

    # -- the per-message part ---------------------------------------------------------------

    def route(self, topic: str) -> bytes:
        self.store.topic_path(topic)  # the path checks, nothing on disk (states: the materializer's)
        return _encode(topic) + b"\t"

    def add(self, key: bytes, line: bytes, mid: int) -> None:
        self.lines.append(key + line)
        if mid:
            self.mids.append(mid)

    def quarantine(self, ts_us: int, reason: str, topic: bytes, qos: int, retain: bool,
                   payload: bytes, mid: int, props: bytes = b"") -> None:
        self.lines.append(_QUARANTINE + encode_quarantine(ts_us, self.shard_name, reason, topic, qos,
                                                          retain, payload, props))
        if mid:
            self.mids.append(mid)

    # -- a batch --------------------------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        return self.journal_problem

    def flush(self, now_us: int, now_mono: float, pending: int, wait: bool = False) -> set[int]:
        """Journal the batch. Returns the ids it could not journal (they wait with their
        lines). ``wait`` changes nothing: a journaled record is written (control operations
        wait for the topic files in :meth:`quiesced`). A batch of a tenth of batch_max or
        more (a backlog draining) tells the materializer to give way for a moment
        (materializer.py, SATURATED)."""
        held: set[int] = set()
        if self.lines:
            problem = self._lagging()
            if problem is None:
                self.writer.last_ts = self.stamps.last
                try:
                    self.writer.write(b"".join(self.lines))
                except OSError as exc:
                    problem = f"journal: {exc.strerror or exc}"
                else:
                    if len(self.lines) >= self.batch_max // 10:
                        self.writer.full_at = now_mono
                    self.lines = []
                    self.released.extend(self.held)
                    self.held, self.mids = [], []
                    self.materializer.wake.set()
            if self.lines:
                held.update(self.mids)
                self.held.extend(self.mids)
                self.mids = []
            self._set_problem(problem)
        return held

    def take_released(self) -> list[int]:
        released, self.released = self.released, []
        return released

    def pending_records(self) -> int:
        return len(self.lines)

    def forget_mids(self) -> None:
        """The connection is gone: the journaled lines stay, their ids mean nothing now."""
        self.mids, self.held, self.released = [], [], []

    def evictable(self, key: bytes) -> bool:
        return True  # a route holds no state: recomputed on the topic's next message

    def _lagging(self) -> str | None:
        lag = self.materializer.lag_bytes()
        if lag > self.max_lag:
            return (f"the topic files are {lag} journal bytes behind (journal.max_lag "
                    f"{self.max_lag}): not acknowledging until they catch up")
        return None

    def _set_problem(self, problem: str | None) -> None:
        if problem and self.journal_problem is None:
            log.error("%s; will retry", problem)
            self.counters.errors += 1
        elif problem is None and self.journal_problem is not None:
            log.warning("journaling again after: %s", self.journal_problem)
        self.journal_problem = problem
        self._report(self.store.degraded_reason)

    def _report(self, store_problem: str | None) -> None:
        """The shard is degraded while the journal or the topic files cannot be written."""
        problem = self.journal_problem or store_problem
        self.counters.degraded = problem is not None
        self.counters.degraded_reason = problem

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self.materializer.start()

    def shutdown(self) -> None:
        """After the last batch is journaled and the session closed: give the topic files a
        few seconds to catch up (the rest follows at the next start)."""
        m = self.materializer
        m.stop()
        if not m.catch_up(time.monotonic() + STOP_CATCH_UP):
            log.warning("stopping with %d journal byte(s) not yet in the topic files; they are "
                        "written at the next start", m.lag_bytes())
        self.store.sweep_recent(time.monotonic(), force=True)

    def close(self) -> None:
        self.materializer.stop()
        self.store.close()
        self.writer.close()

    @contextlib.contextmanager
    def quiesced(self, flush: Callable[[], None]) -> Iterator[str | None]:
        """What is buffered journaled (``flush``: the recorder's, which acknowledges it),
        everything journaled in the topic files, and the materializer waiting. If the files
        cannot catch up within OPERATION_CATCH_UP (the heartbeat must go on), it yields why."""
        flush()
        m = self.materializer
        with m.paused():
            if m.catch_up(time.monotonic() + OPERATION_CATCH_UP):
                yield None
            else:
                why = self.store.degraded_reason
                yield (f"the topic files are {m.lag_bytes()} journal bytes behind"
                       + (f" ({why})" if why else "")
                       + "; try again when they have caught up (stats journal_lag_bytes)")

    def topic_states(self) -> dict[bytes, TopicState | str]:
        return self.materializer.states

    def state_key(self, topic: str) -> bytes:
        return _encode(topic)

    def housekeeping(self, now: float, counters: Counters) -> None:
        m = self.materializer
        counters.topics_cached = len(m.states)
        counters.journal_lag_bytes = m.lag_bytes()
        self.store.report_recent(now, counters)  # the materializer's +recent.json files (its thread's queue)

    def dead_thread(self) -> str | None:
        return "materializer" if not self.materializer.alive() else dead_thread(self.store)
