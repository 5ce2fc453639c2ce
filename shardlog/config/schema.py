"""The shard map's schema: msgspec Structs, its scalar types, and conversion into them.

Every config object is built through :func:`msgspec.convert` (constructors skip
validation; :func:`_convert` here), so unknown keys, wrong types and impossible values
are errors that name their path, e.g. ``shards[2].rotate.max_bytes: expected >= 1KiB``.
Reading a file and the checks across shards are :mod:`shardlog.config.load`'s.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

import msgspec
from msgspec import Meta, Struct

from shardlog.config.units import format_duration, format_size, parse_duration, parse_size


class ConfigError(Exception):
    """A shard map that cannot be used; the message names the offending key."""


# -- custom scalar types, parsed by _dec_hook so errors keep their path -------------


class Size(int):
    """A byte count written as ``64MiB`` or an integer."""

    minimum: ClassVar[int] = 0


class SegmentSize(Size):
    minimum = 1024


class Duration(float):
    """Seconds, written as ``30s``, ``1d``, ``250ms`` or a number."""

    minimum: ClassVar[float] = 0.0
    maximum: ClassVar[float] = 100 * 365 * 86400.0  # a century: below threading.TIMEOUT_MAX; no NaN, no inf


class PositiveDuration(Duration):
    minimum = 0.001


def _dec_hook(tp: type, obj: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, Size):
        n = parse_size(obj)
        if n < tp.minimum:
            raise ValueError(f"expected >= {format_size(tp.minimum)}, got {obj!r}")
        return tp(n)
    if isinstance(tp, type) and issubclass(tp, Duration):
        s = parse_duration(obj)
        if not s >= tp.minimum:
            raise ValueError(f"expected >= {format_duration(tp.minimum)}, got {obj!r}")
        if not s <= tp.maximum:
            raise ValueError(f"expected at most {format_duration(tp.maximum)}, got {obj!r}")
        return tp(s)
    raise NotImplementedError(f"no decoder for {tp!r}")


# -- the structs ---------------------------------------------------------------------

# every struct is forbid_unknown_fields=True, kw_only=True, spelled out in each class
# statement: a type checker reads those keywords, not a **dict of them

Port = Annotated[int, Meta(ge=1, le=65535)]
# \Z, not $: "$" also matches before a trailing newline ("a\n" would pass)
_NAME_RX = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"
ShardName = Annotated[str, Meta(pattern=_NAME_RX)]
#: no control characters: the broker refuses a client id holding one, at every connect
_CLIENT_ID_RX = r"^[^\x00-\x1f\x7f-\x9f]*\Z"
ClientIdPrefix = Annotated[str, Meta(pattern=_CLIENT_ID_RX)]
#: what a pattern asks for, in words (an error quotes these instead of the regex)
_PATTERN_WORDS = {
    _NAME_RX: "a letter or digit, then at most 63 letters, digits, '_', '.' or '-' (no space, no newline)",
    _CLIENT_ID_RX: "text without control characters (a newline, a tab...): the broker would refuse the client id",
}


class TLS(Struct, forbid_unknown_fields=True, kw_only=True):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    key_password: str | None = None  # of an encrypted key_file (never asked for on a terminal)
    insecure: bool = False  # skip host name verification (testing only)


class Broker(Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "localhost"
    port: Port = 1883
    protocol: Literal[5, "5", "3.1.1", "311"] = 5
    username: str | None = None
    password: str | None = None
    tls: TLS | None = None
    client_id_prefix: ClientIdPrefix = "shardlog-"
    keepalive: Annotated[int, Meta(ge=5, le=65535)] = 60
    # MQTT 5 session expiry: how long the broker keeps the session (and queues
    # messages) while a shard is down. 3.1.1 sessions never expire on their own.
    session_expiry: Duration = Duration(7 * 86400)
    # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send.
    # Twice batch.max_messages, so a full batch never waits for the window.
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 10000
    reconnect_max: PositiveDuration = PositiveDuration(30.0)
    # the longest a connection attempt may take: TCP, TLS, and the broker's CONNACK
    connect_timeout: PositiveDuration = PositiveDuration(10.0)
    # embedded: true makes `shardlog supervise` start a broker itself (iotcore, a Rust
    # MQTT broker installed with pip) as a supervised child on host:port, before the
    # shards, and stop it after them. For a laptop or a demo: it keeps sessions in
    # memory only (a broker restart loses what it held), so production runs a real
    # broker (mosquitto, see the README) and leaves this false. host must be loopback.
    # `shardlog record` alone never starts a broker.
    embedded: bool = False
    # embedded only: a second listener speaking MQTT 3.1.1 (the embedded broker has one
    # protocol per port; `port` speaks `protocol`), for publishers such as mosquitto_pub
    # or paho that default to 3.1.1. null: none.
    embedded_port_311: Port | None = None
    # Watch mosquitto's $SYS/broker/publish/messages/dropped (the loss past its
    # max_queued_messages; stats broker_dropped). false for brokers that refuse $SYS
    # subscriptions: rumqttd (iotcore) drops the connection. Never with embedded.
    sys_topics: bool = True

    @property
    def mqtt5(self) -> bool:
        return self.protocol in (5, "5")


class Rotate(Struct, forbid_unknown_fields=True, kw_only=True):
    max_bytes: SegmentSize | None = SegmentSize(64 * 1024 * 1024)
    max_age: PositiveDuration | None = PositiveDuration(86400.0)


class Retention(Struct, forbid_unknown_fields=True, kw_only=True):
    max_segments: Annotated[int, Meta(ge=1)] | None = None
    max_age: PositiveDuration | None = None


class Batch(Struct, forbid_unknown_fields=True, kw_only=True):
    # 5000: on a 1,000-topic stream that is ~5 records per write; docs/benchmarks.md
    max_messages: Annotated[int, Meta(ge=1, le=65535)] = 5000
    max_delay: Duration = Duration(0.02)


class Journal(Struct, forbid_unknown_fields=True, kw_only=True):
    """Acknowledge after one sequential write, fill the topic files behind it
    (shardlog/writing/journal.py; docs/journal.md)."""

    enabled: bool = False
    segment_bytes: SegmentSize = SegmentSize(64 * 1024 * 1024)
    # journal bytes not yet in the topic files past which the shard stops acknowledging
    # (the broker keeps the rest), so a lagging file system cannot fill the disk
    max_lag: SegmentSize = SegmentSize(1024 * 1024 * 1024)
#: ``package.module:attribute``, or a built-in's name alone (shardlog/hooks/builtin.py)
HookName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                                       r"(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?\Z")]


class HookSpec(Struct, forbid_unknown_fields=True, kw_only=True):
    """A hook with arguments: ``use`` names a factory, called once at start with ``args``
    as keyword arguments; it returns the hook (docs/hooks.md)."""

    use: HookName
    args: dict[str, Any] = {}


class Settings(Struct, forbid_unknown_fields=True, kw_only=True):
    """Per-shard settings; ``defaults`` holds them for every shard."""

    root: str = "./data"
    qos: Literal[0, 1] = 1
    rotate: Rotate = msgspec.field(default_factory=Rotate)
    retention: Retention = msgspec.field(default_factory=Retention)
    compress: Literal["none", "gzip"] = "none"
    recent: Annotated[int, Meta(ge=0, le=10000)] = 6
    recent_interval: Duration = Duration(1.0)
    fsync: Literal["never", "batch", "always"] = "never"
    batch: Batch = msgspec.field(default_factory=Batch)
    max_open_files: Annotated[int, Meta(ge=8, le=65536)] = 1024
    #: topics whose state (recent records, segment size) stays in memory, ~1 KB each; past it
    #: the idle ones are forgotten and reloaded from disk if they speak again (docs/journal.md)
    max_topics: Annotated[int, Meta(ge=64, le=10_000_000)] = 200_000
    max_payload: Size = Size(16 * 1024 * 1024)  # larger payloads are quarantined
    lock_wait: Duration = Duration(10.0)
    # how segments are written (shardlog/ondisk/formats.py, docs/history.md "Write formats")
    format: Literal["jsonl", "json", "csv"] = "jsonl"
    payload_only: bool = False  # jsonl/json: the JSON payload alone, no envelope
    journal: Journal = msgspec.field(default_factory=Journal)
    # Python callables applied in order to each message before it is stored (docs/hooks.md);
    # a shard's list replaces the defaults' one. Imported by `shardlog check` and at start.
    hooks: list[HookName | HookSpec] = []
    hooks_path: str | list[str] = []  # directories searched first for the hooks' modules
    hook_timeout: PositiveDuration = PositiveDuration(1.0)  # per message, all hooks together
    #: retained messages the broker sends at a (re)subscription (docs/brokers.md, "Retained
    #: messages"): all = record each (MQTT 5 Retain Handling 0); new = only for a new
    #: subscription, not again at each restart of a persistent session (Retain Handling 1);
    #: none = never (Retain Handling 2). Skipped ones are acknowledged, counted retained_skipped.
    retained: Literal["all", "new", "none"] = "all"


class Shard(Settings, forbid_unknown_fields=True, kw_only=True):
    name: ShardName
    prefix: str
    host: str | None = None
    broker: Broker | None = None  # None: the map's broker

    @property
    def branch(self) -> str:
        """The prefix as a topic branch: ``""`` for the catch-all."""
        return normalize_prefix(self.prefix)


class Restart(Struct, forbid_unknown_fields=True, kw_only=True):
    backoff_initial: PositiveDuration = PositiveDuration(0.5)
    backoff_max: PositiveDuration = PositiveDuration(30.0)
    healthy_after: Duration = Duration(60.0)
    max_restarts: Annotated[int, Meta(ge=1)] = 5
    window: PositiveDuration = PositiveDuration(60.0)
    failed_retry: PositiveDuration = PositiveDuration(300.0)


class SupervisorSettings(Struct, forbid_unknown_fields=True, kw_only=True):
    listen: str = "127.0.0.1:8470"
    restart: Restart = msgspec.field(default_factory=Restart)
    heartbeat_timeout: PositiveDuration = PositiveDuration(30.0)
    stop_timeout: PositiveDuration = PositiveDuration(10.0)
    start_jitter: Duration = Duration(0.2)


class Control(Struct, forbid_unknown_fields=True, kw_only=True):
    """Control over MQTT and status topics (docs/control.md). Everything is off by default;
    the supervisor's local HTTP API (``shardlog rotate|rm|mv|stop``) is always on."""

    # accept JSON commands on `topic` (published to the map's broker); replies go to
    # `reply_topic` (default <topic>/reply) or to a request's MQTT 5 response topic
    mqtt: bool = False
    topic: str = "shardlog/control/{host}"  # {host}: supervise --host, else the host name
    reply_topic: str | None = None
    token: str | None = None                # if set, a command must carry "token" equal to it
    # each shard keeps a retained "online"/"offline" (its Last Will) at <status_topic>/<shard>
    status_topic: str | None = None
    # the supervisor publishes its /status document (retained) here every supervisor_interval
    supervisor_topic: str | None = None     # may contain {host}
    supervisor_interval: PositiveDuration = PositiveDuration(30.0)


