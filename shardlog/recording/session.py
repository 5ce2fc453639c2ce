"""The recorder's broker session: the paho client, connecting, and the paho callbacks
that are about the session itself (CONNACK, SUBACK, UNSUBACK, disconnection).

:class:`BrokerSession` is one object with one role, which the recorder's loop
(shardlog/recording/loop.py) creates and drives. It owns the client, the connection's
state, the reconnection backoff and the session memo, and gets everything else in its
constructor: the shard map and the shard, the counters, the router, the route cache
(where it marks the $SYS dropped counter), the recorder to deliver messages to (a
:class:`Receiver`: the client's message callbacks go straight to it), and two callables of
the loop (whether a stop was asked for; write the stats file). Each shard keeps a
persistent session (a stable client id, MQTT 5 clean_start=False with a session expiry,
or 3.1.1 clean_session=False); what the broker does differently is read from its answers
by the pure functions of shardlog/recording/brokercheck.py and noted once (:meth:`BrokerSession.note`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from shardlog.config.load import client_id
from shardlog.config.routing import subscription
from shardlog.config.tls import broker_key
from shardlog.recording.brokercheck import connack_notes, recorded_before, suback_note
from shardlog.recording.client import (
    BufferedClient,
    PahoErrors,
    StockClient,
    apply_credentials,
    drop_connection,
    make_client,
)
from shardlog.recording.sessionmemo import (
    SessionMemo,
    expects_session,
    memo_path,
    read_memo,
    stale_filters,
    write_memo,
)
from shardlog.routes import Skip

if TYPE_CHECKING:
    from shardlog.config.routing import Router
    from shardlog.config.schema import Broker, Shard, ShardMap
    from shardlog.counters import Counters

log = logging.getLogger(__name__)

#: mosquitto's count of messages it dropped (e.g. past max_queued_messages for an offline
#: session). Nothing else tells a subscriber that the broker lost messages meant for it.
SYS_DROPPED = "$SYS/broker/publish/messages/dropped"


def _mid(sent: tuple[object, int | None]) -> int:
    """The packet id paho gave a SUBSCRIBE or UNSUBSCRIBE; -1 (matching no answer) if none."""
    return -1 if sent[1] is None else sent[1]


class Receiver(Protocol):
    """What the session calls of the recorder it delivers to (shardlog.recording.recorder.Recorder;
    a protocol: this module does not import the recorder)."""

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None: ...

    def on_publish(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                   props: bytes = b"") -> None: ...

    def connection_up(self, client: BufferedClient | StockClient, skip_retained: bool) -> None:
        """The broker accepted the connection: acknowledge through ``client``; ``skip_retained``:
        this connection's retained messages are not recorded."""

    def connection_lost(self) -> None:
        """The connection ended: its message ids are void."""


