"""A shard's journal: one sequential file that is written and acknowledged first.

With ``journal.enabled``, the recording thread appends each batch of records to the
journal with one ``write`` (and, with ``fsync``, one ``fdatasync``), acknowledges the
batch, and a materializer thread (shardlog/writing/materializer.py) copies the records into
the topic files behind it. Acknowledging costs one sequential write whatever the
number of topics; the topic files follow as fast as the file system creates and
opens them.

On disk, beside the shard's lock file (``+`` names: never a topic, never served):

    +journal.00000001.log     segments; the number only grows; deleted once materialized
    +journal.checkpoint       "<segment> <offset> <ts>": every record before that position is
                              in the topic files; <ts>: the newest ts journaled by then

A journal line is ``<topic as a JSON string>\\t<record line>``: JSON escapes every
control character, and a record line is strict JSON on one line, so neither holds a
raw tab or newline (nor a carriage return: ``bytes.splitlines`` splits on it). An
empty key marks a quarantine line (written to the shard's quarantine file).
Record ``ts`` values are strictly increasing within a shard (the recorder makes them
so), which is what makes replay after a crash exact (see materializer.py).
"""

from __future__ import annotations

import logging
import os
import re
from typing import NamedTuple

from shardlog.writing.atomic import swap_in

log = logging.getLogger(__name__)

PREFIX = "+journal."
CHECKPOINT = "+journal.checkpoint"
CHECKPOINT_SPARE = "+journal.checkpoint.spare"
_SEGMENT_RE = re.compile(r"^\+journal\.(\d{8,})\.log$")
_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
QUARANTINE_KEY = b""


class Position(NamedTuple):
    segment: int
    offset: int


class Checkpoint(NamedTuple):
    pos: Position
    last_ts: int  # the newest ts journaled when it was written: ts never go back below it


# -- pure helpers ------------------------------------------------------------------------


def segment_name(n: int) -> str:
    return f"{PREFIX}{n:08d}.log"


def segment_numbers(names: list[str]) -> list[int]:
    """Journal segment numbers among directory entries, oldest first."""
    return sorted(int(m.group(1)) for m in map(_SEGMENT_RE.match, names) if m)


def record_ts(line: bytes) -> int:
    """The ts of a record or quarantine line (both begin ``{"ts":<digits>,``)."""
    return int(line[6:line.index(b",", 6)])


def complete(data: bytes) -> int:
    """Length of the complete lines at the start of ``data``."""
    return data.rfind(b"\n") + 1


def parse_checkpoint(text: bytes) -> Checkpoint | None:
    try:
        seg, off, ts = text.split()
        return Checkpoint(Position(int(seg), int(off)), int(ts))
    except ValueError:
        return None


def lag_bytes(end: Position, done: Position, sizes: dict[int, int]) -> int:
    """Journal bytes written after ``done``, up to ``end``; ``sizes``: size of each
    segment between them (the writer's own segment is ``end.offset`` long)."""
    if end.segment == done.segment:
        return max(0, end.offset - done.offset)
    total = sizes.get(done.segment, done.offset) - done.offset
    for n in range(done.segment + 1, end.segment):
        total += sizes.get(n, 0)
    return total + end.offset


def _last_ts(data: bytes) -> int:
    """ts of the last whole journal line in ``data`` (0: none)."""
    for line in reversed(data[:complete(data)].splitlines()):
        _, _, rec = line.partition(b"\t")
        try:
            return record_ts(rec)
        except ValueError:
            continue
    return 0


# -- files ------------------------------------------------------------------------------


def read_checkpoint(dirpath: str) -> Checkpoint | None:
    try:
        with open(os.path.join(dirpath, CHECKPOINT), "rb") as f:
            return parse_checkpoint(f.read(100))
    except FileNotFoundError:
        return None


def write_checkpoint(dirpath: str, cp: Checkpoint) -> None:
    swap_in(os.path.join(dirpath, CHECKPOINT), os.path.join(dirpath, CHECKPOINT_SPARE),
            b"%d %d %d\n" % (cp.pos.segment, cp.pos.offset, cp.last_ts))


