"""paho's MQTT client, tuned for one busy subscriber that acknowledges in batches.

paho owns the session: connect, subscribe, keepalive, reconnect, TLS, MQTT 5
properties, packet decoding. This subclass changes three things, all measured
(docs/benchmark-history.md, "Earlier results" and "What we learned"):

1. **Buffered reads.** Stock paho reads a packet with four ``recv`` calls and one
   ``select`` per packet. Here ``_sock_recv`` serves paho from a 64 KiB buffer, and
   :meth:`read_buffered` hands paho every packet already buffered without a
   ``select`` between them.
2. **Batched acknowledgements.** :meth:`ack_many` queues the PUBACKs of a whole
   batch as one buffer (one ``send``), instead of two system calls per message.
3. **Keepalive.** paho does not count the packets it writes as outgoing traffic
   unless its write queue runs dry mid-write, so a busy subscriber sends PINGREQ
   every keepalive period; draining a large backlog, the PINGRESP waits behind it
   and paho drops a healthy connection ("keep alive timeout"), which causes
   redeliveries. :meth:`ack_many` records its writes as outgoing traffic, as
   MQTT means it (any control packet resets the keepalive timer).

4. **A PUBLISH fast path.** For complete QoS 0/1 PUBLISH packets at the head of the
   buffer, :meth:`_fast_publishes` slices topic, packet id and payload itself and
   calls ``on_message`` with a small :class:`Publish` object, skipping paho's
   per-message ``MQTTMessage`` (with its own ``threading.Condition``), MQTT 5
   ``Properties`` object and callback topic matching. Everything else goes to
   paho's own reader: other packet types, a packet not yet complete, QoS 2, a
   topic alias (an empty topic). A PUBLISH with a non-empty MQTT 5 properties block
   goes to ``on_publish_fields`` with a seventh argument, the record's ``props`` member,
   decoded by shardlog/recording/properties.py (paho's decoder costs ~200 µs a message); one it
   cannot take (a topic alias, an unknown or repeated property, a bad string) goes to
   paho, and ``on_message`` records its properties. Filtered callbacks and anything
   malformed go to paho too.
   tests/shardlog/test_client.py proves it equivalent to paho's decoder.

5. **TLS records gathered.** Over TLS one ``recv`` returns one TLS record, and brokers
   write one record per packet (mosquitto does): a 200-byte message per read, so every
   message cost a trip through paho's loop and a ``select`` (shardlog over TLS ran at a
   fifth of its plain speed). A buffer fill reads on while records are there, up to
   64 KiB, each read asking for 64 KiB (more than the 16 KiB record maximum), so no read
   leaves decrypted bytes inside the SSL object (``pending()``) behind select's back.

It relies on private parts of paho 2.1-2.2 (``_sock_recv``, ``_packet_queue``,
``_msgtime_mutex``, ``_last_msg_out``); :func:`make_client` checks for them and
falls back to stock paho (as does ``SHARDLOG_STOCK_PAHO=1``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from shardlog.config.tls import ssl_context
from shardlog.recording.properties import _properties, _varint

if TYPE_CHECKING:
    from shardlog.config.schema import Broker

log = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
_PUBACK = 0x40
_PRIVATE = ("_sock_recv", "_packet_queue", "_msgtime_mutex", "_last_msg_out", "_last_bytes_received",
            "_in_packet", "_in_callback_mutex", "_protocol", "_userdata", "loop_read", "_sock_close",
            "_do_on_disconnect")
#: paho's clock for its keepalive bookkeeping (a module attribute of paho 2.x; checked by make_client)
_time_func: Callable[[], float] = getattr(mqtt, "time_func", time.monotonic)
_HAS_TIME_FUNC = hasattr(mqtt, "time_func")


class BufferedClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0
        self._filtered = False  # message_callback_add() used: paho must match topics
        self._tls = False       # the socket is an SSLSocket: gather its records
        #: if set, the fast path calls it with the fields instead of on_message with an object:
        #: (topic: bytes, payload: bytes, qos, mid, dup, retain[, props: bytes]) -> None, props
        #: (shardlog.records.props_member) only for a message with MQTT 5 properties to keep
        self.on_publish_fields: Callable[..., None] | None = None

    def message_callback_add(self, sub: str, callback: Any) -> None:
        self._filtered = True
        super().message_callback_add(sub, callback)

    # -- reading ----------------------------------------------------------------------

    def _sock_recv(self, bufsize: int) -> bytes:
        pos = self._rpos
        buf = self._rbuf
        if pos >= len(buf):
            # raises BlockingIOError when nothing is there; a big payload is read as paho asks
            buf = super()._sock_recv(max(READ_SIZE, bufsize))
            if not buf:
                return buf  # the connection closed
            if self._tls and len(buf) < READ_SIZE:
                buf = self._more_records(buf)
            self._rbuf = buf
            pos = 0
        self._rpos = pos + bufsize
        return buf[pos:pos + bufsize]

    def _more_records(self, first: bytes) -> bytes:
        """The TLS records already received after ``first``, up to READ_SIZE in all."""
        parts = [first]
        n = len(first)
        while n < READ_SIZE:
            try:
                more = super()._sock_recv(READ_SIZE)  # whole records: nothing left in the SSL object
            except OSError:
                break  # none yet (BlockingIOError), or a broken connection: the next read says so
            if not more:
                break  # closed: the next read says so
            parts.append(more)
            n += len(more)
        return b"".join(parts) if len(parts) > 1 else first

    @property
    def buffered(self) -> int:
        return len(self._rbuf) - self._rpos

    def read_buffered(self, max_packets: int = 5000) -> MQTTErrorCode:
        """Handle the packets already received, reading on while the socket has more,
        without a select between packets. Stops after about ``max_packets`` so the
        caller's timers (flush deadline, heartbeat) keep running."""
        rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        done = 0
        while done < max_packets:
            if self._in_packet["command"] == 0 and self.on_message is not None:
                done += self._fast_publishes(max_packets - done)
            left = len(self._rbuf) - self._rpos
            if left <= 0:
                break
            rc = self.loop_read()  # one packet paho's way
            done += 1
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                break
            if len(self._rbuf) - self._rpos == left:
                break  # a partial packet and nothing more on the socket yet
        return rc

    def _fast_publishes(self, limit: int) -> int:
        """Dispatch the complete QoS 0/1 PUBLISH packets at the head of the buffer."""
        if self._filtered or self._protocol == mqtt.MQTTv31:
            return 0
        buf = self._rbuf
        pos = self._rpos
        end = len(buf)
        v5 = self._protocol == mqtt.MQTTv5
        on_message = self.on_message
        handler = self.on_publish_fields
        userdata = self._userdata
        n = 0
        with self._in_callback_mutex:
            while pos < end and n < limit:
                cmd = buf[pos]
                if cmd & 0xF0 != 0x30 or cmd & 0x06 > 2:  # not a PUBLISH, or QoS 2 (or invalid 3)
                    break
                b = buf[pos + 1] if pos + 1 < end else 0x80
                if b < 0x80:  # remaining length in one byte (payloads under ~128 bytes)
                    i, length = pos + 2, b
                elif pos + 2 < end and buf[pos + 2] < 0x80:  # two bytes: under 16 KiB
                    i, length = pos + 3, (b & 0x7F) | (buf[pos + 2] << 7)
                else:
                    i, length = _varint(buf, pos + 1, end)
                if i < 0 or i + length > end:
                    break  # incomplete (or malformed: paho decides)
                stop = i + length
                if length < 2:
                    break
                t_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
                if t_end == i + 2 or t_end > stop:
                    break  # a topic alias, or malformed
                p = t_end
                qos = (cmd >> 1) & 3
                mid = 0
                if qos:
                    if p + 2 > stop:
                        break
                    mid = (buf[p] << 8) | buf[p + 1]
                    p += 2
                props = b""
                if v5:
                    if p >= stop:
                        break
                    if buf[p]:  # a properties block: decoded here, or by paho when it is unusual
                        if handler is None:
                            break
                        p, props = _properties(buf, p, stop)
                        if p < 0:
                            break
                    else:
                        p += 1
                if handler is not None:
                    if props:
                        handler(buf[i + 2:t_end], buf[p:stop], qos, mid, cmd & 0x08 != 0, cmd & 0x01 != 0, props)
                    else:
                        handler(buf[i + 2:t_end], buf[p:stop], qos, mid, cmd & 0x08 != 0, cmd & 0x01 != 0)
                elif on_message is not None:  # it reads a Publish as it reads paho's MQTTMessage
                    on_message(self, userdata, Publish(buf[i + 2:t_end], buf[p:stop], qos, mid,  # type: ignore[arg-type]
                                                        cmd & 0x08 != 0, cmd & 0x01 != 0))
                pos = stop
                n += 1
        if n:
            self._rpos = pos
            with self._msgtime_mutex:
                self._last_bytes_received = _time_func()
        return n

    def reconnect(self) -> MQTTErrorCode:
        self._rbuf, self._rpos = b"", 0  # bytes of the old connection mean nothing now
        rc = super().reconnect()
        self._tls = getattr(self._sock, "pending", None) is not None
        return rc

    # -- acknowledging ------------------------------------------------------------------

    def ack_many(self, mids: Iterable[int]) -> None:
        """PUBACK every message id, in order, as one write."""
        data = b"".join([b"\x40\x02" + mid.to_bytes(2, "big") for mid in mids])
        if not data:
            return
        self._packet_queue(_PUBACK, data, 0, 0)
        with self._msgtime_mutex:
            self._last_msg_out = _time_func()


