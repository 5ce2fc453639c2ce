"""Read what shardlog recorded: list topics, tail, read a time range, follow, export.

Pure reading of the on-disk format of DESIGN.md ("Files on disk"); nothing here
writes into a recording root. A web app can use it directly::

    from shardlog import history
    for info in history.topics("/srv/mqtt", "chat"):
        print(info.topic)
    last = history.tail("/srv/mqtt", "chat/room42", 6)          # list[Record], oldest first
    for topic, rec in history.read("/srv/mqtt", "chat", since="2026-11-22T10:00:00Z"):
        ...
    history.export_sqlite("/srv/mqtt", "chat", "chat.sqlite")

Records are ``shardlog.records.Record`` (ts, qos, retain, payload bytes as
published, value as JSON.parse would see it).

Every write format (shardlog/formats.py: jsonl, json, csv, payload-only) is read:
each segment's lines are turned into envelope record lines by its format (named by
the file's extension), so everything below works on envelope lines.

Assumption: within one topic, ``ts`` does not go backwards (it is the recorder's
reception time); segment skipping in ``read`` relies on it.
"""

from __future__ import annotations

import datetime as _dt
import gzip
import heapq
import os
import resource
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import msgspec

from shardlog.ondisk import formats
from shardlog.ondisk.formats import CURRENTS, Format
from shardlog.records import Record, decode_record
from shardlog.ondisk.segments import TOPIC_FILE, parse_segment, rotated_segments
from shardlog.topics import (
    HashedNameError,
    TopicError,
    decode_level,
    safe_join,
    topic_to_relpath,
)

__all__ = [
    "TopicInfo",
    "TopicNotFound",
    "connect",
    "export_parquet",
    "export_sqlite",
    "follow",
    "parse_time",
    "read",
    "segments_of",
    "tail",
    "topic_dir",
    "topics",
]

BLOCK = 64 * 1024            # first backwards read; doubles while a line is longer
_MAX_BLOCK = 8 * 1024 * 1024
_pread = os.pread            # the one way plain segments are read backwards (tests count it)
_json_encode = msgspec.json.encode
_TS_PREFIX = b'{"ts":'


class TopicNotFound(FileNotFoundError):
    """No recording root, or no records for the topic or prefix below it."""


class TopicInfo(NamedTuple):
    topic: str
    path: str                    # the topic's directory
    records: int | None = None   # the rest only with long=True
    bytes: int | None = None     # on disk (compressed segments count compressed)
    last_ts: int | None = None   # ts of the newest record, µs


# -- time ---------------------------------------------------------------------------------

def parse_time(value: float | str | _dt.datetime | None) -> int | None:
    """µs since the epoch from an int (µs), a datetime (naive = UTC) or an ISO 8601
    string (naive = UTC; a plain integer string is µs). ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        try:
            value = _dt.datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"not a time (µs since the epoch or ISO 8601): {value!r}") from None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise ValueError(f"not a time: {value!r}")


# -- where things are --------------------------------------------------------------------

def _root(root: str | os.PathLike[str]) -> str:
    real = os.path.realpath(os.fspath(root))
    if not os.path.isdir(real):
        raise TopicNotFound(f"no such recording root: {os.fspath(root)}")
    return real


def _prefix_dir(root_real: str, prefix: str) -> str:
    if not prefix:
        return root_real
    try:
        return safe_join(root_real, topic_to_relpath(prefix))
    except TopicError as exc:
        raise TopicNotFound(f"not a storable topic {prefix!r}: {exc}") from None


def topic_dir(root: str | os.PathLike[str], topic: str) -> str:
    """The directory of ``topic`` under ``root`` (which need not exist yet)."""
    return _prefix_dir(_root(root), topic)


def _is_topic(names: Iterable[str]) -> bool:
    return any(n in CURRENTS or (n.startswith("+log.") and parse_segment(n)) for n in names)


def _current_name(names: Iterable[str]) -> str | None:
    """The current segment's name among directory entries (one format's; None if none)."""
    have = set(names)
    return next((c for c in CURRENTS if c in have), None)


def _mtime_us(fd: int) -> int:
    return os.fstat(fd).st_mtime_ns // 1000


def segments_of(topic_dir: str) -> list[str]:
    """Paths of a topic's segments, oldest first: rotated ones (plain or ``.gz``), then
    the current one (``+log.jsonl``, ``+log.csv``, ...) if it exists."""
    try:
        names = os.listdir(topic_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = [os.path.join(topic_dir, s.name) for s in rotated_segments(names)]
    out.extend(os.path.join(topic_dir, c) for c in CURRENTS if c in names)
    return out


def _walk(root_real: str, prefix: str) -> Iterator[tuple[str, str, list[str]]]:
    """(topic, directory, file names) of every topic directory at or below ``prefix``,
    in directory-name order; only directory listings, no file reads (except the
    ``+topic`` file of a hashed level)."""
    start = _prefix_dir(root_real, prefix)
    if prefix:
        if not os.path.isdir(start):
            return
        base_topic: str | None = prefix
    else:
        base_topic = None  # the root itself is no topic
    stack: list[tuple[str, str | None]] = [(start, base_topic)]
    while stack:
        path, topic = stack.pop()
        files: list[str] = []
        subdirs: list[tuple[str, str]] = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    name = e.name
                    if name.startswith("+"):
                        files.append(name)
                    elif e.is_dir(follow_symlinks=False):
                        subdirs.append((name, e.path))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        if topic is not None and _is_topic(files):
            yield topic, path, files
        for name, sub in sorted(subdirs, reverse=True):
            try:
                level = decode_level(name)
            except HashedNameError:
                try:
                    with open(os.path.join(sub, TOPIC_FILE), encoding="utf-8") as f:
                        full = f.read()
                except OSError:
                    continue  # no +topic: not something the recorder made
                stack.append((sub, full))
                continue
            except TopicError:
                continue  # not a name the recorder makes: not ours
            stack.append((sub, level if topic is None else f"{topic}/{level}"))


def topics(root: str | os.PathLike[str], prefix: str = "", long: bool = False) -> Iterator[TopicInfo]:
    """Recorded topics at or below ``prefix`` (all with ``""``), decoded.

    Without ``long`` only directories are listed (fast on 100,000 topics). With
    ``long``: record count (reads every segment; compressed ones are decompressed),
    bytes on disk and the newest record's ts."""
    root_real = _root(root)
    for topic, path, files in _walk(root_real, prefix):
        if not long:
            yield TopicInfo(topic, path)
            continue
        count = size = 0
        for seg in segments_of(path):
            try:
                count += _count_lines(seg)
                size += os.stat(seg if os.path.exists(seg) else seg + ".gz").st_size
            except FileNotFoundError:
                continue  # deleted by retention meanwhile
        last = _tail_lines_dir(path, 1)
        yield TopicInfo(topic, path, count, size, _ts_of(last[-1]) if last else None)


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


