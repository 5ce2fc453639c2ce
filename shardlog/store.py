"""Topic files on disk: buffered appends, rotation, retention, +recent.json, repair.

The store never talks to the network. The recorder hands it record lines per topic
(:meth:`Store.add`), then calls :meth:`Store.flush`, which writes every buffered
line with one ``write`` per topic and tells which lines could not be written (so
their messages are not acknowledged). File descriptors are opened lazily and kept
in a bounded LRU, so any number of topics fits in ``max_open_files`` descriptors.
With :meth:`Store.start_preparer`, a topic's first open (mkdir, file creation,
tail repair, the spare of +recent.json) happens in a :class:`Preparer` thread and
:meth:`Store.flush` holds that topic's lines until it is ready: a waiting topic costs a
flush nothing until new records arrive for it or the preparer hands it back.

Errors: a topic that cannot be stored (its path is too long, a file stands where
a directory should be, ...) has its records quarantined with the reason. A disk
that is full, read-only or refusing permission raises nothing: the lines stay
buffered, the store reports itself degraded, and the next flush tries again.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import gzip
import logging
import os
import queue
import shutil
import threading
import time
import typing

from shardlog import formats, segments
from shardlog.atomic import swap_in
from shardlog.config import Shard
from shardlog.records import decode_record, encode_quarantine
from shardlog.segments import QUARANTINE, RECENT, RECENT_TMP, TOPIC_FILE
from shardlog.stats import Counters
from shardlog.topics import TopicError, is_hashed_name, safe_join, topic_to_relpath

log = logging.getLogger(__name__)

#: errors after which a write is retried later: the disk may come back.
TRANSIENT = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                       errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN,
                       errno.EINTR, errno.ESTALE})
_TAIL_CHUNK = 64 * 1024
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_PWRITE_FLAGS = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)  # json: positioned writes


class TopicState:
    """What the store keeps for one topic. ``lines``/``mids`` are the buffer."""

    __slots__ = ("topic", "relpath", "path", "lines", "mids", "held", "dirty", "fd", "size",
                 "first_ts", "recent", "recent_dirty", "recent_at", "recent_versions", "loaded", "prep")

    def __init__(self, topic: str, relpath: str, path: str, recent: int) -> None:
        self.topic = topic
        self.relpath = relpath
        self.path = path              # the topic's directory
        self.lines: list[bytes] = []
        self.mids: list[int] = []     # QoS 1 message ids of the buffered lines
        #: how many of ``mids`` (the oldest) an earlier flush returned as held: the store
        #: reports them in ``Store.released`` once they are written
        self.held = 0
        self.dirty = False            # in Store.dirty: the next flush looks at it
        self.fd = -1
        self.size = 0                 # bytes in the current segment
        self.first_ts: int | None = None  # ts of the current segment's first record
        self.recent: collections.deque[bytes] = collections.deque(maxlen=recent)
        self.recent_dirty = False
        self.recent_at = -1e18        # monotonic time of the last +recent.json write
        self.recent_versions: set[tuple[int, int]] = set()  # (mtime second, size) this second
        self.loaded = False           # tail repaired and recent loaded (once per state)
        #: background preparation (Preparer): None, _QUEUED, or its Prepared result
        self.prep: object = None


class Store:
    def __init__(self, shard: Shard, root_real: str, branch_root: str, counters: Counters,
                 compressor: Compressor | None = None) -> None:
        self.shard = shard
        self.root = root_real
        self.branch_root = branch_root
        self.counters = counters
        self.dirty: list[TopicState] = []
        #: topics the preparer has (their lines wait): state -> lines counted in waiting_lines.
        #: A flush does not look at them until they get new records (add() puts them in
        #: dirty again) or the preparer hands them back through ``_ready``.
        self.waiting: dict[TopicState, int] = {}
        self.waiting_lines = 0
        self._ready: collections.deque[TopicState] = collections.deque()  # filled by Preparer threads
        #: message ids held by earlier flushes and written (or quarantined) since: acknowledge
        #: them too, then empty the list (flush's result lists only the ids it newly holds)
        self.released: list[int] = []
        self.open: dict[TopicState, None] = {}   # LRU of states holding an fd, oldest first
        self.stale_recent: set[TopicState] = set()
        self.quarantine_lines: list[bytes] = []
        self.quarantine_mids: list[int] = []
        self.quarantine_held: list[int] = []  # quarantine ids an earlier flush returned as held
        self.compressor = compressor
        self.fsync = shard.fsync != "never"
        self.max_bytes = shard.rotate.max_bytes
        self.max_age = shard.rotate.max_age
        self.degraded_reason: str | None = None
        self._dirs_to_sync: set[str] = set()
        # the write format (formats.py); jsonl keeps the plain append path below
        self.fmt = fmt = formats.get(shard.format, shard.payload_only)
        self.current = fmt.current
        self._flags = _OPEN_FLAGS if fmt.append else _PWRITE_FLAGS
        self._plain = fmt is formats.JSONL
        if fmt is not formats.JSONL:
            self._emit = self._emit_format  # type: ignore[method-assign]
        if fmt.payload_only:
            self.add = self._add_payload  # type: ignore[method-assign]
        self.preparer: Preparer | None = None

    def start_preparer(self, threads: int = 1) -> None:
        """From now on, a topic's first open in this process (directory creation, file
        creation, tail repair: up to milliseconds) happens in background threads, and
        its records wait in memory, unacknowledged, until a later flush writes them."""
        if self.preparer is None:
            self.preparer = Preparer(self, threads)

    # -- topics -------------------------------------------------------------------

    def new_state(self, topic: str) -> TopicState:
        """State for a topic; raises TopicError if it cannot be stored."""
        relpath = topic_to_relpath(topic)
        # resolved on disk (symlinks) before its first open: _check_path, off the hot path
        path = safe_join(self.root, relpath, resolve=False)
        if len(os.fsencode(path)) + 32 > 4095:
            raise TopicError("path too long for the file system")
        return TopicState(topic, relpath, path, self.shard.recent)

    def add(self, st: TopicState, line: bytes, mid: int) -> None:
        st.lines.append(line)
        if mid:
            st.mids.append(mid)
        if not st.dirty:
            st.dirty = True
            self.dirty.append(st)

    def _add_payload(self, st: TopicState, line: bytes, mid: int) -> None:
        """``add`` of a payload-only shard: the JSON payload alone; a payload that is
        not JSON goes to the quarantine file (never silently dropped)."""
        item = self.fmt.item(line)
        if item is not None:
            Store.add(self, st, item, mid)
            return
        try:
            rec = decode_record(line)
            ts, qos, retain, payload = rec.ts, rec.qos, rec.retain, rec.payload
        except Exception:  # noqa: BLE001 - keep the line itself
            ts, qos, retain, payload = time.time_ns() // 1000, 0, False, line
        self.quarantine(ts, "payload is not JSON (payload_only shard)", st.topic.encode(), qos,
                        retain, payload, mid)

    def quarantine(self, ts_us: int, reason: str, topic: bytes, qos: int, retain: bool,
                   payload: bytes, mid: int) -> None:
        self.quarantine_lines.append(
            encode_quarantine(ts_us, self.shard.name, reason, topic, qos, retain, payload))
        if mid:
            self.quarantine_mids.append(mid)

    def forget_mids(self) -> None:
        """The connection is gone: its message ids mean nothing any more. The
        buffered lines stay and are written; the broker redelivers the messages."""
        for st in self.dirty:
            st.mids, st.held = [], 0
        for st in self.waiting:
            st.mids, st.held = [], 0
        self.quarantine_mids, self.quarantine_held, self.released = [], [], []

    def pending_records(self) -> int:
        """Records buffered: those waiting for the preparer are counted as they wait."""
        return (self.waiting_lines + sum(len(st.lines) for st in self.dirty)
                + len(self.quarantine_lines))

    # -- flushing -----------------------------------------------------------------

    def flush(self, now_us: int, now_mono: float, wait: bool = False) -> set[int]:
        """Write every buffered line. Returns the message ids added since the last flush
        that could NOT be written (they stay buffered; do not acknowledge them): those
        the disk refused, and those of topics the preparer has not prepared yet (unless
        ``wait``). Ids returned by an earlier flush are the store's from then on: once
        written they are listed in ``self.released`` (acknowledge them then, before the
        newer ids; in the order they arrived within a topic, topics in the order the
        preparer finished them).

        Cost: the topics with new records, and those the preparer handed back; topics
        that only wait are not looked at."""
        held: set[int] = set()
        released = self.released  # the caller empties it (kept if a flush raised before)
        preparer = self.preparer
        if wait and preparer is not None:
            preparer.wait_idle()
        ready = self._ready
        while ready:  # prepared: back to dirty (a stale entry, already handled, is skipped)
            st = ready.popleft()
            n = self.waiting.pop(st, None)
            if n is not None:
                self.waiting_lines -= n
                if not st.dirty:
                    st.dirty = True
                    self.dirty.append(st)
        dirty, self.dirty = self.dirty, []
        problem: str | None = None
        written: list[TopicState] = []
        for st in dirty:
            if (preparer is not None and (st.prep is not None or (not st.loaded and st.fd < 0))
                    and self._waits(st, preparer, wait)):
                # it waits: out of dirty until add() or the preparer brings it back
                st.dirty = False
                if len(st.mids) > st.held:
                    held.update(st.mids[st.held:])
                    st.held = len(st.mids)
                n = len(st.lines)
                self.waiting_lines += n - self.waiting.get(st, 0)
                self.waiting[st] = n
                continue
            try:
                n_held, mids = st.held, st.mids
                self._write(st, now_us)
            except TopicError as exc:
                self._quarantine_state(st, now_us, str(exc))
            except OSError as exc:
                if exc.errno in TRANSIENT:
                    problem = problem or f"{st.relpath}: {exc.strerror or exc}"
                    if len(st.mids) > st.held:
                        held.update(st.mids[st.held:])
                        st.held = len(st.mids)
                    self.dirty.append(st)
                    self._close_fd(st)
                else:
                    self._quarantine_state(st, now_us, f"cannot write: {exc.strerror or exc}")
            else:
                if n_held:
                    released.extend(mids[:n_held])
                written.append(st)
        if self.quarantine_lines:
            try:
                q_held = self.quarantine_held
                self._write_quarantine()
            except OSError as exc:
                problem = problem or f"{QUARANTINE}: {exc.strerror or exc}"
                held.update(self.quarantine_mids)
                self.quarantine_held.extend(self.quarantine_mids)
                self.quarantine_mids = []
            else:
                released.extend(q_held)
        if self.fsync:
            problem = self._sync(written) or problem
        for st in written:
            self._after_write(st, now_mono)
        self._set_degraded(problem)
        return held

    def _waits(self, st: TopicState, preparer: Preparer, wait: bool) -> bool:
        """Must this never-opened topic wait for the preparer? Submits it if new;
        applies a finished preparation (then the caller writes it)."""
        prep = st.prep
        if prep is None:
            if wait:
                return False  # prepared here, synchronously
            st.prep = _QUEUED
            preparer.submit(st)
            return True
        if prep is _QUEUED:
            return True
        st.prep = None
        n = self.waiting.pop(st, None)  # handed back before its _ready entry was drained
        if n is not None:
            self.waiting_lines -= n
        assert isinstance(prep, Prepared)
        if prep.created and self.fsync:
            self._dirs_to_sync.add(st.path)
        if prep.torn is not None:
            self._quarantine_torn(st, prep.torn)
        # a failed preparation (st.loaded still False): _write retries it here, and
        # reports its error as any first open does
        return False

    def _write(self, st: TopicState, now_us: int) -> None:
        if st.fd < 0:
            self._open_fd(st)
        lines = st.lines
        data = b"".join(lines) if len(lines) > 1 else lines[0]
        size = st.size
        n = len(data)
        if size and segments.should_rotate(size, n, st.first_ts, now_us, self.max_bytes, self.max_age):
            self._rotate(st, now_us)
            size = st.size
        if self.max_bytes is None or size + n <= self.max_bytes:
            if self._plain:  # jsonl: one append, without _append's bookkeeping
                try:
                    done = os.write(st.fd, data)
                except OSError:
                    done = 0
                if done == n:  # nearly always
                    st.size = size + n
                else:  # a short or failed write: go on (or fail and cut back) the careful way
                    self._append_rest(st, data, size, done)
            else:
                self._emit(st, lines, data)
        else:  # the batch itself crosses max_bytes: write line by line, rotating between
            chunk: list[bytes] = []
            chunk_len = 0
            for line in lines:
                if chunk_len and st.size + chunk_len + len(line) > self.max_bytes:
                    self._emit(st, chunk, b"".join(chunk))
                    self._rotate(st, now_us)
                    chunk, chunk_len = [], 0
                elif not chunk_len and segments.should_rotate(st.size, len(line), None, now_us,
                                                               self.max_bytes, None):
                    self._rotate(st, now_us)
                chunk.append(line)
                chunk_len += len(line)
            self._emit(st, chunk, b"".join(chunk))
        if st.first_ts is None:
            st.first_ts = now_us
        c = self.counters
        c.messages += len(lines)
        c.bytes += len(data)
        if st.recent.maxlen:
            st.recent.extend(lines)
            st.recent_dirty = True
        st.lines = []
        st.mids = []
        st.held = 0
        st.dirty = False

    def _emit(self, st: TopicState, lines: list[bytes], data: bytes) -> None:
        """Write buffered ``lines`` (``data``: them joined). jsonl: ``data`` itself."""
        self._append(st, data)

    def _emit_format(self, st: TopicState, lines: list[bytes], data: bytes) -> None:
        """Another format: its bytes for ``lines``, written at the end of the segment (json:
        over its closing bracket). On failure the segment is put back as it was."""
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

    def _append(self, st: TopicState, data: bytes) -> None:
        """Append whole lines; on failure cut the file back so no partial line stays."""
        self._append_rest(st, data, st.size, 0)

    def _append_rest(self, st: TopicState, data: bytes, before: int, done: int) -> None:
        """Append ``data[done:]`` (the first ``done`` bytes are in); on failure cut the
        file back to ``before``, so no partial line stays."""
        try:
            view = memoryview(data)[done:]
            while view:
                n = os.write(st.fd, view)
                view = view[n:]
        except OSError:
            if len(view) < len(data):  # part of it was written: cut it off
                try:
                    os.ftruncate(st.fd, before)
                except OSError as exc2:  # the disk refuses even that: cut when reopened
                    log.error("cannot cut %s back after a failed write: %s", st.relpath, exc2)
            raise
        st.size = before + len(data)

    def _open_fd(self, st: TopicState) -> None:
        if len(self.open) >= self.shard.max_open_files:
            self._evict_fds(max(1, self.shard.max_open_files // 8))
        if not st.loaded:  # the first open in this process: nothing on disk may lead out
            safe_join(self.root, st.relpath)
        created = not os.path.isdir(st.path)
        if created:
            self._make_dirs(st)
        path = os.path.join(st.path, self.current)
        try:
            fd = os.open(path, self._flags, 0o644)
        except OSError as exc:
            if exc.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP):
                raise TopicError(f"cannot open {self.current}: {exc.strerror}") from None
            raise
        st.fd = fd
        st.size = os.fstat(fd).st_size
        if not created and not st.loaded and st.size == 0:
            self._retire_other_currents(st)
        self.open[st] = None
        self.counters.topics_open = len(self.open)
        if created and self.fsync:
            self._dirs_to_sync.add(st.path)
        if not st.loaded:
            torn = self._load(st, path)
            st.loaded = True
            if torn is not None:
                self._quarantine_torn(st, torn)

    def _make_dirs(self, st: TopicState) -> None:
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

    def _retire_other_currents(self, st: TopicState) -> None:
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

    def _quarantine_torn(self, st: TopicState, garbage: bytes) -> None:
        self.counters.repaired += 1
        log.warning("%s: cut %d bytes of torn or invalid tail back to the last valid record "
                    "(kept in %s)", st.relpath, len(garbage), QUARANTINE)
        self.quarantine(time.time_ns() // 1000, "torn tail of " + st.relpath,
                        st.topic.encode(), 0, False, garbage, 0)

    def _load(self, st: TopicState, path: str) -> bytes | None:
        """First open of a topic in this process: cut a torn or garbage tail back to
        the last valid record, then fill the recent buffer from the tail. Returns the
        bytes cut off (for the quarantine), if any. Touches only ``st`` and the disk,
        so the preparer may run it in its thread."""
        if st.size == 0:
            return None
        fmt = self.fmt
        garbage = None
        with open(path, "rb") as f:
            start, tail, keep = formats.valid_tail(f, st.size, fmt.valid_line, _TAIL_CHUNK)
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
        n = st.recent.maxlen or 0
        if n:
            lines = tail[:keep].split(b"\n")[:-1]
            if start > 0:
                lines = lines[1:]  # the first piece may be a partial line
            recent = list(fmt.items([ln + b"\n" for ln in lines[-n - fmt.extra_lines:]]))[-n:]
            if start == 0 and len(recent) < n:
                recent = self._previous_tail(st, n - len(recent)) + recent
            st.recent.extend(recent)
        return garbage

    def _previous_tail(self, st: TopicState, n: int) -> list[bytes]:
        try:
            rotated = segments.rotated_segments(os.listdir(st.path))
        except OSError:
            return []
        if not rotated:
            return []
        last = rotated[-1]
        path = os.path.join(st.path, last.name)
        fmt = formats.of_name(last.name)
        if fmt.payload_only != self.fmt.payload_only:
            return []  # the format changed: its records are not what +recent.json holds now
        try:
            if last.compressed:
                with gzip.open(path, "rb") as f:
                    data = f.read()
            else:
                with open(path, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    f.seek(max(0, size - _TAIL_CHUNK))
                    data = f.read()
        except (OSError, EOFError, gzip.BadGzipFile):
            return []
        lines = [ln + b"\n" for ln in data.split(b"\n")[-n - 1 - fmt.extra_lines:-1]]
        return list(fmt.items([ln for ln in lines if fmt.valid_line(ln)]))[-n:]

    def _rotate(self, st: TopicState, now_us: int) -> None:
        names = os.listdir(st.path)
        rotated = segments.rotated_segments(names)
        seq = rotated[-1].seq + 1 if rotated else 1
        name = segments.segment_name(seq, key=self.fmt.key)
        if self.fsync:
            os.fsync(st.fd)
        os.rename(os.path.join(st.path, self.current), os.path.join(st.path, name))
        os.close(st.fd)
        st.fd = os.open(os.path.join(st.path, self.current), self._flags, 0o644)
        st.size = 0
        st.first_ts = None
        self.counters.rotations += 1
        if self.fsync:
            self._dirs_to_sync.add(st.path)
        log.debug("%s: rotated to %s", st.relpath, name)
        if self.compressor is not None:
            for seg in rotated:
                if not seg.compressed:  # left over by a crash or a stop
                    self.compressor.submit(os.path.join(st.path, seg.name))
            self.compressor.submit(os.path.join(st.path, name))
        self._apply_retention(st, rotated + [segments.Segment(seq, name, False)])

    def _apply_retention(self, st: TopicState, rotated: list[segments.Segment]) -> None:
        r = self.shard.retention
        if r.max_segments is None and r.max_age is None:
            return
        infos = []
        names: dict[int, tuple[str, str]] = {}
        for seg in rotated:
            plain = seg.name[:-3] if seg.compressed else seg.name
            names[seg.seq] = (plain, plain + ".gz")
            # the compressor may turn name into name.gz at any moment: look for both
            for name in names[seg.seq]:
                try:
                    infos.append((seg.seq, os.stat(os.path.join(st.path, name)).st_mtime))
                    break
                except FileNotFoundError:
                    continue
        for seq in segments.segments_to_delete(infos, time.time(), r.max_segments, r.max_age):
            for name in names[seq]:
                try:
                    os.unlink(os.path.join(st.path, name))
                    self.counters.deleted_segments += 1
                except FileNotFoundError:
                    pass

    def _quarantine_state(self, st: TopicState, now_us: int, reason: str) -> None:
        log.warning("%s: %s; %d record(s) quarantined", st.relpath, reason, len(st.lines))
        for line in st.lines:
            self.quarantine_lines.append(
                encode_quarantine(now_us, self.shard.name, reason, st.topic.encode(), 0, False, line))
        self.quarantine_held.extend(st.mids[:st.held])  # ids the recorder no longer has
        self.quarantine_mids.extend(st.mids[st.held:])
        st.lines, st.mids, st.held, st.dirty = [], [], 0, False
        self._close_fd(st)  # the quarantine file is written at the end of flush

    def _write_quarantine(self) -> None:
        if not self.quarantine_lines:
            return
        os.makedirs(self.branch_root, exist_ok=True)
        fd = os.open(os.path.join(self.branch_root, QUARANTINE), _OPEN_FLAGS, 0o644)
        try:
            before = os.fstat(fd).st_size
            data = b"".join(self.quarantine_lines)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
            except OSError:
                os.ftruncate(fd, before)
                raise
        finally:
            os.close(fd)
        self.counters.quarantined += len(self.quarantine_lines)
        self.quarantine_lines, self.quarantine_mids, self.quarantine_held = [], [], []

    def _sync(self, written: list[TopicState]) -> str | None:
        try:
            for st in written:
                if st.fd >= 0:
                    os.fdatasync(st.fd)
            for d in self._dirs_to_sync:
                dfd = os.open(d, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            self._dirs_to_sync.clear()
        except OSError as exc:
            # data may not be on disk: keep the whole batch unacknowledged by failing loudly
            raise OSError(exc.errno, f"fsync failed: {exc.strerror}") from exc
        return None

    def _after_write(self, st: TopicState, now_mono: float) -> None:
        self.open.pop(st, None)
        if st.fd >= 0:
            self.open[st] = None  # most recently used
        if st.recent_dirty:
            if now_mono - st.recent_at >= self.shard.recent_interval:
                self._write_recent(st, now_mono)
            else:
                self.stale_recent.add(st)

    def _write_recent(self, st: TopicState, now_mono: float) -> None:
        body = b"[" + b",".join(line[:-1] for line in st.recent) + b"]\n"
        try:
            swap_in(os.path.join(st.path, RECENT), os.path.join(st.path, RECENT_TMP), body,
                    st.recent_versions)
        except OSError as exc:
            self.counters.errors += 1
            log.warning("%s: cannot replace %s: %s", st.relpath, RECENT, exc.strerror or exc)
            self.stale_recent.add(st)
            return
        st.recent_dirty = False
        st.recent_at = now_mono
        self.stale_recent.discard(st)

    def _set_degraded(self, problem: str | None) -> None:
        c = self.counters
        if problem and not c.degraded:
            log.error("cannot write (%s): not acknowledging; will retry", problem)
            c.errors += 1
        elif problem is None and c.degraded:
            log.warning("writing again after: %s", c.degraded_reason)
        c.degraded = problem is not None
        c.degraded_reason = problem

    # -- housekeeping ---------------------------------------------------------------

    def sweep_recent(self, now_mono: float, force: bool = False) -> None:
        """Write the +recent.json files that were held back by recent_interval (not while
        the disk refuses writes: the flush that succeeds again ends that)."""
        if self.counters.degraded and not force:
            return
        for st in list(self.stale_recent):
            if force or now_mono - st.recent_at >= self.shard.recent_interval:
                self._write_recent(st, now_mono)

    def rotate_now(self, st: TopicState, now_us: int) -> bool:
        """Close and version ``st``'s current segment now (a control command); False if it is
        empty. Call only when nothing is buffered for it (after a flush)."""
        if st.fd < 0:
            self._open_fd(st)
        if st.size == 0:
            return False
        self._rotate(st, now_us)
        self.open.pop(st, None)
        self.open[st] = None
        return True

    def forget(self, st: TopicState) -> None:
        """Let go of a topic whose directory is being moved or deleted: close its file and
        drop it from every list (its buffer must be empty: flush first)."""
        self._close_fd(st)
        self.stale_recent.discard(st)
        if st.dirty:  # pragma: no cover - callers flush first and refuse while degraded
            self.dirty = [d for d in self.dirty if d is not st]
            st.dirty = False
        n = self.waiting.pop(st, None)
        if n is not None:  # pragma: no cover - callers flush(wait=True) first
            self.waiting_lines -= n

    def write_recent_now(self, st: TopicState) -> None:
        """Write a held-back +recent.json now (before its directory moves)."""
        if st in self.stale_recent:
            self._write_recent(st, time.monotonic())

    def evictable(self, st: TopicState) -> bool:
        # a topic waiting for the preparer is out of dirty but has lines (and st.prep set)
        return not st.dirty and st.fd < 0 and st.prep is None and not st.lines and st not in self.stale_recent

    def _evict_fds(self, n: int) -> None:
        for st in list(self.open)[:n]:
            self._close_fd(st)

    def _close_fd(self, st: TopicState) -> None:
        if st.fd >= 0:
            try:
                os.close(st.fd)
            except OSError:  # pragma: no cover
                pass
            st.fd = -1
        self.open.pop(st, None)
        self.counters.topics_open = len(self.open)

    def close(self) -> None:
        if self.preparer is not None:
            self.preparer.stop()
            self.preparer = None
        self.sweep_recent(time.monotonic(), force=True)
        for st in list(self.open):
            self._close_fd(st)


_valid_record = formats._valid_envelope


_QUEUED = object()  # TopicState.prep while the preparer has it


class Prepared(typing.NamedTuple):
    created: bool         # the directory was created (fsync it, if the shard fsyncs)
    torn: bytes | None    # a torn tail cut off the segment, for the quarantine
    error: BaseException | None


class Preparer:
    """Prepares topics for their first write in background threads: creates the
    directory and the current segment (on some file systems a millisecond each),
    repairs a torn tail and loads the recent records. The recording thread then
    opens the existing file, cheaply. A thread touches only the state it was given
    (never while the recording thread does) and the disk; it sets ``st.prep`` last."""

    def __init__(self, store: Store, threads: int = 1) -> None:
        self.store = store
        self.queue: queue.Queue[TopicState | None] = queue.Queue()
        self.threads = [threading.Thread(target=self._run, name=f"preparer-{i}", daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, st: TopicState) -> None:
        self.queue.put(st)

    def _run(self) -> None:
        while True:
            st = self.queue.get()
            try:
                if st is None:
                    return
                st.prep = self.prepare(st)
                self.store._ready.append(st)  # after st.prep: the next flush writes it
            finally:
                self.queue.task_done()

    def prepare(self, st: TopicState) -> Prepared:
        store = self.store
        try:
            safe_join(store.root, st.relpath)
            created = not os.path.isdir(st.path)
            if created:
                store._make_dirs(st)
            path = os.path.join(st.path, store.current)
            # jsonl: create the segment here (an empty JSON Lines file is valid); other
            # formats: only if it exists (an empty +log.json is not JSON), the recording
            # thread creates it together with its first records
            flags = store._flags if store._plain else store._flags & ~os.O_CREAT
            try:
                fd = os.open(path, flags, 0o644)
            except FileNotFoundError:
                if store._plain:
                    raise
                st.size = 0
            else:
                try:
                    st.size = os.fstat(fd).st_size
                finally:
                    os.close(fd)
            if not created and st.size == 0:
                store._retire_other_currents(st)  # as _open_fd does
            torn = store._load(st, path)
        except Exception as exc:  # noqa: BLE001 - reported by the recording thread's own open
            return Prepared(False, None, exc)
        if st.recent.maxlen:
            self._recent_files(st)
        st.loaded = True
        return Prepared(created, torn, None)

    @staticmethod
    def _recent_files(st: TopicState) -> None:
        """Create the spare of +recent.json if missing, so the recording thread's first
        rewrite creates no inode; and, for a topic with records on disk, +recent.json
        itself if missing (never an empty one: readers expect the last records)."""
        recent = os.path.join(st.path, RECENT)
        spare = os.path.join(st.path, RECENT_TMP)
        try:
            if st.recent:
                body = b"[" + b",".join(line[:-1] for line in st.recent) + b"]\n"
                for _ in range(2):  # the first swap may only create +recent.json
                    if os.path.exists(spare) and os.path.exists(recent):
                        return
                    swap_in(recent, spare, body)
            elif not os.path.exists(spare):
                os.close(os.open(spare, os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644))
        except OSError:
            pass  # the recording thread's rewrite reports it

    def wait_idle(self) -> None:
        """Until every submitted topic is prepared."""
        self.queue.join()

    def stop(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(30)


class Compressor:
    """Gzips rotated segments in a background thread, off the hot path.

    Writes ``name.gz.tmp``, renames it to ``name.gz``, then removes ``name``; a crash
    at any point leaves a complete plain segment (listed in preference)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.queue: queue.Queue[str | None] = queue.Queue()
        #: held while one file is compressed; a move or delete takes it so that no
        #: compression is half done inside the directory it renames
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="compressor", daemon=True)
        self.thread.start()

    def submit(self, path: str) -> None:
        self.queue.put(path)

    def _run(self) -> None:
        while True:
            path = self.queue.get()
            if path is None:
                return
            try:
                with self.lock:
                    self.compress(path)
                self.counters.compressed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.counters.errors += 1
                log.warning("cannot compress %s: %s", path, exc)

    @staticmethod
    def compress(path: str) -> None:
        tmp = path + ".gz.tmp"
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            info = os.fstat(src.fileno())
        os.utime(tmp, ns=(info.st_atime_ns, info.st_mtime_ns))  # retention by age keeps working
        os.replace(tmp, path + ".gz")
        try:
            os.unlink(path)
        except FileNotFoundError:
            # retention deleted the segment while we compressed it: do not resurrect it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".gz")
            raise

    def stop(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
