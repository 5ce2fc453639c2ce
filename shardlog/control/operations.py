"""Control operations inside a recorder: rotate, delete and move a branch of its topics.

The supervisor sends each request as one JSON datagram to the recorder's control socket
(shardlog/control/channel.py). The recorder's one thread polls it between batches
(:meth:`Operations.poll`, a non-blocking ``recvfrom`` at most every ``POLL_INTERVAL``: no cost
per message), so an operation never meets an open file or a half-written batch:

1. flush what is buffered (and acknowledge it), refuse if the disk still holds records back;
2. close the affected topics' files and drop their in-memory state;
3. do the file system operation; messages that arrived meanwhile wait in the socket buffer and
   are recorded afterwards, re-creating their state (and directories) from scratch.

Every path goes through the recording path's encoding and ``safe_join`` root check, and a tree is
deleted or moved only if it is shardlog's (:mod:`shardlog.control.guard`: ``+`` files and topic
level directories only, no other recorder's lock in it or above it, no other shard's root). Replies are
one JSON datagram to the sender: ``{"ok": true, ...}`` or ``{"ok": false, "reason": "..."}``.

:class:`Operations` works on its recorder through :class:`Host`, the few attributes and
methods it needs (a protocol: this module does not import the recorder, which creates it).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import secrets
import shutil
import threading
import time
import typing
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from shardlog.control.channel import ControlSocket
from shardlog.control.commands import CommandError, check_topic, is_under
from shardlog.control.guard import foreign_below, lock_above
from shardlog.ondisk.formats import CURRENTS
from shardlog.ondisk.segments import LOCK, QUARANTINE, TOPIC_FILE
from shardlog.topics import HashedNameError, TopicError, decode_level, safe_join, topic_to_relpath
from shardlog.writing.atomic import rename_noreplace
from shardlog.writing.topic_state import TopicState

if TYPE_CHECKING:
    from shardlog.config.routing import Router
    from shardlog.config.schema import Broker, Shard, ShardMap
    from shardlog.counters import Counters
    from shardlog.writing.store import Store

log = logging.getLogger(__name__)

#: how often the recorder looks at its control socket (seconds)
POLL_INTERVAL = 0.05
#: a directory being deleted is first renamed to this (+ shard name + random) inside the root
ASIDE = "+deleting."


class Refused(Exception):
    pass


class Host(Protocol):
    """What operations use of their recorder (shardlog.recording.recorder.Recorder)."""

    smap: ShardMap
    shard: Shard
    broker: Broker
    router: Router
    counters: Counters
    store: Store | None
    pending: int

    def flush(self, wait: bool = False) -> None: ...

    def quiesced(self) -> typing.ContextManager[str | None]: ...

    def topic_states(self) -> dict[bytes, TopicState | str]: ...

    def state_key(self, topic: str) -> bytes: ...


class Operations:
    def __init__(self, rec: Host, channel: ControlSocket | None) -> None:
        self.rec = rec
        self.channel = channel
        #: when the loop looks at the channel next (never without one)
        self.next_poll = 0.0 if channel is not None else math.inf
        shard = rec.shard
        self.others = [s.branch for s in rec.smap.shards
                       if s.name != shard.name and rec.smap.broker_of(s) == rec.broker]
        own_root = os.path.realpath(shard.root)
        #: other shards' roots (any host, any broker): never inside a tree this shard deletes or moves
        self.protected = sorted({r for s in rec.smap.shards if (r := os.path.realpath(s.root)) != own_root})

    # -- the channel ------------------------------------------------------------------------

    def poll(self, now: float) -> None:
        """Called by the recorder's loop when ``now >= next_poll``."""
        if self.channel is None:
            self.next_poll = math.inf
            return
        self.next_poll = now + POLL_INTERVAL
        for _ in range(8):  # a few per turn; the rest next turn
            got = self.channel.receive()
            if got is None:
                return
            data, addr = got
            with self.rec.quiesced() as busy:  # busy: why the shard cannot act now
                answer = {"ok": False, "reason": busy} if busy else self.handle(data)
            self.channel.reply(addr, answer)

    def handle(self, data: bytes) -> dict[str, Any]:
        try:
            req = msgspec.json.decode(data)
            if not isinstance(req, dict):
                raise Refused("expected a JSON object")
            op = req.get("op")
            started = time.monotonic()
            if op == "rotate":
                result = self.rotate(str(req.get("prefix", "")))
            elif op == "delete":
                result = self.delete(str(req.get("prefix", "")))
            elif op == "move":
                result = self.move(str(req.get("src", "")), str(req.get("dst", "")))
            else:
                raise Refused(f"unknown op {op!r}")
        except (Refused, CommandError) as exc:
            log.warning("control: refused %s: %s", data[:200], exc)
            return {"ok": False, "reason": str(exc)}
        except msgspec.DecodeError as exc:
            return {"ok": False, "reason": f"malformed request: {exc}"}
        except OSError as exc:
            self.rec.counters.errors += 1
            log.error("control: %s failed: %s", data[:200], exc)
            return {"ok": False, "reason": f"{exc.strerror or exc} ({exc.filename or ''})"}
        result["ms"] = round((time.monotonic() - started) * 1000, 1)
        log.info("control: %s -> %s", data[:200], result)
        return {"ok": True, **result}

    # -- shared steps -----------------------------------------------------------------------

    def _check(self, topic: str, what: str, nested_ok: bool = False) -> str:
        check_topic(topic, what)
        shard = self.rec.shard
        if self.rec.router.owner(topic) != shard.name:
            raise Refused(f"{what} {topic!r} lies outside shard {shard.name!r}'s prefix "
                          f"{shard.prefix or '#'!r} (or belongs to a more specific shard)")
        nested = [b for b in self.others if b and b != topic and is_under(b, topic)]
        if nested and not nested_ok:
            raise Refused(f"{what} {topic!r} spans the branches of other shards: {', '.join(nested)}")
        return topic

    @property
    def _store(self) -> Store:
        """The recorder's store: operations run only while it is open."""
        store = self.rec.store
        assert store is not None
        return store

    def _path(self, topic: str) -> str:
        try:
            return safe_join(self._store.root, topic_to_relpath(topic))
        except TopicError as exc:
            raise Refused(f"{topic!r}: {exc}") from None

    def _ours(self, path: str, topic: str, whole_branch: bool = False) -> None:
        """Refuse unless the tree at ``path`` is shardlog's to delete or move (its own branch
        root's lock aside, when ``whole_branch``)."""
        branch_root = self._store.branch_root
        why = lock_above(path, branch_root) or foreign_below(path, whole_branch, self.protected)
        if why:
            raise Refused(f"{topic!r}: {why}")

    def _settle(self, prefixes: list[str]) -> list[tuple[bytes, TopicState]]:
        """Write everything buffered; the states of topics under ``prefixes``."""
        rec = self.rec
        store = self._store
        if rec.pending or store.dirty:
            if getattr(store, "preparer", None) is not None:
                # first opens run in a background thread: wait for them, so that every
                # buffered record is written and nothing is creating directories meanwhile
                rec.flush(wait=True)
            else:
                rec.flush()
        stuck = [st.topic for st in store.dirty if any(is_under(st.topic, p) for p in prefixes)]
        if stuck:
            raise Refused(f"{len(stuck)} topic(s) there have records the disk refused "
                          f"({store.counters.degraded_reason}); try again when the shard is no longer degraded")
        return [(k, st) for k, st in rec.topic_states().items()
                if isinstance(st, TopicState) and any(is_under(st.topic, p) for p in prefixes)]

    def _let_go(self, affected: list[tuple[bytes, TopicState]]) -> None:
        store = self._store
        for key, st in affected:
            store.forget(st)
            self.rec.topic_states().pop(key, None)

    def _compressor_lock(self) -> Any:
        c = self._store.compressor
        return c.lock if c is not None else _NoLock()

    # -- rotate -----------------------------------------------------------------------------

    def rotate(self, prefix: str) -> dict[str, Any]:
        prefix = self._check(prefix, "prefix", nested_ok=True)  # the walk skips nested branches
        rec = self.rec
        store = self._store
        self._settle([prefix])
        now_us = time.time_ns() // 1000
        rotated: list[str] = []
        base = self._path(prefix)
        why = lock_above(base, store.branch_root)
        if why:
            raise Refused(f"prefix {prefix!r}: {why}")
        states = rec.topic_states()
        for topic in self._topics_on_disk(base, prefix):
            key = rec.state_key(topic)
            st = states.get(key)
            if not isinstance(st, TopicState):
                try:
                    st = store.new_state(topic)
                except TopicError:
                    continue
                states[key] = st
            if store.rotate_now(st, now_us):
                rotated.append(topic)
        return {"rotated": len(rotated), "topics": rotated[:100]}

    def _topics_on_disk(self, base: str, prefix: str) -> list[str]:
        """Topics under ``base`` (the directory of ``prefix``) with a non-empty current
        segment, that this shard owns."""
        out: list[str] = []
        if not os.path.isdir(base):
            return out
        own = os.path.realpath(self._store.branch_root)
        for dirpath, dirnames, filenames in os.walk(base):
            if LOCK in filenames and os.path.realpath(dirpath) != own:
                dirnames[:] = []  # another recorder's branch (another map's shard): not ours to rotate
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("+"))
            rel = os.path.relpath(dirpath, base)
            try:
                topic = prefix if rel == "." else self._dir_topic(dirpath, prefix, rel)
            except (TopicError, OSError):
                dirnames[:] = []
                continue
            if self.rec.router.owner(topic) != self.rec.shard.name:
                dirnames[:] = []  # a nested shard's branch
                continue
            for current in CURRENTS:  # any write format's current segment (shardlog/ondisk/formats.py)
                if current in filenames:
                    try:
                        if os.path.getsize(os.path.join(dirpath, current)) > 0:
                            out.append(topic)
                            break
                    except OSError:
                        pass
        return out

    @staticmethod
    def _dir_topic(dirpath: str, prefix: str, rel: str) -> str:
        levels = prefix.split("/")
        parts = rel.split(os.sep)
        for depth, name in enumerate(parts, 1):
            try:
                levels.append(decode_level(name))
            except HashedNameError:
                here = os.path.join(dirpath, *([os.pardir] * (len(parts) - depth)))
                with open(os.path.join(here, TOPIC_FILE), encoding="utf-8") as f:
                    levels = f.read().split("/")
        return "/".join(levels)

    # -- delete -----------------------------------------------------------------------------

    def delete(self, prefix: str) -> dict[str, Any]:
        prefix = self._check(prefix, "prefix")
        store = self._store
        path = self._path(prefix)
        affected = self._settle([prefix])
        if not os.path.lexists(path):
            self._let_go(affected)
            return {"removed": False, "note": f"nothing recorded under {prefix!r}"}
        whole = os.path.realpath(path) == os.path.realpath(store.branch_root)
        self._ours(path, prefix, whole_branch=whole)
        self._let_go(affected)
        store.retarget_recent_left(os.path.relpath(path, store.root), None)  # a stop's stale +recent.json
        aside = os.path.join(store.root, f"{ASIDE}{self.rec.shard.name}.{secrets.token_hex(6)}")
        with self._compressor_lock():
            if whole:
                # the shard's whole branch: its lock and quarantine files stay
                os.mkdir(aside, 0o700)
                for name in sorted(os.listdir(path)):
                    if name not in (LOCK, QUARANTINE):
                        os.rename(os.path.join(path, name), os.path.join(aside, name))
            else:
                try:
                    os.rename(path, aside)
                except OSError as exc:
                    if exc.errno == errno.EXDEV:
                        raise Refused(f"{prefix!r} is on another file system than the root") from None
                    raise
        _remove_in_background(aside)
        return {"removed": True, "topics_closed": len(affected)}

    # -- move -------------------------------------------------------------------------------

    def move(self, src: str, dst: str) -> dict[str, Any]:
        src = self._check(src, "src")
        dst = self._check(dst, "dst")
        if is_under(dst, src) or is_under(src, dst):
            raise Refused(f"src {src!r} and dst {dst!r} lie inside one another")
        store = self._store
        src_path, dst_path = self._path(src), self._path(dst)
        if os.path.realpath(src_path) == os.path.realpath(store.branch_root):
            raise Refused(f"src {src!r} is this shard's whole branch; move topics below it")
        if not os.path.isdir(src_path):
            raise Refused(f"src: nothing recorded under {src!r}")
        if os.path.lexists(dst_path):
            raise Refused(f"dst {dst!r} exists already (a move never merges or overwrites)")
        affected = self._settle([src, dst])
        self._ours(src_path, src)
        why = lock_above(dst_path, store.branch_root)
        if why:
            raise Refused(f"dst {dst!r}: {why}")
        for _, st in affected:
            store.write_recent_now(st)
        self._let_go(affected)
        parent = os.path.dirname(dst_path)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise Refused(f"dst {dst!r}: cannot create its parent directory: {exc.strerror}") from None
        self._path(dst)  # again: nothing may have swapped a level for a symlink meanwhile
        with self._compressor_lock():
            try:
                rename_noreplace(src_path, dst_path)
            except FileExistsError:
                raise Refused(f"dst {dst!r} exists already (a move never merges or overwrites)") from None
        store.retarget_recent_left(os.path.relpath(src_path, store.root), os.path.relpath(dst_path, store.root))
        fixed = _retarget_topic_files(dst_path, src, dst)
        return {"moved": True, "topics_closed": len(affected), **({"topic_files": fixed} if fixed else {})}

    # -- start-up ---------------------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Finish deletions a previous run of this shard was killed in the middle of."""
        root = self._store.root
        mine = f"{ASIDE}{self.rec.shard.name}."
        try:
            names = os.listdir(root)
        except OSError:
            return
        for name in names:
            if name.startswith(mine):
                log.info("removing %s, left by an interrupted delete", name)
                _remove_in_background(os.path.join(root, name))


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _remove_in_background(path: str) -> None:
    """The rename already made the delete visible; removing the files can take a while
    and must not hold the recorder's loop (a restart finishes an interrupted one)."""
    threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                     name="shardlog-delete", daemon=True).start()


def _retarget_topic_files(path: str, src: str, dst: str) -> int:
    """Hashed (over-long) level names keep their full topic in ``+topic`` files: rewrite the
    ones in a moved tree to name the new place."""
    fixed = 0
    for dirpath, _, filenames in os.walk(path):
        if TOPIC_FILE not in filenames:
            continue
        f_path = os.path.join(dirpath, TOPIC_FILE)
        try:
            with open(f_path, encoding="utf-8") as f:
                topic = f.read()
            if is_under(topic, src):
                with open(f_path, "w", encoding="utf-8") as f:
                    f.write(dst + topic[len(src):])
                fixed += 1
        except OSError as exc:
            log.warning("cannot rewrite %s after a move: %s", f_path, exc)
    return fixed

