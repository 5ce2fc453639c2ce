"""Opening and reading segment files without hanging, crashing or filling memory.

- Regular files only: a FIFO, a directory, a device or a socket named like a segment (or a
  file that cannot be opened: no permission) is skipped with a warning. Files are opened with
  ``O_NONBLOCK`` and checked with ``fstat`` before anything is read, so a FIFO never blocks.
  :class:`Skipped` is a ``FileNotFoundError``: every reader already treats a missing segment
  (removed by retention meanwhile) as one with no records.
- Lines of bounded length: a line holding a NUL byte (never in a record of any write
  format: JSON and the CSV writer escape control characters) or longer than ``MAX_LINE`` is
  skipped with a warning in bounded memory (a sparse segment's gigabytes of NULs).
- A damaged or truncated gzip segment is read up to the damage, with a warning naming it.

Warnings go to this module's logger (``shardlog.reading.files``); the read verbs print them
and exit non-zero (docs/history.md).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import stat
import zlib
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

#: the longest record line read: MQTT's largest payload (256 MB) in base64, and the envelope
MAX_LINE = 384 * 1024 * 1024
#: bytes of a line holding a NUL that a backwards read scans for its start before giving up
MAX_GARBAGE = 16 * 1024 * 1024
CHUNK = 1024 * 1024
GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class Skipped(FileNotFoundError):
    """A file that is not read (the warning is logged): not a regular file, or unreadable."""


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def skip(path: str, reason: str) -> Skipped:
    """Log that ``path`` is left out and why; the exception for the caller to raise."""
    log.warning("%s: %s; skipped", path, reason)
    return Skipped(f"{path}: {reason}")


def open_fd(path: str) -> int:
    """A read-only descriptor of the regular file ``path``. Raises ``FileNotFoundError`` if
    it is missing, :class:`Skipped` (logged) if it is no regular file or cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:  # EACCES, ENXIO (a socket), ELOOP, ...
        raise skip(path, f"cannot be opened ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise skip(path, _kind(mode))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(path: str) -> os.stat_result:
    """``os.stat(path)`` of a regular file; :class:`Skipped` (logged) for anything else."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise skip(path, _kind(st.st_mode))
    return st


def open_file(path: str) -> io.BufferedReader:
    """A buffered binary file of the regular file ``path`` (see :func:`open_fd`)."""
    return os.fdopen(open_fd(path), "rb")


def open_gzip(path: str) -> gzip.GzipFile:
    """A gzip reader of the regular file ``path``; closing it closes the file."""
    f = open_file(path)
    g = gzip.GzipFile(fileobj=f, mode="rb")
    # GzipFile.close closes it (typeshed declares it a FileIO; any file object is closed the same way)
    g.myfileobj = f  # type: ignore[assignment]
    return g


def bounded_lines(read: Callable[[int], bytes], path: str) -> Iterator[bytes]:
    """Complete lines (newline included) of a stream read in chunks. A torn last line (no
    newline) is left out; a line holding a NUL or longer than ``MAX_LINE`` is skipped with
    a warning, its bytes never held; a damaged gzip stream ends the lines with a warning."""
    pending: list[bytes] = []
    plen = 0
    bad = -1       # bytes of the garbage line being skipped; -1: none
    offset = 0     # of the start of the current line
    while True:
        try:
            chunk = read(CHUNK)
        except GZIP_ERRORS as exc:
            log.warning("%s: damaged gzip segment (%s); read up to there", path, exc)
            return
        if not chunk:
            if bad >= 0:
                log.warning("%s: ends in %d bytes at offset %d that hold a NUL byte or are longer than %d "
                            "without a line end; skipped", path, bad, offset, MAX_LINE)
            return  # else what is pending is a torn line (being written)
        parts = chunk.split(b"\n")
        if bad < 0 and b"\0" not in chunk:
            if len(parts) == 1:
                pending.append(chunk)
                plen += len(chunk)
                if plen > MAX_LINE:
                    bad, pending, plen = plen, [], 0
                continue
            first = b"".join(pending) + parts[0] + b"\n" if pending else parts[0] + b"\n"
            yield first
            offset += len(first)
            for p in parts[1:-1]:
                yield p + b"\n"
                offset += len(p) + 1
            last = parts[-1]
            pending, plen = ([last], len(last)) if last else ([], 0)
            continue
        for k, p in enumerate(parts):  # slow path: garbage in this chunk
            end = k < len(parts) - 1
            if bad < 0 and (b"\0" in p or plen + len(p) > MAX_LINE):
                bad, pending, plen = plen, [], 0
            if bad >= 0:
                bad += len(p) + end
            else:
                pending.append(p)
                plen += len(p)
            if not end:
                break
            if bad >= 0:
                log.warning("%s: a line of %d bytes at offset %d holds a NUL byte or is longer than %d; "
                            "skipped", path, bad, offset, MAX_LINE)
                offset += bad
                bad = -1
            else:
                line = b"".join(pending) + b"\n"
                offset += len(line)
                yield line
            pending, plen = [], 0
