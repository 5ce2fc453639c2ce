"""Hooks, the pure parts: loading, the chain's isolation and time limit, the built-ins,
and the stand-in ids that hold a fanned-out message's acknowledgement."""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
import time
from pathlib import Path

import cbor2
import msgpack
import pytest

from shardlog.config.load import parse_map
from shardlog.config.schema import ConfigError, HookSpec
from shardlog.hooks import builtin as builtin_hooks
from shardlog.hooks.chain import Chain, Watchdog, checked, log_due
from shardlog.hooks.loading import load_hooks
from shardlog.hooks.message import HookFailure, LoadedHook, Message
from shardlog.hooks.path import FIRST_STANDIN, FanOut
from tests.helpers import SocketpairClient, gate_preparer

MSG = Message("s/a", b'{"v": 1}', 1_700_000_000_000_000, 1, False)


def chain(*fns, timeout: float = 1.0, owns=lambda t: None) -> Chain:  # type: ignore[no-untyped-def]
    return Chain([LoadedHook(f.__name__, f) for f in fns], timeout, owns)


def test_unchanged_changed_several_and_dropped() -> None:
    def same(m: Message) -> Message:
        return m

    def upper(m: Message) -> Message:
        return m._replace(payload=m.payload.upper())

    def split(m: Message) -> list[Message]:
        return [m._replace(topic=m.topic + "/x"), m._replace(topic=m.topic + "/y", payload="text")]

    def gone(m: Message) -> None:
        return None

    assert chain(same).run(MSG) == [MSG]
    assert chain(upper).run(MSG) == [MSG._replace(payload=b'{"V": 1}')]
    out = chain(split, upper).run(MSG)  # every output of one hook goes through the next
    assert out == [MSG._replace(topic="s/a/x", payload=b'{"V": 1}'),
                   MSG._replace(topic="s/a/y", payload=b"TEXT")]  # a str payload becomes UTF-8
    assert chain(gone, upper).run(MSG) == []
    assert chain(lambda m: (x for x in [m, m])).run(MSG) == [MSG, MSG]  # a generator


@pytest.mark.parametrize("result, text", [
    (42, "returned int 42"),
    ({"topic": "s"}, "returned dict"),
    (MSG._replace(payload={"a": 1}), "payload is a dict"),
    (MSG._replace(topic=""), "topic is ''"),
    (MSG._replace(topic="s/+"), "wildcard"),
    (MSG._replace(topic="s/\udcff"), "not valid UTF-8"),
    (MSG._replace(ts=1.5), "ts is 1.5"),
    (MSG._replace(qos=3), "qos is 3"),
    (MSG._replace(retain=1), "retain is 1"),
    ([MSG, None], "returned NoneType"),
])
def test_garbage_is_a_failure_naming_the_hook(result: object, text: str) -> None:
    def bad(m: Message) -> object:
        return result

    out = chain(bad).run(MSG)
    assert isinstance(out, HookFailure) and out.reason.startswith("hook bad: ") and text in out.reason


def test_a_raising_hook_is_isolated_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    def ok(m: Message) -> Message:
        return m

    def boom(m: Message) -> Message:
        raise ValueError("bad reading")

    c = chain(ok, boom)
    with caplog.at_level(logging.ERROR, "shardlog.hooks"):
        results = [c.run(MSG) for _ in range(5)]
    assert all(r == HookFailure("hook boom: ValueError: bad reading", 1) for r in results)
    assert len(caplog.records) == 1 and "bad reading" in caplog.records[0].getMessage()
    assert c.hooks[1].errors == 5 and c.hooks[1].unlogged == 4
    assert log_due(100.0, 159.9, 60) is False and log_due(100.0, 160.0, 60) is True


def test_a_topic_outside_the_shard_is_a_failure() -> None:
    c = chain(lambda m: m._replace(topic="other/x"),
              owns=lambda t: None if t.startswith("s/") else "owned by shard 'other'")
    out = c.run(MSG)
    assert isinstance(out, HookFailure) and "produced topic 'other/x': owned by shard 'other'" in out.reason


