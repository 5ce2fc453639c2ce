"""First opens of new topics, in background threads (off the recording path).

Creating a topic's directory and files costs up to milliseconds on some file systems.
While a :class:`Preparer` thread does it (and repairs a torn tail, loads the recent
records), the store keeps the topic's records waiting; known topics are written
meanwhile. A thread touches only the state it was given and the disk.

The records a topic had when it was handed over (its :class:`Job`) are written by the
thread itself, with the descriptor it just opened, then closed (jsonl shards that do not
fsync, when no rotation is due): a new topic's first records cost the recording thread
no open and no write, and the two threads' system calls run side by side. The recording
thread then takes the result (:func:`settle`): the counters, the recent records, and the
job's ids, which it may acknowledge from then on (they were written before). Records
that arrive meanwhile wait behind the job's, so a topic's file keeps their order.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import typing

from shardlog.ondisk import segments
from shardlog.topics import TopicError
from shardlog.writing.appending import append_all, left_longer
from shardlog.writing.topic_state import TopicState
from shardlog.writing.topicfiles import TopicFiles


class Job:
    """``TopicState.prep`` while the preparer has the topic: the records taken from its
    buffer when it was handed over. The preparer reads ``lines`` only; ``mids`` (their
    ids) belong to the recording thread (``Store.forget_mids`` empties them)."""

    __slots__ = ("lines", "mids")

    def __init__(self, lines: list[bytes], mids: list[int]) -> None:
        self.lines = lines
        self.mids = mids


class Prepared(typing.NamedTuple):
    created: bool         # the directory was created (fsync it, if the shard fsyncs)
    torn: bytes | None    # a torn tail cut off the segment, for the quarantine
    error: BaseException | None
    job: Job | None = None
    written: bool = False  # the job's lines are in the file (their ids may be acknowledged)


class Preparer:
    """Prepares topics for their first write in background threads: creates the
    directory and the current segment (on some file systems a millisecond each),
    repairs a torn tail and loads the recent records. The recording thread then
    opens the existing file, cheaply. A thread touches only the state it was given
    (never while the recording thread does) and the disk; it sets ``st.prep`` last."""

    def __init__(self, files: TopicFiles, ready: collections.deque[TopicState], threads: int = 1) -> None:
        self.files = files
        self.ready = ready  # the store's: prepared states, for its next flush
        self.queue: queue.Queue[TopicState | None] = queue.Queue()
        self.threads = [threading.Thread(target=self._run, name=f"preparer-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def alive(self) -> bool:
        return all(t.is_alive() for t in self.threads)

    def submit(self, st: TopicState) -> None:
        self.queue.put(st)

    def _run(self) -> None:
        while True:
            st = self.queue.get()
            try:
                if st is None:
                    return
                self._one(st)
            finally:
                self.queue.task_done()

    def _one(self, st: TopicState) -> None:
        st.prep = self.prepare(st)
        self.ready.append(st)  # after st.prep: the next flush writes it

    def prepare(self, st: TopicState) -> Prepared:
        files = self.files
        job = st.prep if isinstance(st.prep, Job) else None
        fd = -1
        try:
            created = files.ensure_dir(st)
            path = os.path.join(st.path, files.current)
            # jsonl: create the segment here (an empty JSON Lines file is valid); other
            # formats: only if it exists (an empty +log.json is not JSON), the recording
            # thread creates it together with its first records
            try:
                fd = files.open_segment(path, create=files.plain)
            except FileNotFoundError:
                if files.plain:
                    raise
                st.size = 0
            else:
                try:  # a directory just made holds only the file just created: empty, regular
                    st.size = 0 if created else files.regular_size(fd)
                except TopicError:
                    fd = -1  # closed by regular_size
                    raise
            if not created and st.size == 0:
                files.retire_other_currents(st)  # as open_fd does
            torn = files.load(st, path)
        except Exception as exc:  # reported by the recording thread's own open
            if fd >= 0:
                _close(fd)
            return Prepared(False, None, exc, job)
        st.loaded = True
        if fd < 0:
            return Prepared(created, torn, None, job)
        written = (job is not None and bool(job.lines) and files.plain and not files.fsync
                   and torn is None and self._write(st, fd, job.lines))
        _close(fd)  # (kept, every waiting topic would hold a descriptor)
        return Prepared(created, torn, None, job, written)

    def _write(self, st: TopicState, fd: int, lines: list[bytes]) -> bool:
        """Append ``lines`` at ``fd`` unless a rotation is due (the recording thread's
        part); False if not written (a failed write is cut back: no partial line)."""
        files = self.files
        data = b"".join(lines)
        size, n = st.size, len(data)
        if (files.max_bytes is not None and size + n > files.max_bytes) or segments.should_rotate(
                size, n, st.first_ts, time.time_ns() // 1000, files.max_bytes, files.max_age):
            return False
        try:
            append_all(fd, data, size, 0, st.relpath)
        except OSError:  # the recording thread retries, and reports it as its own write would
            if left_longer(fd, size):  # not cut back: its next open cuts it (appending.py)
                st.cut_to = size
            return False
        st.size = size + n
        return True

    def wait_idle(self) -> None:
        """Until every submitted topic is prepared. The calling thread prepares queued ones
        meanwhile: its system calls and the threads' run side by side."""
        q = self.queue
        while True:
            try:
                st = q.get_nowait()
            except queue.Empty:
                break
            try:
                if st is None:  # stopping: the sentinel is a thread's
                    q.put(None)
                    break
                self._one(st)
            finally:
                q.task_done()
        q.join()

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(30)


def settle(files: TopicFiles, st: TopicState, prep: Prepared, now_us: int, released: list[int]) -> None:
    """The recording thread takes a preparation's result: the torn tail to the quarantine;
    written lines into the counters and the recent records, their ids into ``released``
    (acknowledge them); unwritten ones back in front of the buffer, held (written next)."""
    job = prep.job
    if prep.created:  # as open_fd: no +recent.json there yet (created, not swapped in)
        st.recent_new = True
        if files.fsync:
            files.dirs_to_sync.add(st.path)
    if prep.torn is not None:
        files.on_torn(st, prep.torn)  # the store quarantines it
    if job is None:
        return
    if prep.written:
        files.account(st, job.lines, now_us)
        released.extend(job.mids)
    else:
        st.lines[:0] = job.lines
        st.mids[:0] = job.mids
        st.held += len(job.mids)


def job_of(prep: object) -> Job | None:
    """The records a topic handed to the preparer (``TopicState.prep``), if any."""
    return prep if isinstance(prep, Job) else prep.job if isinstance(prep, Prepared) else None


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover
        pass