class Publish:
    """What the fast path hands to ``on_message``: the fields of paho's MQTTMessage
    that a recorder reads (``_topic`` is the raw topic, as in paho)."""

    __slots__ = ("_topic", "payload", "qos", "mid", "dup", "retain")

    def __init__(self, topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool) -> None:
        self._topic = topic
        self.payload = payload
        self.qos = qos
        self.mid = mid
        self.dup = dup
        self.retain = retain

    @property
    def topic(self) -> str:
        return self._topic.decode("utf-8")


class StockClient(mqtt.Client):
    """Stock paho behind the same three methods, for comparison and as a fallback."""

    buffered = 0

    def read_buffered(self, max_packets: int = 5000) -> MQTTErrorCode:
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> None:
        for mid in mids:
            self.ack(mid, 1)


class PahoErrors(logging.Logger):
    """Stands in for paho's logger below DEBUG: keeps its last error (why a socket died, e.g.
    ``failed to receive on socket: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]``) for the
    recorder's own log line, and drops the rest (paho's per-packet debug lines). paho
    calls only ``log``."""

    def __init__(self) -> None:
        super().__init__("shardlog.paho-errors")
        self.last: str | None = None

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            self.last = str(msg) % args if args else str(msg)

    def take(self) -> str | None:
        last, self.last = self.last, None
        return last


