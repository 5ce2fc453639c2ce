"""Loading a shard map: YAML in, a validated :class:`~shardlog.config.schema.ShardMap` out.

Loading goes: read text -> YAML (shardlog.config.yamlsafe) -> expand ``${VAR}`` /
``${VAR:-default}`` in string values -> validate ``defaults`` alone -> deep-merge
``defaults`` into every shard -> convert the whole map (shardlog.config.schema) ->
cross-shard checks (names, prefixes, hosts, brokers; the control topics and listen address,
shardlog.config.checks). Relative roots are resolved against the directory of the shard map
file, then checked (nested or system roots: shardlog.config.checks.check_layout).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping
from typing import Any

import msgspec
import yaml

from shardlog.config import yamlsafe
from shardlog.config.checks import check_control_topics, check_layout, parse_listen, prefix_subscription_problem
from shardlog.config.schema import (
    Broker,
    ConfigError,
    Control,
    HookSpec,
    Settings,
    Shard,
    ShardMap,
    _convert,
    _join,
    normalize_prefix,
)

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


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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
    return prefix_subscription_problem(p)


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
    check_layout(smap)
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
    try:
        parse_listen(smap.supervisor.listen)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
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
        if s.journal.enabled and s.payload_only:
            raise ConfigError(f"{where}.journal.enabled: not with payload_only (replaying the "
                              "journal after a crash needs each record's ts in the topic files)")
        if s.qos not in (0, 1):  # pragma: no cover - Literal already enforces it
            raise ConfigError(f"{where}.qos: expected 0 or 1")
    check_control_topics(smap)


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
