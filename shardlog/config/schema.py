"""The shard map: YAML in, validated msgspec Structs out.

Every config object is built through :func:`msgspec.convert` (constructors skip
validation), so unknown keys, wrong types and impossible values are errors that
name their path, e.g. ``shards[2].rotate.max_bytes: expected >= 1KiB``.

Loading goes: read text -> YAML -> expand ``${VAR}`` / ``${VAR:-default}`` in
string values -> validate ``defaults`` alone -> deep-merge ``defaults`` into every
shard -> convert the whole map -> cross-shard checks (names, prefixes, hosts).
Relative roots are resolved against the directory of the shard map file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import msgspec
import yaml
from msgspec import Meta, Struct

from shardlog.config import yamlsafe
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

_STRICT = {"forbid_unknown_fields": True, "kw_only": True}

Port = Annotated[int, Meta(ge=1, le=65535)]
ShardName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class TLS(Struct, **_STRICT):
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False  # skip host name verification (testing only)


class Broker(Struct, **_STRICT):
    host: str = "localhost"
    port: Port = 1883
    protocol: Literal[5, "5", "3.1.1", "311"] = 5
    username: str | None = None
    password: str | None = None
    tls: TLS | None = None
    client_id_prefix: str = "shardlog-"
    keepalive: Annotated[int, Meta(ge=5, le=65535)] = 60
    # MQTT 5 session expiry: how long the broker keeps the session (and queues
    # messages) while a shard is down. 3.1.1 sessions never expire on their own.
    session_expiry: Duration = Duration(7 * 86400)
    # MQTT 5 Receive Maximum: unacknowledged QoS 1 messages the broker may send.
    # Twice batch.max_messages, so a full batch never waits for the window.
    receive_maximum: Annotated[int, Meta(ge=1, le=65535)] = 10000
    reconnect_max: PositiveDuration = PositiveDuration(30.0)
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


class Rotate(Struct, **_STRICT):
    max_bytes: SegmentSize | None = SegmentSize(64 * 1024 * 1024)
    max_age: PositiveDuration | None = PositiveDuration(86400.0)


class Retention(Struct, **_STRICT):
    max_segments: Annotated[int, Meta(ge=1)] | None = None
    max_age: PositiveDuration | None = None


class Batch(Struct, **_STRICT):
    # 5000: on a 1,000-topic stream that is ~5 records per write; docs/benchmarks.md
    max_messages: Annotated[int, Meta(ge=1, le=65535)] = 5000
    max_delay: Duration = Duration(0.02)


class Journal(Struct, **_STRICT):
    """Acknowledge after one sequential write, fill the topic files behind it
    (shardlog/journal.py; docs/journal.md)."""

    enabled: bool = False
    segment_bytes: SegmentSize = SegmentSize(64 * 1024 * 1024)
    # journal bytes not yet in the topic files past which the shard stops acknowledging
    # (the broker keeps the rest), so a lagging file system cannot fill the disk
    max_lag: SegmentSize = SegmentSize(1024 * 1024 * 1024)
#: ``package.module:attribute``, or a built-in's name alone (shardlog/builtin_hooks.py)
HookName = Annotated[str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
                                       r"(:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*)?$")]


class HookSpec(Struct, **_STRICT):
    """A hook with arguments: ``use`` names a factory, called once at start with ``args``
    as keyword arguments; it returns the hook (docs/hooks.md)."""

    use: HookName
    args: dict[str, Any] = {}


class Settings(Struct, **_STRICT):
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
    max_payload: Size = Size(16 * 1024 * 1024)  # larger payloads are quarantined
    lock_wait: Duration = Duration(10.0)
    # how segments are written (shardlog/formats.py, docs/history.md "Write formats")
    format: Literal["jsonl", "json", "csv"] = "jsonl"
    payload_only: bool = False  # jsonl/json: the JSON payload alone, no envelope
    journal: Journal = msgspec.field(default_factory=Journal)
    # Python callables applied in order to each message before it is stored (docs/hooks.md);
    # a shard's list replaces the defaults' one. Imported by `shardlog check` and at start.
    hooks: list[HookName | HookSpec] = []
    hooks_path: str | list[str] = []  # directories searched first for the hooks' modules
    hook_timeout: PositiveDuration = PositiveDuration(1.0)  # per message, all hooks together


class Shard(Settings, **_STRICT):
    name: ShardName
    prefix: str
    host: str | None = None
    broker: Broker | None = None  # None: the map's broker

    @property
    def branch(self) -> str:
        """The prefix as a topic branch: ``""`` for the catch-all."""
        return normalize_prefix(self.prefix)


class Restart(Struct, **_STRICT):
    backoff_initial: PositiveDuration = PositiveDuration(0.5)
    backoff_max: PositiveDuration = PositiveDuration(30.0)
    healthy_after: Duration = Duration(60.0)
    max_restarts: Annotated[int, Meta(ge=1)] = 5
    window: PositiveDuration = PositiveDuration(60.0)
    failed_retry: PositiveDuration = PositiveDuration(300.0)


class SupervisorSettings(Struct, **_STRICT):
    listen: str = "127.0.0.1:8470"
    restart: Restart = msgspec.field(default_factory=Restart)
    heartbeat_timeout: PositiveDuration = PositiveDuration(30.0)
    stop_timeout: PositiveDuration = PositiveDuration(10.0)
    start_jitter: Duration = Duration(0.2)


class Control(Struct, **_STRICT):
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


class ShardMap(Struct, **_STRICT):
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


# -- loading -------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(value: Any, env: Mapping[str, str], path: str = "") -> Any:
    """Expand ``${VAR}`` and ``${VAR:-default}`` in every string value; ``$${`` is a literal ``${``."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$${":
                return "${"
            name, default = m.group(1), m.group(2)
            if name in env and (env[name] != "" or default is None):
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path or '<top>'}: environment variable {name} is not set "
                              f"(write ${{{name}:-default}} to give a default)")
        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, env, _join(path, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
    text = text[0].lower() + text[1:] if text else text
    full = _join(where, path) if path else where
    return f"{full or 'shard map'}: {text}"


def normalize_prefix(prefix: str) -> str:
    return "" if prefix in ("", "#") else prefix


def prefix_problem(prefix: str) -> str | None:
    """Why a prefix is unusable, or None."""
    p = normalize_prefix(prefix)
    if p == "":
        return None
    if "+" in p or "#" in p:
        hint = f" (write {p[:-2]!r})" if p.endswith("/#") else ""
        return f"wildcards are not allowed inside a prefix{hint}; use '#' alone for the catch-all"
    if "\x00" in p:
        return "NUL is not allowed in a topic"
    if len(p.encode("utf-8", "surrogatepass")) > 65535:
        return "longer than an MQTT topic may be"
    return None


def parse_map(raw: Any, base_dir: str = ".", env: Mapping[str, str] | None = None) -> ShardMap:
    """Validate an already-parsed YAML document into a :class:`ShardMap`."""
    if raw is None:
        raise ConfigError("shard map is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"shard map: expected a mapping at the top, got {type(raw).__name__}")
    raw = expand_env(raw, os.environ if env is None else env)
    defaults_raw = raw.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        raise ConfigError("defaults: expected a mapping")
    _convert(defaults_raw, Settings, "defaults")
    shards_raw = raw.get("shards")
    if not isinstance(shards_raw, list):
        raise ConfigError("shards: expected a list of shards (at least one)")
    merged = []
    for i, s in enumerate(shards_raw):
        if not isinstance(s, dict):
            raise ConfigError(f"shards[{i}]: expected a mapping with at least name and prefix")
        merged.append(deep_merge(defaults_raw, s))
    smap: ShardMap = _convert({**raw, "shards": merged}, ShardMap)
    _check_shards(smap)
    for settings in (*smap.shards, smap.defaults):
        settings.root = _resolve_path(base_dir, settings.root)
        paths = [settings.hooks_path] if isinstance(settings.hooks_path, str) else settings.hooks_path
        settings.hooks_path = [_resolve_path(base_dir, p) for p in paths]
    return smap


def _resolve_path(base_dir: str, path: str) -> str:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))


