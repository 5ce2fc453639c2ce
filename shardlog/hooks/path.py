"""Hooks in the recording path: the hooked ``on_publish`` and its acknowledgements.

:func:`install` runs once at start, and only for a shard with hooks: it replaces the
recorder's ``on_publish`` by :meth:`HookedPath.on_publish`, so a shard without hooks
runs exactly the code it ran before (not one call more per message).

Delivery: a message is acknowledged only when everything its hooks made of it is
written or quarantined. One output carries the message's id, as a plain record does.
Several outputs (possibly in several topics, which the store writes or holds apart)
each carry a stand-in id from :class:`FanOut`, which tells the recorder's flush the
real id is held while any stand-in is, and released once the last one is written.
A dropped message is acknowledged with the next flush (counted ``hook_dropped``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from shardlog.control.commands import topic_filter_matches
from shardlog.hooks.chain import Chain, Watchdog
from shardlog.hooks.loading import load_hooks
from shardlog.hooks.message import HookFailure, Message
from shardlog.records import encode_record
from shardlog.writing.store import Store
from shardlog.writing.topic_state import TopicState

if TYPE_CHECKING:
    from shardlog.config.routing import Router
    from shardlog.config.schema import Shard, ShardMap
    from shardlog.counters import Counters

log = logging.getLogger(__name__)
_time_ns = time.time_ns
_monotonic = time.monotonic
_new = tuple.__new__  # Message(...) without the Python-level __new__ of a NamedTuple

#: stand-in ids start above every MQTT packet id (1..65535)
FIRST_STANDIN = 1 << 32


class FanOut:
    """Stand-in ids for a message that became several records, and their settlement at
    each flush (pure bookkeeping: no I/O, no clock)."""

    def __init__(self) -> None:
        self.next_id = FIRST_STANDIN
        self.owner: dict[int, int] = {}      # stand-in -> the real message id
        self.fresh: list[int] = []           # stand-ins handed out since the last settle
        self.outstanding: dict[int, int] = {}  # real id -> its stand-ins the store holds

    def split(self, mid: int, n: int) -> range:
        ids = range(self.next_id, self.next_id + n)
        self.next_id += n
        owner = self.owner
        for i in ids:
            owner[i] = mid
        self.fresh.extend(ids)
        return ids

    @property
    def live(self) -> bool:
        return bool(self.owner)

    def settle(self, held: set[int], released_ids: list[int]) -> tuple[set[int], list[int]]:
        """After ``store.flush`` returned ``held`` (and ``Store.take_released`` the ids
        written since): the real ids held instead, and the released ones as real ids (a
        real id once its last stand-in is out)."""
        owner, outstanding = self.owner, self.outstanding
        real_held = {i for i in held if i < FIRST_STANDIN}
        for s in self.fresh:  # each was written by this flush, or is held from now on
            if s in held:
                real = owner[s]
                outstanding[real] = outstanding.get(real, 0) + 1
                real_held.add(real)
            else:
                del owner[s]
        self.fresh = []
        released: list[int] = []
        for i in released_ids:
            if i < FIRST_STANDIN:
                released.append(i)
                continue
            real = owner.pop(i, None)
            if real is None:
                continue
            n = outstanding[real] - 1
            if n:
                outstanding[real] = n
            else:
                del outstanding[real]
                released.append(real)
        return real_held, released

    def clear(self) -> None:
        """The connection is gone: its ids mean nothing any more (as Store.forget_mids)."""
        self.owner.clear()
        self.fresh = []
        self.outstanding.clear()


class Host(Protocol):
    """What the hooked path uses of its recorder (shardlog.recording.recorder.Recorder):
    its per-message state, used in place (a protocol: this module does not import the
    recorder, which installs it)."""

    smap: ShardMap
    shard: Shard
    router: Router
    counters: Counters
    store: Store | None
    states: dict[bytes, TopicState | str]
    unrecorded: list[str]
    acks: list[int]
    pending: int
    batch_started: float
    flush_at: int
    max_payload: int
    fan: FanOut | None
    on_publish: Callable[..., None]  # (topic, payload, qos, mid, dup, retain, props=b"")

    def _resolve(self, raw: bytes) -> TopicState | str: ...

    def flush(self, wait: bool = False) -> None: ...


class HookedPath:
    """``on_publish`` of a shard with hooks (the recorder's own state, used in place)."""

    def __init__(self, rec: Host, chain: Chain) -> None:
        self.rec = rec
        self.chain = chain
        self.plain = rec.on_publish  # the path without hooks: discards, $SYS, oversized, unstorable
        self.fan = FanOut()

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                   props: bytes = b"") -> None:
        """``props``: the message's MQTT 5 properties as the record's member (hooks do not
        see them; every message a hook makes of this one keeps them)."""
        rec = self.rec
        st = rec.states.get(topic)
        if st is None:
            st = rec._resolve(topic)
        if st.__class__ is not TopicState or len(payload) > rec.max_payload:
            self.plain(topic, payload, qos, mid, dup, retain, props)  # hooks see only what this shard stores
            return
        ts = _time_ns() // 1000
        msg = _new(Message, (st.topic, payload, ts, qos, retain))  # type: ignore[union-attr]
        result = self.chain.run(msg)
        if qos:
            rec.acks.append(mid)
        else:
            mid = 0
        c = rec.counters
        c.last_message_ts = ts
        if dup:
            c.redelivered += 1
        store = rec.store
        assert store is not None
        if result.__class__ is HookFailure:
            c.hook_errors += 1
            store.quarantine(ts, result.reason, topic, qos, retain, payload, mid, props)  # type: ignore[union-attr]
        elif not result:
            c.hook_dropped += 1  # acknowledged by the next flush, as a discarded message
        elif len(result) == 1:  # type: ignore[arg-type]
            if result[0] is msg:  # type: ignore[index]  # unchanged: as without hooks
                store.add(st, encode_record(ts, qos, retain, payload, props), mid)  # type: ignore[arg-type]
            else:
                self._store(result[0], mid, props)  # type: ignore[index]
        else:
            ids = self.fan.split(mid, len(result)) if mid else [0] * len(result)  # type: ignore[arg-type]
            for m, i in zip(result, ids):  # type: ignore[arg-type]
                self._store(m, i, props)
        rec.pending += 1
        if rec.pending == 1:
            rec.batch_started = _monotonic()
        if rec.pending >= rec.flush_at and not c.degraded:
            rec.flush()

    def _store(self, m: Message, mid: int, props: bytes) -> None:
        rec = self.rec
        store = rec.store
        assert store is not None
        raw = m.topic.encode("utf-8")
        st = rec.states.get(raw)
        if st is None:
            st = rec._resolve(raw)
        if st.__class__ is TopicState:
            if len(m.payload) <= rec.max_payload:
                store.add(st, encode_record(m.ts, m.qos, m.retain, m.payload, props), mid)  # type: ignore[arg-type]
                return
            reason = f"payload of {len(m.payload)} bytes (made by hooks) exceeds max_payload"
        elif isinstance(st, str) and st.startswith("topic not storable"):
            reason = st
        else:  # Chain.owns let it through, so this should not happen; keep it anyway
            reason = f"hooks produced topic {m.topic!r}, which this shard does not record"
        store.quarantine(m.ts, reason, raw, m.qos, m.retain, m.payload, mid, props)


