"""The newest records of a topic, read backwards from the end of its current segment
(never a whole large file) into older segments (``history.tail``, ``shardlog tail``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from shardlog.ondisk.formats import CURRENTS, Format
from shardlog.reading.lines import _decode, _lines_backwards, _mtime_us, _open_current, _segment_lines_backwards
from shardlog.reading.tree import _require_topic, segments_of
from shardlog.records import Record


def _tail_lines_dir(path: str, n: int, current: tuple[int, int, Format] | None = None) -> list[bytes]:
    """The last ``n`` envelope lines of a topic directory, oldest first. ``current``:
    an already open (fd, end, format) of the current segment to use instead of opening it."""
    if n <= 0:
        return []
    own_fd = None
    if current is None:
        opened = _open_current(path)
        if opened is not None:
            own_fd, fmt = opened
            current = (own_fd, os.fstat(own_fd).st_size, fmt)
    try:
        segs = [s for s in segments_of(path) if os.path.basename(s) not in CURRENTS]
        if current is not None and segs and not segs[-1].endswith(".gz"):
            # rotated between our open and our listing: the newest rotated one is our file
            try:
                if os.stat(segs[-1]).st_ino == os.fstat(current[0]).st_ino:
                    segs.pop()
            except FileNotFoundError:
                pass
        sources: list[Iterator[bytes]] = []
        if current is not None:
            fd, end, fmt = current
            sources.append(fmt.envelopes(_lines_backwards(fd, end, os.path.join(path, fmt.current)), _mtime_us(fd)))
        sources.extend(_segment_lines_backwards(s, n) for s in reversed(segs))
        out: list[bytes] = []
        for src in sources:
            for line in src:
                out.append(line)
                if len(out) >= n:
                    break
            # each source is a generator (typed Iterator): close it now, and the file it holds
            src.close()  # type: ignore[attr-defined]
            if len(out) >= n:
                break
        out.reverse()
        return out
    finally:
        if own_fd is not None:
            os.close(own_fd)


def tail(root: str | os.PathLike[str], topic: str, n: int = 6) -> list[Record]:
    """The last ``n`` records of ``topic``, oldest first, read backwards from the end
    of the current segment (never a whole large file) into older segments."""
    d = _require_topic(root, topic)
    return [r for line in _tail_lines_dir(d, n) if (r := _decode(line)) is not None]
