"""Replace a small file atomically, cheaply: readers of the name always see a
complete old or new version.

The classic way (write a new temporary file, ``os.replace`` it over the name)
creates an inode per replacement, which measured 0.35-0.4 ms on this project's
test machine and dominated recording. :func:`swap_in` keeps the previous version
as a spare file beside it, rewrites the spare, and exchanges the two names with
``renameat2(RENAME_EXCHANGE)`` (Linux 3.15+, ext4/xfs/btrfs/tmpfs): no inode is
created after the second write. Where the exchange is not available (NFS, other
systems) it falls back to ``os.replace``.

The one cost: a reader that keeps the file open across the *next* replacement
(at least ``recent_interval`` later) may see the spare being rewritten. Web
servers read such a small file at once; keep NGINX's open_file_cache off for it.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_OPEN_FLAGS = os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)


def _load_renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2``, or None where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)
        fn.restype = ctypes.c_int
    except (OSError, AttributeError):  # pragma: no cover - not glibc/Linux
        return None
    return fn


_renameat2 = _load_renameat2()
_exchange_works = _renameat2 is not None


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two names; False if the system cannot (or ``b`` is missing)."""
    global _exchange_works
    if not _exchange_works or _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.ENOENT:
        return False  # nothing to exchange with yet
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        _exchange_works = False  # this file system cannot: replace from now on
        return False
    raise OSError(err, os.strerror(err), b)


def swap_in(path: str, spare: str, data: bytes, versions: set[tuple[int, int]] | None = None) -> None:
    """Make ``path`` hold ``data``; ``spare`` is left holding the previous version.

    With ``versions`` (kept by the caller per file, initially empty), the new version is
    made to differ from every earlier one in its (mtime second, size): see _distinct."""
    try:
        fd = os.open(spare, _OPEN_FLAGS)
    except FileNotFoundError:
        fd = os.open(spare, _OPEN_FLAGS | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
        if versions is not None:
            _distinct(fd, path, data, versions)
    finally:
        os.close(fd)
    if not _exchange(spare, path):
        os.replace(spare, path)


def create_new(path: str, spare: str, data: bytes, versions: set[tuple[int, int]] | None = None) -> None:
    """:func:`swap_in` for a ``path`` that cannot exist yet (its directory was just made): the
    spare created, written and renamed to ``path``, five system calls where swap_in's first
    write makes nine (two failed lookups, a truncate, the exchange that finds nothing). A spare
    already there (the directory was not new after all), or earlier versions in ``versions``
    (a directory made again after an ``rm``: an HTTP client may hold an old ETag), go the
    swap_in way."""
    if versions:
        swap_in(path, spare, data, versions)
        return
    try:
        fd = os.open(spare, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        swap_in(path, spare, data, versions)
        return
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if versions is not None:  # no earlier version: this one's (second, size) is new
            st = os.fstat(fd)
            versions.add((st.st_mtime_ns // 1_000_000_000, st.st_size))
    finally:
        os.close(fd)
    os.replace(spare, path)


def _distinct(fd: int, path: str, data: bytes, versions: set[tuple[int, int]]) -> None:
    """NGINX's ETag is the file's mtime in whole seconds and its size. Two versions written
    in the same second with the same size get the same ETag, so a client revalidating with
    If-None-Match is told 304 and keeps the older one, until the file changes again. Pad the
    new version with spaces before its final newline (the same JSON) until its (second, size)
    is new; ``versions`` keeps those of the current second."""
    if not versions:  # the version a previous process left
        try:
            st = os.stat(path)
            versions.add((st.st_mtime_ns // 1_000_000_000, st.st_size))
        except OSError:
            pass
    pad = 0
    while True:
        st = os.fstat(fd)
        key = (st.st_mtime_ns // 1_000_000_000, st.st_size)
        if key not in versions:
            break
        pad += 1
        os.pwrite(fd, data[:-1] + b" " * pad + data[-1:], 0)
    if any(second < key[0] for second, _ in versions):
        versions.clear()  # an earlier second's versions differ by mtime already
    versions.add(key)


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even an
    empty directory, which a plain rename would silently replace). Atomic where
    ``renameat2(RENAME_NOREPLACE)`` works; elsewhere a check, then ``os.rename``."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)
