"""The edge of a replay: one paho client that publishes, driven from the calling thread.

QoS 1 and 2 publishes are confirmed: at most ``window`` of them are unacknowledged
at a time (never more than the broker's MQTT 5 Receive Maximum), and
:meth:`Publisher.drain` waits for the last acknowledgement before the replay counts
as done. QoS 0 publishes are done once written to the socket (MQTT has no
confirmation for them); the final DISCONNECT follows them on the same connection.
"""

from __future__ import annotations

import logging
import select
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog.config.schema import Broker
from shardlog.recording.client import apply_credentials
from shardlog.replay.plan import BrokerUnavailable, broker_name

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 1000
_PUMP_EVERY = 0.2  # s: read acknowledgements and keep the connection alive at least this often


class Publisher:
    """A publishing MQTT client (clean session, no network thread): every call runs
    paho's loop for as long as it waits, so acknowledgements and keepalive are handled
    by whoever calls :meth:`publish`, :meth:`pump` or :meth:`drain`."""

    def __init__(self, broker: Broker, client_id: str, window: int = DEFAULT_WINDOW,
                 ack_timeout: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.broker = broker
        self.window = window
        self.ack_timeout = ack_timeout
        self.clock = clock
        self.inflight: dict[int, int] = {}  # mid -> ts of its record, QoS 1/2 not yet acknowledged
        self.published = 0
        self.confirmed = 0
        self.refused = 0
        self.refusal: str | None = None
        self.connected = False
        self.lost: str | None = None
        self._refused_connect: str | None = None
        self._last_pump = 0.0
        if broker.mqtt5:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        else:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True,
                            protocol=mqtt.MQTTv311)
        # no paho limit (0): ours is enforced before publish(); paho's own rescans every
        # unacknowledged message on each PUBACK (O(window) per ack)
        c.max_inflight_messages_set(0)
        c.max_queued_messages_set(0)
        apply_credentials(c, broker)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        self.client = c

    # paho callbacks

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                    properties: Any) -> None:
        if getattr(reason, "is_failure", False):
            self._refused_connect = str(reason)
            return
        self.connected = True
        receive_max = getattr(properties, "ReceiveMaximum", None) if properties is not None else None
        if receive_max and receive_max < self.window:
            log.info("the broker accepts %d unacknowledged publishes at a time (Receive Maximum)", receive_max)
            self.window = int(receive_max)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: Any,
                       properties: Any) -> None:
        if self.connected:
            self.lost = str(reason)
        self.connected = False

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, reason: Any, properties: Any) -> None:
        if self.inflight.pop(mid, None) is None:
            return  # a QoS 0 publish written to the socket
        if getattr(reason, "is_failure", False):
            self.refused += 1
            if self.refusal is None:
                self.refusal = str(reason)
        else:
            self.confirmed += 1

    # driving it

    def connect(self, timeout: float = 10.0) -> None:
        b = self.broker
        self.client.connect_timeout = timeout
        try:
            if b.mqtt5:
                self.client.connect(b.host, b.port, b.keepalive, clean_start=True)
            else:
                self.client.connect(b.host, b.port, b.keepalive)
        except (OSError, ValueError) as exc:  # refused, unknown host, timeout, TLS handshake
            raise BrokerUnavailable(f"cannot connect to {broker_name(b)}: {exc}") from None
        deadline = self.clock() + timeout
        while not self.connected:
            if self._refused_connect is not None:
                raise BrokerUnavailable(f"{broker_name(b)} refused the connection: {self._refused_connect}")
            if self.clock() >= deadline:
                raise BrokerUnavailable(f"{broker_name(b)} did not answer the connection within {timeout:g} s")
            rc = self._loop(0.1)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._refused_connect is None:
                raise BrokerUnavailable(f"cannot connect to {broker_name(b)}: {mqtt.error_string(rc)}")

    def _loop(self, timeout: float) -> MQTTErrorCode:
        """paho's ``loop()`` without its wake-up socket pair: ``loop()`` creates one, and
        then every publish also writes a byte to it (a second system call per message).
        Read, write and keepalive through paho's public external-loop calls instead."""
        c = self.client
        sock = c.socket()
        if sock is None:
            return MQTTErrorCode.MQTT_ERR_NO_CONN
        pending = getattr(sock, "pending", None)  # bytes already decrypted by TLS
        if pending is not None and pending() > 0:
            readable, writable = True, c.want_write()
        else:
            r, w, _ = select.select([sock], [sock] if c.want_write() else [], [], timeout)
            readable, writable = bool(r), bool(w)
        if readable:
            rc = c.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c.socket() is None:
                return rc or MQTTErrorCode.MQTT_ERR_CONN_LOST
        if writable:
            rc = c.loop_write()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or c.socket() is None:
                return rc or MQTTErrorCode.MQTT_ERR_CONN_LOST
        return c.loop_misc()

    def pump(self, timeout: float = 0.0) -> None:
        """Handle the network for up to ``timeout`` seconds (returns sooner on traffic)."""
        self._last_pump = self.clock()
        rc = self._loop(timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self.lost is not None:
            raise BrokerUnavailable(f"lost the connection to {broker_name(self.broker)}: "
                                    f"{self.lost or mqtt.error_string(rc)}")

    def _wait(self, done: Callable[[], bool], what: str) -> None:
        """Pump until ``done()``; fail after ``ack_timeout`` without any acknowledgement."""
        last, seen = self.clock(), self.confirmed + self.refused
        while not done():
            self.pump(0.5)
            now = self.clock()
            if self.confirmed + self.refused != seen:
                last, seen = now, self.confirmed + self.refused
            elif now - last > self.ack_timeout:
                raise BrokerUnavailable(f"{broker_name(self.broker)} did not {what} within "
                                        f"{self.ack_timeout:g} s ({len(self.inflight)} unacknowledged)")

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, ts: int,
                props: dict[str, Any] | None = None) -> None:
        """Publish one message; waits while ``window`` QoS 1/2 publishes are unacknowledged
        or paho still holds unwritten bytes (so memory stays bounded). ``props``: MQTT 5
        properties by paho attribute name (shardlog.replay.plan.replay_properties)."""
        if qos and len(self.inflight) >= self.window:
            self._wait(lambda: len(self.inflight) < self.window, "acknowledge publishes")
        if self.client.want_write():
            self._wait(lambda: not self.client.want_write(), "take the data written to it")
        info = self.client.publish(topic, payload, qos, retain, properties=_properties(props) if props else None)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS or self.lost is not None:
            raise BrokerUnavailable(f"lost the connection to {broker_name(self.broker)}: "
                                    f"{self.lost or mqtt.error_string(info.rc)}")
        if qos:
            self.inflight[info.mid] = ts
        self.published += 1
        if self.clock() - self._last_pump >= _PUMP_EVERY:
            self.pump(0.0)

    def oldest_unconfirmed(self) -> int | None:
        return min(self.inflight.values()) if self.inflight else None

    def drain(self) -> None:
        """Wait until every QoS 1/2 publish is acknowledged and every byte written."""
        self._wait(lambda: not self.inflight and not self.client.want_write(), "acknowledge the last publishes")

    def close(self) -> None:
        """DISCONNECT after everything written (paho closes the socket once it is sent)."""
        if not self.connected:
            return
        self.connected = False  # a disconnect we asked for is no loss
        self.client.disconnect()
        deadline = self.clock() + 5.0
        while self.client.socket() is not None and self.clock() < deadline:
            if self._loop(0.1) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break



def _properties(props: dict[str, Any]) -> Properties:
    """paho's PUBLISH Properties of ``props`` (attribute name -> value)."""
    p = Properties(PacketTypes.PUBLISH)
    for name, value in props.items():
        setattr(p, name, value)
    return p
