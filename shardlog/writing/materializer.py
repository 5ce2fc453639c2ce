"""Journal -> topic files, in a thread of its own (``journal.enabled``).

The recording thread appends batches to the journal and acknowledges them
(shardlog/writing/journal.py); this thread reads the journal from its checkpoint on and
hands the records to the :class:`shardlog.writing.store.Store`, which writes the topic
files exactly as a shard without a journal does (one write per topic per batch,
new topics prepared in the background, +recent.json at most every
``recent_interval``). Once every record before a journal position is in the topic
files, the position becomes the checkpoint; segments wholly before it are deleted.

Crash recovery is the same loop. Records between the checkpoint and the journal's
end at start-up may be in the topic files already (written, not yet checkpointed).
Record ts values are strictly increasing within the shard, and each topic file
receives its records in journal order, so a record is in its topic file exactly
when its ts is at most that of the file's newest record: replay skips those and
writes the rest. So a kill at any point neither loses nor duplicates a journal
record (tests/shardlog/test_journal.py kills it at random points).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import logging
import os
import threading
import time
from collections.abc import Iterator

import msgspec

from shardlog.ondisk.segments import QUARANTINE
from shardlog.topics import TopicError
from shardlog.writing import journal
from shardlog.writing.journal import JournalReader, JournalWriter, Position
from shardlog.writing.store import Store
from shardlog.writing.topic_state import TopicState

log = logging.getLogger(__name__)

CHUNK = 4 << 20                # journal bytes read per step
#: While the recording thread is saturated (it journaled a big batch less than SATURATED
#: seconds ago: a backlog is draining; recording/sinks.py) and the files are less than ``soft_lag`` bytes
#: behind, the materializer reads no more of the journal: the two threads share one GIL
#: and two cores with the broker, and giving way doubles the drain (docs/benchmark-history.md, "Many topics").
#: What it holds is still written, new topics are still prepared; the files catch up at
#: full speed when the drain ends or the lag passes ``soft_lag``. Live traffic that does
#: not fill batches is materialized at once.
SATURATED = 0.2
#: ... but it reads a chunk at least this often: the known topics' records keep reaching
#: their files while a backlog or a burst of new topics drains (bench/new_topics.py)
GIVE_WAY_STEP = 0.25
#: A new topic costs this thread ~10-20 µs (its state, its submission to the preparer)
#: where a known topic's record costs ~1 µs. So the records of topics without a state are
#: set aside (``deferred``, cheaply, in order) and at most NEW_PER_STEP new topics are
#: taken up per step, none while giving way: through a burst of 100,000 new topics the
#: known topics' records are written within a step, not after every new topic before them.
NEW_PER_STEP = 2_000
#: a trim of ``states`` that found too few idle topics (all waiting for the preparer, say)
#: is not tried again for this long: each try walks the states
TRIM_RETRY = 1.0
CHECKPOINT_EVERY = 0.2         # seconds between checkpoint writes (and on demand)
_decode_topic = msgspec.json.Decoder(str).decode


class Materializer:
    """Copies journal records into topic files; one thread, paused on demand.

    ``states`` (journal key -> TopicState, or the reason a topic cannot be stored) is
    touched by the thread only, or by another thread inside :meth:`paused`."""

    def __init__(self, store: Store, writer: JournalWriter, checkpoint: journal.Checkpoint | None,
                 max_states: int, max_waiting: int, soft_lag: int = 64 << 20,
                 max_preparing: int = 12_000) -> None:
        self.store = store
        self.writer = writer
        self.dir = writer.dir
        numbers = journal.segment_numbers(os.listdir(self.dir))
        start = checkpoint.pos if checkpoint else Position(numbers[0] if numbers else writer.segment, 0)
        self.reader = JournalReader(self.dir, start)
        self.done = start                      # every record before it is in the topic files
        self.saved = start                     # the checkpoint on disk
        self.replay_end = writer.end           # before it, records may be on disk already
        self.replayed = [0, 0]                 # records replayed, of which already on disk
        self.states: dict[bytes, TopicState | str] = {}
        self.max_states = max_states
        self.max_waiting = max_waiting          # records set aside or waiting, at most
        self.max_preparing = max_preparing      # records waiting for the preparer (with a state)
        self.soft_lag = soft_lag
        self.seq = 0                           # record numbers (the store's "mids")
        self.marks: collections.deque[tuple[int, Position]] = collections.deque()
        self.blocked: set[int] = set()         # numbers the store still holds
        self.blocked_heap: list[int] = []      # the same and some gone since (see _advance)
        #: journal key of a topic without a state -> its records (line, number, replaying)
        self.deferred: collections.OrderedDict[bytes, list[tuple[bytes, int, bool]]] = \
            collections.OrderedDict()
        self.deferred_lines = 0
        self.quarantine_ts: int | None = None  # replay: ts of the quarantine file's last line
        self.next_retry = 0.0
        self.saved_at = 0.0
        self.swept_at = 0.0
        self.read_at = 0.0
        self.trim_at = 0.0                     # no trim before (see TRIM_RETRY)
        self.wake = threading.Event()
        self._cond = threading.Condition()
        self._pauses = 0
        self._busy = False
        self._stopping = False
        self.thread = threading.Thread(target=self._run, name="materializer", daemon=True)

    # -- the thread ------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        """Started and not dead (before start, and after stop, it is not asked)."""
        return self.thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pauses and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                self._busy = True
            try:
                progressed = self.step()
            except Exception:  # logged; the loop goes on after a pause
                log.exception("materializer: unexpected error; retrying in 1s")
                self.store.counters.errors += 1
                progressed = False
                self.next_retry = time.monotonic() + 1.0
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
            if not progressed:
                self.wake.wait(0.05)
                self.wake.clear()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """The thread stays out of the store and ``states`` until the block ends."""
        with self._cond:
            self._pauses += 1
            while self._busy:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._pauses -= 1
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.wake.set()
        if self.thread.is_alive():
            self.thread.join(30)

    # -- one step ------------------------------------------------------------------------------

    def step(self, wait: bool = False) -> bool:
        """Read a chunk of the journal into the store, take up some new topics, flush;
        True if anything was read or taken up. ``wait``: take up every new topic and
        prepare them in place (everything read gets written)."""
        store = self.store
        now = time.monotonic()
        if store.degraded_reason is not None and now < self.next_retry and not wait:
            return False
        data = b""
        giving_way = not wait and self._giving_way(now)
        if ((giving_way and now - self.read_at < GIVE_WAY_STEP) or store.degraded_reason is not None
                or self.deferred_lines + store.waiting_lines >= self.max_waiting):
            pass  # nothing more read: while the disk refuses, or too many records wait
        else:
            self.read_at = now
            replaying = self.reader.pos < self.replay_end
            end = self.replay_end if replaying else self.writer.end
            data, pos = self.reader.read(CHUNK, end)
            if data:
                self._apply(data, replaying)
                self.marks.append((self.seq, pos))
                if replaying and pos >= self.replay_end:
                    log.info("journal: replayed %d record(s) written before the last stop "
                             "(%d of them were in the topic files already)", *self.replayed)
        took = 0
        if self.deferred and not giving_way and store.degraded_reason is None:
            # a state costs ~1.5 KB, a record set aside ~0.25: take up no more than the
            # preparer has room for (with ``wait`` all: the flush prepares them in place)
            took = self._take_new(len(self.deferred) if wait else
                                  min(NEW_PER_STEP, self.max_preparing - store.waiting_lines))
        if data or took or store.has_work():
            held = store.flush(time.time_ns() // 1000, now,
                               wait or store.waiting_lines >= self.max_waiting)
            if held:
                self.blocked.update(held)
                for n in held:
                    heapq.heappush(self.blocked_heap, n)
            self.blocked.difference_update(store.take_released())
            if store.degraded_reason is not None:
                self.next_retry = now + 1.0
            self._advance()
        if now - self.swept_at >= 0.1:
            self.swept_at = now
            store.sweep_recent(now)
            if len(self.states) > self.max_states and now >= self.trim_at:
                if not self._trim_states():
                    self.trim_at = now + TRIM_RETRY
        if self.done != self.saved and (wait or now - self.saved_at >= CHECKPOINT_EVERY):
            self.save()
        return bool(data or took)

    def _giving_way(self, now: float) -> bool:
        """Leave the CPU to the recording thread for now? (See SATURATED.)"""
        return now - self.writer.full_at < SATURATED and self.lag_bytes() < self.soft_lag

    def _apply(self, data: bytes, replaying: bool) -> None:
        states = self.states
        add = self.store.add
        deferred = self.deferred
        seq = self.seq
        n_deferred = 0
        for item in data.splitlines(keepends=True):
            i = item.index(b"\t")
            key = item[:i]
            line = item[i + 1:]
            seq += 1
            st = states.get(key)
            if st is None:  # a new topic (or a forgotten one): set aside, see NEW_PER_STEP
                d = deferred.get(key)
                if d is None:
                    deferred[key] = d = []
                d.append((line, seq, replaying))
                n_deferred += 1
            elif st.__class__ is TopicState and not replaying:
                add(st, line, seq)
            else:
                self._hand(key, st, line, seq, replaying)
        self.seq = seq
        self.deferred_lines += n_deferred

    def _take_new(self, limit: int) -> int:
        """Give up to ``limit`` set-aside topics a state and hand their records to the store
        (in the order they first came; each topic's records in journal order)."""
        deferred = self.deferred
        n = 0
        while deferred and n < limit:  # (limit may be negative: nothing)
            key, items = deferred.popitem(last=False)
            st = self._state(key)
            for line, seq, replaying in items:  # the store's from now on (flush says if it holds them)
                self._hand(key, st, line, seq, replaying)
            self.deferred_lines -= len(items)
            n += 1
        return n

    def _hand(self, key: bytes, st: TopicState | str, line: bytes, seq: int, replaying: bool) -> None:
        """One record to the store: to its topic file, or to the quarantine file."""
        store = self.store
        if replaying and self._on_disk(st, line):
            return
        if st.__class__ is TopicState:
            store.add(st, line, seq)
        elif key == journal.QUARANTINE_KEY:
            store.quarantine_line(line, seq)
        else:  # the topic cannot be stored: its record goes to the quarantine file
            topic = _decode_topic(key)
            store.quarantine(journal.record_ts(line), str(st), topic.encode("utf-8", "surrogateescape"),
                             0, False, line, seq)

    def _state(self, key: bytes) -> TopicState | str:
        if key == journal.QUARANTINE_KEY:
            self.states[key] = "quarantine"
            return "quarantine"
        try:
            st: TopicState | str = self.store.new_state(_decode_topic(key))
        except TopicError as exc:
            st = f"topic not storable: {exc}"
        self.states[key] = st
        return st

    def _on_disk(self, st: TopicState | str, line: bytes) -> bool:
        """Replay: is this record in its file already? (ts at most the file's newest.)"""
        self.replayed[0] += 1
        ts = journal.record_ts(line)
        if st.__class__ is TopicState:
            assert isinstance(st, TopicState)
            if not st.loaded:
                try:
                    self.store.load(st)  # repairs the tail, notes last_ts
                except (OSError, TopicError):
                    return False  # the flush reports (or quarantines) it
            newest = self.store.last_ts_on_disk(st)
        elif st == "quarantine":
            if self.quarantine_ts is None:
                self.quarantine_ts = _last_line_ts(os.path.join(self.store.branch_root, QUARANTINE))
            newest = self.quarantine_ts
        else:
            return False
        if newest is not None and ts <= newest:
            self.replayed[1] += 1
            return True
        return False

    def _advance(self) -> None:
        """Move ``done`` past every chunk whose records are all written."""
        blocked, heap = self.blocked, self.blocked_heap
        while heap and heap[0] not in blocked:  # written since: gone lazily, O(log n) each
            heapq.heappop(heap)
        if len(heap) > 2 * len(blocked) + 1024:  # one held long, many written after it
            heap[:] = blocked
            heapq.heapify(heap)
        first_held = heap[0] if heap else self.seq + 1
        if self.deferred:  # set aside in order: the first one's first record is the oldest
            first_held = min(first_held, next(iter(self.deferred.values()))[0][1])
        marks = self.marks
        while marks and marks[0][0] < first_held:
            self.done = marks.popleft()[1]

    def _trim_states(self) -> bool:
        """Forget idle topics, oldest first, down to 3/4 of ``max_states`` (they are loaded
        again if they speak); False if too few were idle."""
        excess = len(self.states) - self.max_states * 3 // 4
        store = self.store
        drop = []
        for k, st in self.states.items():
            if not isinstance(st, TopicState) or store.evictable(st):
                drop.append(k)
                if len(drop) >= excess:
                    break
        for k in drop:
            del self.states[k]
        return len(drop) >= excess

    # -- checkpoints ---------------------------------------------------------------------------

    def save(self) -> None:
        """Write the checkpoint, delete the segments wholly before it."""
        try:
            if self.store.fsync:
                self.store.sync_dirs()  # directories created for this checkpoint's records
            journal.write_checkpoint(self.dir, journal.Checkpoint(self.done, self.writer.last_ts))
        except OSError as exc:
            log.warning("journal: cannot write the checkpoint: %s", exc)
            return
        self.saved = self.done
        self.saved_at = time.monotonic()
        if journal.delete_before(self.dir, self.done.segment):
            self.writer.forget_before(self.done.segment)

    def catch_up(self, deadline: float | None = None) -> bool:
        """Materialize everything journaled so far (call inside :meth:`paused`, or after
        :meth:`stop`), then checkpoint. False if the disk refused or time ran out."""
        while True:
            self.step(wait=True)
            if self.store.degraded_reason is not None:
                return False
            if (self.reader.pos >= self.writer.end and not self.store.pending_records()
                    and not self.marks and not self.deferred):
                break
            if deadline is not None and time.monotonic() >= deadline:
                return False
        if self.done != self.saved:
            self.save()
        return True

    def lag_bytes(self) -> int:
        w = self.writer
        return journal.lag_bytes(w.end, self.done, w.sizes)


def _last_line_ts(path: str) -> int:
    """ts of the last complete line of a JSON Lines file (0: none)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - (1 << 20)))
            lines = f.read().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return journal.record_ts(line)
        except ValueError:
            continue
    return 0
