"""``+recent.json`` off the per-record path: :class:`RecentFiles`.

Replacing a topic's ``+recent.json`` costs about 50 µs (a spare written, then exchanged
with the old file), ten times an append. Done for every record, it bounds a shard of
100,000 topics to ~17,000 records/s whatever else is done (docs/benchmarks.md). So a
write only marks its topic stale (:meth:`RecentFiles.mark`: an append to a queue), and
the file is replaced at most once per ``recent_interval`` per topic, the most stale
first:

* with :meth:`RecentFiles.start`, by a thread of its own (the recorder's case): its
  system calls run beside the recording thread, which never waits for them;
* without it (a Store used on its own, tests), by the writing thread itself, as the
  write path always did: at once when the topic's interval has passed, else at the next
  :meth:`RecentFiles.sweep`.

How fresh a file is: ``recent_lag`` (seconds; in the stats and ``/metrics``) is the
age of the oldest change not yet in its ``+recent.json``; docs/history.md says what a
reader can expect. A reader never sees a torn file (shardlog/writing/atomic.py).

Threads: the recording (or materializing) thread appends to the queue and changes
``st.recent``; this thread takes a snapshot of ``st.recent`` (``tuple()`` of a deque is
one C call, atomic under the GIL) after clearing ``st.recent_queued``, so a record
written meanwhile queues the topic again and is never missed. :attr:`lock` is held
while a file is written: a control operation that moves or deletes a topic's
directory takes it (:meth:`drop`, :meth:`write_now`), so no write lands in a
directory that is going away.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import typing

from shardlog.ondisk.segments import RECENT

if typing.TYPE_CHECKING:
    from shardlog.counters import Counters
    from shardlog.writing.topic_state import TopicState
    from shardlog.writing.topicfiles import TopicFiles

log = logging.getLogger(__name__)

#: after a write the disk refused, the thread waits this long before the next try
RETRY_AFTER = 1.0
#: while the recording side writes (a flush within BUSY_FOR s), the thread writes for at most
#: SLICE s, then waits SLICE / SHARE - SLICE s: it takes at most SHARE of a core from the
#: topic files. Idle, it writes at full speed (a drain's +recent.json files catch up after it).
BUSY_FOR = 0.2
SLICE = 0.01
SHARE = 0.33


class RecentFiles:
    """The queue of stale ``+recent.json`` files of one shard, and who replaces them."""

    def __init__(self, files: TopicFiles, interval: float, counters: Counters) -> None:
        self.files = files
        self.counters = counters  # errors: each refused replacement
        self.interval = interval
        #: (state, monotonic time it went stale), the most stale first
        self.queue: collections.deque[tuple[TopicState, float]] = collections.deque()
        self.lock = threading.Lock()
        self.written = 0          # files replaced
        self.refused: str | None = None  # the last refusal, while the disk refuses
        #: set by the store while it cannot write (degraded): no file is tried meanwhile
        self.paused = False
        #: monotonic time of the recording side's last flush that wrote (set by the store)
        self.busy_at = -1e18
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the writing thread's side ---------------------------------------------------

    def mark(self, st: TopicState, now_mono: float) -> None:
        """``st.recent`` changed. Without the thread, a topic whose interval has passed
        gets its file at once (the old behaviour)."""
        if st.recent_queued:
            return
        st.recent_queued = True
        if self._thread is None and now_mono - st.recent_at >= self.interval:
            if self._write(st, now_mono):
                return
        self.queue.append((st, now_mono))

    def lag(self, now_mono: float) -> float:
        """Seconds since the oldest change not yet in its +recent.json (0: all current)."""
        q = self.queue
        try:
            return max(0.0, now_mono - q[0][1])
        except IndexError:
            return 0.0

    # -- replacing ---------------------------------------------------------------------

    def sweep(self, now_mono: float, force: bool = False, until: float | None = None) -> float | None:
        """Replace the due files, most stale first. Stops at the first not yet due
        (returns when it is; ``force``: writes every one now), at the first the disk
        refuses (returns when to retry) or at monotonic time ``until`` (returns it).
        None: the queue is empty."""
        q = self.queue
        n = 0
        while q:
            if self.paused and not force:
                return now_mono + RETRY_AFTER
            n += 1
            if until is not None and n % 16 == 0:
                now_mono = time.monotonic()
                if now_mono >= until:
                    return now_mono
            st, since = q[0]
            due = st.recent_at + self.interval
            if not force and due > now_mono:
                return due
            q.popleft()
            if not self._write(st, now_mono):
                q.appendleft((st, since))
                return now_mono + RETRY_AFTER
        return None

    def _write(self, st: TopicState, now_mono: float) -> bool:
        with self.lock:
            if st.recent_gone or not st.recent_queued:  # gone, or written meanwhile (write_now)
                st.recent_queued = False
                return True
            st.recent_queued = False  # before the snapshot: a later record queues it again
            try:
                self.files.write_recent(st)
            except OSError as exc:
                st.recent_queued = True
                if self.refused is None:  # the first refusal in a row: counted and logged once
                    self.counters.errors += 1
                    log.warning("%s: cannot replace %s: %s (retrying; further failures are not "
                                "logged until one succeeds)", st.relpath, RECENT, exc.strerror or exc)
                self.refused = f"{st.relpath}/{RECENT}: {exc.strerror or exc}"
                return False
        st.recent_at = now_mono
        self.written += 1
        self.refused = None
        return True

    def write_now(self, st: TopicState) -> None:
        """Replace ``st``'s file now if it is stale (before its directory moves)."""
        if st.recent_queued:
            self._write(st, time.monotonic())

    def drop(self, st: TopicState) -> None:
        """``st``'s directory is being moved or deleted: no write into it from now on
        (a write in progress ends first)."""
        with self.lock:
            st.recent_gone = True
            st.recent_queued = False

    # -- the thread ----------------------------------------------------------------------

    def start(self) -> None:
        """From now on the files are replaced by a thread of this class's own."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shardlog-recent", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        tick = min(0.25, self.interval) if self.interval > 0 else 0.05
        while not self._stopping:
            now = time.monotonic()
            busy = now - self.busy_at < BUSY_FOR
            try:
                nxt = self.sweep(now, until=now + SLICE if busy else now + 1.0)
            except Exception:  # never die silently: log, count, go on
                log.exception("the +recent.json writer failed; going on")
                self.counters.errors += 1
                nxt = now + RETRY_AFTER
            if busy and nxt is not None:  # give the recording side its share of the core
                nxt = max(nxt, time.monotonic() + SLICE / SHARE - SLICE)
            # an empty queue is looked at again after a tick (mark() does not wake us: it is
            # called per write, and a set() per write would cost the recording thread)
            now = time.monotonic()
            self._wake.wait(tick if nxt is None else min(max(0.0, nxt - now), 1.0) or 0.0005)

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        """Stop the thread, then write every stale file (the shard stops)."""
        t, self._thread = self._thread, None
        if t is not None:
            self._stopping = True
            self._wake.set()
            t.join(30)
        self.sweep(time.monotonic(), force=True)