def drop_connection(client: mqtt.Client) -> None:
    """Close the connection as paho does on a keepalive timeout (calling ``on_disconnect``),
    e.g. when the broker never sent its CONNACK."""
    client._sock_close()
    client._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_CONN_LOST)


def make_client(*args: Any, **kwargs: Any) -> BufferedClient | StockClient:
    if os.environ.get("SHARDLOG_STOCK_PAHO") == "1":
        return StockClient(*args, **kwargs)
    client = BufferedClient(*args, **kwargs)
    if not _HAS_TIME_FUNC or not all(hasattr(client, name) for name in _PRIVATE):
        log.warning("paho-mqtt %s lacks the internals shardlog tunes; using stock paho (slower)",
                    getattr(mqtt, "__version__", "?"))
        return StockClient(*args, **kwargs)
    return client


def apply_credentials(client: mqtt.Client, broker: Broker, where: str = "broker") -> None:
    """Username/password and TLS from a map's ``broker`` section (recorder, replay, supervisor).
    The TLS context is :func:`shardlog.config.tls.ssl_context`'s, as ``shardlog check`` builds it:
    a bad file raises ConfigError naming ``where``'s key."""
    if broker.username:  # "" (an unset ${MQTT_USERNAME:-}) means anonymous
        client.username_pw_set(broker.username, broker.password)
    if broker.tls is not None:
        client.tls_set_context(ssl_context(broker.tls, where))
        client.tls_insecure_set(broker.tls.insecure)