class BrokerSession:
    """One shard's session with its broker (see the module docstring)."""

    def __init__(self, smap: ShardMap, shard: Shard, counters: Counters, router: Router,
                 routes: dict[bytes, Any], receiver: Receiver, *, stopping: Callable[[], bool],
                 write_stats: Callable[[], None]) -> None:
        self.smap = smap
        self.shard = shard
        self.broker: Broker = smap.broker_of(shard)
        self.counters = counters
        self.router = router
        self.routes = routes  # the recorder's route cache: the $SYS dropped counter is marked in it
        self.receiver = receiver
        self.stopping = stopping        # whether the loop was asked to stop (a disconnect is then ours)
        self.write_stats = write_stats  # at the SUBACK: the supervisor sees "subscribed" at once
        self.client_id = client_id(smap, shard)
        self.client: BufferedClient | StockClient | None = None  # make_client
        self.connected = False
        self.backoff = 0.5  # seconds before the next connection attempt; reset by a CONNACK
        self.expect_session = False  # the broker should have this client id's session (recall)
        ctl = smap.control
        self.status_topic = f"{ctl.status_topic}/{shard.name}" if ctl.status_topic else None
        self.watch_sys = self.broker.sys_topics and not self.broker.embedded
        self.paho_errors = PahoErrors()
        self._subscribe_mid = -1  # the SUBACK that makes this shard "subscribed"
        self._sys_mid = -1        # the $SYS watch's SUBACK, while it is outstanding
        # the session memo (shardlog/recording/sessionmemo.py), read by recall
        self._memo_file: str | None = None
        self._memo: SessionMemo | None = None
        self._granted: frozenset[str] = frozenset()  # filters this connection's broker granted
        self._stale: tuple[str, ...] = ()             # filters being unsubscribed (until the UNSUBACK)
        self._unsubscribe_mid = -1
        # this connection attempt: when its CONNACK is overdue, and what went wrong (logged once)
        self._connack_due: float | None = None
        self._attempt_failed: str | None = None

    def recall(self, root_real: str, branch_root: str) -> None:
        """At start: read the memo; whether the broker should hold this client id's session."""
        self._memo_file = memo_path(root_real, self.shard.name)
        self._memo = read_memo(self._memo_file)
        self.expect_session = expects_session(self._memo, self.client_id, recorded_before(branch_root))

    def _remember(self) -> None:
        """Write the memo: the filters the session holds now (granted, and those not yet unsubscribed)."""
        if self._memo_file is None:
            return
        memo = SessionMemo(client_id=self.client_id, subscriptions=sorted(self._granted | set(self._stale)))
        if memo != self._memo:
            write_memo(self._memo_file, memo)
            self._memo = memo

    def make_client(self) -> BufferedClient | StockClient:
        """The session's client, its callbacks set (messages go straight to the receiver).
        Raises ConfigError (a TLS file, credentials)."""
        b = self.broker
        if b.mqtt5:
            client = make_client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 protocol=mqtt.MQTTv5, manual_ack=True)
        else:
            client = make_client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                                 protocol=mqtt.MQTTv311, manual_ack=True)
        apply_credentials(client, b, broker_key(self.smap, self.shard))  # ConfigError: exit 78
        client.on_connect = self.on_connect
        client.on_disconnect = self.on_disconnect
        client.on_message = self.receiver.on_message
        if isinstance(client, BufferedClient):
            client.on_publish_fields = self.receiver.on_publish  # the fast path skips building a message
        client.on_subscribe = self.on_subscribe
        client.on_unsubscribe = self.on_unsubscribe
        client.reconnect_delay_set(1, int(max(1, b.reconnect_max)))
        client.connect_timeout = float(b.connect_timeout)  # TCP and TLS; the CONNACK: check_connack
        if self.status_topic:  # the broker publishes it if the connection dies without DISCONNECT
            client.will_set(self.status_topic, "offline", qos=1, retain=True)
        # paho's own errors ("failed to receive on socket: [SSL: ...]") name why a connection died
        client.enable_logger(logging.getLogger("paho") if log.isEnabledFor(logging.DEBUG) else self.paho_errors)
        self.client = client
        return client

    def next_backoff(self) -> float:
        """The wait before the attempt after this one, doubled for the one after (up to
        broker.reconnect_max) until a CONNACK resets it."""
        wait = self.backoff
        self.backoff = min(self.backoff * 2, self.broker.reconnect_max)
        return wait

    def connect(self) -> None:
        b = self.broker
        assert self.client is not None
        self._attempt_failed = None
        self._connack_due = None
        if b.mqtt5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(b.session_expiry)
            props.ReceiveMaximum = b.receive_maximum
            self.client.connect(b.host, b.port, b.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect(b.host, b.port, b.keepalive)
        self._connack_due = time.monotonic() + float(b.connect_timeout)

    def check_connack(self, now: float) -> None:
        """Each turn of the loop: a CONNACK that has not come within broker.connect_timeout
        ends the attempt (one WARNING), and the loop retries with its backoff. Without this,
        paho waited a whole keepalive and said the broker closed the connection."""
        due = self._connack_due
        if due is None or now < due or self.connected or self.client is None or self.client.socket() is None:
            return
        self._connack_due = None
        b = self.broker
        self._attempt_failed = "no CONNACK"
        log.warning("broker %s:%s sent no CONNACK within %gs of the connection%s; closing it and retrying "
                    "(an overloaded broker, or not an MQTT broker on this port?)", b.host, b.port,
                    float(b.connect_timeout), " (TLS completed)" if b.tls is not None else "")
        drop_connection(self.client)

    def lost(self) -> None:
        """The connection ended (paho's on_disconnect, or the loop found the socket gone)."""
        self.connected = False
        self.counters.connected = False
        self.counters.subscribed = False
        self.receiver.connection_lost()

    def note(self, text: str) -> None:
        """A way this broker differs: one WARNING line, once, and listed in the stats."""
        if text not in self.counters.broker_notes:
            log.warning("%s", text)
            self.counters.broker_notes.append(text)

    # -- paho callbacks ---------------------------------------------------------------

    def on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                   reason: object, properties: Properties | None) -> None:
        self._connack_due = None
        if getattr(reason, "is_failure", False):
            self._attempt_failed = str(reason)  # paho then closes the socket: on_disconnect says no more
            log.error("broker %s:%s refused the connection: %s; retrying", self.broker.host, self.broker.port,
                      reason)
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
                                  asked_expiry=int(self.broker.session_expiry), client_id=self.client_id):
            self.note(note)
        c.session_present = flags.session_present
        self.expect_session = True
        sys_watch = self.router.owner(SYS_DROPPED) != self.shard.name and self.watch_sys
        wanted = [topic, SYS_DROPPED] if sys_watch else [topic]
        self._granted = frozenset()
        self._stale = ()
        if flags.session_present:  # filters of an older prefix stay in the session until unsubscribed
            if stale := stale_filters(self._memo, self.client_id, wanted):
                log.info("unsubscribing from %s: kept by the broker's session, no longer this shard's",
                         ", ".join(stale))
                self._stale = tuple(stale)
                self._unsubscribe_mid = _mid(client.unsubscribe(stale))
        assert self.client is not None
        self.receiver.connection_up(self.client, skip_retained(self.shard.retained, flags.session_present,
                                                               self._memo, self.client_id, topic))
        if self.broker.mqtt5:
            options = SubscribeOptions(qos=self.shard.qos, retainHandling=_RETAIN_HANDLING[self.shard.retained])
            self._subscribe_mid = _mid(client.subscribe(topic, options=options))
        else:
            self._subscribe_mid = _mid(client.subscribe(topic, self.shard.qos))
        if self.status_topic:
            client.publish(self.status_topic, "online", qos=1, retain=True)
        # Not with the embedded broker (iotcore/rumqttd): it has no $SYS and answers a $SYS
        # subscription by dropping the connection, which would reconnect forever.
        if sys_watch:
            self.routes[SYS_DROPPED.encode()] = Skip.BROKER_DROPPED
            self._sys_mid = _mid(client.subscribe(SYS_DROPPED, 0))  # harmless where the broker has no such topic

    def on_unsubscribe(self, client: mqtt.Client, userdata: object, mid: int,
                       reasons: list, properties: Properties | None) -> None:
        if mid != self._unsubscribe_mid:
            return
        self._unsubscribe_mid = -1
        self._stale = ()
        self._remember()

    def on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                     reasons: list, properties: Properties | None) -> None:
        failed = [r for r in reasons if getattr(r, "is_failure", False) or r == 128]
        if mid == self._sys_mid:  # the $SYS watch: its refusal or grant says nothing about recording
            self._sys_mid = -1
            if failed:
                self.note(f"the broker refuses the subscription to {SYS_DROPPED} ({failed[0]}): messages it "
                          "drops go uncounted (broker_dropped); broker.sys_topics: false skips asking")
            else:
                self._granted |= {SYS_DROPPED}
                self._remember()
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
        self._granted |= {subscription(self.shard.branch)}
        self._remember()
        self.write_stats()

    def on_disconnect(self, client: mqtt.Client, userdata: object, flags: object,
                      reason: object, properties: Properties | None) -> None:
        error = self.paho_errors.take()
        stopping = self.stopping()
        if self.connected and self._sys_mid != -1 and not stopping:
            self.watch_sys = False  # iotcore (rumqttd) does this: never ask again in this process
            self.note(f"the broker closed the connection on the subscription to {SYS_DROPPED} instead of "
                      "answering it; not asking again (set broker.sys_topics: false for this broker)")
        elif self.connected and not stopping:
            log.warning("disconnected from the broker: %s%s", reason, f" ({error})" if error else "")
        elif self._attempt_failed is not None:
            pass  # a refusal or a missing CONNACK, already said with its reason
        elif not stopping:
            log.warning("broker %s:%s closed the connection before accepting it: %s; retrying (TLS client "
                        "certificate, credentials, or the broker's limits?)", self.broker.host,
                        self.broker.port, error or reason)
        self._sys_mid = -1
        self._connack_due = None
        self.lost()

    def disconnect(self) -> None:
        """At stop: DISCONNECT (after the PUBACKs queued), keeping the session on the broker."""
        client = self.client
        assert client is not None
        if client.socket() is not None:
            if self.status_topic and self.connected:
                client.publish(self.status_topic, "offline", qos=1, retain=True)  # no Will on DISCONNECT
            client.disconnect()  # queued after the PUBACKs; the session stays on the broker
            deadline = time.monotonic() + 5.0
            while client.socket() is not None and time.monotonic() < deadline:
                client.loop(0.05)


