"""Control commands (rotate, delete, move, stop, start): parsing, validation and routing. Pure.

A command arrives as JSON (the supervisor's HTTP API, ``shardlog rotate|rm|mv|stop``, or the
MQTT control topic), is parsed into a :class:`Command`, its topic arguments are checked by
:func:`check_topic` and :func:`route` decides which shard(s) carry it out, or refuses it with a
reason. Nothing here touches the disk or the network: the recorder that owns the branch does the
file system work (:mod:`shardlog.control.operations`) and the supervisor the process work.

Refusals are :class:`CommandError` with a sentence meant for the operator. A refused command
changes nothing: every check runs before any shard is asked to do anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from shardlog.config.routing import Router
from shardlog.topics import MAX_TOPIC_BYTES, TopicError, topic_to_relpath

OPS = ("rotate", "delete", "move", "stop", "start")
#: operations a recorder carries out itself (the others are the supervisor's)
RECORDER_OPS = ("rotate", "delete", "move")
#: the whole supervisor (``stop`` without a shard)
ALL = "*"

Op = Literal["rotate", "delete", "move", "stop", "start"]


class CommandError(ValueError):
    """A command that is refused; ``str(exc)`` is the reason given to the sender."""


class Command(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    op: Op
    id: str | int | None = None     # echoed in the reply
    prefix: str | None = None       # rotate, delete: a topic or a branch
    src: str | None = None          # move
    dst: str | None = None          # move
    shard: str | None = None        # stop (none: the whole supervisor), start
    token: str | None = None        # the map's control.token, when it sets one


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise CommandError(f"duplicate key {key!r} (a command names each key once)")
        obj[key] = value
    return obj


def decode_strict(body: bytes | str) -> Any:
    """JSON text -> Python, as strictly as the shard map is read: strict JSON (msgspec: no NaN,
    no trailing commas, valid UTF-8) and no key twice in one object (``{"op": "rotate", "op":
    "delete"}`` would otherwise be a delete: a decoder keeps the last). Raises CommandError."""
    if not body:
        return {}
    try:
        msgspec.json.decode(body)  # strictness and the depth limit (about 1,000 levels)
        # the same text again, only to see every key of every object (msgspec keeps the last)
        return json.loads(body, object_pairs_hook=_refuse_duplicates)
    except msgspec.DecodeError as exc:
        raise CommandError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise CommandError("malformed JSON: nested too deeply") from None


def parse_command(body: bytes | str | dict[str, Any], op: str | None = None) -> Command:
    """JSON (or an already decoded object) -> Command. ``op``, when given (the HTTP path),
    fills in or must match the body's ``op``. Raises CommandError."""
    obj = decode_strict(body) if isinstance(body, (bytes, str)) else body
    if not isinstance(obj, dict):
        raise CommandError(f"expected a JSON object, got {type(obj).__name__}")
    if op is not None:
        if obj.get("op", op) != op:
            raise CommandError(f"the body's op {obj.get('op')!r} differs from the request's {op!r}")
        obj = {**obj, "op": op}
    if "op" not in obj:
        raise CommandError(f"missing 'op' (one of {', '.join(OPS)})")
    if obj["op"] not in OPS:
        raise CommandError(f"unknown op {obj['op']!r} (expected one of {', '.join(OPS)})")
    try:
        cmd = msgspec.convert(obj, Command)
    except msgspec.ValidationError as exc:
        raise CommandError(f"bad command: {exc}") from None
    needed = {"rotate": ("prefix",), "delete": ("prefix",), "move": ("src", "dst"), "start": ("shard",),
              "stop": ()}[cmd.op]
    for key in needed:
        if getattr(cmd, key) is None:
            raise CommandError(f"{cmd.op}: missing {key!r}")
    unused = [k for k in ("prefix", "src", "dst", "shard")
              if k not in needed and getattr(cmd, k) is not None and not (cmd.op == "stop" and k == "shard")]
    if unused:
        raise CommandError(f"{cmd.op}: {', '.join(unused)} not used by this operation")
    return cmd


def check_topic(value: str, what: str = "prefix") -> str:
    """A topic or branch named in a command, as given, or CommandError: it must be a plain
    topic name (no wildcard, no empty, ``.`` or ``..`` level, not an absolute path) that the
    recorder's encoding can store."""
    if not isinstance(value, str) or value == "":
        raise CommandError(f"{what}: empty (name a topic or branch; the whole tree is never a target)")
    if value.startswith("/"):
        raise CommandError(f"{what}: {value!r} looks like an absolute path: name a topic "
                           "(e.g. chat/room42), not a file system path")
    if "+" in value or "#" in value:
        raise CommandError(f"{what}: {value!r} contains a wildcard ('+' or '#'); name one branch")
    if "\x00" in value:
        raise CommandError(f"{what}: contains NUL")
    levels = value.split("/")
    if any(level in ("", ".", "..") for level in levels):
        raise CommandError(f"{what}: {value!r} has an empty, '.' or '..' level; commands take "
                           "topic names, never relative paths")
    try:
        if len(value.encode("utf-8")) > MAX_TOPIC_BYTES:
            raise CommandError(f"{what}: longer than an MQTT topic may be")
        topic_to_relpath(value)
    except (TopicError, UnicodeEncodeError) as exc:
        raise CommandError(f"{what}: {value!r} cannot be stored: {exc}") from None
    return value


