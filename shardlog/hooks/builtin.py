"""The built-in hooks (docs/hooks.md): named without a module in the shard map.

    hooks:
      - cbor_to_json                              # CBOR payloads -> JSON (cbor2)
      - msgpack_to_json                           # MessagePack payloads -> JSON (msgpack)
      - {use: drop, args: {topics: [chat/+/debug, chat/bots/#]}}
      - {use: keep, args: {topics: [sensors/+/temp]}}
      - {use: sample, args: {interval: 10s}}      # at most one message per topic per interval
      - {use: redact, args: {keys: [password, token]}}

Each is a factory: called once at start with its ``args`` (validated by the Struct beside
it, so a bad argument is a configuration error naming its key), it returns the hook.
A payload a decoder cannot decode raises, so that message is quarantined, bytes kept.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

from shardlog import extras
from shardlog.config.schema import ConfigError, PositiveDuration, _convert
from shardlog.hooks.message import Hook, Message

# every struct is forbid_unknown_fields=True, kw_only=True, spelled out in each class
# statement: a type checker reads those keywords, not a **dict of them

_json_decode = msgspec.json.decode


def _to_json_value(obj: Any) -> Any:
    """msgspec's enc_hook for what the decoders return beyond JSON's types."""
    import cbor2

    if obj is cbor2.undefined:
        return None
    if isinstance(obj, cbor2.CBORTag):
        return {"tag": obj.tag, "value": obj.value}
    if isinstance(obj, cbor2.CBORSimpleValue):
        return {"simple": obj.value}
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)  # Decimal, Fraction, IP addresses, regular expressions, ...


_json_encoder = msgspec.json.Encoder(enc_hook=_to_json_value)


class _MissingPackage(ConfigError):
    """A decoder's package is not installed: a configuration error naming the ``hooks`` extra."""


def _need(module: str, hook: str) -> Any:
    try:
        return extras._need(hook, module, f"the Python package {module}", "hooks")
    except extras.MissingExtra as exc:
        raise _MissingPackage(str(exc)) from None  # cbor_to_json needs the Python package cbor2: pip ...


# -- decoders ---------------------------------------------------------------------------


