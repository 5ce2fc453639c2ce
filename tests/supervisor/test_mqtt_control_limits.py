"""The MQTT control topic under bad input (issue 17): malformed JSON, wrong types, huge messages,
a flood; each refused with a reason on the reply topic, rate-limited, and a command sent again
(a QoS 1 redelivery) never carried out twice. Against a real mosquitto and a real supervisor; the
admission decisions (supervisor.control.admission) are pure and tested with an explicit clock."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from supervisor.control.admission import BURST, MAX_COMMAND, RATE, Recent, TokenBucket, dedup_key, too_large
from tests.supervisor.helpers import Listener, SupervisorProc, make_map, read_records, topic_dir, wait_for

pytestmark = pytest.mark.timeout(180)


def test_token_bucket_takes_now_and_refills_at_its_rate() -> None:
    b = TokenBucket(rate=10, burst=3, now=100.0)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert b.wait() == pytest.approx(0.1)
    assert not b.take(100.05) and b.take(100.1)
    assert [b.take(200.0) for _ in range(4)] == [True, True, True, False]  # never more than the burst
    assert not b.take(150.0)  # a clock going back gives nothing


def test_recent_remembers_by_key_within_size_and_age() -> None:
    r = Recent(size=2, ttl=10)
    r.put("a", {"ok": True}, 0.0)
    r.put("b", {"ok": True}, 1.0)
    assert r.get("a", 5.0) == {"ok": True}
    r.put("c", {"ok": True}, 2.0)
    assert r.get("a", 5.0) is None and r.get("b", 5.0) is not None  # the oldest went first
    assert r.get("b", 11.5) is None  # aged out


def test_dedup_key_needs_an_id_or_correlation_data_and_the_same_bytes() -> None:
    assert dedup_key(None, None, b"{}") is None
    assert dedup_key(1, None, b"x") == dedup_key(1, None, b"x") != dedup_key(1, None, b"y")
    assert dedup_key(1, None, b"x") != dedup_key("1", None, b"x")
    assert dedup_key(None, b"c", b"x") == dedup_key(None, b"c", b"x") != dedup_key(None, b"d", b"x")
    assert too_large(b"x" * MAX_COMMAND) is None and "too large" in (too_large(b"x" * (MAX_COMMAND + 1)) or "")


def test_bad_commands_a_flood_and_redeliveries_over_mqtt(broker, publisher, supervisors, tmp_path: Path) -> None:
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(root))
    doc = yaml.safe_load(m.read_text())
    doc["control"] = {"mqtt": True}
    m.write_text(yaml.safe_dump(doc))
    sup = SupervisorProc(m, tmp_path, extra=["--host", "h1"])
    supervisors.append(sup)
    ctl, reply_topic = "shardlog/control/h1", "shardlog/control/h1/reply"
    listen = Listener(broker.port, [reply_topic])
    try:
        sup.start()
        sup.running("a")
        wait_for(lambda: "accepting control commands" in sup.log(), 10, "the control client")

        def send(payload: bytes, corr: bytes) -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
            publisher.client.publish(ctl, payload, qos=1, properties=props).wait_for_publish(10)

        def replies(corr: bytes) -> list[dict[str, Any]]:
            with listen.lock:
                return [msgspec.json.decode(p) for t, p, props, _ in listen.messages
                        if t == reply_topic and getattr(props, "CorrelationData", None) == corr]

        def answer(corr: bytes) -> dict[str, Any]:
            return wait_for(lambda: replies(corr), 15, f"the reply to {corr!r}")[0]

        bad = {
            b"truncated JSON": (b'{"op": "rotate", "prefix": "a/x"', "malformed JSON"),
            b"not UTF-8": (b'{"op": "rotate", "prefix": "\xff"}', "malformed JSON"),
            b"binary junk": (bytes(range(256)), "malformed JSON"),
            b"empty": (b"", "missing 'op'"),
            b"a list": (b"[1, 2]", "expected a JSON object"),
            b"a string": (b'"rotate"', "expected a JSON object"),
            b"null": (b"null", "expected a JSON object"),
            b"op a number": (b'{"op": 5}', "unknown op"),
            b"prefix a list": (b'{"op": "rotate", "prefix": ["a"]}', "bad command"),
            b"id an object": (b'{"op": "rotate", "prefix": "a/x", "id": {}}', "bad command"),
            b"unknown key": (b'{"op": "rotate", "prefix": "a/x", "rm": "-rf"}', "bad command"),
            b"a duplicate op": (b'{"op": "rotate", "op": "delete", "prefix": "a/x"}', "duplicate key 'op'"),
            b"a .. prefix": (b'{"op": "delete", "prefix": "a/../.."}', "'..' level"),
            b"huge (1 MB)": (b'{"op": "rotate", "prefix": "' + b"a" * (1 << 20) + b'"}', "command too large"),
            b"deep nesting": (b'{"op": "rotate", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        }
        for corr, (payload, _) in bad.items():
            send(payload, corr)
        for corr, (_, why) in bad.items():
            got = answer(corr)
            assert got["ok"] is False and why in got["reason"], (corr, got)
        assert sup.alive()

        # the same command (same bytes, same id) again, as a QoS 1 redelivery would bring it
        publisher.publish_many([("a/x", b'{"i": 0}', 1)])
        wait_for(lambda: read_records(root, "a/x"), 10, "a/x recorded")
        time.sleep(len(bad) / RATE)  # pacing: let the bucket refill after the bad commands
        cmd = b'{"id": "dup-1", "op": "rotate", "prefix": "a/x"}'
        send(cmd, b"first")
        first = answer(b"first")
        assert first["ok"] and first["rotated"] == 1, first
        publisher.publish_many([("a/x", b'{"i": 1}', 1)])
        wait_for(lambda: len(read_records(root, "a/x")) == 2, 10, "the second record")
        send(cmd, b"first")  # the same PUBLISH again: same bytes, same correlation data
        dup = wait_for(lambda: len(r := replies(b"first")) == 2 and r[1], 15, "the reply to the repeated command")
        assert dup["ok"] and dup["duplicate"] is True and dup["rotated"] == 1, dup
        send(cmd, b"other")  # the same id and bytes from another request (other correlation data): carried out
        assert answer(b"other")["ok"] and "duplicate" not in answer(b"other")
        segments = sorted(p.name for p in topic_dir(root, "a/x").glob("+log.*.jsonl"))
        assert segments == ["+log.00000001.jsonl", "+log.00000002.jsonl"], f"rotated {len(segments)} times: {segments}"
        assert "not carried out twice" in sup.log()

        # a flood: every command answered, most refused by the rate limit
        time.sleep(BURST / RATE)  # pacing: a full bucket
        flood = [(f"f{i}".encode(), b'{"id": %d, "op": "rotate", "prefix": "a/none"}' % i) for i in range(300)]
        t0 = time.monotonic()
        for corr, payload in flood:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = corr
            publisher.client.publish(ctl, payload, qos=1, properties=props)
        got = {corr: answer(corr) for corr, _ in flood}
        elapsed = time.monotonic() - t0
        passed = [c for c, r in got.items() if r["ok"]]
        limited = [c for c, r in got.items() if "rate limited" in r.get("reason", "")]
        print(f"\n[bad input] flood of 300 commands: {len(passed)} carried out, {len(limited)} rate limited, "
              f"all answered in {elapsed:.1f}s")
        assert len(passed) + len(limited) == 300, [r for r in got.values() if not r["ok"]][:3]
        assert BURST <= len(passed) <= BURST + RATE * elapsed + 1
        assert all(len(replies(c)) == 1 for c, _ in flood), "a command answered twice"
        assert sup.alive() and sup.shard("a")["restarts"] == 0
    finally:
        listen.close()
