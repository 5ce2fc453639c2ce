"""Republish recorded messages to a broker: ``shardlog replay``.

Records come from :func:`shardlog.history.read` (one topic or a whole branch, in
time order across rotated and gzipped segments, ``since <= ts < until``). Each is
published with its original payload bytes, QoS and retain flag, optionally under a
renamed topic prefix, either at the recorded pace (the gaps between ``ts`` values,
divided by ``speed``) or as fast as the broker takes them (``speed=None``).

The pure parts take their inputs (``now``, the text of an option) and return values:
:func:`parse_speed`, :func:`parse_rename`, :func:`rename_topic`, :func:`delay`,
:func:`broker_from_url`, :func:`format_progress`. The side effects live at the edge:
:class:`Publisher` (one paho client, driven from the calling thread) and
:func:`replay` (the loop that paces and publishes).

QoS 1 and 2 publishes are confirmed: at most ``window`` of them are unacknowledged
at a time (never more than the broker's MQTT 5 Receive Maximum), and
:meth:`Publisher.drain` waits for the last acknowledgement before the replay counts
as done. QoS 0 publishes are done once written to the socket (MQTT has no
confirmation for them); the final DISCONNECT follows them on the same connection.
"""

from __future__ import annotations

import logging
import os
import select
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgspec
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from shardlog.recording.client import apply_credentials
from shardlog.config.schema import Broker
from shardlog.records import Record
from shardlog.topics import TopicError, topic_from_bytes

log = logging.getLogger(__name__)

__all__ = [
    "BrokerUnavailable",
    "Interrupted",
    "Publisher",
    "Rename",
    "ReplayError",
    "Summary",
    "broker_from_url",
    "broker_name",
    "delay",
    "format_progress",
    "parse_rename",
    "parse_speed",
    "rename_topic",
    "replay",
]

DEFAULT_WINDOW = 1000
_PUMP_EVERY = 0.2  # s: read acknowledgements and keep the connection alive at least this often


class ReplayError(Exception):
    """A replay that cannot go on; the message says why (and where to resume)."""


class BrokerUnavailable(ReplayError):
    """The broker cannot be reached, refused the connection, lost it or stopped acknowledging."""


class Interrupted(ReplayError):
    """Ctrl-C (SIGINT) during a replay; the message says where to resume."""


# -- pure parts ---------------------------------------------------------------------------