class JournalWriter:
    """The recording thread's end: appends whole batches to the newest segment."""

    def __init__(self, dirpath: str, segment_bytes: int, fsync: bool,
                 checkpoint: Checkpoint | None) -> None:
        self.dir = dirpath
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        numbers = segment_numbers(os.listdir(dirpath))
        # after the checkpoint's segment if that one is gone (never go back before it)
        self.segment = max(numbers[-1] if numbers else 1,
                           checkpoint.pos.segment + (checkpoint.pos.segment not in numbers)
                           if checkpoint else 1)
        self.fd = os.open(os.path.join(dirpath, segment_name(self.segment)), _FLAGS, 0o644)
        self.size = os.fstat(self.fd).st_size
        #: the newest ts journaled: the recorder's ts stay above it (strictly increasing)
        self.last_ts = max(self._repair(), checkpoint.last_ts if checkpoint else 0)
        #: where the written lines end: one tuple, replaced whole (read by another thread)
        self.end = Position(self.segment, self.size)
        #: monotonic time of the last write of a big batch: the recording thread is saturated
        #: (draining a backlog), and the materializer gives way to it (materializer.py)
        self.full_at = -1e18
        #: sizes of the finished segments still on disk (for the lag)
        self.sizes: dict[int, int] = {}
        for n in numbers[:-1]:
            try:
                self.sizes[n] = os.path.getsize(os.path.join(dirpath, segment_name(n)))
            except FileNotFoundError:
                pass

    def _repair(self) -> int:
        """Cut a torn last line (a crash mid-write: never acknowledged, the broker sends it
        again); return the ts of the last record in the journal (0 if none)."""
        if self.size:
            back = min(self.size, 1 << 20)
            tail = os.pread(self.fd, back, self.size - back)
            keep = complete(tail)
            if keep < len(tail):
                log.warning("journal %s: cut %d bytes of a torn last line",
                            segment_name(self.segment), len(tail) - keep)
                self.size -= len(tail) - keep
                os.ftruncate(self.fd, self.size)
            ts = _last_ts(tail[:keep])
            if ts:
                return ts
        for n in reversed(segment_numbers(os.listdir(self.dir))):  # the newest was empty
            if n < self.segment:
                with open(os.path.join(self.dir, segment_name(n)), "rb") as f:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
                    ts = _last_ts(f.read())
                if ts:
                    return ts
        return 0

    def write(self, data: bytes) -> None:
        """Append whole lines; raises OSError with nothing of ``data`` left in the file."""
        before = self.size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view):]
            if self.fsync:
                os.fdatasync(self.fd)
        except OSError:
            try:
                os.ftruncate(self.fd, before)
            except OSError as exc2:  # cut when reopened (_repair keeps whole lines only)
                log.error("journal: cannot cut back a failed write: %s", exc2)
            raise
        self.size = before + len(data)
        self.end = Position(self.segment, self.size)
        if self.size >= self.segment_bytes:
            self._next_segment()

    def _next_segment(self) -> None:
        self.sizes[self.segment] = self.size
        os.close(self.fd)
        self.segment += 1
        self.fd = os.open(os.path.join(self.dir, segment_name(self.segment)), _FLAGS, 0o644)
        self.size = 0
        self.end = Position(self.segment, 0)
        if self.fsync:
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def forget_before(self, segment: int) -> None:
        for n in [n for n in self.sizes if n < segment]:
            del self.sizes[n]

    def close(self) -> None:
        os.close(self.fd)


class JournalReader:
    """The materializer's end: reads complete lines from a position on."""

    def __init__(self, dirpath: str, start: Position) -> None:
        self.dir = dirpath
        self.pos = start
        self.fd = -1

    def read(self, limit: int, end: Position) -> tuple[bytes, Position]:
        """Complete lines after ``self.pos`` (at most about ``limit`` bytes), not past
        ``end`` (the writer's position), and the position after them (``self.pos`` from
        now on). Moves on to the
        next segment once this one is read to its end and the writer has left it."""
        while True:
            seg, off = self.pos
            if self.fd < 0:
                try:
                    self.fd = os.open(os.path.join(self.dir, segment_name(seg)), os.O_RDONLY)
                except FileNotFoundError:
                    if seg < end.segment:  # a gap (never written): go on
                        self.pos = Position(seg + 1, 0)
                        continue
                    return b"", self.pos
            stop = end.offset if seg == end.segment else os.fstat(self.fd).st_size
            if off < stop:
                data = os.pread(self.fd, min(limit, stop - off), off)
                n = complete(data)
                if n == 0 and len(data) == limit:  # one line longer than limit
                    data = os.pread(self.fd, stop - off, off)
                    n = complete(data)
                self.pos = Position(seg, off + n)
                return data[:n], self.pos
            if seg >= end.segment:
                return b"", self.pos
            os.close(self.fd)
            self.fd = -1
            self.pos = Position(seg + 1, 0)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def delete_before(dirpath: str, segment: int) -> int:
    """Remove the segments before ``segment`` (fully materialized); how many."""
    n = 0
    for number in segment_numbers(os.listdir(dirpath)):
        if number >= segment:
            break
        try:
            os.unlink(os.path.join(dirpath, segment_name(number)))
            n += 1
        except FileNotFoundError:
            pass
    return n