def owns_check(rec: Host):  # type: ignore[no-untyped-def]
    """``owns(topic)`` for the Chain: None if this shard records ``topic``, else why not."""
    name = rec.shard.name

    def owns(topic: str) -> str | None:
        owner = rec.router.owner(topic)
        if owner != name:
            return (f"owned by shard {owner!r}, not {name!r} (a hook may move a message within "
                    "its shard's branch only)" if owner else "owned by no shard")
        if any(topic_filter_matches(t, topic) for t in rec.unrecorded):
            return "a control topic (never recorded)"
        return None
    return owns


def install(rec: Host) -> Chain:
    """Load the shard's hooks and put the hooked path in place (ConfigError if a hook
    cannot be loaded). Starts the watchdog when called from the main thread."""
    shard = rec.shard
    hooks = load_hooks(rec.smap, shard)
    watchdog = Watchdog(shard.hook_timeout)
    chain = Chain(hooks, shard.hook_timeout, owns_check(rec), watchdog)
    path = HookedPath(rec, chain)
    rec.on_publish = path.on_publish  # type: ignore[method-assign]
    rec.fan = path.fan
    watchdog.start()
    log.info("hooks: %s (hook_timeout %gs)", ", ".join(h.name for h in hooks), shard.hook_timeout)
    return chain
