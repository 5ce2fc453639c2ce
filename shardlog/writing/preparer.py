"""First opens of new topics, in background threads (off the recording path).

Creating a topic's directory and files costs up to milliseconds on some file systems.
While a :class:`Preparer` thread does it (and repairs a torn tail, loads the recent
records), the store keeps the topic's records waiting; known topics are written
meanwhile. A thread touches only the state it was given and the disk.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import typing

from shardlog.ondisk.segments import RECENT, RECENT_TMP
from shardlog.topics import safe_join
from shardlog.writing.atomic import swap_in
from shardlog.writing.topic_state import TopicState
from shardlog.writing.topicfiles import TopicFiles


_QUEUED = object()  # TopicState.prep while the preparer has it


class Prepared(typing.NamedTuple):
    created: bool         # the directory was created (fsync it, if the shard fsyncs)
    torn: bytes | None    # a torn tail cut off the segment, for the quarantine
    error: BaseException | None


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

    def submit(self, st: TopicState) -> None:
        self.queue.put(st)

    def _run(self) -> None:
        while True:
            st = self.queue.get()
            try:
                if st is None:
                    return
                st.prep = self.prepare(st)
                self.ready.append(st)  # after st.prep: the next flush writes it
            finally:
                self.queue.task_done()

    def prepare(self, st: TopicState) -> Prepared:
        files = self.files
        try:
            safe_join(files.root, st.relpath)
            created = not os.path.isdir(st.path)
            if created:
                files.make_dirs(st)
            path = os.path.join(st.path, files.current)
            # jsonl: create the segment here (an empty JSON Lines file is valid); other
            # formats: only if it exists (an empty +log.json is not JSON), the recording
            # thread creates it together with its first records
            flags = files.flags if files.plain else files.flags & ~os.O_CREAT
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                if files.plain:
                    raise
                st.size = 0
            else:
                try:
                    st.size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            if not created and st.size == 0:
                files.retire_other_currents(st)  # as open_fd does
            torn = files.load(st, path)
        except Exception as exc:  # noqa: BLE001 - reported by the recording thread's own open
            return Prepared(False, None, exc)
        if st.recent.maxlen:
            self._recent_files(st)
        st.loaded = True
        return Prepared(created, torn, None)

    @staticmethod
    def _recent_files(st: TopicState) -> None:
        """Create the spare of +recent.json if missing, so the recording thread's first
        rewrite creates no inode; and, for a topic with records on disk, +recent.json
        itself if missing (never an empty one: readers expect the last records)."""
        recent = os.path.join(st.path, RECENT)
        spare = os.path.join(st.path, RECENT_TMP)
        try:
            if st.recent:
                body = b"[" + b",".join(line[:-1] for line in st.recent) + b"]\n"
                for _ in range(2):  # the first swap may only create +recent.json
                    if os.path.exists(spare) and os.path.exists(recent):
                        return
                    swap_in(recent, spare, body)
            elif not os.path.exists(spare):
                os.close(os.open(spare, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))
        except OSError:
            pass  # the recording thread's rewrite reports it

    def wait_idle(self) -> None:
        """Until every submitted topic is prepared."""
        self.queue.join()

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(30)
