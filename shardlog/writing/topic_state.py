"""What the write path keeps in memory for one topic: :class:`TopicState`.

The store (its buffer), the topic files (its descriptor, segment size and first ts,
recent records), the preparer (its background preparation) and a journal's
materializer all work on it; it holds data only.
"""

from __future__ import annotations

import typing


class RecentLines(list[bytes]):
    """A topic's newest record lines, at most ``maxlen`` (what its +recent.json holds).

    A list, not a ``deque(maxlen=...)``: 120 bytes for six lines instead of 760, which is
    most of a topic's memory at 100,000 topics. A reader in another thread takes
    ``tuple(lines)[-maxlen:]`` (one C call, atomic under the GIL; between ``extend`` and
    the trim it may hold a few more)."""

    __slots__ = ("maxlen",)

    def __init__(self, maxlen: int) -> None:
        super().__init__()
        self.maxlen = maxlen

    def extend(self, lines: typing.Iterable[bytes]) -> None:
        super().extend(lines)
        extra = len(self) - self.maxlen
        if extra > 0:
            del self[:extra]

    def snapshot(self) -> tuple[bytes, ...]:
        return tuple(self)[-self.maxlen:] if self.maxlen else ()


class TopicState:
    """What the store keeps for one topic. ``lines``/``mids`` are the buffer."""

    __slots__ = ("topic", "relpath", "path", "lines", "mids", "held", "dirty", "fd", "size", "size_known",
                 "first_ts", "last_ts", "recent", "recent_dirty", "recent_queued", "recent_gone",
                 "recent_at", "recent_versions", "recent_new", "loaded", "prep", "cut_to")

    def __init__(self, topic: str, relpath: str, path: str, recent: int) -> None:
        self.topic = topic
        self.relpath = relpath
        self.path = path              # the topic's directory
        self.lines: list[bytes] = []
        self.mids: list[int] = []     # QoS 1 message ids (journal: record numbers) of the lines
        #: how many of ``mids`` (the oldest) an earlier flush returned as held: the store
        #: reports them in ``Store.released`` once they are written
        self.held = 0
        self.dirty = False            # in Store.dirty: the next flush looks at it
        self.fd = -1
        self.size = 0                 # bytes in the current segment
        self.size_known = False       # closed by the LRU: ``size`` is still the file's (no fstat)
        self.first_ts: int | None = None  # ts of the current segment's first record
        #: ts of the newest record on disk when the topic was loaded (None: none, or a
        #: format without ts); a journal replay skips records at or before it
        self.last_ts: int | None = None
        self.recent = RecentLines(recent)
        self.recent_dirty = False     # recent changed since the store last looked
        self.recent_queued = False    # in RecentFiles.queue: its +recent.json is stale
        self.recent_gone = False      # its directory was moved or deleted: no more +recent.json
        self.recent_at = -1e18        # monotonic time of the last +recent.json write
        #: (mtime second, size) of this second's +recent.json versions (set by its first write)
        self.recent_versions: set[tuple[int, int]] | None = None
        self.recent_new = False       # its directory was made by this process: no +recent.json there yet
        self.loaded = False           # tail repaired and recent loaded (once per state)
        #: a failed write left a part of its batch at the end (the disk refused the cut back):
        #: the current segment's size to cut back to at the next open (-1: none)
        self.cut_to = -1
        #: background preparation (Preparer): None, a Job while queued, or its Prepared result
        self.prep: object = None
