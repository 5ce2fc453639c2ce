"""The shard lock: one writer per branch, also across hosts sharing a root over NFS.

POSIX record locks (``fcntl.lockf``) are used rather than ``flock`` because NFS
(v4, and v3 with lockd) honours them. The kernel releases the lock when the holder
dies, so a SIGKILLed recorder never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import time

from shardlog.ondisk.segments import LOCK

log = logging.getLogger(__name__)


class LockBusy(Exception):
    pass


class ShardLock:
    def __init__(self, branch_root: str) -> None:
        self.path = os.path.join(branch_root, LOCK)
        self.fd = -1

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                return f.read().strip() or "unknown"
        except OSError:
            return "unknown"

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self.fd = fd
        return True

    def acquire(self, wait: float, poll: float = 0.25) -> None:
        """Take the lock, waiting up to ``wait`` seconds; raise LockBusy after that."""
        deadline = time.monotonic() + wait
        told = False
        while not self.try_acquire():
            if not told:
                log.warning("%s is held by %s; waiting up to %.0fs", self.path, self.holder(), wait)
                told = True
            if time.monotonic() >= deadline:
                raise LockBusy(f"another recorder ({self.holder()}) is writing this branch "
                               f"({self.path}); refusing to interleave")
            time.sleep(poll)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing releases the POSIX lock
            self.fd = -1