def hook_specs(settings: Settings) -> list[HookSpec]:
    """A shard's ``hooks`` list, every entry as a HookSpec (a bare name has no args)."""
    return [h if isinstance(h, HookSpec) else msgspec.convert({"use": h}, HookSpec)
            for h in settings.hooks]


def hook_key(smap: ShardMap, shard: Shard, j: int) -> str:
    """The key of a shard's ``j``-th hook, for error messages: ``shards[2].hooks[0]``, or
    ``defaults.hooks[0] (shard chat)`` when the shard inherits the defaults' list."""
    if shard.hooks == smap.defaults.hooks:
        return f"defaults.hooks[{j}] (shard {shard.name})"
    return f"shards[{smap.shards.index(shard)}].hooks[{j}]"


LOOPBACK_NAMES = ("localhost", "localhost.", "ip6-localhost", "ip6-loopback")


def is_loopback(host: str) -> bool:
    """True for a loopback address or the name localhost (never resolved: no DNS at load)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _check_broker(b: Broker, where: str, may_embed: bool) -> None:
    if not b.embedded:
        if b.embedded_port_311 is not None:
            raise ConfigError(f"{where}.embedded_port_311: only used with {where}.embedded: true")
        return
    if not may_embed:
        raise ConfigError(f"{where}.embedded: only the map's broker (broker.embedded) can be embedded; "
                          "a shard's own broker must be a running broker")
    if not is_loopback(b.host):
        raise ConfigError(f"{where}.embedded: the embedded broker listens on loopback only, so "
                          f"{where}.host must be localhost or 127.0.0.1 (got {b.host!r}); to record a "
                          f"broker on another host set {where}.embedded: false")
    if b.tls is not None:
        raise ConfigError(f"{where}.embedded: the embedded broker speaks plain MQTT on loopback; "
                          f"remove {where}.tls or set {where}.embedded: false")
    if b.embedded_port_311 is not None and b.embedded_port_311 == b.port:
        raise ConfigError(f"{where}.embedded_port_311: must differ from {where}.port ({b.port})")


def _check_control(c: Control) -> None:
    for key in ("topic", "reply_topic", "status_topic", "supervisor_topic"):
        value = getattr(c, key)
        if value is None:
            continue
        if value == "" or "+" in value or "#" in value or "\x00" in value:
            raise ConfigError(f"control.{key}: expected a topic name without wildcards, got {value!r}")
        if value.startswith("$"):
            raise ConfigError(f"control.{key}: {value!r} starts with '$' (reserved for the broker)")
    if c.token == "":
        c.token = None  # an unset ${SHARDLOG_CONTROL_TOKEN:-}: no token


def _check_shards(smap: ShardMap) -> None:
    _check_broker(smap.broker, "broker", True)
    _check_control(smap.control)
    names: dict[str, int] = {}
    prefixes: dict[str, int] = {}
    hosts = [s.host for s in smap.shards]
    for i, s in enumerate(smap.shards):
        where = f"shards[{i}]"
        if s.name in names:
            raise ConfigError(f"{where}.name: {s.name!r} is already the name of shards[{names[s.name]}]")
        names[s.name] = i
        problem = prefix_problem(s.prefix)
        if problem:
            raise ConfigError(f"{where}.prefix: {problem}")
        branch = s.branch
        if branch in prefixes:
            raise ConfigError(f"{where}.prefix: {s.prefix!r} is already the prefix of "
                              f"shards[{prefixes[branch]}] (every topic belongs to exactly one shard)")
        prefixes[branch] = i
        if s.host is None and any(h is not None for h in hosts):
            raise ConfigError(f"{where}.host: required, because other shards name a host "
                              "(a shard without one would run on every host)")
        if s.broker is not None:
            _check_broker(s.broker, f"{where}.broker", False)
        if "\x00" in s.root:
            raise ConfigError(f"{where}.root: contains NUL")
        if s.payload_only and s.format == "csv":
            raise ConfigError(f"{where}.payload_only: only with format jsonl or json (a csv row "
                              "always holds ts, qos, retain and payload)")
        if s.journal.enabled and s.hooks:
            raise ConfigError(f"{where}.journal.enabled: not with hooks yet (a hook's records are "
                              "stored by the recording thread, which a journal leaves to its materializer)")
        if s.journal.enabled and s.payload_only:
            raise ConfigError(f"{where}.journal.enabled: not with payload_only (replaying the "
                              "journal after a crash needs each record's ts in the topic files)")
        if s.qos not in (0, 1):  # pragma: no cover - Literal already enforces it
            raise ConfigError(f"{where}.qos: expected 0 or 1")


def load_map(path: str, env: Mapping[str, str] | None = None) -> ShardMap:
    """Read, expand and validate a shard map file. Raises ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read(yamlsafe.MAX_BYTES + 1)  # never the whole of /dev/zero
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the shard map: {exc.strerror or exc}") from None
    if len(data) > yamlsafe.MAX_BYTES:
        raise ConfigError(f"{path}: larger than {yamlsafe.MAX_BYTES // (1024 * 1024)} MiB: refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start}") from None
    try:
        raw = yamlsafe.load(text)
    except yamlsafe.YamlLimit as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}: not valid YAML{where}: {' '.join(problem.split())}") from None
    try:
        return parse_map(raw, base_dir=os.path.dirname(os.path.abspath(path)), env=env)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def shards_for_host(smap: ShardMap, host: str | None) -> list[Shard]:
    """The shards one supervisor runs: all of a single-host map, else those of ``host``
    (default: this machine's host name)."""
    if all(s.host is None for s in smap.shards):
        return list(smap.shards)
    wanted = host or socket.gethostname()
    return [s for s in smap.shards if s.host == wanted]


def client_id(smap: ShardMap, shard: Shard) -> str:
    """Stable per shard, so the broker keeps its session across restarts."""
    return f"{smap.broker_of(shard).client_id_prefix}{shard.name}"
