"""The shard map: validation with errors that name the key, env expansion, units,
routing, and the `check` / `init` verbs (exit 78 on a bad map)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shardlog.config.load import load_map, parse_map, shards_for_host
from shardlog.config.routing import Router, subscription
from shardlog.config.schema import ConfigError
from shardlog.config.units import parse_duration, parse_size

REPO = Path(__file__).resolve().parents[2]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=60)


def test_example_map_is_valid_and_init_writes_it(tmp_path: Path) -> None:
    smap = load_map(str(REPO / "shards.example.yaml"), env={})
    assert [s.name for s in smap.shards] == ["chat", "rest"]
    assert smap.shards[0].recent == 20 and smap.shards[1].recent == 6
    assert smap.broker.username == ""  # ${MQTT_USERNAME:-} unset: anonymous
    r = run_cli("init", str(tmp_path / "shards.yaml"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "shards.yaml").read_text() == (REPO / "shards.example.yaml").read_text()
    assert run_cli("init", str(tmp_path / "shards.yaml")).returncode == 64  # no silent overwrite


def test_check_prints_routing_table(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("shards:\n  - {name: chat, prefix: chat, root: /srv/a}\n"
                 "  - {name: vip, prefix: chat/vip}\n  - {name: rest, prefix: '#'}\n")
    r = run_cli("check", str(m))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[:3] == ["PREFIX", "SHARD", "ROOT"]
    assert [ln.split()[:3] for ln in lines[2:]] == [
        ["chat/vip", "vip", str(tmp_path / "data")], ["chat", "chat", "/srv/a"], ["#", "rest", str(tmp_path / "data")]]


BAD_MAPS = [
    ("shards:\n  - {name: a, prefix: x}\n  - {name: b, prefix: y}\n  - {name: c, prefix: z, rotate: {max_bytes: 12}}\n",
     "shards[2].rotate.max_bytes: expected >= 1KiB"),
    ("defaults: {rotate: {max_age: soon}}\nshards: [{name: a, prefix: x}]\n", "defaults.rotate.max_age"),
    ("shards: [{name: a, prefix: x, colour: red}]\n", "shards[0]: object contains unknown field `colour`"),
    ("brokr: {host: x}\nshards: [{name: a, prefix: x}]\n", "unknown field `brokr`"),
    ("shards: [{name: a, prefix: 'x/#'}]\n", "shards[0].prefix: wildcards are not allowed"),
    ("shards: [{name: a, prefix: 'x/+/y'}]\n", "shards[0].prefix: wildcards"),
    ("shards: [{name: a, prefix: x}, {name: b, prefix: x}]\n",
     "shards[1].prefix: 'x' is already the prefix of shards[0]"),
    ("shards: [{name: a, prefix: '#'}, {name: b, prefix: ''}]\n", "shards[1].prefix"),
    ("shards: [{name: a, prefix: x}, {name: a, prefix: y}]\n", "shards[1].name"),
    ("shards: [{name: a, prefix: x, qos: 2}]\n", "shards[0].qos"),
    ("broker: {port: 70000}\nshards: [{name: a, prefix: x}]\n", "broker.port"),
    ("broker: {password: '${SHARDLOG_TEST_UNSET}'}\nshards: [{name: a, prefix: x}]\n",
     "broker.password: environment variable SHARDLOG_TEST_UNSET is not set"),
    ("shards: []\n", "shards"),
    ("shards: [{name: 'a b', prefix: x}]\n", "shards[0].name"),
    ("shards: [{name: a, prefix: x, host: h1}, {name: b, prefix: y}]\n", "shards[1].host: required"),
    ("supervisor: {restart: {max_restarts: 0}}\nshards: [{name: a, prefix: x}]\n", "supervisor.restart.max_restarts"),
    ("shards: [{name: a, prefix: x}\n", "not valid YAML (line"),
    ("- just\n- a list\n", "expected a mapping at the top"),
    ("", "shard map is empty"),
]


@pytest.mark.parametrize("text,expected", BAD_MAPS)
def test_bad_map_names_the_key_and_exits_78(tmp_path: Path, text: str, expected: str) -> None:
    m = tmp_path / "bad.yaml"
    m.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_map(str(m), env={})
    assert expected in str(info.value)
    r = run_cli("check", str(m))
    assert r.returncode == 78
    assert expected in r.stderr and "Traceback" not in r.stderr
    r = run_cli("record", str(m), "--shard", "a")
    assert r.returncode == 78 and expected in r.stderr


def test_record_unknown_shard_exits_78(tmp_path: Path) -> None:
    m = tmp_path / "m.yaml"
    m.write_text("shards: [{name: a, prefix: x}]\n")
    r = run_cli("record", str(m), "--shard", "nope")
    assert r.returncode == 78 and "no shard named 'nope'" in r.stderr


def test_usage_error_exits_64() -> None:
    assert run_cli("record").returncode == 64
    assert run_cli("frobnicate").returncode == 64


def test_env_expansion_defaults_and_merge() -> None:
    raw = {
        "broker": {"host": "${H:-localhost}", "password": "${PW}", "username": "lit$${x}"},
        "defaults": {"rotate": {"max_bytes": "1MiB", "max_age": "1h"}, "recent": 3},
        "shards": [{"name": "a", "prefix": "a", "rotate": {"max_age": "90s"}, "root": "rel"},
                   {"name": "b", "prefix": "#", "root": "/abs"}],
    }
    smap = parse_map(raw, base_dir="/base", env={"PW": "s3cret: #not yaml"})
    assert smap.broker.host == "localhost" and smap.broker.password == "s3cret: #not yaml"
    assert smap.broker.username == "lit${x}"
    a, b = smap.shards
    assert (a.rotate.max_bytes, a.rotate.max_age) == (1024 * 1024, 90.0)  # deep merge
    assert (b.rotate.max_bytes, b.rotate.max_age) == (1024 * 1024, 3600.0)
    assert a.recent == 3 and a.root == "/base/rel" and b.root == "/abs"
    assert smap.broker.mqtt5 and a.branch == "a" and b.branch == ""


def test_protocol_311_and_per_shard_broker() -> None:
    smap = parse_map({"broker": {"protocol": "3.1.1"},
                      "shards": [{"name": "a", "prefix": "a", "broker": {"host": "other", "protocol": 5}}]}, env={})
    assert not smap.broker.mqtt5
    assert smap.broker_of(smap.shards[0]).host == "other" and smap.broker_of(smap.shards[0]).mqtt5


def test_hosts() -> None:
    single = parse_map({"shards": [{"name": "a", "prefix": "a"}]}, env={})
    assert [s.name for s in shards_for_host(single, "anything")] == ["a"]
    multi = parse_map({"shards": [{"name": "a", "prefix": "a", "host": "h1"},
                                  {"name": "b", "prefix": "#", "host": "h2"}]}, env={})
    assert [s.name for s in shards_for_host(multi, "h2")] == ["b"]
    assert shards_for_host(multi, "h3") == []


@pytest.mark.parametrize("text,n", [("64MiB", 64 * 2**20), ("1KiB", 1024), ("2MB", 2_000_000), (4096, 4096),
                                    ("1.5GiB", 3 * 2**29), ("10 B", 10)])
def test_sizes(text: object, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text,s", [("30s", 30.0), ("1d", 86400.0), ("250ms", 0.25), ("1h30m", 5400.0), (5, 5.0)])
def test_durations(text: object, s: float) -> None:
    assert parse_duration(text) == s


@pytest.mark.parametrize("bad", ["1 parsec", "-3s", "s", "", True, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(bad)


def test_routing_longest_prefix_and_dollar_topics() -> None:
    r = Router([("", "rest"), ("chat", "chat"), ("chat/vip", "vip"), ("$SYS", "sys")])
    assert r.owner("chat") == "chat" and r.owner("chat/x/y") == "chat"
    assert r.owner("chatter") == "rest" and r.owner("chat/vipx") == "chat"
    assert r.owner("chat/vip") == "vip" and r.owner("chat/vip/1") == "vip"
    assert r.owner("/chat") == "rest"
    assert r.owner("$SYS/broker/load") == "sys" and r.owner("$other/x") is None
    assert Router([("a", "a")]).owner("b") is None
    assert subscription("") == "#" and subscription("chat") == "chat/#"
