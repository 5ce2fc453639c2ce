"""Appending to a segment: all of a batch, or nothing of it.

:func:`append_all` writes a batch at the end of a segment and, when a write fails part-way,
cuts the segment back to where it was. When the disk refuses even that ``ftruncate``, the
partial line stays at the end, and the next append would land after it, in the middle of
the file: the caller then notes the size to cut back to (``TopicState.cut_to``), and the
topic's next open cuts it (:func:`cut_back`) before anything else is written, with the
bytes cut off kept for the quarantine.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: bytes of a cut-off partial batch kept for the quarantine; the rest is counted
QUARANTINE_MAX = 64 * 1024


def append_all(fd: int, data: bytes, before: int, done: int, name: str) -> None:
    """Append ``data[done:]`` at ``fd`` (the file was ``before`` long); on failure cut it back
    to it and raise. Whether that cut failed too: :func:`left_longer`."""
    view = memoryview(data)[done:]
    try:
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        if len(view) < len(data):  # part of it was written: cut it off
            try:
                os.ftruncate(fd, before)
            except OSError as exc2:  # the disk refuses even that: cut at the topic's next open
                log.error("cannot cut %s back after a failed write: %s (cut when it is opened again)",
                          name, exc2)
        raise


def left_longer(fd: int, before: int) -> bool:
    """After a failed :func:`append_all`: is the file still longer than ``before`` (a part of
    the batch left at its end)? True also when the file cannot even be looked at."""
    try:
        return os.fstat(fd).st_size != before
    except OSError:
        return True


def cut_back(fd: int, path: str, size: int) -> tuple[int, bytes]:
    """Cut the file at ``fd`` (write-only; ``path`` to read it) back to ``size`` if it is
    longer: (its size now, what was cut off: at most QUARANTINE_MAX bytes of it, then a line
    saying how many in all). Raises OSError if the disk still refuses."""
    now = os.fstat(fd).st_size
    total = now - size
    if total <= 0:  # (made again since: shorter)
        return now, b""
    rfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        cut = os.pread(rfd, min(total, QUARANTINE_MAX), size)
    finally:
        os.close(rfd)
    os.ftruncate(fd, size)
    if total > len(cut):
        cut += b"\n[shardlog: %d bytes cut in all; the first %d are above]\n" % (total, len(cut))
    return size, cut
