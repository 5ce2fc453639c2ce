"""The lines of one segment: backwards from its end, forwards from a time, its first ts.

Every write format (shardlog/ondisk/formats.py: jsonl, json, csv, payload-only) is read:
a segment's lines are turned into envelope record lines by its format (named by the
file's extension), so the readers above work on envelope lines. Plain segments are read
backwards with ``os.pread`` in blocks (``BLOCK``, doubling while a line is longer) and
searched by bisection on byte offsets (records are in ``ts`` order within a topic); a
segment compressed meanwhile is read from its ``.gz``.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Iterator

import msgspec

from shardlog.ondisk import formats
from shardlog.ondisk.formats import CURRENTS, Format
from shardlog.ondisk.segments import parse_segment
from shardlog.records import Record, decode_record


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
        while chunk := f.read(1024 * 1024):
            n += chunk.count(b"\n")
    return max(0, n - formats.of_name(path).extra_lines)


def _ts_of(line: bytes) -> int:
    if line.startswith(_TS_PREFIX):
        end = line.find(b",", 6)
        try:
            return int(line[6:end])
        except ValueError:
            pass
    return decode_record(line).ts


def _decode(line: bytes) -> Record | None:
    try:
        return decode_record(line)
    except (ValueError, KeyError, TypeError, AttributeError, msgspec.DecodeError):
        return None


def _lines_backwards(fd: int, end: int) -> Iterator[bytes]:
    """Complete lines (newline included) of ``fd[:end]``, newest first, reading
    backwards in blocks. Bytes after the last newline (a torn line) are skipped."""
    pos, buf, block, trimmed = end, b"", BLOCK, False
    while pos > 0:
        start = max(0, pos - block)
        chunk = _pread(fd, pos - start, start)
        if len(chunk) != pos - start:  # truncated under us: stop at what we have
            return
        buf = chunk + buf
        pos = start
        if not trimmed:
            j = buf.rfind(b"\n")
            if j < 0:
                block = min(block * 2, _MAX_BLOCK)
                continue
            buf = buf[: j + 1]
            trimmed = True
        if pos > 0:
            i = buf.find(b"\n")
            if i < 0 or i == len(buf) - 1:
                block = min(block * 2, _MAX_BLOCK)
                continue
            complete, buf = buf[i + 1:], buf[: i + 1]
        else:
            complete, buf = buf, b""
        parts = complete.split(b"\n")
        for k in range(len(parts) - 2, -1, -1):
            yield parts[k] + b"\n"


def _segment_lines_backwards(path: str) -> Iterator[bytes]:
    """Envelope lines of one segment, newest first."""
    fmt = formats.of_name(path)
    if path.endswith(".gz"):
        try:
            data = _read_gz(path)
            mtime = os.stat(path).st_mtime_ns // 1000
        except FileNotFoundError:
            return
        parts = data.split(b"\n")
        yield from fmt.envelopes((parts[k] + b"\n" for k in range(len(parts) - 2, -1, -1)), mtime)
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        # compressed meanwhile
        if parse_segment(os.path.basename(path)):
            yield from _segment_lines_backwards(path + ".gz")
        return
    try:
        yield from fmt.envelopes(_lines_backwards(fd, os.fstat(fd).st_size), _mtime_us(fd))
    finally:
        os.close(fd)


def _read_gz(path: str) -> bytes:
    with open(path, "rb") as f:
        data = gzip.decompress(f.read())
    return data


def _open_current(path: str) -> tuple[int, Format] | None:
    """An open descriptor of a topic's current segment and its format, or None."""
    for name in CURRENTS:
        try:
            return os.open(os.path.join(path, name), os.O_RDONLY), formats.of_name(name)
        except FileNotFoundError:
            continue
    return None


def _first_ts(path: str) -> int | None:
    """ts of a segment's first record: one line read (a .gz one: only its first blocks)."""
    fmt = formats.of_name(path)
    if not fmt.has_ts:
        return None  # payload-only: no ts stored, never skipped
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            head = [f.readline(1 << 20) for _ in range(1 + fmt.extra_lines)]
    except FileNotFoundError:
        if path.endswith(".gz") or not parse_segment(os.path.basename(path)):
            return None
        return _first_ts(path + ".gz")
    except (OSError, EOFError):
        return None
    head = [h for h in head if h.endswith(b"\n")]
    try:
        return fmt.first_ts(head) if fmt is not formats.JSONL else (_ts_of(head[0]) if head else None)
    except Exception:  # noqa: BLE001 - a damaged first line: do not skip on it
        return None


def _open_segment(path: str):  # -> binary file object
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        if parse_segment(os.path.basename(path)):
            return gzip.open(path + ".gz", "rb")
        raise


def _lines_forward(f) -> Iterator[bytes]:
    for line in f:
        if line.endswith(b"\n"):
            yield line
        # else a torn last line (being written): left out


def _segment_file_lines(path: str, since: int | None = None) -> Iterator[bytes]:
    try:
        f = _open_segment(path)
    except FileNotFoundError:
        return  # deleted by retention meanwhile
    fmt = formats.of_name(path)
    with f:
        _skip_to(f, since, fmt)
        mtime = os.fstat(f.fileno()).st_mtime_ns // 1000 if not fmt.has_ts else 0
        yield from fmt.envelopes(_lines_forward(f), mtime)


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