class NoArgs(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


def cbor_to_json(args: NoArgs) -> Hook:
    """CBOR (RFC 8949) payload -> JSON: byte strings become base64 text, datetimes ISO 8601
    text, NaN and infinities null, other tags ``{"tag": n, "value": ...}``."""
    cbor2 = _need("cbor2", "cbor_to_json")
    loads, encode = cbor2.loads, _json_encoder.encode

    def hook(msg: Message) -> Message:
        return msg._replace(payload=encode(loads(msg.payload)))
    return hook


def msgpack_to_json(args: NoArgs) -> Hook:
    """MessagePack payload -> JSON: binary becomes base64 text, timestamps ISO 8601 text,
    extension types ``{"ext": code, "data": base64}``; map keys may be numbers."""
    msgpack = _need("msgpack", "msgpack_to_json")
    unpackb, encode = msgpack.unpackb, _json_encoder.encode

    def hook(msg: Message) -> Message:
        return msg._replace(payload=encode(unpackb(msg.payload, raw=False, strict_map_key=False,
                                                   timestamp=3, ext_hook=_ext)))
    return hook


def _ext(code: int, data: bytes) -> dict[str, Any]:
    return {"ext": code, "data": base64.b64encode(data).decode("ascii")}


# -- by topic ---------------------------------------------------------------------------

# \Z, not $: "$" matches before a trailing newline, and "a/#\n" (a literal level "#\n") kept nothing
TopicFilter = Annotated[str, Meta(min_length=1, pattern=r"^([^+#]*|\+)(/([^+#]*|\+))*(/#)?\Z|^#\Z")]


class TopicsArgs(Struct, forbid_unknown_fields=True, kw_only=True):
    topics: Annotated[list[TopicFilter], Meta(min_length=1)]  # MQTT filters: + one level, # the rest


def filter_regex(filters: list[str]) -> re.Pattern[str]:
    """MQTT topic filters -> one regex that matches the topics any of them matches
    (``a/#`` also matches ``a``; ``+`` and ``#`` do not match $-topics at the first level)."""
    parts = []
    for f in filters:
        levels = f.split("/")
        rx = ""
        for i, level in enumerate(levels):
            sep = "/" if i else ""
            if level == "#":
                rx += "(?:/.*)?" if i else "(?!\\$).*"
            elif level == "+":
                rx += sep + ("[^/]*" if i else "(?!\\$)[^/]*")
            else:
                rx += sep + re.escape(level)
        parts.append(rx)
    return re.compile("|".join(f"(?:{p})" for p in parts), re.S)


def drop(args: TopicsArgs) -> Hook:
    """Drop the messages whose topic matches one of ``topics`` (counted hook_dropped)."""
    match = filter_regex(args.topics).fullmatch

    def hook(msg: Message) -> Message | None:
        return None if match(msg.topic) else msg
    return hook


def keep(args: TopicsArgs) -> Hook:
    """Keep only the messages whose topic matches one of ``topics``; drop the others."""
    match = filter_regex(args.topics).fullmatch

    def hook(msg: Message) -> Message | None:
        return msg if match(msg.topic) else None
    return hook


class SampleArgs(Struct, forbid_unknown_fields=True, kw_only=True):
    interval: PositiveDuration  # keep at most one message per topic per interval


def sample(args: SampleArgs) -> Hook:
    """At most one message per topic per ``interval`` (by reception time): the first is
    kept, the rest of the interval dropped. Retained messages are always kept."""
    every = int(args.interval * 1_000_000)
    last: dict[str, int] = {}

    def hook(msg: Message) -> Message | None:
        ts = msg.ts
        kept = last.get(msg.topic)
        if kept is not None and ts - kept < every and not msg.retain:
            return None
        if len(last) >= 100_000:  # forget the topics whose interval is over
            for t in [t for t, k in last.items() if ts - k >= every]:
                del last[t]
        last[msg.topic] = ts
        return msg
    return hook


class RedactArgs(Struct, forbid_unknown_fields=True, kw_only=True):
    keys: Annotated[list[str], Meta(min_length=1)]  # object keys, at any depth
    replacement: Any = "[redacted]"
    non_json: Literal["keep", "drop", "quarantine"] = "keep"  # a payload that is not JSON


def redact(args: RedactArgs) -> Hook:
    """Replace the values of ``keys`` (in JSON objects, at any depth) by ``replacement``.
    A payload without them is stored unchanged, byte for byte."""
    keys = frozenset(args.keys)
    replacement, non_json = args.replacement, args.non_json

    def scrub(value: Any) -> bool:
        changed = False
        if isinstance(value, dict):
            for k, v in value.items():
                if k in keys:
                    value[k] = replacement
                    changed = True
                elif isinstance(v, (dict, list)):
                    changed = scrub(v) or changed
        elif isinstance(value, list):
            for v in value:
                if isinstance(v, (dict, list)):
                    changed = scrub(v) or changed
        return changed

    def hook(msg: Message) -> Message | None:
        try:
            value = _json_decode(msg.payload)
        except msgspec.DecodeError:
            if non_json == "keep":
                return msg
            if non_json == "drop":
                return None
            raise ValueError("payload is not JSON (redact non_json: quarantine)") from None
        if not scrub(value):
            return msg
        return msg._replace(payload=msgspec.json.encode(value))
    return hook


#: name -> (args Struct, factory)
BUILTINS: dict[str, tuple[type, Callable[[Any], Hook]]] = {
    "cbor_to_json": (NoArgs, cbor_to_json),
    "msgpack_to_json": (NoArgs, msgpack_to_json),
    "drop": (TopicsArgs, drop),
    "keep": (TopicsArgs, keep),
    "sample": (SampleArgs, sample),
    "redact": (RedactArgs, redact),
}


def make(name: str, args: dict[str, Any], key: str) -> Hook:
    """The built-in ``name`` made with ``args``; ConfigError naming ``key`` if they are wrong."""
    struct, factory = BUILTINS[name]
    try:
        return factory(_convert(args, struct, key))
    except _MissingPackage as exc:  # not the args' fault: the hook's key alone
        raise ConfigError(f"{key.removesuffix('.args')}: {exc}") from None
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(key) else f"{key}: {msg}") from None
