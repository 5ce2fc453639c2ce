"""Follow a topic as it is written, surviving rotation (``history.follow``, ``shardlog tail -f``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from types import TracebackType

from shardlog.ondisk import formats
from shardlog.ondisk.segments import rotated_segments
from shardlog.reading.files import open_fd, open_gzip
from shardlog.reading.lines import _complete_end, _decode, _mtime_us, _pread, _segment_file_lines
from shardlog.reading.tail import _tail_lines_dir
from shardlog.reading.tree import _current_name, _require_topic, _safe_listdir, topic_dir
from shardlog.records import Record


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        return typ is not None and issubclass(typ, FileNotFoundError)


class _Follower:
    """Reads the current segment of one topic as it grows (any format: a json array's
    closing bracket is never consumed, so an append over it reads on cleanly). When the name points to another
    file (its inode changed) or the file shrank, it drains the old file, reads whole
    any segments rotated in between (several rotations between two polls), then goes
    on with the new current file from its start. ``at_end``: skip what the file holds
    now (if it exists now; a file that appears later is read from its start)."""

    def __init__(self, path: str, at_end: bool = True) -> None:
        self.dir = path
        self.file = os.path.join(path, formats.JSONL.current)  # open() finds another format's
        self.fmt = formats.of_name(self.file)
        self.fd: int | None = None
        self.ino = -1
        self.offset = 0
        self.buf = b""
        self.base = 0  # newest rotated seq that is not the open file, when it was opened
        self.done: int | None = None  # segments after this seq not yet read (after a rotation)
        if at_end and self.open():
            assert self.fd is not None
            self.offset = self.settle(_complete_end(self.fd, os.fstat(self.fd).st_size))
        elif at_end:
            self.done = self._newest_seq()

    def _newest_seq(self) -> int:
        rot = rotated_segments(_safe_listdir(self.dir))
        return rot[-1].seq if rot else 0

    def settle(self, offset: int) -> int:
        """``offset`` moved back before a json array's closing ``]`` line."""
        if self.fmt.closer and self.fd is not None and offset >= 3 and \
                _pread(self.fd, 3, offset - 3) == b"\n]\n":
            return offset - 2
        return offset

    def open(self) -> bool:
        while True:
            try:
                fd = open_fd(self.file)
                break
            except FileNotFoundError:  # or skipped (logged): no regular file
                now = _current_name(_safe_listdir(self.dir))
                if now is None or os.path.join(self.dir, now) == self.file:
                    return False
                self.file = os.path.join(self.dir, now)  # the shard's format changed
                self.fmt = formats.of_name(now)
        ino = os.fstat(fd).st_ino
        rot = rotated_segments(_safe_listdir(self.dir))
        self.fd, self.ino, self.buf, self.offset = fd, ino, b"", 0
        self.base = self._seq_of_open_file(rot) - 1 if rot else 0
        return True

    def _seq_of_open_file(self, rot: list) -> int:
        """The number the open file will have once rotated: one past the newest rotated
        segment, unless it was rotated between our open and our listing (then it is
        one of them: the plain one with our inode, or, if already compressed and
        unlinked, the .gz one whose first line is ours)."""
        assert self.fd is not None
        unlinked = os.fstat(self.fd).st_nlink == 0
        head = b""
        if unlinked:
            first = _pread(self.fd, 4096, 0)
            head = first[: first.find(b"\n") + 1]
        for seg in reversed(rot[-8:]):
            p = os.path.join(self.dir, seg.name)
            with _suppress_missing():
                if not seg.compressed and os.stat(p).st_ino == self.ino:
                    return seg.seq
                if seg.compressed and unlinked and head:
                    with open_gzip(p) as g:
                        if g.readline(len(head) + 1) == head:
                            return seg.seq
        return rot[-1].seq + 1

    def _drain(self) -> list[bytes]:
        assert self.fd is not None
        out: list[bytes] = []
        while True:
            chunk = os.pread(self.fd, 1 << 20, self.offset)
            if not chunk:
                break
            self.offset += len(chunk)
            data = self.buf + chunk
            j = data.rfind(b"\n")
            if j < 0:
                self.buf = data
                continue
            out.extend(x + b"\n" for x in data[:j].split(b"\n"))
            self.buf = data[j + 1:]
        if self.fmt.closer and out and out[-1] == b"]\n" and not self.buf:
            out.pop()  # the closing bracket: the next append overwrites it
            self.offset -= 2
        if self.fmt is formats.JSONL:
            return out
        return list(self.fmt.envelopes(out, _mtime_us(self.fd)))

    def poll(self) -> list[bytes]:
        if self.fd is None:
            return self._reopen()
        lines = self._drain()
        try:
            st: os.stat_result | None = os.stat(self.file)
        except FileNotFoundError:
            if _current_name(_safe_listdir(self.dir)) is None:
                return lines  # rotated, the new one not created yet: keep the old one
            st = None  # the format changed: the old current segment was rotated away
        if st is not None and st.st_ino == self.ino and self.offset - len(self.buf) <= st.st_size < self.offset:
            # a torn tail (a crash mid-write) cut back by the restarted recorder
            self.offset -= len(self.buf)
            self.buf = b""
            return lines + self._drain()
        if st is None or st.st_ino != self.ino or st.st_size < self.offset:
            lines.extend(self._drain())  # the last records written before the rotation
            self.close()
            self.done = self.base + 1  # the number our file got
            lines.extend(self._reopen())
        return lines

    def _reopen(self) -> list[bytes]:
        if not self.open():
            return []
        lines: list[bytes] = []
        if self.done is not None:
            for seg in rotated_segments(_safe_listdir(self.dir)):
                if self.done < seg.seq <= self.base:  # rotated in between: read whole
                    lines.extend(_segment_file_lines(os.path.join(self.dir, seg.name)))
            self.done = None
        return lines + self._drain()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _follow_lines(path: str, poll: float, stop: threading.Event | None,
                  follower: _Follower | None = None) -> Iterator[bytes]:
    fo = follower or _Follower(path)
    try:
        while stop is None or not stop.is_set():
            lines = fo.poll()
            if lines:
                yield from lines
                continue
            if stop is not None:
                stop.wait(poll)
            else:
                time.sleep(poll)
    finally:
        fo.close()


def follow(root: str | os.PathLike[str], topic: str, poll: float = 0.2,
           stop: threading.Event | None = None) -> Iterator[Record]:
    """Records of ``topic`` as they are appended from now on, surviving rotation.
    Runs until ``stop`` is set (checked every ``poll`` seconds) or the generator is
    closed. The topic need not exist yet."""
    d = topic_dir(root, topic)
    fo = _Follower(d)  # positioned now, not on the first next()
    return (rec for line in _follow_lines(d, poll, stop, fo) if (rec := _decode(line)) is not None)


def _tail_and_follow(root: str | os.PathLike[str], topic: str, n: int, poll: float = 0.2,
                     stop: threading.Event | None = None) -> Iterator[bytes]:
    """The last ``n`` lines, then every line appended after them: no gap, no repeat."""
    d = _require_topic(root, topic)
    fo = _Follower(d, at_end=False)
    if fo.open():
        assert fo.fd is not None
        end = os.fstat(fo.fd).st_size
        lines = _tail_lines_dir(d, n, current=(fo.fd, end, fo.fmt))
        fo.offset = fo.settle(_complete_end(fo.fd, end))
    else:
        lines = _tail_lines_dir(d, n)
        fo.done = fo._newest_seq()
    yield from lines
    yield from _follow_lines(d, poll, stop, fo)
