"""The pure side of control commands: parsing, topic checks, routing to shards, refusals."""

from __future__ import annotations

import pytest

from shardlog.config.load import parse_map
from shardlog.config.schema import ConfigError
from shardlog.control.commands import (
    ALL,
    CommandError,
    ShardRef,
    Target,
    check_topic,
    control_topics,
    is_under,
    parse_command,
    route,
    topic_filter_matches,
)

SHARDS = [
    ShardRef("chat", "chat", True),
    ShardRef("vip", "chat/vip", True),
    ShardRef("rest", "", True),
    ShardRef("far", "far", False),       # run by another host's supervisor
    ShardRef("sys", "$SYS", True),
]


def refused(body: dict, why: str, shards: list[ShardRef] = SHARDS) -> None:
    with pytest.raises(CommandError) as exc:
        route(parse_command(body), shards)
    assert why in str(exc.value), str(exc.value)


@pytest.mark.parametrize("body,why", [
    (b"{", "malformed JSON"),
    (b"[1]", "expected a JSON object"),
    (b'{"prefix": "a"}', "missing 'op'"),
    (b'{"op": "explode"}', "unknown op 'explode'"),
    (b'{"op": "delete"}', "missing 'prefix'"),
    (b'{"op": "move", "src": "a"}', "missing 'dst'"),
    (b'{"op": "start"}', "missing 'shard'"),
    (b'{"op": "delete", "prefix": "a", "dst": "b"}', "dst not used"),
    (b'{"op": "delete", "prefix": 5}', "bad command"),
    (b'{"op": "delete", "prefix": "a", "extra": 1}', "bad command"),
    (b'{"op": "delete", "prefix": "a", "id": [1]}', "bad command"),
    # issue 22: a decoder keeps the last of two keys, so this was a delete of chat/dup
    (b'{"op": "rotate", "op": "delete", "prefix": "chat/dup"}', "duplicate key 'op'"),
    (b'{"op": "delete", "prefix": "chat/a", "prefix": "chat/b"}', "duplicate key 'prefix'"),
    (b'{"op": "rotate", "prefix": "a", "id": 1, "id": 2}', "duplicate key 'id'"),
    ('{"op": "rotate", "prefix": "a", "\\u006fp": "delete"}', "duplicate key 'op'"),  # an escaped "op"
    (b'{"op": "rotate", "prefix": NaN}', "malformed JSON"),
    (b'{"op": "rotate", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
])
def test_parse_refuses_malformed_commands(body: bytes, why: str) -> None:
    with pytest.raises(CommandError) as exc:
        parse_command(body)
    assert why in str(exc.value)


def test_a_duplicate_key_is_refused_over_the_request_path_too() -> None:
    with pytest.raises(CommandError, match="duplicate key 'prefix'"):
        parse_command(b'{"prefix": "chat/keep", "prefix": "chat/gone"}', "delete")


def test_parse_takes_the_op_from_the_request_path() -> None:
    assert parse_command(b'{"prefix": "a"}', "delete").op == "delete"
    assert parse_command(b'{"op": "delete", "prefix": "a", "id": "x1"}', "delete").id == "x1"
    with pytest.raises(CommandError, match="differs"):
        parse_command(b'{"op": "move", "prefix": "a"}', "delete")
    assert parse_command({"op": "stop"}).shard is None


@pytest.mark.parametrize("value,why", [
    ("", "empty"),
    ("/etc/passwd", "absolute path"),
    ("..", "'.' or '..' level"),
    ("chat/../..", "'.' or '..' level"),
    ("chat/./x", "'.' or '..' level"),
    ("chat//x", "empty"),
    ("chat/", "empty"),
    ("chat/+", "wildcard"),
    ("chat/#", "wildcard"),
    ("chat/\x00", "NUL"),
    ("chat/\ud800", "cannot be stored"),
    ("x" * 70000, "longer than an MQTT topic"),
])
def test_check_topic_refuses_paths_and_wildcards(value: str, why: str) -> None:
    with pytest.raises(CommandError) as exc:
        check_topic(value)
    assert why in str(exc.value)


def test_check_topic_accepts_odd_but_plain_topics() -> None:
    for t in ("chat", "chat/room 42", "a/...", "a/.hidden", "ünï/cødé", "a/%2E%2E", "$SYS/x"):
        assert check_topic(t) == t


def test_is_under() -> None:
    assert is_under("chat", "chat") and is_under("chat/x", "chat")
    assert not is_under("chatx", "chat") and not is_under("chat", "chat/x")
    assert is_under("anything", "") and not is_under("$SYS/x", "")


def test_route_finds_the_owner() -> None:
    assert route(parse_command({"op": "delete", "prefix": "chat/room1"}), SHARDS) == [
        Target("chat", "delete", {"prefix": "chat/room1"})]
    assert route(parse_command({"op": "delete", "prefix": "chat/vip/x"}), SHARDS)[0].shard == "vip"
    assert route(parse_command({"op": "delete", "prefix": "chat/vipx"}), SHARDS)[0].shard == "chat"
    assert route(parse_command({"op": "delete", "prefix": "other"}), SHARDS)[0].shard == "rest"
    assert route(parse_command({"op": "move", "src": "chat/a", "dst": "chat/b/c"}), SHARDS) == [
        Target("chat", "move", {"src": "chat/a", "dst": "chat/b/c"})]
    assert route(parse_command({"op": "stop"}), SHARDS) == [Target(ALL, "stop", {})]
    assert route(parse_command({"op": "stop", "shard": "vip"}), SHARDS) == [Target("vip", "stop", {})]


def test_route_refuses_what_spans_or_leaves_a_shard() -> None:
    refused({"op": "delete", "prefix": "chat"}, "spans shards 'chat' and 'vip'")
    refused({"op": "delete", "prefix": "far/x"}, "another supervisor")
    refused({"op": "delete", "prefix": "$other"}, "no shard records '$other'")
    refused({"op": "move", "src": "chat/a", "dst": "other/a"}, "a move stays within one shard")
    refused({"op": "move", "src": "chat/a", "dst": "chat/vip/a"}, "belongs to shard 'vip'")
    refused({"op": "move", "src": "chat/a", "dst": "chat/a"}, "the same topic")
    refused({"op": "move", "src": "chat/a", "dst": "chat/a/b"}, "lies inside src")
    refused({"op": "move", "src": "chat/a/b", "dst": "chat/a"}, "lies inside dst")
    refused({"op": "move", "src": "chat/vip", "dst": "chat/vip2"}, "belongs to shard 'chat'")
    refused({"op": "stop", "shard": "far"}, "another supervisor")
    refused({"op": "start", "shard": "nope"}, "no shard named 'nope'")
    no_catch_all = [s for s in SHARDS if s.name != "rest"]
    refused({"op": "delete", "prefix": "other/x"}, "outside every shard's prefix", no_catch_all)
    refused({"op": "move", "src": "chat", "dst": "chat2"}, "outside every shard's prefix", no_catch_all)
    refused({"op": "move", "src": "chat/vip", "dst": "chat/vip/old"}, "lies inside src", no_catch_all)


def test_rotate_is_split_between_the_owner_and_nested_shards() -> None:
    targets = route(parse_command({"op": "rotate", "prefix": "chat"}), SHARDS)
    assert targets == [Target("chat", "rotate", {"prefix": "chat"}), Target("vip", "rotate", {"prefix": "chat/vip"})]
    no_catch_all = [s for s in SHARDS if s.name != "rest"]
    assert route(parse_command({"op": "rotate", "prefix": "chat/vip/x"}), SHARDS) == [
        Target("vip", "rotate", {"prefix": "chat/vip/x"})]
    with pytest.raises(CommandError, match="no shard records"):
        route(parse_command({"op": "rotate", "prefix": "nothing"}), no_catch_all)


def test_control_topic_matching() -> None:
    t = "shardlog/control/{host}"
    assert topic_filter_matches(t, "shardlog/control/web1")
    assert topic_filter_matches(t, "shardlog/control/web1/reply")
    assert not topic_filter_matches(t, "shardlog/control")
    assert not topic_filter_matches(t, "shardlog/controlx/web1")
    assert topic_filter_matches(t, "shardlog/control/a/b")  # below a control topic: never recorded either
    assert topic_filter_matches("ctl.[x]*", "ctl.[x]*") and not topic_filter_matches("ctl.[x]*", "ctlx[x]")
    assert control_topics(t, None, "web1") == ("shardlog/control/web1", "shardlog/control/web1/reply")
    assert control_topics(t, "replies/{host}", "w") == ("shardlog/control/w", "replies/w")


def test_control_section_of_the_shard_map() -> None:
    base = {"shards": [{"name": "a", "prefix": "a"}]}
    smap = parse_map(base, env={})
    assert not smap.control.mqtt and smap.control.status_topic is None and smap.control.token is None
    smap = parse_map({**base, "control": {"mqtt": True, "token": "${TOKEN:-}", "status_topic": "st"}}, env={})
    assert smap.control.mqtt and smap.control.token is None and smap.control.status_topic == "st"
    for bad, why in (({"topic": "a/#"}, "control.topic: expected a topic name without wildcards"),
                     ({"status_topic": "$SYS/x"}, "control.status_topic: '$SYS/x' starts with '$'"),
                     ({"mqtt": "yes"}, "control.mqtt"),
                     ({"tokn": "x"}, "control: object contains unknown field `tokn`")):
        with pytest.raises(ConfigError) as exc:
            parse_map({**base, "control": bad}, env={})
        assert why in str(exc.value), str(exc.value)
