"""A topic's first open in this process: repair its tail, read back its recent records.

A crash mid-write can leave a torn or garbage tail on the current segment: :func:`load`
cuts it back to the last valid record (the bytes cut off go to the quarantine), fills
the recent buffer from the tail (reaching into the newest rotated segment if the
current one holds too few) and notes the newest record's ts. It touches only the state
it is given and the disk, so the preparer may run it in its thread. The checks on lines
and the repair of each format are pure functions of :mod:`shardlog.ondisk.formats`.

A run of lines holding NUL bytes at the end (a crash on a file system that extends a file
before its data reaches it: a hole of gigabytes) is found backwards in blocks of
``SCAN_BLOCK`` without being held, and only its first ``QUARANTINE_MAX`` bytes go to the
quarantine, followed by a line saying how many bytes were cut in all (and logged): the
memory and the quarantine record stay bounded whatever the size of the run.
"""

from __future__ import annotations

import gzip
import logging
import os

from shardlog.ondisk import formats, segments
from shardlog.records import decode_record
from shardlog.writing.topic_state import TopicState

TAIL_CHUNK = 64 * 1024
SCAN_BLOCK = 1024 * 1024
QUARANTINE_MAX = 64 * 1024   # bytes of a cut tail kept for the quarantine; the rest is counted

log = logging.getLogger(__name__)


def nul_run_start(fd: int, size: int) -> int:
    """Where the run of lines holding a NUL byte at the end of ``fd[:size]`` begins (``size``
    if the last line holds none). No record of any write format holds a NUL (JSON and the CSV
    writer escape control characters). Reads backwards in blocks (64 KiB, growing to 1 MiB);
holds one block at a time."""
    run = pos = size
    nul = False  # the line being scanned (from ``run`` back) holds a NUL
    block_size = TAIL_CHUNK  # what a sound segment needs; growing to SCAN_BLOCK in a run
    while pos > 0:
        start = max(0, pos - block_size)
        block_size = min(2 * block_size, SCAN_BLOCK)
        block = os.pread(fd, pos - start, start)
        if len(block) != pos - start:
            return run  # shrunk under us: cut no more than found so far
        k = len(block)
        while True:
            j = block.rfind(b"\n", 0, k)
            nul = nul or b"\0" in block[j + 1:k]
            if j < 0:
                break
            if not nul and start + j + 1 < size:  # (the empty piece after a final newline is no line)
                return run
            run, nul, k = start + j + 1, False, j
        pos = start
    return 0 if nul else run


def _bounded(cut: bytes, fd: int, run: int, size: int) -> bytes:
    """What the quarantine keeps of a cut tail: ``cut`` (the bytes before ``run``) and the
    run of NUL lines ``fd[run:size]``, whole if small, else the first ``QUARANTINE_MAX``
    bytes and a line saying how many were cut in all."""
    total = len(cut) + size - run
    if total <= QUARANTINE_MAX:
        return cut + os.pread(fd, size - run, run)
    head = (cut[:QUARANTINE_MAX] if len(cut) >= QUARANTINE_MAX
            else cut + os.pread(fd, QUARANTINE_MAX - len(cut), run))
    return head + b"\n[shardlog: %d bytes cut in all; the first %d are above]\n" % (total, len(head))


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
        run = nul_run_start(f.fileno(), st.size)
        start, tail, keep = formats.valid_tail(f, run, fmt.valid_line, TAIL_CHUNK)
        keep, suffix = fmt.finish(tail, keep, start == 0)
        f.seek(0)
        head = [f.readline(4096) for _ in range(1 + fmt.extra_lines)]
        if keep < len(tail) or suffix or run < st.size:
            garbage = _bounded(tail[keep:], f.fileno(), run, st.size)
            if run < st.size:
                log.warning("%s: %d bytes of lines holding NUL bytes at the end (from offset %d) cut; "
                            "the quarantine keeps the first %d", path, st.size - run, run,
                            min(QUARANTINE_MAX, st.size - start - keep))
    if garbage is not None:
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
    except Exception:  # a valid_line passed it; be safe anyway
        return None
