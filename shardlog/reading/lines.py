"""The lines of one segment: backwards from its end, forwards from a time, its first ts.

Every write format (shardlog/ondisk/formats.py: jsonl, json, csv, payload-only) is read:
a segment's lines are turned into envelope record lines by its format (named by the
file's extension), so the readers above work on envelope lines. Plain segments are read
backwards with ``os.pread`` in blocks (``BLOCK``, doubling while a line is longer) and
searched by bisection on byte offsets (records are in ``ts`` order within a topic); a
segment compressed meanwhile is read from its ``.gz``. Files are opened and lines split by
:mod:`shardlog.reading.files`: regular files only, lines of bounded length, a damaged gzip
stream read up to the damage (each with a warning); a backwards read gives up on a segment
after ``MAX_LINE`` bytes without a line end (``MAX_GARBAGE`` if they hold a NUL), so a tail
reads a bounded number of bytes whatever the file size.
"""

from __future__ import annotations

import gzip
import logging
import os
from collections import deque
from collections.abc import Iterator

from shardlog.ondisk import formats
from shardlog.ondisk.formats import CURRENTS, Format
from shardlog.ondisk.segments import parse_segment
from shardlog.reading.files import GZIP_ERRORS, MAX_GARBAGE, MAX_LINE, bounded_lines, open_fd, open_file, open_gzip
from shardlog.records import Record, decode_record

log = logging.getLogger(__name__)


BLOCK = 64 * 1024            # first backwards read; doubles while a line is longer
_MAX_BLOCK = 8 * 1024 * 1024
_pread = os.pread            # the one way plain segments are read backwards (tests count it)

_TS_PREFIX = b'{"ts":'


def _mtime_us(fd: int) -> int:
    return os.fstat(fd).st_mtime_ns // 1000


def _count_lines(path: str) -> int:
    """Records in a segment: its lines, less a csv header or json brackets."""
    n = 0
    with _open_segment(path) as f:  # a plain one compressed meanwhile: its .gz
        try:
            while chunk := f.read1(1024 * 1024):
                n += chunk.count(b"\n")
        except GZIP_ERRORS as exc:
            log.warning("%s: damaged gzip segment (%s); counted up to there", path, exc)
    return max(0, n - formats.of_name(path).extra_lines)


_TS_MAX = 2**63 - 1


def _ts_of(line: bytes) -> int:
    """A record line's ts (a ValueError for a line that is no record, or a ts beyond 64 bits)."""
    if line.startswith(_TS_PREFIX):
        end = line.find(b",", 6, 32)
        try:
            ts = int(line[6:end])
        except ValueError:
            pass
        else:
            if -_TS_MAX - 1 <= ts <= _TS_MAX:
                return ts
    return decode_record(line, value=False).ts


def _decode(line: bytes) -> Record | None:
    """The record of a line; None (with a warning saying why) for a line that is none."""
    try:
        return decode_record(line)
    except ValueError as exc:
        log.warning("a line that is no record left out (%s): %.80r", exc, line)
        return None


def _lines_backwards(fd: int, end: int, path: str = "") -> Iterator[bytes]:
    """Complete lines (newline included) of ``fd[:end]``, newest first, reading
    backwards in blocks. Bytes after the last newline (a torn line) are skipped, and so is
    a line holding a NUL byte (never in a record) without being held in memory; after
    ``MAX_GARBAGE`` bytes of such a line, or ``MAX_LINE`` of any, without a line start the
    rest of the segment is left out with a warning: the bytes read are bounded."""
    pos, buf, block = end, b"", BLOCK
    trimmed = False   # the torn tail after the last newline is behind us
    garbage = 0       # bytes of the NUL-holding line being skipped (buf is then empty)
    while pos > 0:
        start = max(0, pos - block)
        chunk = _pread(fd, pos - start, start)
        if len(chunk) != pos - start:  # truncated under us: stop at what we have
            return
        pos = start
        if not trimmed or garbage:
            j = chunk.rfind(b"\n")
            if j < 0:
                if garbage or b"\0" in chunk:
                    garbage += len(chunk) + (0 if garbage else len(buf))
                    buf = b""
                else:
                    buf = chunk + buf
                if garbage > MAX_GARBAGE or len(buf) > MAX_LINE:
                    log.warning("%s: no line start in the %d bytes before offset %d (a NUL byte in them: %s); "
                                "the segment before them is left out", path, garbage or len(buf), end - pos,
                                bool(garbage))
                    return
                block = min(block * 2, _MAX_BLOCK)
                continue
            if garbage and trimmed:
                log.warning("%s: a line of %d bytes holding a NUL byte at offset %d; skipped",
                            path, garbage + len(chunk) - j - 1, pos + j + 1)
            buf, trimmed, garbage = chunk[: j + 1], True, 0
        else:
            buf = chunk + buf
        if pos > 0:
            i = buf.find(b"\n")
            if i < 0 or i == len(buf) - 1:
                if b"\0" in buf:
                    garbage, buf = len(buf) - 1, b""
                elif len(buf) > MAX_LINE:
                    log.warning("%s: a line longer than %d bytes before offset %d; the segment before it is "
                                "left out", path, MAX_LINE, pos + len(buf))
                    return
                block = min(block * 2, _MAX_BLOCK)
                continue
            complete, buf = buf[i + 1:], buf[: i + 1]
        else:
            complete, buf = buf, b""
        parts = complete.split(b"\n")
        for k in range(len(parts) - 2, -1, -1):
            line = parts[k]
            if b"\0" in line:
                log.warning("%s: a line of %d bytes holding a NUL byte; skipped", path, len(line) + 1)
                continue
            yield line + b"\n"