def test_a_topic_outside_the_shard_is_blamed_on_the_hook_that_moved_it(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 22, item 17: ``[mymod:move, ..., {use: drop}]`` whose ``move`` sends a message out of
    the branch was blamed on ``drop`` (the last hook) in the reason, the log and the count."""
    def move(m: Message) -> Message:
        return m._replace(topic="other/x")

    def tag(m: Message) -> Message:
        return m._replace(payload=m.payload + b" ")

    def drop(m: Message) -> Message | None:
        return None if m.topic.endswith("/junk") else m

    def split(m: Message) -> list[Message]:
        return [m, m._replace(topic="elsewhere/y")]

    owns = lambda t: None if t.startswith("s/") else "owned by shard 'other'"  # noqa: E731
    c = chain(move, tag, drop, owns=owns)
    with caplog.at_level(logging.ERROR, "shardlog.hooks"):
        out = c.run(MSG)
    assert isinstance(out, HookFailure) and out.hook == 0, out
    assert out.reason.startswith("hook move: produced topic 'other/x'"), out.reason
    assert [h.errors for h in c.hooks] == [1, 0, 0]
    assert "hook move:" in caplog.records[0].getMessage()
    # a fan-out whose second output leaves the branch: the splitting hook, not the last
    c = chain(tag, split, drop, owns=owns)
    out = c.run(MSG)
    assert isinstance(out, HookFailure) and out.hook == 1 and out.reason.startswith("hook split:"), out
    # moved out, then back in by a later hook: nothing to blame
    c = chain(move, lambda m: m._replace(topic="s/back"), owns=owns)
    assert c.run(MSG) == [MSG._replace(topic="s/back")]


def test_the_watchdog_interrupts_a_slow_hook_and_suspends_it_after_three() -> None:
    def slow(m: Message) -> Message:
        if m.payload == b"spin":
            while True:  # pure Python: interrupted between bytecodes
                pass
        time.sleep(30)  # a blocking call: interrupted too (EINTR, then the handler raises)
        return m

    def swallow(m: Message) -> Message:
        try:
            return slow(m)
        except Exception:  # HookTimeout is a BaseException: not caught here
            return m

    wd = Watchdog(0.2)
    assert wd.start(), "pytest runs tests in the main thread"
    try:
        c = Chain([LoadedHook("slow", swallow)], 0.2, lambda t: None, wd)
        t0 = time.monotonic()
        first = c.run(MSG._replace(payload=b"spin"))
        second = c.run(MSG)
        took = time.monotonic() - t0
        assert isinstance(first, HookFailure) and "timed out: ran 0.2" in first.reason, first
        assert isinstance(second, HookFailure) and "timed out" in second.reason
        assert took < 2.0, f"two timeouts of 0.2s took {took:.1f}s"
        third = c.run(MSG)
        assert isinstance(third, HookFailure) and c.hooks[0].suspended_until > time.monotonic()
        t1 = time.monotonic()
        fourth = c.run(MSG)  # suspended: quarantined at once, not after another 0.2s
        assert isinstance(fourth, HookFailure) and "suspended after 3 timeouts" in fourth.reason
        assert time.monotonic() - t1 < 0.1 and wd.fired == 3
    finally:
        wd.stop()


def test_overdue_blames_only_the_call_still_running() -> None:
    wd = Watchdog(1.0)
    wd.seq, wd.started, wd.busy = 7, 100.0, True
    assert wd.overdue(100.5) is None and wd.overdue(101.5) == 7
    wd.target = 7
    assert wd.overdue(102.0) is None  # asked once already
    wd.busy = False
    wd.target = -1
    assert wd.overdue(105.0) is None


def test_without_the_watchdog_a_slow_hook_is_quarantined_when_it_returns() -> None:
    def slow(m: Message) -> Message:
        time.sleep(0.06)
        return m

    out = chain(slow, timeout=0.05).run(MSG)  # its Watchdog was never started
    assert isinstance(out, HookFailure) and "timed out" in out.reason


def test_checked_accepts_bytes_like_payloads() -> None:
    assert checked(MSG._replace(payload=bytearray(b"ab"))).payload == b"ab"
    assert checked(MSG) is MSG


# -- the built-ins -----------------------------------------------------------------------


def built(name: str, **args: object):  # type: ignore[no-untyped-def]
    return builtin_hooks.make(name, args, "shards[0].hooks[0].args")


def test_cbor_to_json() -> None:
    hook = built("cbor_to_json")
    when = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    raw = cbor2.dumps({"t": 21.5, "unit": "C", "raw": b"\x00\x01", "at": when, 1: float("nan"),
                       "tagged": cbor2.CBORTag(4711, [1, 2])})
    out = json.loads(hook(MSG._replace(payload=raw)).payload)
    assert out == {"t": 21.5, "unit": "C", "raw": "AAE=", "at": "2026-01-02T03:04:05Z", "1": None,
                   "tagged": {"tag": 4711, "value": [1, 2]}}
    with pytest.raises(cbor2.CBORDecodeError):  # not CBOR: the chain quarantines it
        hook(MSG._replace(payload=b"\xff\xff"))


def test_msgpack_to_json() -> None:
    hook = built("msgpack_to_json")
    raw = msgpack.packb({"t": 21.5, 7: [1, "x"], "bin": b"\x00", "ext": msgpack.ExtType(5, b"\x01")},
                        use_bin_type=True)
    out = json.loads(hook(MSG._replace(payload=raw)).payload)
    assert out == {"t": 21.5, "7": [1, "x"], "bin": "AA==", "ext": {"ext": 5, "data": "AQ=="}}
    with pytest.raises(ValueError):  # msgpack's FormatError
        hook(MSG._replace(payload=b"\xc1"))  # never used in MessagePack


def test_drop_keep_by_mqtt_filter() -> None:
    drop = built("drop", topics=["s/+/debug", "s/bots/#"])
    keep = built("keep", topics=["s/+/temp"])
    for topic, dropped in [("s/a/debug", True), ("s/a/b/debug", False), ("s/bots", True),
                           ("s/bots/x/y", True), ("s/botsx", False), ("s/a", False)]:
        assert (drop(MSG._replace(topic=topic)) is None) is dropped, topic
    assert keep(MSG._replace(topic="s/k/temp")) is not None and keep(MSG._replace(topic="s/k/hum")) is None
    assert built("drop", topics=["#"])(MSG._replace(topic="$SYS/x")) is not None  # as MQTT: # skips $


def test_sample_keeps_one_per_topic_per_interval() -> None:
    hook = built("sample", interval="10s")
    t0 = MSG.ts
    kept = [hook(MSG._replace(ts=t0 + s * 1_000_000, topic=topic)) is not None
            for s, topic in [(0, "a"), (1, "a"), (2, "b"), (9.9, "a"), (10, "a"), (15, "a")]]
    assert kept == [True, False, True, False, True, False]
    assert hook(MSG._replace(ts=t0 + 16_000_000, topic="a", retain=True)) is not None


def test_redact() -> None:
    hook = built("redact", keys=["password", "token"])
    m = MSG._replace(payload=b'{"user": "ann", "password": "x", "items": [{"token": 1}]}')
    assert json.loads(hook(m).payload) == {"user": "ann", "password": "[redacted]",
                                           "items": [{"token": "[redacted]"}]}
    assert hook(MSG) is MSG  # nothing to redact: the bytes as they came
    assert hook(MSG._replace(payload=b"not json")).payload == b"not json"
    assert built("redact", keys=["a"], non_json="drop")(MSG._replace(payload=b"x")) is None
    with pytest.raises(ValueError, match="not JSON"):
        built("redact", keys=["a"], non_json="quarantine")(MSG._replace(payload=b"x"))


@pytest.mark.parametrize("spec, text", [
    ({"use": "sample", "args": {}}, "shards[0].hooks[0].args: Object missing required field `interval`"),
    ({"use": "sample", "args": {"interval": "soon"}}, "shards[0].hooks[0].args.interval:"),
    ({"use": "drop", "args": {"topics": ["a/#/b"]}}, "shards[0].hooks[0].args.topics[0]:"),
    ({"use": "redact", "args": {"keys": ["a"], "extra": 1}}, "unknown field `extra`"),
    ({"use": "nosuch"}, "shards[0].hooks[0]: no built-in hook named 'nosuch'"),
    ({"use": "nosuchmodule_xyz:f"}, "shards[0].hooks[0]: cannot import 'nosuchmodule_xyz:f': "
                                     "ModuleNotFoundError"),
    ({"use": "json:nosuch"}, "shards[0].hooks[0]: cannot import 'json:nosuch': AttributeError"),
    ({"use": "json:__doc__"}, "shards[0].hooks[0]: 'json:__doc__' is a str, not a callable"),
    ({"use": "json:dumps", "args": {"bogus": 1}}, "shards[0].hooks[0].args: json:dumps(**args) raised"),
])
def test_load_errors_name_the_key(spec: dict, text: str) -> None:
    smap = parse_map({"shards": [{"name": "s", "prefix": "s", "hooks": [spec]}]})
    with pytest.raises(ConfigError) as err:
        load_hooks(smap, smap.shards[0])
    assert text in str(err.value)


def test_hooks_path_and_inherited_keys(tmp_path: Path) -> None:
    (tmp_path / "hk").mkdir()
    (tmp_path / "hk" / "my_hooks_mod.py").write_text(
        "def tag(m):\n    return m._replace(payload=b'tagged')\n"
        "def make(suffix):\n    return lambda m: m._replace(topic=m.topic + suffix)\n")
    smap = parse_map({"defaults": {"hooks": ["my_hooks_mod:tag", {"use": "my_hooks_mod:make",
                                                                   "args": {"suffix": "/z"}}],
                                   "hooks_path": "hk"},
                      "shards": [{"name": "s", "prefix": "s"},
                                 {"name": "t", "prefix": "t", "hooks": ["broken_mod_xyz:f"]}]},
                     base_dir=str(tmp_path))
    try:
        hooks = load_hooks(smap, smap.shards[0])
        assert smap.shards[0].hooks_path == [str(tmp_path / "hk")]
        assert chain(*(h.fn for h in hooks)).run(MSG)[0][:2] == ("s/a/z", b"tagged")  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"^shards\[1\]\.hooks\[0\]: cannot import"):
            load_hooks(smap, smap.shards[1])
        smap2 = parse_map({"defaults": {"hooks": ["broken_mod_xyz:f"]}, "shards": [{"name": "s", "prefix": "s"}]})
        with pytest.raises(ConfigError, match=r"^defaults\.hooks\[0\] \(shard s\): cannot import"):
            load_hooks(smap2, smap2.shards[0])
    finally:
        sys.path.remove(str(tmp_path / "hk"))
        sys.modules.pop("my_hooks_mod", None)


def test_config_validates_hook_entries() -> None:
    for bad, where in [(["a b"], "shards[0].hooks[0]"), ([{"args": {}}], "shards[0].hooks[0]"),
                       ("x:y", "shards[0].hooks"), ([{"use": "x", "with": 1}], "shards[0].hooks[0]")]:
        with pytest.raises(ConfigError, match=rf"^{re.escape(where)}: "):
            parse_map({"shards": [{"name": "s", "prefix": "s", "hooks": bad}]})
    with pytest.raises(ConfigError, match=r"^defaults\.hook_timeout: expected >= 1ms"):
        parse_map({"defaults": {"hook_timeout": 0}, "shards": [{"name": "s", "prefix": "s"}]})
    smap = parse_map({"shards": [{"name": "s", "prefix": "s", "hooks": ["x.y:z", {"use": "drop"}]}]})
    assert smap.shards[0].hooks == ["x.y:z", HookSpec(use="drop")]


# -- acknowledgements of a message that became several records -----------------------------


def test_fanout_holds_the_real_id_until_its_last_record_is_written() -> None:
    fan = FanOut()
    a, b, c = fan.split(7, 3)
    assert a >= FIRST_STANDIN and fan.live
    # flush 1: a written, b and c held (their topics being prepared): 7 is held
    assert fan.settle({b, c, 5}, []) == ({7, 5}, [])
    assert fan.settle(set(), [b, 3]) == (set(), [3])  # b out, c still held: 7 waits
    assert fan.settle(set(), [c]) == (set(), [7])     # its last stand-in out: 7 released
    assert not fan.live
    x, y = fan.split(8, 2)  # both written at once: nothing to hold, nothing to release
    assert fan.settle(set(), []) == (set(), []) and not fan.live
    fan.split(9, 2)
    fan.clear()
    assert not fan.live


def test_a_fanned_out_message_is_acked_after_its_last_record(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A real Recorder and store, a real client on a socketpair (no broker): a message that
    a hook turns into a record of a known topic and one of a new topic (held by the preparer)
    is acknowledged only once both are written, and once."""
    from shardlog.recording.loop import prepare_root
    from shardlog.recording.recorder import Recorder

    (tmp_path / "hk").mkdir()
    (tmp_path / "hk" / "fan_hooks_mod.py").write_text(
        "def fan(m):\n    return [m, m._replace(topic='new/' + m.payload.decode())]\n")
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data"),
                                  "hooks": ["fan_hooks_mod:fan"], "hooks_path": str(tmp_path / "hk")}]})
    rec = Recorder(smap, smap.shards[0])
    chain = rec.install_hooks()
    assert rec.hooks is not None and chain is not None
    rec.open_store(*prepare_root(rec.shard))
    assert rec.store is not None
    gate = gate_preparer(monkeypatch)
    pair = SocketpairClient(rec)
    pubacks = pair.pubacks
    try:
        rec.on_publish(b"known", b"0", 1, 1, False, False)
        rec.flush(wait=True)  # known and new/0 prepared in this flush
        assert pubacks() == [1]
        rec.store.start_preparer()
        rec.on_publish(b"known", b"1", 1, 2, False, False)  # new/1: waits for the gated preparer
        rec.flush()
        assert (tmp_path / "data" / "known" / "+log.jsonl").read_bytes().count(b"\n") == 2
        assert pubacks() == [], "acked while one of its records was still in memory"
        gate.set()
        rec.flush(wait=True)
        assert pubacks() == [2]
        assert (tmp_path / "data" / "new" / "1" / "+log.jsonl").read_bytes().count(b"\n") == 1
        assert not rec.hooks.fan.live and rec.counters.messages == 4
    finally:
        gate.set()
        rec.store.close()
        pair.close()
        chain.watchdog.stop()
        sys.path.remove(str(tmp_path / "hk"))
        sys.modules.pop("fan_hooks_mod", None)