def parse_speed(text: str) -> float | None:
    """``max`` -> ``None`` (as fast as possible); ``1``, ``10``, ``0.5``, ``10x`` -> the factor."""
    s = text.strip().lower()
    if s == "max":
        return None
    try:
        value = float(s.removesuffix("x"))
    except ValueError:
        raise ValueError(f"speed must be a positive number (1, 10, 0.5) or 'max', got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"speed must be a positive number (1, 10, 0.5) or 'max', got {text!r}")
    return value


def delay(ts: int, first_ts: int, start: float, speed: float | None, now: float) -> float:
    """Seconds to wait before publishing the record stamped ``ts`` (µs) when the first
    record (``first_ts``) was published at ``start`` (a monotonic clock, like ``now``).
    Due times are measured from the start, not from the previous record, so waiting
    never accumulates drift; a replay that fell behind publishes at once (<= 0)."""
    if speed is None:
        return 0.0
    return start + (ts - first_ts) / 1e6 / speed - now


class Rename(NamedTuple):
    old: str
    new: str


def _prefix_problem(prefix: str) -> str | None:
    if not prefix:
        return "is empty"
    try:
        topic_from_bytes(prefix.encode("utf-8"))
    except (TopicError, UnicodeEncodeError) as exc:
        return str(exc)
    return None


def _covers(a: str, b: str) -> bool:
    """Topic prefix ``a`` is ``b`` or above it, level-wise (``""`` covers everything)."""
    return a == "" or b == a or b.startswith(a + "/")


def parse_rename(text: str, prefix: str) -> Rename:
    """``OLD=NEW`` (split at the first ``=``) for a replay of ``prefix``. Both sides are
    topic prefixes: not empty, no wildcards, no U+0000; NEW may not start with ``$``
    (brokers keep those topics to themselves). OLD must be ``prefix``, above it or
    below it; otherwise it would rename nothing. Raises ValueError."""
    old, sep, new = text.partition("=")
    if not sep:
        raise ValueError(f"--rename expects OLD=NEW, got {text!r}")
    for side, value in (("OLD", old), ("NEW", new)):
        problem = _prefix_problem(value)
        if problem:
            raise ValueError(f"--rename {text!r}: {side} {problem}")
    if new.startswith("$"):
        raise ValueError(f"--rename {text!r}: NEW may not start with '$' (brokers reserve $-topics)")
    if not (_covers(old, prefix) or _covers(prefix, old)):
        raise ValueError(f"--rename {text!r}: OLD must be {prefix!r}, a prefix above it or a topic below it "
                         "(otherwise it renames nothing)")
    return Rename(old, new)


def rename_topic(topic: str, rename: Rename | None) -> str:
    """``old`` and every topic below it, level-wise, move to ``new``; others stay."""
    if rename is None:
        return topic
    old = rename.old
    if topic == old:
        return rename.new
    if topic.startswith(old) and topic[len(old):len(old) + 1] == "/":
        return rename.new + topic[len(old):]
    return topic


def broker_from_url(url: str, protocol: str = "5", ca_file: str | None = None, cert_file: str | None = None,
                    key_file: str | None = None, insecure: bool = False, keepalive: int = 60,
                    env: dict[str, str] | None = None) -> Broker:
    """The broker settings of ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS,
    port 8883 by default) as the recorder's :class:`shardlog.config.Broker`. User and
    password are percent-decoded; a URL with a user but no password takes the password
    from ``$MQTT_PASSWORD`` (as the example shard map does). Raises ValueError."""
    env = dict(os.environ) if env is None else env
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"--broker {_safe_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"--broker {_safe_url(url)!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    if not parts.hostname:
        raise ValueError(f"--broker {_safe_url(url)!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"--broker {_safe_url(url)!r}: a broker URL has no path, query or fragment")
    tls = scheme in ("mqtts", "ssl")
    username = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        password = env.get("MQTT_PASSWORD")
    raw: dict[str, Any] = {
        "host": parts.hostname, "port": port if port is not None else (8883 if tls else 1883),
        "protocol": protocol, "username": username or None, "password": password,
        "keepalive": keepalive, "client_id_prefix": "shardlog-replay-",
    }
    if tls or ca_file or cert_file or key_file:
        raw["tls"] = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file, "insecure": insecure}
    try:
        return msgspec.convert(raw, Broker)
    except msgspec.ValidationError as exc:
        raise ValueError(f"--broker {_safe_url(url)!r}: {exc}") from None


def _safe_url(url: str) -> str:
    """The URL with its password replaced, for messages."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable URL>"


def broker_name(b: Broker) -> str:
    """``mqtt://host:port`` without credentials, for messages."""
    host = f"[{b.host}]" if ":" in b.host else b.host
    return f"{'mqtts' if b.tls is not None else 'mqtt'}://{host}:{b.port}"


def _hms(seconds: float) -> str:
    s = int(max(0.0, seconds) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_progress(done: int, total: int | None, elapsed: float, eta: float | None, width: int = 30) -> str:
    """One progress line: ``[#####-----]  1,234/5,000  24%  3,210 rec/s  ETA 0:00:01``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        frac = min(1.0, done / total)
        filled = int(frac * width)
        head = f"[{'#' * filled}{'-' * (width - filled)}] {done:,}/{total:,} {frac * 100:3.0f}%"
    else:
        head = f"{done:,} records"
    tail = f" ETA {_hms(eta)}" if eta is not None else ""
    return f"{head}  {rate:,.0f} rec/s  {_hms(elapsed)}{tail}"


# -- the edge: one paho client driven from the calling thread ------------------------------

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

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool, ts: int) -> None:
        """Publish one message; waits while ``window`` QoS 1/2 publishes are unacknowledged
        or paho still holds unwritten bytes (so memory stays bounded)."""
        if qos and len(self.inflight) >= self.window:
            self._wait(lambda: len(self.inflight) < self.window, "acknowledge publishes")
        if self.client.want_write():
            self._wait(lambda: not self.client.want_write(), "take the data written to it")
        info = self.client.publish(topic, payload, qos, retain)
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


# -- the loop -----------------------------------------------------------------------------

class Summary(NamedTuple):
    published: int          # records published
    confirmed: int          # of them, QoS 1/2 acknowledged by the broker
    skipped: int            # records that cannot be published (a renamed topic too long, bad QoS)
    first_ts: int | None
    last_ts: int | None
    seconds: float


def replay(records: Iterable[tuple[str, Record]], publisher: Publisher, speed: float | None,
           rename: Rename | None = None, progress: Callable[[int, int | None], None] | None = None,
           clock: Callable[[], float] = time.monotonic) -> Summary:
    """Publish ``records`` (time order) through a connected ``publisher``, paced by
    ``speed`` (None: as fast as possible), then wait for every acknowledgement.
    ``progress(done, current_ts)`` is called after each record. Raises ReplayError
    (BrokerUnavailable) with a ``--since`` value to resume from."""
    start = clock()
    first_ts: int | None = None
    last_ts: int | None = None
    skipped = 0
    ts = None
    try:
        for topic, rec in records:
            ts = rec.ts
            if first_ts is None:
                first_ts, start = ts, clock()
            if speed is not None:
                while (wait := delay(ts, first_ts, start, speed, clock())) > 0:
                    publisher.pump(min(wait, 0.5))
                    if progress is not None:
                        progress(publisher.published + skipped, None)
            target = rename_topic(topic, rename)
            problem = None
            if rec.qos not in (0, 1, 2) or not isinstance(rec.retain, bool):
                problem = f"qos {rec.qos!r}, retain {rec.retain!r}"
            else:
                try:
                    topic_from_bytes(target.encode("utf-8"))
                except (TopicError, UnicodeEncodeError) as exc:
                    problem = f"topic {target[:80]!r}: {exc}"
            if problem is not None:
                skipped += 1
                log.warning("cannot publish the record of %r at ts %d: %s", topic, ts, problem)
            else:
                publisher.publish(target, rec.payload, rec.qos, rec.retain, ts)
            last_ts = ts
            if progress is not None:
                progress(publisher.published + skipped, ts)
        publisher.drain()
    except (BrokerUnavailable, KeyboardInterrupt) as exc:
        resume = publisher.oldest_unconfirmed()
        if ts is not None and (resume is None or ts < resume):
            resume = ts
        hint = f"; {publisher.confirmed:,} confirmed; to go on, replay again with --since {resume}" \
            if resume is not None else ""
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted after {publisher.published:,} publishes{hint}") from None
        raise BrokerUnavailable(f"{exc}{hint}") from None
    if publisher.refused:
        raise BrokerUnavailable(f"{broker_name(publisher.broker)} refused {publisher.refused:,} of "
                                f"{publisher.published:,} publishes (first reason: {publisher.refusal})")
    return Summary(publisher.published, publisher.confirmed, skipped, first_ts, last_ts, clock() - start)

