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
                st.size = files.regular_size(fd)  # closes it if it raises
                os.close(fd)
            if not created and st.size == 0:
                files.retire_other_currents(st)  # as open_fd does
            torn = files.load(st, path)
        except Exception as exc:  # reported by the recording thread's own open
            return Prepared(False, None, exc)
        st.loaded = True
        return Prepared(created, torn, None)

    def wait_idle(self) -> None:
        """Until every submitted topic is prepared."""
        self.queue.join()

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(30)