def test_the_worked_examples_of_docs_hooks_md_do_what_it_says(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "hooks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, re.S)
    (tmp_path / "doc_chatfilter.py").write_text(next(b for b in blocks if "_RUDE" in b))
    (tmp_path / "doc_sensor_units.py").write_text(next(b for b in blocks if "def add_units" in b))
    smap = parse_map({"shards": [
        {"name": "chat", "prefix": "chat", "hooks_path": str(tmp_path),
         "hooks": ["doc_chatfilter:clean", {"use": "redact", "args": {"keys": ["email", "phone"]}}]},
        {"name": "sensors", "prefix": "sensors", "hooks_path": str(tmp_path),
         "hooks": [{"use": "keep", "args": {"topics": ["sensors/+"]}}, "cbor_to_json",
                   "doc_sensor_units:add_units"]}]})
    try:
        chat = Chain(load_hooks(smap, smap.shards[0]), 1.0, lambda t: None)
        sensors = Chain(load_hooks(smap, smap.shards[1]), 1.0, lambda t: None)
        room = MSG._replace(topic="chat/room42")
        out = chat.run(room._replace(payload=b'{"user":"bob","text":"what the heck"}'))
        assert [json.loads(m.payload) for m in out] == [  # type: ignore[union-attr]
            {"user": "bob", "text": "what the h***", "filtered": True}]
        assert chat.run(room._replace(payload=b'{"text":"HECK"}')) == []
        polite = room._replace(payload=b'{"user":"ann","text":"hi"}')
        assert chat.run(polite) == [polite]
        bad = chat.run(room._replace(payload=b'[1, 2]'))
        assert bad == [room._replace(payload=b'[1, 2]')]  # a list: not a chat message, kept
        k1 = MSG._replace(topic="sensors/k1", payload=bytes.fromhex(
            "a3 61 74 18 d7 61 68 18 30 61 62 fb 40 08 cc cc cc cc cc cd"))
        out = sensors.run(k1)
        assert [json.loads(m.payload) for m in out] == [{  # type: ignore[union-attr]
            "temperature": {"value": 21.5, "unit": "°C"}, "humidity": {"value": 48, "unit": "%"},
            "battery": {"value": 3.1, "unit": "V"}}]
        assert sensors.run(k1._replace(topic="sensors/k1/raw")) == []
        failure = sensors.run(k1._replace(payload=cbor2.dumps({"x": 1})))
        assert isinstance(failure, HookFailure) and failure.reason == "hook doc_sensor_units:add_units: KeyError: 'x'"
        failure = sensors.run(k1._replace(payload=b"\xa3\x61"))
        assert isinstance(failure, HookFailure) and failure.reason.startswith("hook cbor_to_json: CBORDecodeEOF")
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("doc_chatfilter", "doc_sensor_units"):
            sys.modules.pop(name, None)


def test_a_journaled_shard_runs_its_hooks_and_acks_once_everything_is_journaled(tmp_path: Path) -> None:
    """The one per-message path serves a journal too: what the hooks make of a message
    (changed, fanned out into a new topic, dropped, failed) is journaled, acknowledged in
    arrival order once journaled, and the materializer puts it in the topic files."""
    from shardlog.recording.loop import prepare_root
    from shardlog.recording.recorder import Recorder

    (tmp_path / "hk").mkdir()
    (tmp_path / "hk" / "jr_hooks_mod.py").write_text(
        "def f(m):\n"
        "    if m.payload == b'drop': return None\n"
        "    if m.payload == b'boom': raise ValueError('boom')\n"
        "    if m.payload == b'fan': return [m, m._replace(topic='new/x')]\n"
        "    return m._replace(payload=b'[' + m.payload + b']')\n")
    smap = parse_map({"shards": [{"name": "all", "prefix": "#", "root": str(tmp_path / "data"),
                                  "journal": {"enabled": True},
                                  "hooks": ["jr_hooks_mod:f"], "hooks_path": str(tmp_path / "hk")}]}, env={})
    rec = Recorder(smap, smap.shards[0])
    chain = rec.install_hooks()
    assert chain is not None
    rec.open_store(*prepare_root(rec.shard))
    rec.store.start_preparer()  # type: ignore[union-attr]
    rec.sink.start()
    pair = SocketpairClient(rec)
    try:
        for mid, payload in enumerate([b"1", b"fan", b"drop", b"boom", b"2"], 1):
            rec.on_publish(b"t", payload, 1, mid, False, False)
        rec.flush()
        assert pair.pubacks() == [1, 2, 3, 4, 5]
        with rec.quiesced() as busy:
            assert busy is None
            t = [json.loads(x)["payload"] for x in (tmp_path / "data" / "t" / "+log.jsonl").read_text().splitlines()]
            new = (tmp_path / "data" / "new" / "x" / "+log.jsonl").read_text().splitlines()
            quarantined = (tmp_path / "data" / "+quarantine.jsonl").read_text()
        assert t == [[1], "fan", [2]] and len(new) == 1, (t, new)
        assert "boom" in quarantined
        assert rec.counters.hook_dropped == 1 and rec.counters.hook_errors == 1
        assert not rec.hooks.fan.live  # type: ignore[union-attr]
    finally:
        rec.sink.close()
        pair.close()
        chain.watchdog.stop()
        sys.path.remove(str(tmp_path / "hk"))
        sys.modules.pop("jr_hooks_mod", None)
