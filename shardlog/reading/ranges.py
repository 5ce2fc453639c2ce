"""Records of a topic or a branch in a time range, in time order (``history.read``,
``shardlog cat``, exports, replay).

Rotated segments outside the range are skipped by their first records, without
decompressing them; within a plain segment the start is found by bisection. Topics are
merged by ``ts`` (ties keep topic-name order), through temporary spool files when there
are more topics than open files allowed. Assumption: within one topic, ``ts`` does not go
backwards (it is the recorder's reception time).
"""

from __future__ import annotations

import heapq
import logging
import os
import resource
import tempfile
from collections.abc import Iterator

from shardlog.ondisk import formats
from shardlog.ondisk.segments import rotated_segments
from shardlog.reading.files import open_file
from shardlog.reading.lines import _decode, _first_ts, _lines_forward, _mtime_us, _segment_file_lines, _skip_to, _ts_of
from shardlog.reading.times import TimeArg, parse_time
from shardlog.reading.tree import TopicNotFound, _current_name, _root, _safe_listdir, _walk
from shardlog.records import Record

log = logging.getLogger(__name__)


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
            f = open_file(cur)
        except FileNotFoundError:  # or skipped (logged): no regular file
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
            yield from _filter(fmt.envelopes(_lines_forward(f, cur), _mtime_us(f.fileno())), since, until)
        return


def _filter(lines: Iterator[bytes], since: int | None, until: int | None) -> Iterator[tuple[int, bytes]]:
    for line in lines:
        try:
            ts = _ts_of(line)
        except ValueError as exc:  # a line that is no record: left out, said
            log.warning("a line that is no record left out (%s): %.80r", exc, line)
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


def read(root: str | os.PathLike[str], topic_or_prefix: str, since: TimeArg = None,
         until: TimeArg = None) -> Iterator[tuple[str, Record]]:
    """(topic, Record) of one topic and every topic below it, in time order, with
    ``since <= ts < until`` (µs ints, datetimes or ISO strings). Rotated segments
    outside the range are skipped by their first records, without decompressing
    them. Raises ``TopicNotFound`` if nothing is recorded there."""
    lo, hi = parse_time(since), parse_time(until)
    lines = _read_lines(root, topic_or_prefix, lo, hi)
    return ((t, rec) for t, _ts, line in lines if (rec := _decode(line)) is not None)
