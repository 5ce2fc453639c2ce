"""One shard's recorder: a persistent MQTT session in, topic files out.

One thread does everything: paho's network loop calls :meth:`Recorder.on_message`,
which encodes the record and buffers it; :meth:`Recorder.flush` writes the buffers
(one write per topic) and only then acknowledges the QoS 1 messages it wrote. A
batch is flushed when it holds ``batch.max_messages`` records or its oldest record
is ``batch.max_delay`` old. So a SIGKILL can cost duplicates (the broker redelivers
what was not acknowledged) but never a message.

New topics: a topic's first open (creating its directory and files costs up to
milliseconds on some file systems) runs in the store's preparer thread. Its records
wait in memory, unacknowledged, and a later flush (``max_delay`` on) writes them, so
a burst of new topics does not hold up the topics already known. At most
``max_waiting`` records wait; past that a flush waits for the preparer.

Its broker session is shardlog/recording/session.py; its start, main loop and stop
(and the exit codes) shardlog/recording/loop.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import typing
from collections import deque
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt

from shardlog.config.routing import Router
from shardlog.config.schema import Broker, Shard, ShardMap
from shardlog.control.commands import topic_filter_matches
from shardlog.control.operations import Operations
from shardlog.recording.brokercheck import InflightProbe
from shardlog.recording.client import BufferedClient, PahoErrors, StockClient
from shardlog.recording.loop import RecorderLoop
from shardlog.recording.session import _BROKER_DROPPED, _DISCARD, BrokerSession
from shardlog.counters import Counters
from shardlog.records import encode_record, props_member
from shardlog.topics import TopicError, topic_from_bytes
from shardlog.writing.compressor import Compressor
from shardlog.writing.store import Store
from shardlog.writing.topic_state import TopicState

if TYPE_CHECKING:
    from shardlog.hooks.chain import Chain
    from shardlog.hooks.path import FanOut

log = logging.getLogger(__name__)
_time_ns = time.time_ns
MAX_WAITING = 12_000


class Recorder(RecorderLoop, BrokerSession):
    """One shard's recorder. Its broker session is :class:`BrokerSession`'s
    (shardlog/recording/session.py), its start, main loop and stop are
    :class:`RecorderLoop`'s (shardlog/recording/loop.py); this class holds the state and
    does what happens per message: route, encode, buffer, flush, acknowledge."""

    def __init__(self, smap: ShardMap, shard: Shard, stats_file: str | None = None,
                 parent_pid: int | None = None, heartbeat: float = 1.0,
                 control_path: str | None = None) -> None:
        self.smap = smap
        self.shard = shard
        self.broker: Broker = smap.broker_of(shard)
        self.stats_file = stats_file
        self.parent_pid = parent_pid
        self.heartbeat = heartbeat
        self.counters = Counters(shard=shard.name, pid=os.getpid(), started_ts=time.time_ns() // 1000)
        self.router = Router((s.branch, s.name) for s in smap.shards
                             if smap.broker_of(s) == self.broker)
        self.states: dict[bytes, TopicState | str] = {}
        self.acks: list[int] = []        # QoS 1 message ids received since the last flush, in order
        #: PUBACKs go out in the order the PUBLISHes came (MQTT 5 4.6.0-2; iotcore hangs up
        #: otherwise): while the store holds an id (its topic being prepared, or refused by
        #: the disk), it and every later id wait here, in arrival order
        self.unacked: deque[int] = deque()
        self.blocked: set[int] = set()   # the ids of self.unacked the store still holds
        self.pending = 0                 # records received since the last successful flush
        self.batch_started = 0.0
        self.batch_max = 1 if shard.fsync == "always" else shard.batch.max_messages
        #: flush by count when pending reaches this: batch_max more than the records that
        #: wait for their topic's preparation (which a flush cannot write yet)
        self.flush_at = self.batch_max
        #: records waiting for the preparer beyond this: the next flush waits for it, so
        #: memory stays bounded (~1.5 KB a waiting topic) when new topics arrive faster
        #: than the disk creates them; a burst of up to ~10,000 new topics does not wait
        self.max_waiting = max(MAX_WAITING, 2 * self.batch_max)
        self.max_delay = shard.batch.max_delay
        self.max_payload = shard.max_payload
        self.max_states = shard.max_topics
        self.stop_requested = False
        self._subscribe_mid = -1  # the SUBACK that makes this shard "subscribed"
        self.connected = False
        self.next_retry = 0.0
        self.store: Store | None = None
        self.client: BufferedClient | StockClient | None = None
        self.control_path = control_path  # the supervisor's control socket for this shard
        self.ops = Operations(self, None)
        ctl = smap.control
        #: never recorded: the control topic (commands may carry a token) and its replies
        self.unrecorded = [ctl.topic] + ([ctl.reply_topic] if ctl.reply_topic else []) if ctl.mqtt else []
        self.status_topic = f"{ctl.status_topic}/{shard.name}" if ctl.status_topic else None
        # how this broker differs (shardlog/recording/brokercheck.py): notes logged once, kept in the stats
        self.expect_session = False  # the broker should have this client id's session
        self._sys_mid = -1           # the $SYS watch's SUBACK, while it is outstanding
        self.watch_sys = self.broker.sys_topics and not self.broker.embedded
        self.probe = InflightProbe(self.batch_max, self.max_delay)
        self.batch_step = self.batch_max  # flush every this many records (the broker's cap, if lower)
        self.paho_errors = PahoErrors()
        self.backoff = 0.5  # seconds before the next connection attempt; reset by a CONNACK
        #: with hooks (shardlog.hooks.path.install): the stand-in ids of messages that became several records
        self.fan: FanOut | None = None
        if self.broker.mqtt5 and (shard.format == "csv" or shard.payload_only):
            log.warning("shard %s: the %s format does not store MQTT 5 properties; messages are "
                        "recorded without them (docs/history.md, \"Write formats\")", shard.name,
                        "payload-only" if shard.payload_only else shard.format)

    def install_hooks(self) -> Chain | None:
        """A shard with hooks records through shardlog.hooks.path.HookedPath.on_publish (bound once,
        here: a shard without hooks keeps the plain path). Raises ConfigError."""
        if not self.shard.hooks:
            return None
        from shardlog.hooks import path as hook_path
        return hook_path.install(self)

    def install_retained_filter(self) -> None:
        """With ``retained: new|none``: put :meth:`_skip_retained` in front of ``on_publish``
        (after the hooks; a shard with ``retained: all`` keeps its path unchanged)."""
        if self.shard.retained == "all":
            return
        inner = self.on_publish
        c = self.counters

        def on_publish(topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                       props: bytes = b"") -> None:
            if not (retain and self.skip_retained) or self.states.get(topic) is _BROKER_DROPPED:
                inner(topic, payload, qos, mid, dup, retain, props)
                return
            c.retained_skipped += 1  # acknowledged with the next flush, never written
            if qos:
                self.acks.append(mid)
            self.pending += 1
            if self.pending == 1:
                self.batch_started = time.monotonic()

        self.on_publish = on_publish  # type: ignore[method-assign]

    # -- messages -----------------------------------------------------------------------

    def _lost_connection(self) -> None:
        self.connected = False
        self.counters.connected = False
        self.counters.subscribed = False
        # Message ids belong to the connection: the broker redelivers the unacknowledged
        # messages after we reconnect, so their buffered records are still written (the
        # redelivered copies become duplicates, never losses).
        self.acks = []
        self.unacked.clear()
        self.blocked.clear()
        if self.store is not None:
            self.store.forget_mids()
        if self.fan is not None:
            self.fan.clear()

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # msg._topic: the raw topic bytes. paho's .topic property decodes on every
        # access and raises on invalid UTF-8, which must be quarantined, not lost.
        # The fast path (client.py) sends a PUBLISH with MQTT 5 properties here.
        props = getattr(msg, "properties", None)
        self.on_publish(msg._topic, msg.payload, msg.qos, msg.mid, msg.dup, msg.retain,
                        b"" if props is None else props_member(props.__dict__))

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                   props: bytes = b"") -> None:
        """One received message (the hot path): encode it, buffer it, maybe flush.
        ``props``: the record's ``props`` member (shardlog.records.props_member), if any."""
        st = self.states.get(topic)
        if st.__class__ is TopicState and len(payload) <= self.max_payload:
            # the common case, straight through (the general path below does the same)
            ts = _time_ns() // 1000
            if qos:
                self.acks.append(mid)
            else:
                mid = 0
            c = self.counters
            c.last_message_ts = ts
            if dup:
                c.redelivered += 1
            self.store.add(st, encode_record(ts, qos, retain, payload, props), mid)  # type: ignore[arg-type, union-attr]
            self.pending += 1
            if self.pending == 1:
                self.batch_started = time.monotonic()
            if self.pending >= self.flush_at and not self.counters.degraded:
                self.flush()
            return
        if st is None:
            st = self._resolve(topic)
        elif st is _BROKER_DROPPED:
            self._broker_dropped(payload)
            return
        ts = time.time_ns() // 1000
        if not qos:
            mid = 0
        else:
            self.acks.append(mid)
        c = self.counters
        c.last_message_ts = ts
        if dup:
            c.redelivered += 1
        store = self.store
        assert store is not None
        if st.__class__ is TopicState:
            if len(payload) <= self.max_payload:
                store.add(st, encode_record(ts, qos, retain, payload, props), mid)  # type: ignore[arg-type]
            else:
                store.quarantine(ts, f"payload of {len(payload)} bytes exceeds max_payload",
                                 topic, qos, retain, payload, mid, props)
        elif st is _DISCARD:
            c.discarded += 1
        else:
            if c.degraded and qos == 0 and self.pending > 10 * self.batch_max:
                c.dropped_qos0 += 1
                return
            store.quarantine(ts, st, topic, qos, retain, payload, mid, props)  # type: ignore[arg-type]
        self.pending += 1
        if self.pending == 1:
            self.batch_started = time.monotonic()
        if self.pending >= self.flush_at and not c.degraded:
            self.flush()

    def _resolve(self, raw: bytes) -> TopicState | str:
        """Topic bytes -> its state, _DISCARD, or a reason to quarantine (not cached)."""
        try:
            topic = topic_from_bytes(raw)
        except TopicError as exc:
            return f"topic not storable: {exc}"
        if self._not_mine(topic):
            self.states[raw] = _DISCARD
            return _DISCARD
        assert self.store is not None
        try:
            st = self.store.new_state(topic)
        except TopicError as exc:
            return f"topic not storable: {exc}"
        self.states[raw] = st
        return st

    def _not_mine(self, topic: str) -> bool:
        """Owned by a more specific shard, or a control topic: acknowledged, not recorded."""
        return (self.router.owner(topic) != self.shard.name
                or any(topic_filter_matches(t, topic) for t in self.unrecorded))

    # -- flushing and acknowledging -----------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Write the buffered records, then acknowledge what was written. Records of
        topics still being prepared stay buffered (``wait``: prepare them first)."""
        store = self.store
        assert store is not None
        if self.pending >= self.max_waiting:
            wait = True
        now = time.monotonic()
        # held: ids received since the last flush and not written; from now on the store
        # keeps them (with their records) and lists them in store.released once written.
        # So this costs the new ids only, however many records wait for the preparer.
        try:
            held = store.flush(time.time_ns() // 1000, now, wait)
            released = store.take_released()
            if self.fan is not None and self.fan.live:
                held, released = self.fan.settle(held, released)  # stand-in ids -> the messages' own
        except BaseException:
            # the store may hold some of these ids now: never acknowledge them before their
            # write (unacknowledged, the broker redelivers them: duplicates, never losses)
            self.acks = []
            raise
        if held or self.unacked:
            ack = self._in_order(held, released)
        else:
            ack = self.acks  # the common case: every id written, none waiting before them
        self.acks = []
        self.pending = store.pending_records()  # QoS 0 ones may wait too
        if self.pending:
            self.next_retry = now + 1.0
        self.batch_started = now
        self.flush_at = self.pending + self.batch_step
        if len(self.states) > self.max_states:
            self._trim_states()
        if ack and self.connected and self.client is not None:
            self.client.ack_many(ack)  # one write; sent by the loop if inside a callback
            self.counters.acked += len(ack)

    def _in_order(self, held: set[int], released: list[int]) -> list[int]:
        """The ids that may be acknowledged now: the written ones up to the first id the
        store still holds, in arrival order (the rest wait in self.unacked)."""
        blocked = self.blocked
        blocked.update(held)
        blocked.difference_update(released)
        unacked = self.unacked
        unacked.extend(self.acks)
        ack: list[int] = []
        while unacked and unacked[0] not in blocked:
            ack.append(unacked.popleft())
        return ack

    def _deadline_flush(self, now: float) -> None:
        """A flush because the batch's time is up; watches for a broker in-flight cap."""
        first, acked = self.batch_started, self.counters.acked
        self.flush()
        last = self.counters.last_message_ts
        if last is None or self.counters.degraded:
            return
        offset = time.time() - now  # wall clock minus monotonic
        step = self.probe.on_deadline_flush(now, self.counters.acked - acked, first, last / 1e6 - offset, acked)
        if step is not None:
            self._inflight_step(step)

    def _flush_deadline(self) -> float | None:
        """When the buffered records must be flushed: the batch's max_delay, or, while
        the disk refuses writes, the next retry. None when nothing is buffered."""
        if not self.pending:
            return None
        if self.counters.degraded:
            return self.next_retry
        return self.batch_started + self.probe.delay  # max_delay, longer for a test of a broker cap

    def _due(self, now: float) -> bool:
        deadline = self._flush_deadline()
        return deadline is not None and now >= deadline

    def _trim_states(self) -> None:
        """Forget idle topics (oldest first) down to 3/4 of the cap; they are reloaded
        from disk if they speak again. Called when the cache passes ``max_states``."""
        store = self.store
        assert store is not None
        excess = len(self.states) - self.max_states * 3 // 4
        drop = []
        for k, st in self.states.items():
            if len(drop) >= excess:
                break
            if st is _DISCARD or (isinstance(st, TopicState) and store.evictable(st)):
                drop.append(k)
        for k in drop:
            del self.states[k]

    # -- the store (what a journal recorder replaces) ---------------------------------

    def _started(self) -> None:
        """The store is open and the preparer runs (a journal's materializer starts here)."""

    def _close_store(self) -> None:
        assert self.store is not None
        self.store.close()

    def quiesced(self) -> typing.ContextManager[str | None]:
        """A block in which the recording thread may use the store and the topic states
        (control operations); nothing else touches them meanwhile. It yields None, or why
        the shard cannot act now (then do nothing)."""
        return contextlib.nullcontext()

    def topic_states(self) -> dict[bytes, TopicState | str]:
        """Topic states by key (in ``quiesced``); see :meth:`state_key`."""
        return self.states

    def state_key(self, topic: str) -> bytes:
        return topic.encode()

    def open_store(self, root_real: str, branch_root: str) -> Compressor | None:
        compressor = Compressor(self.counters) if self.shard.compress == "gzip" else None
        self.store = Store(self.shard, root_real, branch_root, self.counters, compressor)
        return compressor
