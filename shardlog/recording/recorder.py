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

Exit codes follow sysexits: 0 stopped cleanly, 64 usage, 70 internal error,
73 the root cannot be created, 75 the branch is locked by another recorder,
78 configuration error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import time
import typing
from collections import deque
from types import FrameType
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog.recording.brokercheck import InflightProbe, connack_notes, recorded_before, suback_note
from shardlog.recording.client import BufferedClient, PahoErrors, StockClient, apply_credentials, make_client
from shardlog.config.load import client_id
from shardlog.config.schema import Broker, ConfigError, Shard, ShardMap
from shardlog.control.commands import topic_filter_matches
from shardlog.recording.lock import LockBusy, ShardLock
from shardlog.control.operations import ControlSocket, Operations
from shardlog.records import encode_record
from shardlog.config.routing import Router, subscription
from shardlog.recording.stats import Counters, write_stats
from shardlog.writing.compressor import Compressor
from shardlog.writing.store import Store
from shardlog.writing.topicfiles import TopicState
from shardlog.topics import TopicError, safe_join, topic_from_bytes, topic_to_relpath

if TYPE_CHECKING:
    from shardlog.hooks.path import FanOut
    from shardlog.hooks.chain import Chain

log = logging.getLogger(__name__)
_time_ns = time.time_ns
MAX_WAITING = 12_000

EX_OK, EX_SOFTWARE, EX_CANTCREAT, EX_TEMPFAIL, EX_CONFIG = 0, 70, 73, 75, 78

#: states kept in memory per open-file slot (closed-file topics keep their recent buffer)
_STATES_PER_FD = 2
_DISCARD = "discard"
_BROKER_DROPPED = "broker-dropped"
#: mosquitto's count of messages it dropped (e.g. past max_queued_messages for an offline
#: session). Nothing else tells a subscriber that the broker lost messages meant for it.
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


