"""Hooks in the recording path: what the hooks make of a message, and its acknowledgements.

:func:`install` runs once at start, and only for a shard with hooks: the recorder's one
per-message path then hands each message it would store to :meth:`HookedPath.run`
instead of adding its record (a shard without hooks pays one attribute test a message).

Delivery: a message is acknowledged only when everything its hooks made of it is
written or quarantined. One output carries the message's id, as a plain record does.
Several outputs (possibly in several topics, which the store writes or holds apart)
each carry a stand-in id from :class:`FanOut`, which tells the recorder's flush the
real id is held while any stand-in is, and released once the last one is written.
A dropped message is acknowledged with the next flush (counted ``hook_dropped``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from shardlog.control.commands import topic_filter_matches
from shardlog.hooks.chain import Chain, Watchdog
from shardlog.hooks.loading import load_hooks
from shardlog.hooks.message import HookFailure, Message
from shardlog.records import encode_record
from shardlog.routes import Unstorable

if TYPE_CHECKING:
    from shardlog.config.routing import Router
    from shardlog.config.schema import Shard, ShardMap
    from shardlog.counters import Counters

log = logging.getLogger(__name__)
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
            if i not in owner:
                continue
            real = owner.pop(i)
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


class Sink(Protocol):
    """What the hooked path uses of the recorder's sink (shardlog/recording/sinks.py)."""

    @property
    def target(self) -> type: ...  # the class of a routed topic's target

    def add(self, target: Any, line: bytes, mid: int) -> None: ...

    def quarantine(self, ts_us: int, reason: str, topic: bytes, qos: int, retain: bool,
                   payload: bytes, mid: int, props: bytes = b"") -> None: ...


class Host(Protocol):
    """What the hooked path uses of its recorder (shardlog.recording.recorder.Recorder): its
    routes and its sink (a protocol: this module does not import the recorder, which
    installs it)."""

    smap: ShardMap
    shard: Shard
    router: Router
    counters: Counters
    routes: dict[bytes, Any]
    unrecorded: list[str]

    @property
    def sink(self) -> Sink: ...

    @property
    def max_payload(self) -> int: ...

    def route(self, raw: bytes) -> Any: ...


class HookedPath:
    """What a shard with hooks records of each message: the recorder's one per-message
    path calls :meth:`run` for a message it would store (routed to a target of its sink,
    within max_payload) instead of adding its record; the recorder does the rest (stamp,
    acknowledgements, flushes)."""

    def __init__(self, rec: Host, chain: Chain) -> None:
        self.rec = rec
        self.chain = chain
        self.fan = FanOut()

    def run(self, target: Any, topic: bytes, payload: bytes, ts: int, qos: int, retain: bool, mid: int,
            props: bytes) -> None:
        """``mid``: 0 for QoS 0; ``props``: the message's MQTT 5 properties as the record's
        member (hooks do not see them; every message a hook makes of this one keeps them)."""
        rec = self.rec
        msg = _new(Message, (topic.decode("utf-8"), payload, ts, qos, retain))
        result = self.chain.run(msg)
        c = rec.counters
        sink = rec.sink
        if isinstance(result, HookFailure):
            c.hook_errors += 1
            sink.quarantine(ts, result.reason, topic, qos, retain, payload, mid, props)
        elif not result:
            c.hook_dropped += 1  # acknowledged by the next flush, as a discarded message
        elif len(result) == 1:
            if result[0] is msg:  # unchanged: as without hooks
                sink.add(target, encode_record(ts, qos, retain, payload, props), mid)
            else:
                self._store(result[0], mid, props)
        else:
            ids: Sequence[int] = self.fan.split(mid, len(result)) if mid else [0] * len(result)
            for m, i in zip(result, ids, strict=True):
                self._store(m, i, props)

    def _store(self, m: Message, mid: int, props: bytes) -> None:
        rec = self.rec
        sink = rec.sink
        raw = m.topic.encode("utf-8")
        target = rec.routes.get(raw)
        if target is None:
            target = rec.route(raw)
        if target.__class__ is sink.target:
            if len(m.payload) <= rec.max_payload:
                sink.add(target, encode_record(m.ts, m.qos, m.retain, m.payload, props), mid)
                return
            reason = f"payload of {len(m.payload)} bytes (made by hooks) exceeds max_payload"
        elif isinstance(target, Unstorable):
            reason = target.reason
        else:  # Chain.owns let it through, so this should not happen; keep it anyway
            reason = f"hooks produced topic {m.topic!r}, which this shard does not record"
        sink.quarantine(m.ts, reason, raw, m.qos, m.retain, m.payload, mid, props)


def owns_check(rec: Host) -> Callable[[str], str | None]:
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


def install(rec: Host) -> HookedPath:
    """Load the shard's hooks and make the path the recorder runs them on (ConfigError if
    a hook cannot be loaded). Starts the watchdog when called from the main thread."""
    shard = rec.shard
    hooks = load_hooks(rec.smap, shard)
    watchdog = Watchdog(shard.hook_timeout)
    chain = Chain(hooks, shard.hook_timeout, owns_check(rec), watchdog)
    watchdog.start()
    log.info("hooks: %s (hook_timeout %gs)", ", ".join(h.name for h in hooks), shard.hook_timeout)
    return HookedPath(rec, chain)
