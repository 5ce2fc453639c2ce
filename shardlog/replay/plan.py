"""The pure parts of a replay: the options (``--speed``, ``--rename``, ``--broker URL``),
the pacing and the errors. They take their inputs (``now``, the text of an option) and
return values; nothing here touches the network."""

from __future__ import annotations

import base64
import os
import urllib.parse
from typing import Any, NamedTuple

import msgspec

from shardlog.config.schema import Broker
from shardlog.records import PROPS
from shardlog.topics import TopicError, topic_from_bytes


class ReplayError(Exception):
    """A replay that cannot go on; the message says why (and where to resume)."""


class BrokerUnavailable(ReplayError):
    """The broker cannot be reached, refused the connection, lost it or stopped acknowledging."""


class Interrupted(ReplayError):
    """Ctrl-C (SIGINT) during a replay; the message says where to resume."""


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
    port 8883 by default) as the recorder's :class:`shardlog.config.schema.Broker`. User and
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


#: the record's ``props`` key -> paho's Properties attribute (shardlog.records.PROPS)
_PAHO_NAMES = {key: attr for attr, key in PROPS}


def replay_properties(props: dict[str, Any] | None, ts_us: int, now_us: int) -> dict[str, Any] | None:
    """The MQTT 5 properties to republish a record's ``props`` with, as paho attribute names
    and values (user properties as (key, value) tuples in their order, correlation data as
    bytes). The message expiry counts down as a broker's does: the recorded seconds minus
    the whole seconds since the record's ``ts``; None when it has run out (a broker would no
    longer deliver the message: the replay skips it). {} for a record without properties.
    Raises ValueError for a ``props`` member shardlog did not write."""
    if not props:
        return {}
    out: dict[str, Any] = {}
    for key, value in props.items():
        attr = _PAHO_NAMES.get(key)
        if attr is None:
            raise ValueError(f"unknown property {key!r}")
        if key == "user":
            value = [(str(k), str(v)) for k, v in value]
        elif key == "correlation_data":
            value = base64.b64decode(value, validate=True)
        elif key == "message_expiry":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"message_expiry {value!r}")
            value -= max(0, now_us - ts_us) // 1_000_000
            if value <= 0:
                return None
        out[attr] = value
    return out