def _require_topic(root: str | os.PathLike[str], topic: str) -> str:
    d = topic_dir(root, topic)
    if not segments_of(d):
        raise TopicNotFound(f"no records for topic {topic!r} under {os.fspath(root)}")
    return d


# -- tail ---------------------------------------------------------------------------------

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
            sources.append(fmt.envelopes(_lines_backwards(fd, end), _mtime_us(fd)))
        sources.extend(_segment_lines_backwards(s) for s in reversed(segs))
        out: list[bytes] = []
        for src in sources:
            for line in src:
                out.append(line)
                if len(out) >= n:
                    break
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


# -- read a range ---------------------------------------------------------------------------

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


def _segments_in_range(segs: list[str], since: int | None, until: int | None) -> list[str]:
    """Drop rotated segments wholly before ``since`` or at/after ``until`` by their
    first records only (a segment's records lie in [its first ts, next first ts])."""
    if since is None and until is None:
        return segs
    firsts = [_first_ts(s) for s in segs]
    keep = []
    for i, s in enumerate(segs):
        first = firsts[i]
        if until is not None and first is not None and first >= until:
            break
        nxt = next((t for t in firsts[i + 1:] if t is not None), None) if i + 1 < len(segs) else None
        if since is not None and nxt is not None and nxt < since:
            continue
        keep.append(s)
    return keep


def _topic_lines(path: str, since: int | None, until: int | None) -> Iterator[tuple[int, bytes]]:
    """(ts, line) of one topic directory in [since, until), oldest first. Segments
    rotated while reading are picked up; the current segment is read from an open
    descriptor, so a rotation during the read does not lose it."""
    names = _safe_listdir(path)
    rotated = rotated_segments(names)
    cur_name = _current_name(names)
    cur = os.path.join(path, cur_name or formats.JSONL.current)
    paths = [os.path.join(path, s.name) for s in rotated] + ([cur] if cur_name else [])
    chosen = set(_segments_in_range(paths, since, until))
    done_seq = -1
    for seg in rotated:
        done_seq = seg.seq
        p = os.path.join(path, seg.name)
        if p in chosen:
            yield from _filter(_segment_file_lines(p, since), since, until)
    if cur_name and cur not in chosen:
        return  # the current segment starts at or after ``until``
    while True:
        try:
            f = open(cur, "rb")
        except FileNotFoundError:
            f = None
            now = _current_name(_safe_listdir(path))
            if now is not None and os.path.join(path, now) != cur:  # the format changed
                cur = os.path.join(path, now)
                continue
        newer = [s for s in rotated_segments(_safe_listdir(path)) if s.seq > done_seq]
        if newer:  # rotated since we listed: read those first, then the current one again
            if f is not None:
                f.close()
            for seg in newer:
                done_seq = seg.seq
                yield from _filter(_segment_file_lines(os.path.join(path, seg.name), since), since, until)
            continue
        if f is None:
            return
        with f:
            fmt = formats.of_name(cur)
            _skip_to(f, since, fmt)
            yield from _filter(fmt.envelopes(_lines_forward(f), _mtime_us(f.fileno())), since, until)
        return