class ShardMap(Struct, forbid_unknown_fields=True, kw_only=True):
    shards: Annotated[list[Shard], Meta(min_length=1)]
    broker: Broker = msgspec.field(default_factory=Broker)
    defaults: Settings = msgspec.field(default_factory=Settings)
    supervisor: SupervisorSettings = msgspec.field(default_factory=SupervisorSettings)
    control: Control = msgspec.field(default_factory=Control)

    def shard(self, name: str) -> Shard:
        for s in self.shards:
            if s.name == name:
                return s
        raise ConfigError(f"no shard named {name!r} (shards: {', '.join(s.name for s in self.shards)})")

    def broker_of(self, shard: Shard) -> Broker:
        return shard.broker if shard.broker is not None else self.broker


# -- conversion: the only way config objects are built -------------------------------


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(raw: Any, tp: type, where: str = "") -> Any:
    try:
        return msgspec.convert(raw, tp, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        raise ConfigError(_rewrite_error(str(exc), where)) from None


def _rewrite_error(msg: str, where: str) -> str:
    """``Expected `int` >= 1 - at `$.shards[0].n``` -> ``shards[0].n: expected `int` >= 1``."""
    m = re.match(r"^(.*) - at `\$(.*)`$", msg, re.S)
    if not m:
        return f"{where or 'shard map'}: {msg}"
    text, path = m.group(1), m.group(2).lstrip(".")
    for rx, words in _PATTERN_WORDS.items():
        text = text.replace(f"`str` matching regex {rx!r}", words)
    text = text[0].lower() + text[1:] if text else text
    full = _join(where, path) if path else where
    return f"{full or 'shard map'}: {text}"


def normalize_prefix(prefix: str) -> str:
    return "" if prefix in ("", "#") else prefix