def broker_dropped(counters: Counters, payload: bytes) -> None:
    """A message of the $SYS dropped counter (SYS_DROPPED): the broker's count, and a WARNING
    when it grew."""
    try:
        n = int(payload)
    except ValueError:
        return
    before = counters.broker_dropped
    counters.broker_dropped = n
    if before is not None and n > before:
        log.warning("the broker dropped %d message(s) (%s now %d): messages queued for offline "
                    "sessions may be lost; raise mosquitto's max_queued_messages", n - before,
                    SYS_DROPPED, n)
    elif before is None and n:
        log.warning("the broker has dropped %d message(s) since it started (%s)", n, SYS_DROPPED)


#: the shard's ``retained`` -> MQTT 5 Retain Handling (0: at every subscribe, 1: only for a new
#: subscription, 2: never)
_RETAIN_HANDLING = {"all": SubscribeOptions.RETAIN_SEND_ON_SUBSCRIBE,
                    "new": SubscribeOptions.RETAIN_SEND_IF_NEW_SUB,
                    "none": SubscribeOptions.RETAIN_DO_NOT_SEND}


def skip_retained(mode: str, session_present: bool, memo: SessionMemo | None, cid: str, topic: str) -> bool:
    """Whether the messages with the retain flag this connection receives are left out (pure).
    A broker sets the flag only on the retained messages a subscription brings (MQTT 5
    3.3.1.3, without Retain As Published; 3.1.1 3.3.1.3), so: ``none`` always; ``new`` when the
    broker kept the session and it already held this filter (the memo says so), which
    catches MQTT 3.1.1 brokers (no Retain Handling) and those that ignore it."""
    if mode == "none":
        return True
    if mode != "new" or not session_present:
        return False
    return memo is not None and memo.client_id == cid and topic in memo.subscriptions
