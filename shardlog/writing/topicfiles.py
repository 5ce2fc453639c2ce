"""One topic's files on disk: the system calls of the write path.

:class:`TopicFiles` opens, appends to, rotates, prunes and repairs the segments of a
topic directory and rewrites its ``+recent.json``; it keeps the open descriptors in
a bounded LRU. It decides nothing about *what* to write or acknowledge (that is
:class:`shardlog.writing.store.Store`), and the decisions it follows are pure functions
of :mod:`shardlog.ondisk.segments` (rotation, retention) and :mod:`shardlog.ondisk.formats`.
A topic's first open (tail repair, recent records) is shardlog/writing/topic_load.py.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import typing

from shardlog.config.schema import Shard
from shardlog.counters import Counters
from shardlog.ondisk import formats, segments
from shardlog.ondisk.segments import RECENT, RECENT_TMP, TOPIC_FILE
from shardlog.topics import TopicError, is_hashed_name, safe_join
from shardlog.writing import retention, topic_load
from shardlog.writing.appending import append_all, cut_back, left_longer
from shardlog.writing.atomic import create_new, swap_in
from shardlog.writing.compressor import Compressor
from shardlog.writing.topic_state import TopicState

log = logging.getLogger(__name__)

#: errors after which a write is retried later: the disk may come back.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                       errno.EINTR, errno.ESTALE})
OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
#: directories remembered as checked (ensure_dir); past it the set starts again
MAX_SAFE_DIRS = 100_000
#: added to every open of a segment: no symlink followed, no FIFO waited for
_SAFE_OPEN = os.O_NOFOLLOW | os.O_NONBLOCK
PWRITE_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)  # json: positioned writes


class TopicFiles:
    """The files of every topic of one shard, and the LRU of their descriptors."""

    def __init__(self, shard: Shard, root_real: str, counters: Counters,
                 compressor: Compressor | None,
                 on_torn: typing.Callable[[TopicState, bytes], None]) -> None:
        self.shard = shard
        self.root = root_real
        self.counters = counters
        self.compressor = compressor
        self.on_torn = on_torn            # a torn tail was cut off: the store quarantines it
        self.open: dict[TopicState, None] = {}   # LRU of states holding an fd, oldest first
        self.fsync = shard.fsync != "never"
        self.max_bytes = shard.rotate.max_bytes
        self.max_age = shard.rotate.max_age
        self.dirs_to_sync: set[str] = set()
        #: relpaths of directories checked (or made) in this process: inside the root, no
        #: symlink. A new topic below one costs one mkdir (ensure_dir)
        self.safe_dirs: set[str] = set()
        # the write format (shardlog/ondisk/formats.py); jsonl keeps the plain append path below
        self.fmt = fmt = formats.get(shard.format, shard.payload_only)
        self.current = fmt.current
        self.flags = OPEN_FLAGS if fmt.append else PWRITE_FLAGS
        self.plain = fmt is formats.JSONL

    # -- writing ------------------------------------------------------------------

    def write(self, st: TopicState, now_us: int) -> None:
        """Append ``st.lines`` (rotating first or between lines as the limits say) and
        empty the buffer. Raises OSError or TopicError with the buffer untouched."""
        if st.fd < 0:
            self.open_fd(st)
        lines = st.lines
        data = b"".join(lines) if len(lines) > 1 else lines[0]
        size = st.size
        n = len(data)
        if size and segments.should_rotate(size, n, st.first_ts, now_us, self.max_bytes, self.max_age):
            self.rotate(st, now_us)
            size = st.size
        if self.max_bytes is None or size + n <= self.max_bytes:
            if self.plain:  # jsonl: one append, without append_rest's bookkeeping
                try:
                    done = os.write(st.fd, data)
                except OSError:
                    done = 0
                if done == n:  # nearly always
                    st.size = size + n
                else:  # a short or failed write: go on (or fail and cut back) the careful way
                    self.append_rest(st, data, size, done)
            else:
                self.emit(st, lines, data)
        else:  # the batch itself crosses max_bytes: write line by line, rotating between
            chunk: list[bytes] = []
            chunk_len = 0
            for line in lines:
                if chunk_len and st.size + chunk_len + len(line) > self.max_bytes:
                    self.emit(st, chunk, b"".join(chunk))
                    self.rotate(st, now_us)
                    chunk, chunk_len = [], 0
                elif not chunk_len and segments.should_rotate(st.size, len(line), None, now_us,
                                                               self.max_bytes, None):
                    self.rotate(st, now_us)
                chunk.append(line)
                chunk_len += len(line)
            self.emit(st, chunk, b"".join(chunk))
        self.account(st, lines, now_us, len(data))
        st.lines, st.mids, st.held, st.dirty = [], [], 0, False

    def account(self, st: TopicState, lines: list[bytes], now_us: int, n: int = -1) -> None:
        """``lines`` (``n`` bytes) were appended: the counters and the recent records."""
        if st.first_ts is None:
            st.first_ts = now_us
        self.counters.messages += len(lines)
        self.counters.bytes += n if n >= 0 else sum(map(len, lines))
        if st.recent.maxlen:
            st.recent.extend(lines)
            st.recent_dirty = True

    def emit(self, st: TopicState, lines: list[bytes], data: bytes) -> None:
        """Write ``lines`` (``data``: them joined): jsonl ``data``; another format its bytes for
        them at the end of the segment (json: over its ``]``), put back as it was on failure."""
        if self.plain:
            self.append_rest(st, data, st.size, 0)
            return
        fmt = self.fmt
        before = st.size
        offset = before - len(fmt.closer) if before else 0
        out = fmt.pack(lines, before)
        view = memoryview(out)
        pos = offset
        try:
            while view:
                n = os.pwrite(st.fd, view, pos)
                view = view[n:]
                pos += n
        except OSError:
            if pos > offset:  # part of it was written: put the segment back as it was
                try:
                    os.ftruncate(st.fd, offset)
                    if before and fmt.closer:
                        os.pwrite(st.fd, fmt.closer, offset)
                except OSError as exc2:  # the disk refuses even that
                    log.error("cannot put %s back after a failed write: %s", st.relpath, exc2)
                    st.loaded = False  # repaired when it is opened again
            raise
        st.size = offset + len(out)

    def append_rest(self, st: TopicState, data: bytes, before: int, done: int) -> None:
        try:
            append_all(st.fd, data, before, done, st.relpath)
        except OSError:
            if left_longer(st.fd, before):  # not cut back: the next open cuts it (appending.py)
                st.cut_to = before
            raise
        st.size = before + len(data)

    # -- opening ------------------------------------------------------------------

    def open_fd(self, st: TopicState) -> None:
        if len(self.open) >= self.shard.max_open_files:
            self.evict(max(1, self.shard.max_open_files // 8))
        # the first open in this process: the directory made or checked (nothing on disk
        # may lead out); later ones open the file, and make the directory only if it went
        created = self.ensure_dir(st) if not st.loaded else False
        path = os.path.join(st.path, self.current)
        try:
            fd = self.open_segment(path)
        except FileNotFoundError:  # the directory went (an rm from outside): made again
            st.size_known = False
            created = self.ensure_dir(st, checked=True)
            fd = self.open_segment(path)
        if not (st.size_known and self.plain):  # else: the size it had when evicted (one writer)
            st.size = self.regular_size(fd)
        if st.cut_to >= 0:  # a failed write the disk would not let us cut back (appending.py)
            self.cut_partial(st, fd, path)
        st.fd = fd
        st.size_known = False
        if not created and not st.loaded and st.size == 0:
            self.retire_other_currents(st)
        self.open[st] = None
        self.counters.topics_open = len(self.open)
        if created:  # no +recent.json in it yet: its first is created, not swapped in
            st.recent_new = True
            if self.fsync:
                self.dirs_to_sync.add(st.path)
        if not st.loaded:
            torn = self.load(st, path)
            st.loaded = True
            if torn is not None:
                self.on_torn(st, torn)

    def open_segment(self, path: str, create: bool = True) -> int:
        """The current segment's descriptor (created if missing, unless ``create`` is False:
        then FileNotFoundError). A TopicError if the path cannot hold it: a symlink (it could
        lead out of the root), a FIFO without a reader (never a hang), a directory."""
        flags = (self.flags if create else self.flags & ~os.O_CREAT) | _SAFE_OPEN
        try:
            return os.open(path, flags, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENXIO):
                reason = "not a regular file" if exc.errno in (errno.ELOOP, errno.ENXIO) else exc.strerror
                raise TopicError(f"cannot open {self.current}: {reason}") from None
            raise

    def cut_partial(self, st: TopicState, fd: int, path: str) -> None:
        """Cut the current segment back to ``st.cut_to`` (``fd`` closed if the disk still refuses)."""
        try:
            st.size, cut = cut_back(fd, path, st.cut_to)
        except OSError:
            os.close(fd)
            raise
        st.cut_to = -1
        if cut:
            self.on_torn(st, cut)

    def regular_size(self, fd: int) -> int:
        """The size of the segment open at ``fd``; a TopicError (``fd`` closed) if it is
        not a regular file (a FIFO with a reader, a device)."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise TopicError(f"cannot open {self.current}: not a regular file")
        return info.st_size

    def ensure_dir(self, st: TopicState, checked: bool = False) -> bool:
        """Make ``st``'s directory, or check the one there (a first open); True if made.

        Below a parent already checked in this process (``safe_dirs``) this is one
        ``mkdir`` (a directory it makes is no symlink), or one ``lstat`` if the directory
        exists; the first topic below a parent (or ``checked``) gets the whole check of
        :func:`shardlog.topics.safe_join` (every level resolved inside the root)."""
        parent, _, name = st.relpath.rpartition("/")
        if checked or (parent and parent not in self.safe_dirs) or is_hashed_name(name):
            return self._ensure_dir_checked(st, parent)
        try:
            os.mkdir(st.path)
            return True
        except FileExistsError:
            if stat.S_ISLNK(os.lstat(st.path).st_mode):
                safe_join(self.root, st.relpath)  # resolved: raises if it leads out
            return False
        except (FileNotFoundError, NotADirectoryError):  # the parent went or changed
            self.safe_dirs.discard(parent)
            return self._ensure_dir_checked(st, parent)
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.ELOOP):
                raise TopicError(f"cannot create the directory: {exc.strerror}") from None
            raise

    def _ensure_dir_checked(self, st: TopicState, parent: str) -> bool:
        safe_join(self.root, st.relpath)
        created = not os.path.isdir(st.path)
        if created:
            self.make_dirs(st)
        if len(self.safe_dirs) >= MAX_SAFE_DIRS:
            self.safe_dirs.clear()
        while parent:  # every level above st's directory is checked now
            self.safe_dirs.add(parent)
            parent = parent.rpartition("/")[0]
        return created

    def make_dirs(self, st: TopicState) -> None:
        try:
            os.makedirs(st.path, exist_ok=True)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP):
                raise TopicError(f"cannot create the directory: {exc.strerror}") from None
            raise
        # the last guard: nothing may have swapped a level for a symlink meanwhile
        safe_join(self.root, st.relpath)
        levels = st.relpath.split("/")
        if any(is_hashed_name(level) for level in levels):
            topic_levels = st.topic.split("/")
            for depth, level in enumerate(levels, 1):
                if is_hashed_name(level):
                    target = os.path.join(self.root, *levels[:depth], TOPIC_FILE)
                    with open(target, "w", encoding="utf-8") as f:
                        f.write("/".join(topic_levels[:depth]))

    def retire_other_currents(self, st: TopicState) -> None:
        """The shard's format changed: rotate a current segment of another format away
        (renamed to the next number, with its own extension), so only one grows."""
        for name in formats.CURRENTS:
            if name != self.current and os.path.exists(os.path.join(st.path, name)):
                rotated = segments.rotated_segments(os.listdir(st.path))
                seq = rotated[-1].seq + 1 if rotated else 1
                new = segments.segment_name(seq, key=formats.of_name(name).key)
                os.rename(os.path.join(st.path, name), os.path.join(st.path, new))
                log.info("%s: format is now %s: %s rotated to %s", st.relpath, self.fmt.key, name, new)
                if self.compressor is not None:
                    self.compressor.submit(os.path.join(st.path, new))

    def evict(self, n: int) -> None:
        """Close the ``n`` least recently used; their sizes stay known (this process is the
        only writer of its branch), so a jsonl reopen is one ``open``."""
        for st in list(self.open)[:n]:
            self.close_fd(st)
            st.size_known = True

    def close_fd(self, st: TopicState) -> None:
        if st.fd >= 0:
            try:
                os.close(st.fd)
            except OSError:  # pragma: no cover
                pass
            st.fd = -1
        self.open.pop(st, None)
        self.counters.topics_open = len(self.open)

    def touch(self, st: TopicState) -> None:
        """``st`` was just written: most recently used."""
        self.open.pop(st, None)
        if st.fd >= 0:
            self.open[st] = None

    # -- loading (first open in this process: shardlog/writing/topic_load.py) -----------

    def load(self, st: TopicState, path: str) -> bytes | None:
        """Repair the tail, fill the recent buffer; the bytes cut off, if any (the
        preparer calls it in its thread)."""
        return topic_load.load(self.fmt, st, path)

    def last_ts_on_disk(self, st: TopicState) -> int | None:
        return topic_load.last_ts_on_disk(self.fmt, st)

    # -- rotation and retention --------------------------------------------------------

    def rotate(self, st: TopicState, now_us: int) -> None:
        names = os.listdir(st.path)
        rotated = segments.rotated_segments(names)
        seq = rotated[-1].seq + 1 if rotated else 1
        name = segments.segment_name(seq, key=self.fmt.key)
        if self.fsync:
            os.fsync(st.fd)
        os.rename(os.path.join(st.path, self.current), os.path.join(st.path, name))
        os.close(st.fd)
        st.fd = os.open(os.path.join(st.path, self.current), self.flags, 0o644)
        st.size = 0
        st.first_ts = None
        self.counters.rotations += 1
        if self.fsync:
            self.dirs_to_sync.add(st.path)
        log.debug("%s: rotated to %s", st.relpath, name)
        if self.compressor is not None:
            for seg in rotated:
                if not seg.compressed:  # left over by a crash or a stop
                    self.compressor.submit(os.path.join(st.path, seg.name))
            self.compressor.submit(os.path.join(st.path, name))
        retention.apply(st.path, rotated + [segments.Segment(seq, name, False)], self.shard.retention,
                        self.counters)

    # -- +recent.json and syncing ---------------------------------------------------------

    def recent_body(self, st: TopicState) -> bytes:
        return b"[" + b",".join([line[:-1] for line in st.recent.snapshot()]) + b"]\n"

    def write_recent(self, st: TopicState) -> None:
        """Replace ``st``'s +recent.json with its recent records (raises OSError)."""
        if st.recent_versions is None:
            st.recent_versions = set()
        write, st.recent_new = create_new if st.recent_new else swap_in, False
        write(os.path.join(st.path, RECENT), os.path.join(st.path, RECENT_TMP), self.recent_body(st),
              st.recent_versions)

    def sync(self, written: list[TopicState]) -> None:
        """fdatasync the written topics and fsync the directories created or renamed in."""
        try:
            for st in written:
                if st.fd >= 0:
                    os.fdatasync(st.fd)
            for d in self.dirs_to_sync:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self.dirs_to_sync.clear()
        except OSError as exc:
            # data may not be on disk: keep the whole batch unacknowledged by failing loudly
            raise OSError(exc.errno, f"fsync failed: {exc.strerror}") from exc
