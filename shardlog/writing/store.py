"""What to write and what to acknowledge: the buffer of a shard's topic files.

The store never talks to the network. The recorder hands it record lines per topic
(:meth:`Store.add`), then calls :meth:`Store.flush`, which writes every buffered
line with one ``write`` per topic (through :class:`shardlog.writing.topicfiles.TopicFiles`,
which does the system calls) and tells which lines could not be written (so their
messages are not acknowledged). File descriptors are opened lazily and kept in a
bounded LRU, so any number of topics fits in ``max_open_files`` descriptors. With
:meth:`Store.start_preparer`, a topic's first open, and the write of the records it had
then, happen in a :class:`shardlog.writing.preparer.Preparer` thread; the flushes hold its
lines meanwhile, at no cost until new records arrive for it or the preparer hands it back.

Errors: a topic that cannot be stored (its path is too long, a file stands where
a directory should be, ...) has its records quarantined with the reason. A disk
that is full, read-only or refusing permission raises nothing: the lines stay
buffered, the store reports itself degraded, and the next flush tries again.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import time

from shardlog.config.schema import Shard
from shardlog.counters import Counters
from shardlog.ondisk.segments import QUARANTINE
from shardlog.records import decode_record, encode_quarantine
from shardlog.topics import TopicError, safe_join, topic_to_relpath
from shardlog.writing.compressor import Compressor
from shardlog.writing.preparer import Job, Prepared, Preparer, job_of, settle
from shardlog.writing.recent import RecentFiles
from shardlog.writing.topic_state import TopicState
from shardlog.writing.topicfiles import OPEN_FLAGS, TRANSIENT, TopicFiles

log = logging.getLogger(__name__)


class Store:
    def __init__(self, shard: Shard, root_real: str, branch_root: str, counters: Counters,
                 compressor: Compressor | None = None) -> None:
        self.shard = shard
        self.root = root_real
        self.branch_root = branch_root
        self.counters = counters
        self.compressor = compressor
        self.files = TopicFiles(shard, root_real, counters, compressor, self._quarantine_torn)
        self.fmt = self.files.fmt
        self.payload_only = self.fmt.payload_only
        self.dirty: list[TopicState] = []
        #: topics the preparer has (their lines wait): state -> lines counted in waiting_lines.
        #: A flush does not look at them until they get new records (add() puts them in
        #: dirty again) or the preparer hands them back through ``_ready``.
        self.waiting: dict[TopicState, int] = {}
        self.waiting_lines = 0
        self._ready: collections.deque[TopicState] = collections.deque()  # filled by Preparer threads
        #: message ids held by earlier flushes and written (or quarantined) since: acknowledge
        #: them too, then empty the list (flush's result lists only the ids it newly holds)
        self.released: list[int] = []
        self.open = self.files.open   # LRU of states holding an fd, oldest first
        #: the stale +recent.json files and who replaces them (shardlog/writing/recent.py)
        self.recent = RecentFiles(self.files, shard.recent_interval, counters, branch_root)
        self.quarantine_lines: list[bytes] = []
        self.quarantine_mids: list[int] = []
        self.quarantine_held: list[int] = []  # quarantine ids an earlier flush returned as held
        self.fsync = shard.fsync != "never"
        self.degraded_reason: str | None = None
        self.preparer: Preparer | None = None

    def start_preparer(self, threads: int = 1) -> None:
        """From now on, a topic's first open in this process (directory creation, file
        creation, tail repair: up to milliseconds) and the write of the records it has then
        happen in background threads; its records wait, unacknowledged, until written."""
        if self.preparer is None:
            self.preparer = Preparer(self.files, self._ready, threads)

    def start_recent_writer(self) -> None:
        """From now on +recent.json files are replaced by a thread of their own, at most
        once per ``recent_interval`` per topic, the most stale first: a write only marks
        its topic (shardlog/writing/recent.py)."""
        self.recent.start()

    # -- topics -------------------------------------------------------------------

    def topic_path(self, topic: str) -> tuple[str, str]:
        """A topic's (relpath, directory), checked without touching the disk; raises
        TopicError if it cannot be stored (the journal's recorder checks with this alone)."""
        relpath = topic_to_relpath(topic)
        # resolved on disk (symlinks) before its first open: _check_path, off the hot path
        path = safe_join(self.root, relpath, resolve=False)
        if len(os.fsencode(path)) + 32 > 4095:
            raise TopicError("path too long for the file system")
        return relpath, path

    def new_state(self, topic: str) -> TopicState:
        """State for a topic; raises TopicError if it cannot be stored."""
        return TopicState(topic, *self.topic_path(topic), self.shard.recent)

    def add(self, st: TopicState, line: bytes, mid: int) -> None:
        """Buffer a record line (a payload-only shard: its JSON payload alone) with its id."""
        if self.payload_only:
            item = self.fmt.item(line)
            if item is None:
                self._not_json(st, line, mid)
                return
            line = item
        st.lines.append(line)
        if mid:
            st.mids.append(mid)
        if not st.dirty:
            st.dirty = True
            self.dirty.append(st)

    def _not_json(self, st: TopicState, line: bytes, mid: int) -> None:
        """A payload that is not JSON (payload-only shard): quarantined, never dropped."""
        try:
            rec = decode_record(line)
            ts, qos, retain, payload = rec.ts, rec.qos, rec.retain, rec.payload
        except Exception:  # keep the line itself
            ts, qos, retain, payload = time.time_ns() // 1000, 0, False, line
        self.quarantine(ts, "payload is not JSON (payload_only shard)", st.topic.encode(), qos,
                        retain, payload, mid)

    def quarantine(self, ts_us: int, reason: str, topic: bytes, qos: int, retain: bool,
                   payload: bytes, mid: int, props: bytes = b"") -> None:
        self.quarantine_lines.append(
            encode_quarantine(ts_us, self.shard.name, reason, topic, qos, retain, payload, props))
        if mid:
            self.quarantine_mids.append(mid)

    def quarantine_line(self, line: bytes, mid: int) -> None:
        """A quarantine line made elsewhere (a journal's), with its id."""
        self.quarantine_lines.append(line)
        if mid:
            self.quarantine_mids.append(mid)

    def take_released(self) -> list[int]:
        """The ids held by earlier flushes and written since (acknowledge them now, before the
        newer ones); the list is emptied."""
        released, self.released = self.released, []
        return released

    def has_work(self) -> bool:
        """Anything buffered, waiting or to quarantine (a flush would do something)."""
        return bool(self.dirty or self.waiting or self.quarantine_lines)

    def load(self, st: TopicState) -> None:
        """Open ``st`` now (its first open repairs the tail and notes ``st.last_ts``)."""
        self.files.open_fd(st)

    def last_ts_on_disk(self, st: TopicState) -> int | None:
        return self.files.last_ts_on_disk(st)

    def sync_dirs(self) -> None:
        """fsync the directories created since the last sync (raises OSError)."""
        self.files.sync([])

    def forget_mids(self) -> None:
        """The connection is gone: its message ids mean nothing any more. The
        buffered lines stay and are written; the broker redelivers the messages."""
        for st in itertools.chain(self.dirty, self.waiting):
            st.mids, st.held = [], 0
            job = job_of(st.prep)
            if job is not None:  # the preparer's lines too: written, never acknowledged
                job.mids = []
        self.quarantine_mids, self.quarantine_held, self.released = [], [], []

    def pending_records(self) -> int:
        """Records buffered: those waiting for the preparer are counted as they wait."""
        return (self.waiting_lines + sum(len(st.lines) for st in self.dirty)
                + len(self.quarantine_lines))

    # -- flushing -----------------------------------------------------------------

    def flush(self, now_us: int, now_mono: float, wait: bool = False) -> set[int]:
        """Write every buffered line. Returns the message ids added since the last flush
        that could NOT be written (they stay buffered; do not acknowledge them): those
        the disk refused, and those of topics the preparer has not prepared yet (unless
        ``wait``). Ids returned by an earlier flush are the store's from then on: once
        written they are listed in ``self.released`` (acknowledge them then, before the
        newer ids; in the order they arrived within a topic, topics in the order the
        preparer finished them; a topic's first records may be written by the preparer).
        Cost: the topics with new records and those handed back; waiting ones are not looked at."""
        held: set[int] = set()
        released = self.released  # the caller empties it (kept if a flush raised before)
        preparer = self.preparer
        if wait and preparer is not None:
            preparer.wait_idle()
        ready = self._ready
        while ready:  # prepared: back to dirty (a stale entry, already handled, is skipped)
            st = ready.popleft()
            n = self.waiting.pop(st, None)
            if n is not None:
                self.waiting_lines -= n
                if not st.dirty:
                    st.dirty = True
                    self.dirty.append(st)
        dirty, self.dirty = self.dirty, []
        problem: str | None = None
        written: list[TopicState] = []
        for st in dirty:
            if (preparer is not None and (st.prep is not None or (not st.loaded and st.fd < 0))
                    and self._waits(st, preparer, wait, now_us)):
                # it waits: out of dirty until add() or the preparer brings it back
                st.dirty = False
                if len(st.mids) > st.held:
                    held.update(st.mids[st.held:])
                    st.held = len(st.mids)
                job = job_of(st.prep)
                if job is None:  # new: to the preparer, with its records (it writes them)
                    st.prep = job = Job(st.lines, st.mids)
                    st.lines, st.mids, st.held = [], [], 0
                    preparer.submit(st)
                n = len(st.lines) + len(job.lines)
                self.waiting_lines += n - self.waiting.get(st, 0)
                self.waiting[st] = n
                continue
            if not st.lines:  # the preparer wrote them all
                st.dirty = False
                written.append(st)
                continue
            try:
                n_held, mids = st.held, st.mids
                self.files.write(st, now_us)
            except TopicError as exc:
                self._quarantine_state(st, now_us, str(exc))
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    problem = problem or f"{st.relpath}: {exc.strerror or exc}"
                    if len(st.mids) > st.held:
                        held.update(st.mids[st.held:])
                        st.held = len(st.mids)
                    self.dirty.append(st)
                    self.files.close_fd(st)
                else:
                    self._quarantine_state(st, now_us, f"cannot write: {exc.strerror or exc}")
            else:
                if n_held:
                    released.extend(mids[:n_held])
                written.append(st)
        if self.quarantine_lines:
            try:
                q_held = self.quarantine_held
                self._write_quarantine()
            except OSError as exc:
                problem = problem or f"{QUARANTINE}: {exc.strerror or exc}"
                held.update(self.quarantine_mids)
                self.quarantine_held.extend(self.quarantine_mids)
                self.quarantine_mids = []
            else:
                released.extend(q_held)
        if self.fsync:
            self.files.sync(written)  # raises: the whole batch stays unacknowledged
        for st in written:
            self._after_write(st, now_mono)
        if written:
            self.recent.busy_at = now_mono
        self._set_degraded(problem)
        return held

    def _waits(self, st: TopicState, preparer: Preparer, wait: bool, now_us: int) -> bool:
        """Must this never-opened topic wait for the preparer? (A new one: the caller
        submits it.) Applies a finished preparation (then the caller writes the rest)."""
        prep = st.prep
        if prep is None:
            return not wait  # wait: prepared here, synchronously
        if isinstance(prep, Job):
            return True
        st.prep = None
        self.waiting_lines -= self.waiting.pop(st, 0)  # handed back before its _ready entry was drained
        assert isinstance(prep, Prepared)
        # a failed preparation (st.loaded still False): the write retries its open, and
        # reports its error as any first open does
        settle(self.files, st, prep, now_us, self.released)
        return False

    def _quarantine_torn(self, st: TopicState, garbage: bytes) -> None:
        self.counters.repaired += 1
        log.warning("%s: cut %d bytes of torn or invalid tail back to the last valid record "
                    "(kept in %s)", st.relpath, len(garbage), QUARANTINE)
        self.quarantine(time.time_ns() // 1000, "torn tail of " + st.relpath,
                        st.topic.encode(), 0, False, garbage, 0)

    def _quarantine_state(self, st: TopicState, now_us: int, reason: str) -> None:
        log.warning("%s: %s; %d record(s) quarantined", st.relpath, reason, len(st.lines))
        for line in st.lines:
            self.quarantine_lines.append(
                encode_quarantine(now_us, self.shard.name, reason, st.topic.encode(), 0, False, line))
        self.quarantine_held.extend(st.mids[:st.held])  # ids the recorder no longer has
        self.quarantine_mids.extend(st.mids[st.held:])
        st.lines, st.mids, st.held, st.dirty = [], [], 0, False
        self.files.close_fd(st)  # the quarantine file is written at the end of flush

    def _write_quarantine(self) -> None:
        if not self.quarantine_lines:
            return
        os.makedirs(self.branch_root, exist_ok=True)
        fd = os.open(os.path.join(self.branch_root, QUARANTINE), OPEN_FLAGS, 0o644)
        try:
            before = os.fstat(fd).st_size
            data = b"".join(self.quarantine_lines)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        self.counters.quarantined += len(self.quarantine_lines)
        self.quarantine_lines, self.quarantine_mids, self.quarantine_held = [], [], []

    def _after_write(self, st: TopicState, now_mono: float) -> None:
        self.files.touch(st)
        if st.recent_dirty:
            st.recent_dirty = False
            self.recent.mark(st, now_mono)

    def _set_degraded(self, problem: str | None) -> None:
        if problem and self.degraded_reason is None:
            log.error("cannot write (%s): not acknowledging; will retry", problem)
            self.counters.errors += 1
        elif problem is None and self.degraded_reason is not None:
            log.warning("writing again after: %s", self.degraded_reason)
        self.degraded_reason = problem
        self.recent.paused = problem is not None  # its writer waits with the topic files
        self.report_degraded(problem)

    def report_degraded(self, problem: str | None) -> None:
        """Tell the counters (a journal's recorder merges its own problem in)."""
        self.counters.degraded = problem is not None
        self.counters.degraded_reason = problem

    # -- housekeeping ---------------------------------------------------------------

    def sweep_recent(self, now_mono: float, force: bool = False) -> None:
        """Replace the +recent.json files held back by recent_interval; with the writer
        thread, only ``force`` does anything here (write every stale one now). Not while
        the disk refuses writes: the flush that succeeds again ends that."""
        if (self.recent.threaded or self.degraded_reason is not None) and not force:
            return
        self.recent.sweep(now_mono, force)

    def report_recent(self, now_mono: float, counters: Counters) -> None:
        """The +recent.json figures into the counters (the stats file, /metrics)."""
        r = self.recent
        counters.recent_lag = round(r.lag(now_mono), 3)
        counters.recent_stale = len(r.queue) + len(r.left)
        counters.recent_written = r.written

    def rotate_now(self, st: TopicState, now_us: int) -> bool:
        """Close and version ``st``'s current segment now (a control command); False if it is
        empty. Call only when nothing is buffered for it (after a flush)."""
        if st.fd < 0:
            self.files.open_fd(st)
        if st.size == 0:
            return False
        self.files.rotate(st, now_us)
        self.files.touch(st)
        return True

    def forget(self, st: TopicState) -> None:
        """Let go of a topic whose directory is being moved or deleted: close its file and
        drop it from every list (its buffer must be empty: flush first)."""
        self.files.close_fd(st)
        self.recent.drop(st)
        if st.dirty:  # pragma: no cover - callers flush first and refuse while degraded
            self.dirty = [d for d in self.dirty if d is not st]
            st.dirty = False
        self.waiting_lines -= self.waiting.pop(st, 0)  # none: callers flush(wait=True) first

    def retarget_recent_left(self, relpath: str, to: str | None) -> None:
        """The directory ``relpath`` is deleted (``to`` None) or moved: RecentFiles.retarget_left."""
        self.recent.retarget_left(relpath, to)

    def write_recent_now(self, st: TopicState) -> None:
        """Write a held-back +recent.json now (before its directory moves)."""
        self.recent.write_now(st)

    def evictable(self, st: TopicState) -> bool:
        """May the recorder forget ``st``? Not while it has lines (a topic waiting for the
        preparer is out of dirty but has lines, and st.prep set) or an open file. A stale
        +recent.json does not keep it: the writer's queue holds the state until its file
        is written; a new state of the topic, if it speaks again, is queued behind it."""
        return not st.dirty and st.fd < 0 and st.prep is None and not st.lines

    def close(self) -> None:
        if self.preparer is not None:
            self.preparer.stop()
            self.preparer = None
        self.recent.stop()  # and every stale +recent.json written
        for st in list(self.open):
            self.files.close_fd(st)
