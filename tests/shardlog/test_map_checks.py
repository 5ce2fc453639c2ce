"""Shard maps that `check` used to accept and that then lost or deleted data (issue 22, items 1, 2,
4, 6, 11, 12): each is refused with exit 78 naming the key, by `check` and by `record` alike; and
`check` never calls a hook factory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shardlog.config.load import load_map
from shardlog.config.schema import ConfigError


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, doc: dict) -> Path:
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump(doc, sort_keys=False))
    return m


ONE = [{"name": "a", "prefix": "a"}]

# (the map, what the refusal says): the map's roots are relative to its directory (tmp_path)
REFUSED = {
    # 1: b's root inside a's root, below a's branch: `rm a/x` deleted b's live branch and lock
    "nested roots": ({"shards": [{"name": "a", "prefix": "a", "root": "r"},
                                 {"name": "b", "prefix": "b", "root": "r/a/x"}]},
                     "shards[1].root: {tmp}/r/a/x and shards[0].root {tmp}/r lie one inside the other"),
    "nested roots, outer listed last": ({"shards": [{"name": "b", "prefix": "b", "root": "r/a/x"},
                                                    {"name": "a", "prefix": "a", "root": "r"}]},
                                        "shards[1].root: {tmp}/r and shards[0].root {tmp}/r/a/x lie one inside"),
    # 11: a catch-all whose root is another shard's branch directory: one lock for two shards (75 for ever)
    "catch-all root in a branch": ({"shards": [{"name": "a", "prefix": "a", "root": "r"},
                                               {"name": "rest", "prefix": "#", "root": "r/a"}]},
                                   "shards[1].root: {tmp}/r/a and shards[0].root {tmp}/r lie one inside"),
    "nested through a symlink": ({"shards": [{"name": "a", "prefix": "a", "root": "r"},
                                             {"name": "b", "prefix": "b", "root": "link-into-r"}]},
                                 "shards[1].root: {tmp}/r/a/x and shards[0].root {tmp}/r lie one inside"),
    # 1: shards of two brokers in one root, their branches nested: each routes only against its own broker's
    "two brokers, nested branches, one root": ({"shards": [{"name": "a", "prefix": "a"},
                                                           {"name": "b", "prefix": "a/x",
                                                            "broker": {"host": "other", "port": 1884}}]},
                                               "shards[1].root: shards[1] 'b' (prefix 'a/x') and shards[0] 'a' "
                                               "(prefix 'a') record different brokers into one root"),
    "two brokers, a catch-all, one root": ({"shards": [{"name": "rest", "prefix": "#"},
                                                       {"name": "b", "prefix": "x", "broker": {"host": "other"}}]},
                                           "record different brokers into one root"),
    # 2: a root that resolves to / (a symlink), or to a system directory
    "root resolving to /": ({"shards": [{"name": "a", "prefix": "a", "root": "slash"}]},
                            "shards[0].root: '{tmp}/slash' (resolves to /) is a system directory (the whole"),
    "root /": ({"shards": [{"name": "a", "prefix": "a", "root": "/"}]}, "shards[0].root: '/' is a system directory"),
    "root /usr": ({"shards": [{"name": "a", "prefix": "a", "root": "/usr"}]}, "'/usr' is a system directory"),
    "root in /etc": ({"shards": [{"name": "a", "prefix": "a", "root": "/etc/shardlog"}]},
                     "'/etc/shardlog' is inside the system directory /etc"),
    # 4: silent discards
    "$share prefix": ({"shards": [{"name": "a", "prefix": "$share/g/chat"}]},
                      "shards[0].prefix: '$share/g/chat' starts with $share/, a shared-subscription filter"),
    "control topic inside a prefix": ({"shards": [{"name": "a", "prefix": "shardlog"}], "control": {"mqtt": True}},
                                      "control.topic: 'shardlog/control/{host}' overlaps shards[0].prefix 'shardlog'"),
    "control topic equal to a prefix": ({"shards": [{"name": "a", "prefix": "ctl/web1"}],
                                         "control": {"mqtt": True, "topic": "ctl/web1"}},
                                        "control.topic: 'ctl/web1' overlaps shards[0].prefix 'ctl/web1'"),
    "a prefix inside the control topic": ({"shards": [{"name": "a", "prefix": "ctl/web1/x"}],
                                           "control": {"mqtt": True, "topic": "ctl/{host}"}},
                                          "control.topic: 'ctl/{host}' overlaps shards[0].prefix 'ctl/web1/x'"),
    "reply topic inside a prefix": ({"shards": [{"name": "a", "prefix": "answers"}, {"name": "r", "prefix": "#"}],
                                     "control": {"mqtt": True, "reply_topic": "answers/{host}"}},
                                    "control.reply_topic: 'answers/{host}' overlaps shards[0].prefix 'answers'"),
    "control topic {host}": ({"shards": [{"name": "rest", "prefix": "#"}],
                              "control": {"mqtt": True, "topic": "{host}"}},
                             "control.topic: '{host}': {host} in the first level matches topics of every first level"),
    # 6: replies published on the control topic: a loop
    "reply topic = control topic": ({"shards": ONE,
                                     "control": {"mqtt": True, "reply_topic": "shardlog/control/{host}"}},
                                    "control.reply_topic: 'shardlog/control/{host}' can be the control topic"),
    "reply topic = one host's control topic": ({"shards": ONE, "control": {"mqtt": True, "topic": "ctl/{host}",
                                                                           "reply_topic": "ctl/web1"}},
                                               "control.reply_topic: 'ctl/web1' can be the control topic 'ctl/{host}'"),
    "status document on the control topic": ({"shards": ONE, "control": {"mqtt": True, "topic": "ctl/{host}",
                                                                         "supervisor_topic": "ctl/{host}"}},
                                             "control.supervisor_topic: 'ctl/{host}' can be the control topic"),
    "a shard's status on the control topic": ({"shards": [{"name": "web1", "prefix": "a"}],
                                               "control": {"mqtt": True, "topic": "ctl/{host}", "status_topic": "ctl"}},
                                              "control.status_topic: ctl/web1 (shard 'web1''s status) "
                                              "can be the control"),
    # 11: a name with a trailing newline (the broker refuses the client id at every connect), a port past 65535
    "name with a newline": ({"shards": [{"name": "a\n", "prefix": "a"}]},
                            "shards[0].name: expected a letter or digit, then at most 63 letters"),
    "client id prefix with a newline": ({"broker": {"client_id_prefix": "x\n"}, "shards": ONE},
                                        "broker.client_id_prefix: expected text without control characters"),
    "listen port 70000": ({"supervisor": {"listen": "127.0.0.1:70000"}, "shards": ONE},
                          "supervisor.listen: expected HOST:PORT with a port from 0 to 65535, got '127.0.0.1:70000'"),
    "listen without a port": ({"supervisor": {"listen": "127.0.0.1"}, "shards": ONE}, "supervisor.listen: expected"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_check_and_record_refuse_what_would_lose_or_delete_data(tmp_path: Path, case: str) -> None:
    doc, expected = REFUSED[case]
    (tmp_path / "r" / "a" / "x").mkdir(parents=True)
    os.symlink(tmp_path / "r" / "a" / "x", tmp_path / "link-into-r")
    os.symlink("/", tmp_path / "slash")
    expected = expected.replace("{tmp}", str(tmp_path))
    m = write(tmp_path, doc)
    with pytest.raises(ConfigError) as info:
        load_map(str(m), env={})
    assert expected in str(info.value)
    r = run_cli("check", str(m))
    assert r.returncode == 78, r
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


ACCEPTED = {
    "shards sharing one root": {"shards": [{"name": "a", "prefix": "a"}, {"name": "vip", "prefix": "a/vip"},
                                           {"name": "rest", "prefix": "#"}]},
    "two brokers, branches apart, one root": {"shards": [{"name": "a", "prefix": "a"},
                                                         {"name": "b", "prefix": "b", "broker": {"host": "other"}}]},
    "two brokers, nested branches, roots apart": {"shards": [{"name": "a", "prefix": "a", "root": "d1"},
                                                             {"name": "b", "prefix": "a/x", "root": "d2",
                                                              "broker": {"host": "other"}}]},
    "roots side by side": {"shards": [{"name": "a", "prefix": "a", "root": "disk1"},
                                      {"name": "b", "prefix": "b", "root": "disk2"}]},
    "control topics of a catch-all map": {"shards": [{"name": "rest", "prefix": "#"}],
                                          "control": {"mqtt": True, "reply_topic": "answers/{host}",
                                                      "supervisor_topic": "shardlog/status/{host}"}},
    "control topic beside the prefixes": {"shards": [{"name": "a", "prefix": "shardlog2"},
                                                     {"name": "b", "prefix": "shardlog/data"}],
                                          "control": {"mqtt": True}},
    "an unused control topic": {"shards": [{"name": "a", "prefix": "shardlog"}], "control": {"topic": "{host}"}},
    "listen on every interface": {"shards": ONE, "supervisor": {"listen": ":8470"}},
    "listen on IPv6 loopback": {"shards": ONE, "supervisor": {"listen": "[::1]:8470"}},
}


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_layouts_that_lose_nothing_are_still_accepted(tmp_path: Path, case: str) -> None:
    load_map(str(write(tmp_path, ACCEPTED[case])), env={})


def test_check_imports_hooks_but_never_calls_a_factory(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    m = write(tmp_path, {"shards": [{"name": "a", "prefix": "a",
                                     "hooks": [{"use": "os:system", "args": {"command": f"touch {marker}"}}]}]})
    r = run_cli("check", str(m))
    assert r.returncode == 0, r.stderr
    assert "1 hook(s) imported" in r.stdout
    assert not marker.exists(), "shardlog check ran the hook factory os.system(...)"
    # the factory's signature is still checked: an argument it does not take is refused, naming the key
    m = write(tmp_path, {"shards": [{"name": "a", "prefix": "a",
                                     "hooks": [{"use": "os:system", "args": {"cmd": f"touch {marker}"}}]}]})
    r = run_cli("check", str(m))
    assert r.returncode == 78 and "shards[0].hooks[0].args: os:system(**args) would fail" in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["a/#\n", "#\n"])
def test_a_topic_filter_with_a_trailing_newline_is_refused(tmp_path: Path, bad: str) -> None:
    """`keep: [a/#\\n]` passed ($ matches before a trailing newline) and, a literal level '#\\n',
    kept nothing: every message acknowledged and dropped."""
    hook = {"use": "keep", "args": {"topics": [bad]}}
    m = write(tmp_path, {"shards": [{"name": "a", "prefix": "a", "hooks": [hook]}]})
    r = run_cli("check", str(m))
    assert r.returncode == 78 and "shards[0].hooks[0].args.topics[0]" in r.stderr, r.stderr