def is_under(topic: str, branch: str) -> bool:
    """``topic`` is ``branch`` or lies below it (``branch`` "" is everything but ``$``-topics)."""
    if branch == "":
        return not topic.startswith("$")
    return topic == branch or topic.startswith(branch + "/")


@dataclass(frozen=True)
class ShardRef:
    name: str
    branch: str        # "" for the catch-all
    local: bool        # run by this supervisor (its host)


@dataclass(frozen=True)
class Target:
    """One shard's part of a command: the request sent to its recorder (or the supervisor's
    own action for stop/start)."""

    shard: str
    op: str
    args: dict[str, str]


def _owner(router: Router, topic: str, what: str) -> str:
    owner = router.owner(topic)
    if owner is None:
        raise CommandError(f"{what}: no shard records {topic!r} (it lies outside every shard's prefix)")
    return owner


def _nested(shards: Iterable[ShardRef], topic: str, owner: str) -> list[ShardRef]:
    """Shards other than ``owner`` whose branch lies strictly below ``topic``."""
    return [s for s in shards if s.name != owner and s.branch and s.branch != topic and is_under(s.branch, topic)]


def _local(ref: ShardRef, topic: str) -> None:
    if not ref.local:
        raise CommandError(f"{topic!r} belongs to shard {ref.name!r}, which another supervisor (host) runs; "
                           "send the command there")


def route(cmd: Command, shards: list[ShardRef]) -> list[Target]:
    """Which shard(s) carry ``cmd`` out. Refuses (CommandError) anything that would touch
    more than one shard's files (delete, move) or a shard this supervisor does not run.
    ``rotate`` is split: the owner of the prefix and every shard nested below it rotate
    their part. ``shards``: every shard of the map (on this broker)."""
    by_name = {s.name: s for s in shards}
    router = Router((s.branch, s.name) for s in shards)
    if cmd.op in ("stop", "start"):
        if cmd.shard is None:
            return [Target(ALL, cmd.op, {})]
        ref = by_name.get(cmd.shard)
        if ref is None:
            raise CommandError(f"{cmd.op}: no shard named {cmd.shard!r} (shards: {', '.join(sorted(by_name))})")
        if not ref.local:
            raise CommandError(f"{cmd.op}: shard {cmd.shard!r} is run by another supervisor (host)")
        return [Target(ref.name, cmd.op, {})]
    if cmd.op == "rotate":
        prefix = check_topic(cmd.prefix or "")
        targets = []
        owner = router.owner(prefix)
        if owner is not None:
            targets.append(by_name[owner])
        targets += _nested(shards, prefix, owner or "")
        if not targets:
            raise CommandError(f"prefix: no shard records {prefix!r} (it lies outside every shard's prefix)")
        for ref in targets:
            _local(ref, prefix)
        return [Target(ref.name, "rotate", {"prefix": prefix if ref.name == owner else ref.branch})
                for ref in targets]
    if cmd.op == "delete":
        prefix = check_topic(cmd.prefix or "")
        owner = _owner(router, prefix, "prefix")
        nested = _nested(shards, prefix, owner)
        if nested:
            raise CommandError(f"{prefix!r} spans shards {owner!r} and "
                               f"{', '.join(repr(s.name) for s in nested)} (their prefixes lie below it); "
                               "delete each shard's part separately")
        _local(by_name[owner], prefix)
        return [Target(owner, "delete", {"prefix": prefix})]
    # move
    src = check_topic(cmd.src or "", "src")
    dst = check_topic(cmd.dst or "", "dst")
    if src == dst:
        raise CommandError("src and dst are the same topic")
    if is_under(dst, src):
        raise CommandError(f"dst {dst!r} lies inside src {src!r}")
    if is_under(src, dst):
        raise CommandError(f"src {src!r} lies inside dst {dst!r}")
    owner = _owner(router, src, "src")
    dst_owner = _owner(router, dst, "dst")
    if dst_owner != owner:
        raise CommandError(f"dst {dst!r} belongs to shard {dst_owner!r} but src {src!r} to shard {owner!r}: "
                           "a move stays within one shard (a rename inside one root)")
    for topic, what in ((src, "src"), (dst, "dst")):
        nested = _nested(shards, topic, owner)
        if nested:
            raise CommandError(f"{what} {topic!r} spans shards {owner!r} and "
                               f"{', '.join(repr(s.name) for s in nested)} (their prefixes lie below it)")
    if by_name[owner].branch == src:
        raise CommandError(f"src {src!r} is shard {owner!r}'s whole branch; move topics below it")
    _local(by_name[owner], src)
    return [Target(owner, "move", {"src": src, "dst": dst})]


def topic_filter_matches(pattern: str, topic: str) -> bool:
    """``pattern`` with ``{host}`` standing for any text within one level: does ``topic``
    equal it or lie below it? (The control and reply topics are never recorded.)"""
    rx = re.escape(pattern).replace(re.escape("{host}"), "[^/]+")
    return re.fullmatch(rx + "(?:/.*)?", topic, re.S) is not None


def control_topics(template: str, reply_template: str | None, host: str) -> tuple[str, str]:
    """(command topic, reply topic) for ``host``."""
    topic = template.replace("{host}", host)
    reply = (reply_template or template + "/reply").replace("{host}", host)
    return topic, reply
