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

A stop writes stale files for at most ``STOP_BUDGET`` seconds (at 100,000 topics a drain
can leave 45,000, ten seconds of work, past a supervisor's patience); the rest go, with
their contents, into the branch's ``+recent.left`` (one sequential write), and the next
start's thread writes them before anything else, then removes it.

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
import json
import logging
import os
import threading
import time
import typing

from shardlog.ondisk.segments import RECENT, RECENT_LEFT, RECENT_TMP
from shardlog.topics import safe_join
from shardlog.writing.atomic import swap_in

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
#: seconds a stop (each forced sweep) writes stale files; the rest are left to the next start
STOP_BUDGET = 2.0


class RecentFiles:
    """The queue of stale ``+recent.json`` files of one shard, and who replaces them."""

    def __init__(self, files: TopicFiles, interval: float, counters: Counters,
                 branch_root: str | None = None) -> None:
        self.files = files
        #: where a stop leaves the files it had no time for (None: it writes them all)
        self.left_path = os.path.join(branch_root, RECENT_LEFT) if branch_root else None
        #: (relpath, contents) a previous stop left: written first by the thread
        self.left: collections.deque[tuple[str, bytes]] = collections.deque()
        self._left_loaded = False
        #: a forced sweep ran out of STOP_BUDGET: the stop leaves the rest at once
        self.out_of_time = False
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
        (returns when it is; ``force``: writes every one now, for STOP_BUDGET s at most), at the first the disk
        refuses (returns when to retry) or at monotonic time ``until`` (returns it).
        None: the queue is empty."""
        q = self.queue
        n = 0
        # a forced sweep (a stop) with a +recent.left to leave the rest in: STOP_BUDGET at most
        deadline = time.monotonic() + STOP_BUDGET if force and self.left_path is not None else None
        while q:
            if self.paused and not force:
                return now_mono + RETRY_AFTER
            n += 1
            if until is not None and n % 16 == 0:
                now_mono = time.monotonic()
                if now_mono >= until:
                    return now_mono
            if deadline is not None and n % 16 == 0 and time.monotonic() >= deadline:
                self.out_of_time = True
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

    def _write_left(self, until: float) -> float | None:
        """Write what a previous stop left, until monotonic ``until`` (returns it), or until the
        disk refuses (returns when to retry); None when none is left (its file removed). A
        topic whose directory went is skipped."""
        left = self.left
        while left:
            now = time.monotonic()
            if self.paused:
                return now + RETRY_AFTER
            if now >= until:
                return now
            with self.lock:  # (a move or delete changes the entries under it: retarget_left)
                if not left:
                    break
                relpath, body = left[0]
                try:
                    path = safe_join(self.files.root, relpath)
                    if os.path.isdir(path):
                        swap_in(os.path.join(path, RECENT), os.path.join(path, RECENT_TMP), body, set())
                except (FileNotFoundError, NotADirectoryError):
                    pass  # went meanwhile
                except OSError as exc:
                    if self.refused is None:
                        self.counters.errors += 1
                        log.warning("%s: cannot replace %s: %s (retrying)", relpath, RECENT, exc.strerror or exc)
                    self.refused = f"{relpath}/{RECENT}: {exc.strerror or exc}"
                    return now + RETRY_AFTER
                except ValueError:  # TopicError: no path of this root (any more)
                    pass
                left.popleft()
            self.written += 1
            self.refused = None
        self._unlink_left()
        return None

    def retarget_left(self, relpath: str, to: str | None) -> None:
        """The directory ``relpath`` is being deleted (``to`` None) or moved to ``to``: what a
        previous stop left for the topics under it is dropped, or goes with them. Else a topic
        deleted and speaking again could get its deleted records back in +recent.json."""
        self._load_left()
        with self.lock:
            kept = []
            for name, body in self.left:
                if name == relpath or name.startswith(relpath + "/"):
                    if to is None:
                        continue
                    name = to + name[len(relpath):]
                kept.append((name, body))
            self.left.clear()
            self.left.extend(kept)

    def _unlink_left(self) -> None:
        if self.left_path is not None:
            try:
                os.unlink(self.left_path)
            except FileNotFoundError:
                pass

    def _load_left(self) -> None:
        """The files a previous stop left (``self.left``)."""
        if self.left_path is None or self._left_loaded:
            return
        self._left_loaded = True
        try:
            with open(self.left_path, "rb") as f:
                for line in f:
                    name, tab, body = line.partition(b"\t")
                    if tab and body.endswith(b"\n"):  # a complete entry
                        self.left.append((json.loads(name), body))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s: %s (its +recent.json files stay as they are)", self.left_path, exc)
        if self.left:
            log.info("%d %s file(s) left stale by the last stop: writing them first", len(self.left), RECENT)

    def save_left(self) -> None:
        """The stop: what is still stale (and still left) into ``+recent.left``, whole or not
        at all (written aside, then renamed over it)."""
        if self.left_path is None or not (self.queue or self._left_loaded):
            return  # nothing new, and a file there (never read) stays as it is
        self._load_left()  # (without the thread they were never read: kept)
        if not self.left and not any(st.recent_queued and not st.recent_gone for st, _ in self.queue):
            self._unlink_left()
            return
        tmp = self.left_path + ".tmp"
        n = 0
        try:
            with open(tmp, "wb") as f:
                for relpath, body in self.left:
                    f.write(json.dumps(relpath).encode() + b"\t" + body)
                    n += 1
                for st, _since in self.queue:
                    if st.recent_queued and not st.recent_gone:
                        f.write(json.dumps(st.relpath).encode() + b"\t" + self.files.recent_body(st))
                        n += 1
            os.replace(tmp, self.left_path)
        except OSError as exc:
            log.warning("cannot write %s: %s (%d stale %s file(s) stay stale until their topic "
                        "speaks)", self.left_path, exc, n, RECENT)
            return
        log.info("stopping with %d stale %s file(s): left to the next start in %s", n, RECENT, self.left_path)

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
            self._load_left()
            self._thread = threading.Thread(target=self._run, name="shardlog-recent", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        tick = min(0.25, self.interval) if self.interval > 0 else 0.05
        while not self._stopping:
            now = time.monotonic()
            busy = now - self.busy_at < BUSY_FOR
            until = now + SLICE if busy else now + 1.0
            try:
                nxt = self._write_left(until) if self.left else None  # a previous stop's first
                if nxt is None:
                    nxt = self.sweep(now, until=until)
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
        """Stop the thread, then write the stale files for at most STOP_BUDGET seconds and
        leave the rest to the next start (the shard stops)."""
        t, self._thread = self._thread, None
        if t is not None:
            self._stopping = True
            self._wake.set()
            t.join(30)
        if not self.out_of_time:
            self.sweep(time.monotonic(), force=True)
        self.save_left()
