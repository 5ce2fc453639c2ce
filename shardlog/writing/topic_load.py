"""A topic's first open in this process: repair its tail, read back its recent records.

A crash mid-write can leave a torn or garbage tail on the current segment: :func:`load`
cuts it back to the last valid record (the bytes cut off go to the quarantine), fills
the recent buffer from the tail (reaching into the newest rotated segment if the
current one holds too few) and notes the newest record's ts. It touches only the state
it is given and the disk, so the preparer may run it in its thread. The checks on lines
and the repair of each format are pure functions of :mod:`shardlog.ondisk.formats`.
"""

from __future__ import annotations

import gzip
import os

from shardlog.ondisk import formats, segments
from shardlog.records import decode_record
from shardlog.writing.topic_state import TopicState

TAIL_CHUNK = 64 * 1024


def load(fmt: formats.Format, st: TopicState, path: str) -> bytes | None:
    """First open of a topic in this process: cut a torn or garbage tail back to
    the last valid record, then fill the recent buffer from the tail and note the
    newest record's ts (``st.last_ts``, of the current segment). Returns the bytes
    cut off (for the quarantine), if any.
    Touches only ``st`` and the disk, so the preparer may run it in its thread."""
    if st.size == 0:
        return None
    garbage = None
    with open(path, "rb") as f:
        start, tail, keep = formats.valid_tail(f, st.size, fmt.valid_line, TAIL_CHUNK)
        keep, suffix = fmt.finish(tail, keep, start == 0)
        f.seek(0)
        head = [f.readline(4096) for _ in range(1 + fmt.extra_lines)]
    if keep < len(tail) or suffix:
        garbage = tail[keep:]
        os.truncate(path, start + keep)
        if suffix:
            with open(path, "ab") as f:
                f.write(suffix)
        st.size = start + keep + len(suffix)
        tail = tail[:keep] + suffix
        keep = len(tail)
    if st.size:
        st.first_ts = fmt.first_ts([h for h in head if h.endswith(b"\n")])
        if st.first_ts is None and not fmt.has_ts:
            st.first_ts = int(os.stat(path).st_mtime * 1e6)  # no ts stored: its last write
    lines = tail[:keep].split(b"\n")[:-1]
    if start > 0:
        lines = lines[1:]  # the first piece may be a partial line
    n = st.recent.maxlen or 0
    items = list(fmt.items([ln + b"\n" for ln in lines[-max(n, 1) - fmt.extra_lines:]]))
    st.last_ts = _last_ts(fmt, items)
    if n:
        recent = items[-n:]
        if start == 0 and len(recent) < n:
            recent = previous_tail(fmt, st, n - len(recent)) + recent
        st.recent.extend(recent)
    return garbage


def last_ts_on_disk(fmt: formats.Format, st: TopicState) -> int | None:
    """ts of the topic's newest record on disk, for a loaded ``st``: in the current
    segment, else in the newest rotated one (a rotation right before a crash)."""
    if st.last_ts is None and fmt.has_ts:
        st.last_ts = _last_ts(fmt, previous_tail(fmt, st, 1)) or 0  # 0: none
    return st.last_ts


def previous_tail(shard_fmt: formats.Format, st: TopicState, n: int) -> list[bytes]:
    """The last ``n`` items of the newest rotated segment (``shard_fmt``: the shard's
    write format; a segment of another payload kind gives none)."""
    try:
        rotated = segments.rotated_segments(os.listdir(st.path))
    except OSError:
        return []
    if not rotated:
        return []
    last = rotated[-1]
    path = os.path.join(st.path, last.name)
    fmt = formats.of_name(last.name)
    if fmt.payload_only != shard_fmt.payload_only:
        return []  # the format changed: its records are not what +recent.json holds now
    try:
        if last.compressed:
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(max(0, size - TAIL_CHUNK))
                data = f.read()
    except (OSError, EOFError, gzip.BadGzipFile):
        return []
    lines = [ln + b"\n" for ln in data.split(b"\n")[-n - 1 - fmt.extra_lines:-1]]
    return list(fmt.items([ln for ln in lines if fmt.valid_line(ln)]))[-n:]


def _last_ts(fmt: formats.Format, items: list[bytes]) -> int | None:
    """ts of the last of a segment's items (envelope lines), None without one."""
    if not items or not fmt.has_ts:
        return None
    try:
        return decode_record(items[-1]).ts
    except Exception:  # noqa: BLE001 - a valid_line passed it; be safe anyway
        return None