class Recorder:
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
        self.max_states = shard.max_open_files * _STATES_PER_FD
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
        # how this broker differs (shardlog/brokercheck.py): notes logged once, kept in the stats
        self.expect_session = False  # the broker should have this client id's session
        self._sys_mid = -1           # the $SYS watch's SUBACK, while it is outstanding
        self.watch_sys = self.broker.sys_topics and not self.broker.embedded
        self.probe = InflightProbe(self.batch_max, self.max_delay)
        self.batch_step = self.batch_max  # flush every this many records (the broker's cap, if lower)
        self.paho_errors = PahoErrors()
        self.backoff = 0.5  # seconds before the next connection attempt; reset by a CONNACK
        #: with hooks (hook_path.install): the stand-in ids of messages that became several records
        self.fan: FanOut | None = None

    def install_hooks(self) -> Chain | None:
        """A shard with hooks records through hook_path.HookedPath.on_publish (bound once,
        here: a shard without hooks keeps the plain path). Raises ConfigError."""
        if not self.shard.hooks:
            return None
        from shardlog.hooks import path as hook_path
        return hook_path.install(self)

    # -- setup ----------------------------------------------------------------------

    def _prepare_root(self) -> tuple[str, str]:
        os.makedirs(self.shard.root, exist_ok=True)
        root_real = os.path.realpath(self.shard.root)
        branch = self.shard.branch
        branch_root = safe_join(root_real, topic_to_relpath(branch)) if branch else root_real
        os.makedirs(branch_root, exist_ok=True)
        self.expect_session = recorded_before(branch_root)
        if not os.access(branch_root, os.W_OK):
            raise PermissionError(13, "not writable", branch_root)
        return root_real, branch_root

    def _make_client(self) -> BufferedClient | StockClient:
        b = self.broker
        cid = client_id(self.smap, self.shard)
        if b.mqtt5:
            client = make_client(CallbackAPIVersion.VERSION2, client_id=cid,
                                 protocol=mqtt.MQTTv5, manual_ack=True)
        else:
            client = make_client(CallbackAPIVersion.VERSION2, client_id=cid, clean_session=False,
                                 protocol=mqtt.MQTTv311, manual_ack=True)
        apply_credentials(client, b)
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_message = self.on_message
        if isinstance(client, BufferedClient):
            client.on_publish_fields = self.on_publish  # the fast path skips building a message
        client.on_subscribe = self.on_subscribe
        client.reconnect_delay_set(1, int(max(1, b.reconnect_max)))
        if self.status_topic:  # the broker publishes it if the connection dies without DISCONNECT
            client.will_set(self.status_topic, "offline", qos=1, retain=True)
        # paho's own errors ("failed to receive on socket: [SSL: ...]") name why a connection died
        client.enable_logger(logging.getLogger("paho") if log.isEnabledFor(logging.DEBUG) else self.paho_errors)
        return client

    def _connect(self) -> None:
        b = self.broker
        assert self.client is not None
        if b.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(b.session_expiry)
            props.ReceiveMaximum = b.receive_maximum
            self.client.connect(b.host, b.port, b.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect(b.host, b.port, b.keepalive)

    # -- paho callbacks ---------------------------------------------------------------

    def on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                   reason: object, properties: Properties | None) -> None:
        if getattr(reason, "is_failure", False):
            log.error("broker %s:%s refused the connection: %s", self.broker.host, self.broker.port, reason)
            return
        self.connected = True
        self.backoff = 0.5
        c = self.counters
        c.connected = True
        c.connects += 1
        topic = subscription(self.shard.branch)
        log.info("connected to %s:%s (session present: %s); subscribing to %s at QoS %d",
                 self.broker.host, self.broker.port, flags.session_present, topic, self.shard.qos)
        if self.expect_session and not flags.session_present:
            c.sessions_lost += 1
        for note in connack_notes(session_present=flags.session_present, expect_session=self.expect_session,
                                  first=c.connects == 1, mqtt5=self.broker.mqtt5,
                                  props=properties.json() if properties is not None else {},
                                  asked_expiry=int(self.broker.session_expiry),
                                  client_id=client_id(self.smap, self.shard)):
            self.note(note)
        c.session_present = flags.session_present
        self.expect_session = True
        self._subscribe_mid = client.subscribe(topic, self.shard.qos)[1]
        if self.status_topic:
            client.publish(self.status_topic, "online", qos=1, retain=True)
        # Not with the embedded broker (iotcore/rumqttd): it has no $SYS and answers a $SYS
        # subscription by dropping the connection, which would reconnect forever.
        if self.router.owner(SYS_DROPPED) != self.shard.name and self.watch_sys:
            self.states[SYS_DROPPED.encode()] = _BROKER_DROPPED
            self._sys_mid = client.subscribe(SYS_DROPPED, 0)[1]  # harmless where the broker has no such topic

    def note(self, text: str) -> None:
        """A way this broker differs: one WARNING line, once, and listed in the stats."""
        if text not in self.counters.broker_notes:
            log.warning("%s", text)
            self.counters.broker_notes.append(text)

    def on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                     reasons: list, properties: Properties | None) -> None:
        failed = [r for r in reasons if getattr(r, "is_failure", False) or r == 128]
        if mid == self._sys_mid:  # the $SYS watch: its refusal or grant says nothing about recording
            self._sys_mid = -1
            if failed:
                self.note(f"the broker refuses the subscription to {SYS_DROPPED} ({failed[0]}): messages it "
                          "drops go uncounted (broker_dropped); broker.sys_topics: false skips asking")
        if mid != self._subscribe_mid:
            return
        if failed:
            log.error("the broker refused the subscription to %s: %s",
                      subscription(self.shard.branch), failed)
            self.counters.errors += 1
            return
        for r in reasons:
            if (note := suback_note(self.shard.qos, getattr(r, "value", r), subscription(self.shard.branch))):
                self.note(note)
        self.counters.subscribed = True
        self._write_stats()

    def on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                      reason: object, properties: Properties | None) -> None:
        error = self.paho_errors.take()
        if self.connected and self._sys_mid != -1 and not self.stop_requested:
            self.watch_sys = False  # iotcore (rumqttd) does this: never ask again in this process
            self.note(f"the broker closed the connection on the subscription to {SYS_DROPPED} instead of "
                      "answering it; not asking again (set broker.sys_topics: false for this broker)")
        elif self.connected and not self.stop_requested:
            log.warning("disconnected from the broker: %s%s", reason, f" ({error})" if error else "")
        elif not self.stop_requested:
            log.warning("broker %s:%s closed the connection before accepting it: %s; retrying (TLS client "
                        "certificate, credentials, or the broker's limits?)", self.broker.host,
                        self.broker.port, error or reason)
        self._sys_mid = -1
        self._lost_connection()

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
        self.on_publish(msg._topic, msg.payload, msg.qos, msg.mid, msg.dup, msg.retain)

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool) -> None:
        """One received message (the hot path): encode it, buffer it, maybe flush."""
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
            self.store.add(st, encode_record(ts, qos, retain, payload), mid)  # type: ignore[arg-type, union-attr]
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
                store.add(st, encode_record(ts, qos, retain, payload), mid)  # type: ignore[arg-type]
            else:
                store.quarantine(ts, f"payload of {len(payload)} bytes exceeds max_payload",
                                 topic, qos, retain, payload, mid)
        elif st is _DISCARD:
            c.discarded += 1
        else:
            if c.degraded and qos == 0 and self.pending > 10 * self.batch_max:
                c.dropped_qos0 += 1
                return
            store.quarantine(ts, st, topic, qos, retain, payload, mid)  # type: ignore[arg-type]
        self.pending += 1
        if self.pending == 1:
            self.batch_started = time.monotonic()
        if self.pending >= self.flush_at and not c.degraded:
            self.flush()

    def _broker_dropped(self, payload: bytes) -> None:
        try:
            n = int(payload)
        except ValueError:
            return
        before = self.counters.broker_dropped
        self.counters.broker_dropped = n
        if before is not None and n > before:
            log.warning("the broker dropped %d message(s) (%s now %d): messages queued for offline "
                        "sessions may be lost; raise mosquitto's max_queued_messages", n - before,
                        SYS_DROPPED, n)
        elif before is None and n:
            log.warning("the broker has dropped %d message(s) since it started (%s)", n, SYS_DROPPED)

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
            if self.fan is not None and self.fan.live:
                held = self.fan.settle(held, store)  # stand-in ids -> the messages' own
        except BaseException:
            # the store may hold some of these ids now: never acknowledge them before their
            # write (unacknowledged, the broker redelivers them: duplicates, never losses)
            self.acks = []
            raise
        if held or self.unacked:
            ack = self._in_order(held, store.released)
            store.released = []
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
        cap = self.probe.on_deadline_flush(now, self.counters.acked - acked, first, last / 1e6 - offset)
        if cap is not None:
            self.batch_step = min(self.batch_max, cap)
            self.flush_at = self.pending + self.batch_step
            self.counters.inflight_cap = cap
            self.note(f"the broker sends at most {cap} unacknowledged messages (its in-flight cap, below "
                      f"batch.max_messages {self.batch_max}): flushing every {cap} messages instead of "
                      f"waiting batch.max_delay; raise the cap on the broker for throughput (docs/brokers.md)")

    def _flush_deadline(self) -> float | None:
        """When the buffered records must be flushed: the batch's max_delay, or, while
        the disk refuses writes, the next retry. None when nothing is buffered."""
        if not self.pending:
            return None
        if self.counters.degraded:
            return self.next_retry
        return self.batch_started + self.max_delay

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

    # -- the main loop -------------------------------------------------------------------

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True  # only a flag: the main loop does the work

    def run(self) -> int:
        shard = self.shard
        try:
            self.install_hooks()
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EX_CONFIG
        try:
            root_real, branch_root = self._prepare_root()
        except (OSError, TopicError) as exc:
            log.error("cannot use root %s: %s", shard.root, exc)
            return EX_CANTCREAT
        lock = ShardLock(branch_root)
        try:
            lock.acquire(shard.lock_wait)
        except LockBusy as exc:
            log.error("%s", exc)
            return EX_TEMPFAIL
        except OSError as exc:
            log.error("cannot take the shard lock in %s: %s", branch_root, exc)
            return EX_CANTCREAT
        try:
            return self._run_locked(root_real, branch_root)
        finally:
            lock.release()

    def _run_locked(self, root_real: str, branch_root: str) -> int:
        _raise_fd_limit(self.shard.max_open_files + 64)
        compressor = self.open_store(root_real, branch_root)
        channel = None
        if self.control_path:
            try:
                channel = ControlSocket(self.control_path)
            except OSError as exc:
                log.error("cannot open the control socket %s: %s (control commands will fail)",
                          self.control_path, exc)
        self.ops = Operations(self, channel)
        self.ops.clean_leftovers()
        assert self.store is not None
        self.store.start_preparer()  # new topics' directories and files: off the hot path
        self._started()
        self.client = self._make_client()
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        log.info("recording %s into %s (pid %d)", subscription(self.shard.branch), branch_root, os.getpid())
        try:
            self._loop()
            self._shutdown()
        finally:
            if channel is not None:
                channel.close()
            self._close_store()
            if compressor is not None:
                compressor.stop(timeout=30.0)
            self._write_stats()
        log.info("stopped: %d messages, %d acknowledged, %d quarantined",
                 self.counters.messages, self.counters.acked, self.counters.quarantined)
        return EX_OK

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

    def _loop(self) -> None:
        client = self.client
        assert client is not None
        next_connect = 0.0
        next_tick = 0.0
        while not self.stop_requested:
            now = time.monotonic()
            if client.socket() is None and now >= next_connect:
                # the next attempt if this one fails, even after the TCP connect (a TLS or login
                # refusal ends the connection inside connect()): only a CONNACK resets the backoff
                next_connect = now + self.backoff
                self.backoff = min(self.backoff * 2, self.broker.reconnect_max)
                try:
                    self._connect()
                except (OSError, ValueError) as exc:
                    log.warning("cannot reach broker %s:%s: %s; retrying in %.1fs",
                                self.broker.host, self.broker.port, exc, next_connect - now)
            if client.socket() is not None:
                timeout = min(0.1, max(0.0, self.ops.next_poll - now))  # inf without a control socket
                deadline = self._flush_deadline()
                if deadline is not None:
                    timeout = max(0.0, min(timeout, deadline - now))
                rc = client.loop(timeout)
                if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.buffered:
                    rc = client.read_buffered()
                    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and client.want_write():
                        client.loop_write()  # the acks queued by flushes inside callbacks
                if client.socket() is None:  # ended, whatever rc says (paho may close it itself)
                    self._lost_connection()
                    next_connect = max(next_connect, time.monotonic() + 0.5)
            else:
                time.sleep(min(0.1, max(0.0, next_connect - now)))  # waiting to reconnect
            now = time.monotonic()
            if self._due(now):
                self._deadline_flush(now)
            if now >= self.ops.next_poll:
                self.ops.poll(now)  # control commands, between batches
            if now >= next_tick:
                next_tick = now + self.heartbeat
                self._tick(now)

    def _tick(self, now: float) -> None:
        """About once a heartbeat: housekeeping, stats (the heartbeat), parent check."""
        self._housekeeping(now)
        self.counters.pending = self.pending
        self._write_stats()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.error("supervisor (pid %d) is gone; stopping", self.parent_pid)
            self.stop_requested = True

    def _housekeeping(self, now: float) -> None:
        assert self.store is not None
        self.store.sweep_recent(now)
        self.counters.topics_cached = len(self.states)

    def _shutdown(self) -> None:
        """Flush, acknowledge, and disconnect keeping the session."""
        client = self.client
        assert client is not None and self.store is not None
        if self.pending:
            self.flush(wait=True)
        if self.counters.degraded:
            log.error("stopping with %d record(s) not written; the broker keeps them unacknowledged",
                      self.pending)
        self.store.sweep_recent(time.monotonic(), force=True)
        self._disconnect()

    def _disconnect(self) -> None:
        client = self.client
        assert client is not None
        if client.socket() is not None:
            if self.status_topic and self.connected:
                client.publish(self.status_topic, "offline", qos=1, retain=True)  # no Will on DISCONNECT
            client.disconnect()  # queued after the PUBACKs; the session stays on the broker
            deadline = time.monotonic() + 5.0
            while client.socket() is not None and time.monotonic() < deadline:
                client.loop(0.05)

    def _write_stats(self) -> None:
        if self.stats_file is None:
            return
        self.counters.updated_ts = time.time_ns() // 1000
        try:
            write_stats(self.stats_file, self.counters)
        except OSError as exc:
            log.warning("cannot write stats file %s: %s", self.stats_file, exc)


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("file descriptor limit %d is below max_open_files + 64 (%d)", new, wanted)