def _segment_lines_backwards(path: str, keep: int | None = None) -> Iterator[bytes]:
    """Envelope lines of one segment, newest first. A ``.gz`` one is decompressed as a
    stream; with ``keep`` only its last ``keep`` records are held (and given)."""
    fmt = formats.of_name(path)
    if path.endswith(".gz"):
        try:
            g = open_gzip(path)
        except FileNotFoundError:
            return
        with g:
            mtime = os.fstat(g.fileno()).st_mtime_ns // 1000
            maxlen = None if keep is None else keep + fmt.extra_lines + 1
            last = deque(bounded_lines(g.read1, path), maxlen=maxlen)
        last.reverse()
        yield from fmt.envelopes(last, mtime)
        return
    try:
        fd = open_fd(path)
    except FileNotFoundError:
        # compressed meanwhile (or skipped: then there is no .gz either)
        if parse_segment(os.path.basename(path)) and not os.path.lexists(path):
            yield from _segment_lines_backwards(path + ".gz", keep)
        return
    try:
        yield from fmt.envelopes(_lines_backwards(fd, os.fstat(fd).st_size, path), _mtime_us(fd))
    finally:
        os.close(fd)


def _open_current(path: str) -> tuple[int, Format] | None:
    """An open descriptor of a topic's current segment and its format, or None."""
    for name in CURRENTS:
        try:
            return open_fd(os.path.join(path, name)), formats.of_name(name)
        except FileNotFoundError:  # or skipped: no regular file
            continue
    return None


def _first_ts(path: str) -> int | None:
    """ts of a segment's first record: one line read (a .gz one: only its first blocks)."""
    fmt = formats.of_name(path)
    if not fmt.has_ts:
        return None  # payload-only: no ts stored, never skipped
    try:
        opener = open_gzip if path.endswith(".gz") else open_file
        with opener(path) as f:
            head = [f.readline(1 << 20) for _ in range(1 + fmt.extra_lines)]
    except FileNotFoundError:
        if path.endswith(".gz") or not parse_segment(os.path.basename(path)) or os.path.lexists(path):
            return None
        return _first_ts(path + ".gz")
    except (OSError, *GZIP_ERRORS):
        return None
    head = [h for h in head if h.endswith(b"\n")]
    try:
        return fmt.first_ts(head) if fmt is not formats.JSONL else (_ts_of(head[0]) if head else None)
    except Exception:  # a damaged first line: do not skip on it
        return None


def _open_segment(path: str):  # -> binary file object
    if path.endswith(".gz"):
        return open_gzip(path)
    try:
        return open_file(path)
    except FileNotFoundError:
        if parse_segment(os.path.basename(path)) and not os.path.lexists(path):
            return open_gzip(path + ".gz")
        raise


def _lines_forward(f, path: str) -> Iterator[bytes]:  # a binary file
    """Complete lines of ``f`` (a torn last line, being written, is left out), bounded."""
    return bounded_lines(f.read1, path)  # read1: a damaged gzip stream keeps what it gave


def _segment_file_lines(path: str, since: int | None = None) -> Iterator[bytes]:
    try:
        f = _open_segment(path)
    except FileNotFoundError:
        return  # deleted by retention meanwhile
    fmt = formats.of_name(path)
    with f:
        _skip_to(f, since, fmt)
        mtime = os.fstat(f.fileno()).st_mtime_ns // 1000 if not fmt.has_ts else 0
        yield from fmt.envelopes(_lines_forward(f, path), mtime)


def _skip_to(f, since: int | None, fmt: Format = formats.JSONL) -> None:
    """Position a plain segment near its first record with ``ts >= since`` (formats whose
    lines start with ``{"ts":``; the others are read from their start)."""
    if since is None or isinstance(f, gzip.GzipFile) or fmt.key not in ("jsonl", "json"):
        return
    fd = f.fileno()
    f.seek(_seek_since(fd, os.fstat(fd).st_size, since))


def _seek_since(fd: int, size: int, since: int) -> int:
    """A line start ``lo`` such that every record starting before it has ``ts < since``
    (found by bisection on byte offsets; records are in ts order). Reading from ``lo``
    and dropping records before ``since`` gives exactly the range."""
    lo, hi = 0, size
    while hi - lo > BLOCK:
        mid = (lo + hi) // 2
        chunk = _pread(fd, min(BLOCK, hi - mid + 1), mid - 1)
        j = chunk.find(b"\n")
        if j < 0:
            hi = mid
            continue
        p = mid + j  # the first line start at or after mid
        if p >= hi:
            hi = mid
            continue
        head = _pread(fd, 64, p)
        if not head.startswith(_TS_PREFIX):
            break  # not a record start: scan from lo
        end = head.find(b",", 6)
        try:
            ts = int(head[6:end])
        except ValueError:
            break
        if ts < since:
            lo = p
        else:
            hi = mid
    return lo


def _complete_end(fd: int, end: int) -> int:
    """Offset just after the last newline in ``fd[:end]`` (0 if none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - BLOCK)
        j = _pread(fd, pos - start, start).rfind(b"\n")
        if j >= 0:
            return start + j + 1
        pos = start
    return 0
