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

Where the records go is the sink's business (shardlog/recording/sinks.py): the topic
files directly, or, with ``journal.enabled``, a journal that the topic files follow.

The recorder does not connect, loop or stop: shardlog/recording/loop.py's
:class:`~shardlog.recording.loop.RecorderLoop` has it, and a
:class:`~shardlog.recording.session.BrokerSession` (shardlog/recording/session.py) that
delivers the messages to it and tells it when a connection begins and ends (the
recorder is the session's :class:`~shardlog.recording.session.Receiver`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt

from shardlog.config.routing import Router
from shardlog.config.schema import Broker, Shard, ShardMap
from shardlog.control.commands import topic_filter_matches
from shardlog.counters import Counters
from shardlog.recording.brokercheck import InflightProbe
from shardlog.recording.client import BufferedClient, StockClient
from shardlog.recording.session import broker_dropped
from shardlog.recording.sinks import MAX_WAITING, JournalSink, Sink, Stamps, StoreSink
from shardlog.records import encode_record, props_member
from shardlog.routes import Skip, Unstorable
from shardlog.topics import TopicError, topic_from_bytes
from shardlog.writing.compressor import Compressor
from shardlog.writing.store import Store

if TYPE_CHECKING:
    from shardlog.hooks.chain import Chain
    from shardlog.hooks.path import HookedPath

log = logging.getLogger(__name__)
_time_ns = time.time_ns
_monotonic = time.monotonic
DISCARD, BROKER_DROPPED = Skip.DISCARD, Skip.BROKER_DROPPED


class Recorder:
    """One shard's recorder: what happens per message, in one path for every shard: route,
    stamp, encode (through the hooks, if any), buffer in the sink (shardlog/recording/sinks.py:
    the topic files, or a journal), flush, acknowledge in order; and when a batch is due (its
    size follows the broker's in-flight cap, :class:`InflightProbe`). Its session and its loop
    are other objects (see the module docstring)."""

    #: where the records go (set by open_store)
    sink: Sink

    def __init__(self, smap: ShardMap, shard: Shard) -> None:
        self.smap = smap
        self.shard = shard
        self.broker: Broker = smap.broker_of(shard)
        self.counters = Counters(shard=shard.name, pid=os.getpid(), started_ts=time.time_ns() // 1000)
        self.router = Router((s.branch, s.name) for s in smap.shards
                             if smap.broker_of(s) == self.broker)
        #: topic bytes -> its sink's target (TopicState, or a journal key) or a Skip
        self.routes: dict[bytes, Any] = {}
        self.stamps = Stamps()
        self.acks: list[int] = []        # QoS 1 message ids received since the last flush, in order
        #: PUBACKs go out in the order the PUBLISHes came (MQTT 5 4.6.0-2; iotcore hangs up
        #: otherwise): while the sink holds an id (its topic being prepared, or refused by
        #: the disk), it and every later id wait here, in arrival order
        self.unacked: deque[int] = deque()
        self.blocked: set[int] = set()   # the ids of self.unacked the sink still holds
        self.pending = 0                 # records received since the last successful flush
        self.batch_started = 0.0
        self.batch_max = 1 if shard.fsync == "always" else shard.batch.max_messages
        #: flush by count when pending reaches this: batch_max more than the records that
        #: wait for their topic's preparation (which a flush cannot write yet)
        self.flush_at = self.batch_max
        #: records waiting for the preparer beyond this: the next flush waits for it
        self.max_waiting = max(MAX_WAITING, 2 * self.batch_max)
        self.max_delay = shard.batch.max_delay
        self.max_payload = shard.max_payload
        self.max_states = shard.max_topics
        self.next_retry = 0.0
        self.store: Store | None = None
        #: the client to acknowledge through while connected (connection_up), else None
        self.ack_client: BufferedClient | StockClient | None = None
        ctl = smap.control
        #: never recorded: the control topic (commands may carry a token) and its replies
        self.unrecorded = [ctl.topic] + ([ctl.reply_topic] if ctl.reply_topic else []) if ctl.mqtt else []
        #: the broker's in-flight cap, searched from deadline flushes (the loop asks it; set_batch_step)
        self.probe = InflightProbe(self.batch_max, self.max_delay)
        self.batch_step = self.batch_max  # flush every this many records (the broker's cap, if lower)
        #: with hooks (shardlog.hooks.path.install): what the chain makes of each message
        self.hooks: HookedPath | None = None
        #: with ``retained: new|none``: this connection's retained messages are not recorded
        #: (shard ``retained``, given at each CONNACK by the session: connection_up)
        self.skip_retained = False
        if self.broker.mqtt5 and (shard.format == "csv" or shard.payload_only):
            log.warning("shard %s: the %s format does not store MQTT 5 properties; messages are "
                        "recorded without them (docs/history.md, \"Write formats\")", shard.name,
                        "payload-only" if shard.payload_only else shard.format)

    def install_hooks(self) -> Chain | None:
        """A shard with hooks runs each storable message through them (shardlog/hooks/path.py);
        a shard without keeps the plain path. Raises ConfigError."""
        if not self.shard.hooks:
            return None
        from shardlog.hooks import path as hook_path
        self.hooks = hook_path.install(self)
        return self.hooks.chain

    def open_store(self, root_real: str, branch_root: str) -> Compressor | None:
        """The sink of this shard (``journal.enabled``: the journal) and its store."""
        shard = self.shard
        compressor = Compressor(self.counters) if shard.compress == "gzip" else None
        sink: Sink
        if shard.journal.enabled:
            sink = JournalSink(shard, root_real, branch_root, self.counters, compressor, self.stamps,
                               self.max_states, self.max_waiting, self.batch_max)
        else:
            sink = StoreSink(Store(shard, root_real, branch_root, self.counters, compressor), self.max_waiting,
                             self.routes)
        self.sink, self.store = sink, sink.store
        return compressor

    # -- the connection (what the session tells: session.Receiver) ------------------------

    def connection_up(self, client: BufferedClient | StockClient, skip_retained: bool) -> None:
        self.ack_client = client
        self.skip_retained = skip_retained

    def connection_lost(self) -> None:
        self.ack_client = None
        # Message ids belong to the connection: the broker redelivers the unacknowledged
        # messages after we reconnect, so their buffered records are still written (the
        # redelivered copies become duplicates, never losses).
        self.acks = []
        self.unacked.clear()
        self.blocked.clear()
        if self.store is not None:
            self.sink.forget_mids()
        if self.hooks is not None:
            self.hooks.fan.clear()

    # -- messages -----------------------------------------------------------------------

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        # msg._topic: the raw topic bytes. paho's .topic property decodes on every
        # access and raises on invalid UTF-8, which must be quarantined, not lost.
        # The fast path (client.py) sends a PUBLISH with MQTT 5 properties here.
        props = getattr(msg, "properties", None)
        self.on_publish(bytes(msg._topic), bytes(msg.payload), msg.qos, msg.mid, msg.dup, msg.retain,
                        b"" if props is None else props_member(props.__dict__))

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                   props: bytes = b"") -> None:
        """One received message, the hot path of every shard: route it (cached), stamp it,
        buffer its record in the sink (or what the hooks make of it, or a quarantine record),
        maybe flush. ``props``: the record's ``props`` member (shardlog.records.props_member)."""
        target = self.routes.get(topic)
        if target is None:
            target = self.route(topic)
        elif target is BROKER_DROPPED:
            broker_dropped(self.counters, payload)
            return
        sink = self.sink
        c = self.counters
        ts = _time_ns() // 1000
        stamps = self.stamps
        if ts <= stamps.last:  # strictly increasing within the shard (sinks.Stamps)
            ts = stamps.last + 1
        stamps.last = ts
        if qos:
            self.acks.append(mid)
        else:
            mid = 0
        c.last_message_ts = ts
        if dup:
            c.redelivered += 1
        if retain and self.skip_retained:
            c.retained_skipped += 1  # acknowledged with the next flush, never written
        elif target.__class__ is sink.target and len(payload) <= self.max_payload:
            if self.hooks is None:
                sink.add(target, encode_record(ts, qos, retain, payload, props), mid)
            else:
                self.hooks.run(target, topic, payload, ts, qos, retain, mid, props)
        elif target is DISCARD:
            c.discarded += 1
        elif target.__class__ is Unstorable:
            if sink.problem is not None and qos == 0 and self.pending > 10 * self.batch_max:
                c.dropped_qos0 += 1  # an unstorable QoS 0 flood while the disk refuses: counted
                return
            sink.quarantine(ts, target.reason, topic, qos, retain, payload, mid, props)
        else:
            sink.quarantine(ts, f"payload of {len(payload)} bytes exceeds max_payload",
                            topic, qos, retain, payload, mid, props)
        self.pending += 1
        if self.pending == 1:
            self.batch_started = _monotonic()
        if self.pending >= self.flush_at and sink.problem is None:
            self.flush()

    def route(self, raw: bytes) -> Any:
        """Topic bytes -> the sink's target or a Skip (both cached in ``routes``), or why
        the topic cannot be stored (:class:`Unstorable`, not cached)."""
        try:
            topic = topic_from_bytes(raw)
        except TopicError as exc:
            return Unstorable(f"topic not storable: {exc}")
        if self._not_mine(topic):
            self.routes[raw] = DISCARD
            return DISCARD
        try:
            target = self.sink.route(topic)
        except TopicError as exc:
            return Unstorable(f"topic not storable: {exc}")
        self.routes[raw] = target
        return target

    def _not_mine(self, topic: str) -> bool:
        """Owned by a more specific shard, or a control topic: acknowledged, not recorded."""
        return (self.router.owner(topic) != self.shard.name
                or any(topic_filter_matches(t, topic) for t in self.unrecorded))

    # -- flushing and acknowledging -----------------------------------------------------

    def flush(self, wait: bool = False) -> None:
        """Write the buffered records, then acknowledge what was written. Records of
        topics still being prepared stay buffered (``wait``: prepare them first)."""
        sink = self.sink
        now = time.monotonic()
        # held: ids received since the last flush and not written; from now on the sink
        # keeps them (with their records) and lists them in take_released once written.
        # So this costs the new ids only, however many records wait for the preparer.
        try:
            held = sink.flush(time.time_ns() // 1000, now, self.pending, wait)
            released = sink.take_released()
            if self.hooks is not None and self.hooks.fan.live:
                held, released = self.hooks.fan.settle(held, released)  # stand-in ids -> the messages' own
        except BaseException:
            # the sink may hold some of these ids now: never acknowledge them before their
            # write (unacknowledged, the broker redelivers them: duplicates, never losses)
            self.acks = []
            raise
        if held or self.unacked:  # (released ids are in unacked: held by an earlier flush)
            ack = self._in_order(held, released)
        else:
            ack = self.acks  # the common case: every id written, none waiting before them
        self.acks = []
        self.pending = sink.pending_records()  # QoS 0 ones may wait too
        if self.pending:
            self.next_retry = now + 1.0
        self.batch_started = now
        self.flush_at = self.pending + self.batch_step
        if len(self.routes) > self.max_states:
            self._trim_routes()
        if ack and (client := self.ack_client) is not None:
            client.ack_many(ack)  # one write; sent by the loop if inside a callback
            self.counters.acked += len(ack)

    def _in_order(self, held: set[int], released: list[int]) -> list[int]:
        """The ids that may be acknowledged now: the written ones up to the first id the
        sink still holds, in arrival order (the rest wait in self.unacked)."""
        blocked = self.blocked
        blocked.update(held)
        blocked.difference_update(released)
        unacked = self.unacked
        unacked.extend(self.acks)
        ack: list[int] = []
        while unacked and unacked[0] not in blocked:
            ack.append(unacked.popleft())
        return ack

    def deadline_flush(self, now: float) -> int | None:
        """A flush because the batch's time is up. Returns the probe's new batch step if this
        flush changed what it knows of a broker in-flight cap (the loop calls set_batch_step)."""
        first, acked = self.batch_started, self.counters.acked
        self.flush()
        last = self.counters.last_message_ts
        if last is None or self.counters.degraded:
            return None
        offset = time.time() - now  # wall clock minus monotonic
        return self.probe.on_deadline_flush(now, self.counters.acked - acked, first, last / 1e6 - offset, acked)

    def set_batch_step(self, step: int) -> None:
        """Flush every ``step`` records from now on (the probe's answer)."""
        self.batch_step = step
        self.flush_at = self.pending + step

    def flush_deadline(self) -> float | None:
        """When the buffered records must be flushed: the batch's max_delay, or, while
        the sink refuses writes, the next retry. None when nothing is buffered."""
        if not self.pending:
            return None
        if self.sink.problem is not None:
            return self.next_retry
        return self.batch_started + self.probe.delay  # max_delay, longer for a test of a broker cap

    def due(self, now: float) -> bool:
        deadline = self.flush_deadline()
        return deadline is not None and now >= deadline

    def _trim_routes(self) -> None:
        """Forget idle topics (oldest first) down to 3/4 of the cap; they are routed (and,
        without a journal, reloaded from disk) again if they speak. Called when the cache
        passes ``max_topics``."""
        sink = self.sink
        excess = len(self.routes) - self.max_states * 3 // 4
        drop: list[bytes] = []
        for k, target in self.routes.items():
            if len(drop) >= excess:
                break
            if target is DISCARD or (target.__class__ is sink.target and sink.evictable(target)):
                drop.append(k)
        for k in drop:
            del self.routes[k]

    # -- what control operations use (shardlog/control/operations.py, Host) ------------

    @contextlib.contextmanager
    def quiesced(self) -> Iterator[str | None]:
        """A block in which the recording thread may use the store and the topic states
        (control operations); nothing else touches them meanwhile. It yields None, or why
        the shard cannot act now (then do nothing)."""
        with self.sink.quiesced(self.flush) as busy:
            yield busy

    def topic_states(self) -> dict[bytes, Any]:
        """Topic states by key (in ``quiesced``); see :meth:`state_key`."""
        return self.sink.topic_states()

    def state_key(self, topic: str) -> bytes:
        return self.sink.state_key(topic)