class _suppress_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: object, exc: object, tb: object) -> bool:
        return typ is not None and issubclass(typ, FileNotFoundError)  # type: ignore[arg-type]


def _safe_listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


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


def _filter(lines: Iterator[bytes], since: int | None, until: int | None) -> Iterator[tuple[int, bytes]]:
    for line in lines:
        try:
            ts = _ts_of(line)
        except Exception:  # noqa: BLE001 - an unreadable line is left out
            continue
        if since is not None and ts < since:
            continue
        if until is not None and ts >= until:
            return  # ts does not go backwards within a topic: the rest is later still
        yield ts, line


def _raise_fd_limit(streams: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = streams + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            pass


def _read_lines(root: str | os.PathLike[str], topic_or_prefix: str, since: int | None = None,
                until: int | None = None) -> Iterator[tuple[str, int, bytes]]:
    """(topic, ts, line) in time order; ties keep topic-name order. Raises
    ``TopicNotFound`` at once (not on the first ``next``)."""
    root_real = _root(root)
    found = list(_walk(root_real, topic_or_prefix))
    if not found:
        raise TopicNotFound(f"no records for {topic_or_prefix or 'any topic'!r} under {os.fspath(root)}")
    if len(found) == 1:
        t, p, _ = found[0]
        return ((t, ts, line) for ts, line in _topic_lines(p, since, until))
    _raise_fd_limit(len(found))  # one open segment per topic while merging
    budget = _fd_budget()
    if len(found) <= budget:
        streams = [_tagged(_topic_lines(p, since, until), i, t) for i, (t, p, _) in enumerate(found)]
        return ((t, ts, line) for ts, _i, t, line in heapq.merge(*streams))
    return _external_merge(found, since, until, budget)


def _fd_budget() -> int:
    """How many segments may be open at once while merging."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    return max(16, soft - in_use - 64)


def _external_merge(found: list[tuple[str, str, list[str]]], since: int | None, until: int | None,
                    budget: int) -> Iterator[tuple[str, int, bytes]]:
    """More topics than open files allowed: merge groups of ``budget`` topics into
    temporary spool files (``ts index line``), then merge the spools."""
    spools = []
    try:
        for start in range(0, len(found), budget):
            spool = tempfile.TemporaryFile()
            spools.append(spool)
            group = [_tagged(_topic_lines(p, since, until), i, t)
                     for i, (t, p, _) in enumerate(found[start:start + budget], start)]
            write = spool.write
            for ts, i, _t, line in heapq.merge(*group):
                write(b"%d %d %s" % (ts, i, line))
            spool.seek(0)
        for ts, i, line in heapq.merge(*(_read_spool(f) for f in spools)):
            yield found[i][0], ts, line
    finally:
        for f in spools:
            f.close()


def _read_spool(f) -> Iterator[tuple[int, int, bytes]]:
    for entry in f:
        a = entry.index(b" ")
        b = entry.index(b" ", a + 1)
        yield int(entry[:a]), int(entry[a + 1:b]), entry[b + 1:]


def _tagged(lines: Iterator[tuple[int, bytes]], i: int, t: str) -> Iterator[tuple[int, int, str, bytes]]:
    for ts, line in lines:
        yield ts, i, t, line


def read(root: str | os.PathLike[str], topic_or_prefix: str, since: object = None,
         until: object = None) -> Iterator[tuple[str, Record]]:
    """(topic, Record) of one topic and every topic below it, in time order, with
    ``since <= ts < until`` (µs ints, datetimes or ISO strings). Rotated segments
    outside the range are skipped by their first records, without decompressing
    them. Raises ``TopicNotFound`` if nothing is recorded there."""
    lo, hi = parse_time(since), parse_time(until)  # type: ignore[arg-type]
    lines = _read_lines(root, topic_or_prefix, lo, hi)
    return ((t, rec) for t, _ts, line in lines if (rec := _decode(line)) is not None)


# -- follow -------------------------------------------------------------------------------

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
                fd = os.open(self.file, os.O_RDONLY)
                break
            except FileNotFoundError:
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
                    with gzip.open(p, "rb") as g:
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
        if st is not None and st.st_ino == self.ino and st.st_size < self.offset and st.st_size >= self.offset - len(self.buf):
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


# -- SQL and Parquet (DuckDB: shardlog/sql.py, shardlog/parquet.py) -----------------------

def connect(root: str | os.PathLike[str], prefix: str = "", since: object = None, until: object = None):  # noqa: ANN201
    """An in-process DuckDB connection with a ``records`` view (see shardlog.sql)."""
    from shardlog.reading import sql

    return sql.connect(root, prefix, since, until)


def export_parquet(root: str | os.PathLike[str], prefix: str, path: str | os.PathLike[str],
                   since: object = None, until: object = None, progress: Callable[[int, int], None] | None = None) -> int:
    """One Parquet file of ``prefix`` and below, payload keys as typed columns (see shardlog.parquet)."""
    from shardlog.reading import parquet

    return parquet.export_parquet(root, prefix, path, since, until, progress)


# -- export -------------------------------------------------------------------------------

_INT64 = (-(2**63), 2**63 - 1)
MAX_FLAT_COLUMNS = 1000  # SQLite allows 2000 columns by default
_SKIP = object()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fold(name: str) -> str:
    # SQLite compares identifiers case-insensitively, ASCII letters only
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in name)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar(v: object) -> object:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, str):
        return v if _utf8_ok(v) else _SKIP  # a lone surrogate: it stays in payload_json
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if _INT64[0] <= v <= _INT64[1] else str(v)
    return _SKIP


def _is_json_record(line: bytes) -> bool:
    """The payload is embedded JSON (no ``enc`` member before ``payload``)."""
    i = line.find(b',"payload":')
    return i >= 0 and b',"enc":' not in line[:i]


def export_sqlite(root: str | os.PathLike[str], prefix: str, path: str | os.PathLike[str],
                  since: object = None, until: object = None, batch: int = 5000,
                  progress: Callable[[int], None] | None = None) -> int:
    """Write the records of ``prefix`` (and below) to a new SQLite file ``path``: one
    table ``records(topic, ts, qos, retain, payload BLOB, payload_json TEXT)`` plus a
    column ``payload.<key>`` for each top-level scalar member of JSON object payloads
    (added as first seen). One transaction. Returns the number of rows."""
    lo, hi = parse_time(since), parse_time(until)  # type: ignore[arg-type]
    if os.path.exists(path):
        raise FileExistsError(f"{os.fspath(path)} exists; remove it first")
    lines = _read_lines(root, prefix, lo, hi)  # raises TopicNotFound before anything is created
    con = sqlite3.connect(os.fspath(path), isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=OFF")  # a new file: on a crash, export again
        con.execute("BEGIN")
        con.execute("CREATE TABLE records (topic TEXT NOT NULL, ts INTEGER NOT NULL, qos INTEGER NOT NULL, "
                    "retain INTEGER NOT NULL, payload BLOB NOT NULL, payload_json TEXT)")
        columns: dict[str, int] = {}   # JSON key -> index in a row
        folded: set[str] = {"topic", "ts", "qos", "retain", "payload", "payload_json"}
        rows: list[list[object]] = []
        n = 0

        def flush() -> None:
            if not rows:
                return
            width = 6 + len(columns)
            sql = f"INSERT INTO records VALUES ({','.join('?' * width)})"
            con.executemany(sql, [r + [None] * (width - len(r)) for r in rows])
            rows.clear()

        for topic, _ts, line in lines:
            rec = _decode(line)
            if rec is None:
                continue
            is_json = _is_json_record(line)
            row: list[object] = [topic, rec.ts, rec.qos, int(rec.retain), rec.payload,
                                 rec.payload.decode("utf-8") if is_json else None]
            if is_json and isinstance(rec.value, dict):
                for key, value in rec.value.items():
                    v = _scalar(value)
                    if v is _SKIP:
                        continue
                    idx = columns.get(key)
                    if idx is None:
                        if len(columns) >= MAX_FLAT_COLUMNS or not _utf8_ok(key):
                            continue
                        name = "payload." + key.replace("\x00", "\\u0000")
                        base, k = name, 2
                        while _fold(name) in folded:
                            name, k = f"{base}~{k}", k + 1
                        flush()  # rows so far have the old width
                        con.execute(f"ALTER TABLE records ADD COLUMN {_quote(name)}")
                        folded.add(_fold(name))
                        idx = columns[key] = 6 + len(columns)
                    if len(row) <= idx:
                        row.extend([None] * (idx + 1 - len(row)))
                    row[idx] = v
            rows.append(row)
            n += 1
            if len(rows) >= batch:
                flush()
                if progress is not None:
                    progress(n)
        flush()
        con.execute("CREATE INDEX records_topic_ts ON records (topic, ts)")
        con.execute("COMMIT")
        if progress is not None:
            progress(n)
        return n
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
