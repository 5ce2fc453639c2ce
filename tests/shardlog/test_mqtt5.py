"""MQTT 5 fidelity (issue 23): a message's PUBLISH properties are recorded (plain, journal
and hooked paths, a message without properties keeping today's bytes), survive a SIGKILL
of the recorder, and `shardlog replay --rename` gives them back to a real MQTT 5
subscriber; plus the pure parts (the record member, the replay's expiry countdown)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog import history
from shardlog.records import decode_record, encode_quarantine, encode_record, props_member
from shardlog.replay.plan import replay_properties
from tests.helpers import Mosquitto, RecorderProc, wait_for, write_map

USER = [("k", "1"), ("other", "ü ✓"), ("k", "2")]  # order and the repeated key matter
CORR = b"\x00\xff\x10 binary"
EXPIRY = 3600
PLAIN = re.compile(rb'\{"ts":\d+,"qos":1,"retain":false,"payload":\{"i":\d+(,"secret":"[^"]*")?\}\}\n')


def full_properties(i: int) -> Properties:
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [*USER, ("i", str(i))]
    p.ContentType = "application/json"
    p.PayloadFormatIndicator = 1
    p.ResponseTopic = "reply/to/me"
    p.CorrelationData = CORR + bytes([i % 256])
    p.MessageExpiryInterval = EXPIRY
    return p


def expected_props(i: int) -> dict[str, Any]:
    return {"user": [*USER, ("i", str(i))], "content_type": "application/json", "payload_format": 1,
            "response_topic": "reply/to/me", "correlation_data": CORR + bytes([i % 256]),
            "message_expiry": EXPIRY}


class Client5:
    """A real MQTT 5 client with its network thread: publishes (waiting for each PUBACK)
    and collects what its subscriptions deliver."""

    def __init__(self, port: int, client_id: str, username: str | None = None, password: str | None = None) -> None:
        self.got: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username:
            self.c.username_pw_set(username, password)
        self.c.max_inflight_messages_set(1000)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.got.append(msg)

    def subscribe(self, topic: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe(topic, 1)
        assert done.wait(10), "no SUBACK"

    def publish(self, msgs: list[tuple[str, bytes, Properties | None]]) -> None:
        infos = [self.c.publish(t, p, 1, properties=props) for t, p, props in msgs]
        for info in infos:
            info.wait_for_publish(30)
            assert info.is_published()

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def client5(broker: Mosquitto) -> Iterator[Client5]:
    c = Client5(broker.port, "t-mqtt5-client")
    yield c
    c.close()


def messages(n: int, first: int = 0) -> list[tuple[str, bytes, Properties | None]]:
    """Every third message without properties; some with a "secret" a hook redacts."""
    out = []
    for i in range(first, first + n):
        body: dict[str, Any] = {"i": i}
        if i % 5 == 4:
            body["secret"] = "x"
        out.append((f"m5/{i % 3}", json.dumps(body, separators=(",", ":")).encode(),
                    None if i % 3 == 0 else full_properties(i)))
    return out


def all_lines(root: Path) -> list[bytes]:
    out = []
    for seg in sorted(root.rglob("+log.*")):
        out.extend(seg.read_bytes().splitlines(keepends=True))
    return out


def check_recorded(root: Path, n: int, redacted: bool = False, slack: int = 0) -> None:
    """Every message 0..n-1 recorded (duplicates allowed) with exactly its properties; a
    message without properties recorded as before this change, byte for byte. ``slack``:
    seconds a message may have waited in the broker, which counts its expiry down."""
    seen: dict[int, dict[str, Any]] = {}
    for line in all_lines(root):
        rec = decode_record(line)
        i = rec.value["i"]
        if i % 3 == 0:
            assert PLAIN.fullmatch(line), line
        seen[i] = rec.properties()
        if slack and "message_expiry" in seen[i]:
            assert EXPIRY - slack <= seen[i]["message_expiry"] <= EXPIRY, line
            seen[i]["message_expiry"] = EXPIRY
        if i % 5 == 4:
            assert (rec.value["secret"] != "x") == redacted, line
    assert sorted(seen) == list(range(n))
    for i, props in seen.items():
        assert props == ({} if i % 3 == 0 else expected_props(i)), i


PATHS = {"plain": {}, "journal": {"journal": {"enabled": True}},
         "hooks": {"hooks": [{"use": "redact", "args": {"keys": ["secret"]}}]}}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_properties_recorded_on_every_path(tmp_path: Path, broker: Mosquitto, client5: Client5,
                                           recorders: list[RecorderProc], path: str) -> None:
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "m5", **PATHS[path]}])
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    n = 300
    client5.publish(messages(n))
    wait_for(lambda: (s := rec.stats()) is not None and s.acked >= n, 30, f"{n} acks ({rec.stderr_path})")
    assert rec.stop() == 0
    check_recorded(tmp_path / "data", n, redacted=path == "hooks")
    if path == "hooks":  # a changed message keeps the properties of the message it came from
        changed = [decode_record(x) for x in all_lines(tmp_path / "data")
                   if b'"secret":"x"' not in x and b"secret" in x]
        assert changed and all(r.properties() == ({} if r.value["i"] % 3 == 0 else expected_props(r.value["i"]))
                               for r in changed)


def test_sigkill_mid_recording_then_replay_round_trip(tmp_path: Path, broker: Mosquitto, client5: Client5,
                                                      recorders: list[RecorderProc]) -> None:
    """Record with every property, SIGKILL the recorder while messages flow, restart it:
    nothing lost. Then `shardlog replay --rename` to another branch: a MQTT 5 subscriber
    gets every message with the same properties (the expiry counted down)."""
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "m5"}])
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    n = 3000
    msgs = messages(n)
    sender = threading.Thread(target=client5.publish, args=(msgs,))
    sender.start()
    wait_for(lambda: (s := rec.stats()) is not None and s.acked >= 300, 30, "the first acks")
    rec.kill()  # mid-stream: messages buffered, unacknowledged, in flight
    sender.join(60)
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    root = tmp_path / "data"
    wait_for(lambda: len({decode_record(x).value["i"] for x in all_lines(root)}) >= n, 60,
             f"every message after the restart ({rec.stderr_path})")
    assert rec.stop() == 0
    check_recorded(root, n, slack=60)

    watcher = Client5(broker.port, "t-mqtt5-watcher")
    try:
        watcher.subscribe("again/#")
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "shardlog", "replay", str(root), "m5", "--broker",
                            f"mqtt://127.0.0.1:{broker.port}", "--speed", "max", "--rename", "m5=again"],
                           capture_output=True, timeout=120, check=False)
        assert r.returncode == 0, r.stderr
        replayed = len(list(history.read(root, "m5")))
        wait_for(lambda: len(watcher.got) >= replayed, 30, f"{replayed} replayed messages")
        elapsed = time.time() - t0
    finally:
        watcher.close()
    got: dict[int, dict[str, Any]] = {}
    for msg in watcher.got:
        assert msg.topic.startswith("again/")
        i = json.loads(msg.payload)["i"]
        props = received_props(msg)
        if i % 3:
            # counted down from the recorded value: by the seconds since reception (and the broker's)
            assert EXPIRY - 120 - elapsed <= props["message_expiry"] <= EXPIRY, props
            props["message_expiry"] = EXPIRY
        got[i] = props
    assert sorted(got) == list(range(n))
    for i, props in got.items():
        assert props == ({} if i % 3 == 0 else expected_props(i)), i


def received_props(msg: mqtt.MQTTMessage) -> dict[str, Any]:
    """The properties a subscriber got, keyed as the record's ``props``."""
    p = msg.properties
    return {k: v for k, v in {
        "user": getattr(p, "UserProperty", None), "content_type": getattr(p, "ContentType", None),
        "payload_format": getattr(p, "PayloadFormatIndicator", None),
        "response_topic": getattr(p, "ResponseTopic", None),
        "correlation_data": getattr(p, "CorrelationData", None),
        "message_expiry": getattr(p, "MessageExpiryInterval", None)}.items() if v is not None}


def test_replay_to_mqtt_311_drops_properties_with_one_warning(tmp_path: Path, broker: Mosquitto) -> None:
    root = tmp_path / "data"
    d = root / "p" / "x"
    d.mkdir(parents=True)
    now = time.time_ns() // 1000
    member = props_member({"UserProperty": USER, "MessageExpiryInterval": 600})
    (d / "+log.jsonl").write_bytes(b"".join(encode_record(now + k, 1, False, b'{"i":%d}' % k, member)
                                            for k in range(20)))
    watcher = Client5(broker.port, "t-mqtt5-watcher311")
    try:
        watcher.subscribe("q/#")
        r = subprocess.run([sys.executable, "-m", "shardlog", "replay", str(root), "p", "--broker",
                            f"mqtt://127.0.0.1:{broker.port}", "--speed", "max", "--rename", "p=q",
                            "--protocol", "3.1.1"], capture_output=True, timeout=60, check=False)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(watcher.got) >= 20, 30, "20 replayed messages")
    finally:
        watcher.close()
    assert r.stderr.count(b"MQTT 3.1.1") == 1, r.stderr
    assert all(getattr(m.properties, "UserProperty", None) is None for m in watcher.got)


def test_props_member_and_decode() -> None:
    assert props_member({}) == b""
    assert props_member({"TopicAlias": 3, "SubscriptionIdentifier": [1]}) == b""  # the connection's own
    member = props_member({"UserProperty": [("a", "1"), ("a", "2")], "CorrelationData": b"\x00\x01",
                           "ContentType": "t", "PayloadFormatIndicator": 0, "ResponseTopic": "r",
                           "MessageExpiryInterval": 0})
    assert member == (b',"props":{"user":[["a","1"],["a","2"]],"content_type":"t","payload_format":0,'
                      b'"response_topic":"r","correlation_data":"AAE=","message_expiry":0}')
    assert encode_record(1, 1, False, b'{"x":1}') == b'{"ts":1,"qos":1,"retain":false,"payload":{"x":1}}\n'
    for payload in (b'{"x":1}', b"text", b"\xff\x00", b'{"a":\n1}'):
        line = encode_record(5, 1, True, payload, member)
        rec = decode_record(line)
        assert rec.payload == payload and rec.ts == 5 and rec.retain is True
        assert rec.properties()["user"] == [("a", "1"), ("a", "2")]
        assert rec.properties()["correlation_data"] == b"\x00\x01"
        assert json.loads(line)["payload"] == rec.value and list(json.loads(line))[-1] == "payload"
    assert decode_record(encode_record(1, 0, False, b"x")).props is None
    q = json.loads(encode_quarantine(1, "s", "why", b"t", 1, False, b"p", member))
    assert q["props"]["user"] == [["a", "1"], ["a", "2"]] and q["payload"] == "cA=="


def test_replay_properties_expiry_countdown() -> None:
    props = {"user": [["a", "1"]], "correlation_data": "AAE=", "message_expiry": 10}
    ts = 1_000_000_000
    assert replay_properties(None, ts, ts) == {}
    assert replay_properties(props, ts, ts + 999_999) == {
        "UserProperty": [("a", "1")], "CorrelationData": b"\x00\x01", "MessageExpiryInterval": 10}
    assert replay_properties(props, ts, ts + 3_500_000)["MessageExpiryInterval"] == 7
    assert replay_properties(props, ts, ts + 9_999_999)["MessageExpiryInterval"] == 1
    assert replay_properties(props, ts, ts + 10_000_000) is None  # run out: not published
    assert replay_properties({"user": [["a", "1"]]}, ts, ts + 10**12) == {"UserProperty": [("a", "1")]}
    with pytest.raises(ValueError):
        replay_properties({"nope": 1}, ts, ts)
    with pytest.raises(ValueError):
        replay_properties({"message_expiry": -1}, ts, ts)


@pytest.mark.parametrize("mode,protocol,want", [("all", 5, 11), ("new", 5, 5), ("none", 5, 0),
                                                ("all", "3.1.1", 11), ("new", "3.1.1", 5), ("none", "3.1.1", 0)])
def test_retained_on_restart(tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc],
                             mode: str, protocol: int | str, want: int) -> None:
    """A persistent session restarted: the broker sends the branch's retained messages again
    (Retain Handling 0, or MQTT 3.1.1). ``retained: all`` records them at each start (5, then
    5 + the first live one, retained meanwhile), ``new`` once, ``none`` never; a live message
    (published with retain, delivered with the flag cleared) is recorded in every mode."""
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="t-rt-pub", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    root = tmp_path / "data"
    skipped = []
    try:
        for k in range(5):
            pub.publish(f"rt/{k}", b'{"retained":%d}' % k, 1, retain=True).wait_for_publish(10)
        m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "rt", "prefix": "rt", "retained": mode}],
                      broker_keys={"protocol": protocol})
        for run in range(2):
            rec = RecorderProc(m, "rt", tmp_path).start()
            recorders.append(rec)
            # published after the SUBACK: it comes after the retained ones the subscription brings
            pub.publish(f"rt/live{run}", b'{"live":%d}' % run, 1, retain=True).wait_for_publish(10)
            wait_for(lambda run=run: any((r := decode_record(x)).value.get("live") == run and not r.retain
                                         for x in all_lines(root)), 20, f"live{run} recorded ({rec.stderr_path})")
            assert rec.stop() == 0
            s = rec.stats()
            assert s is not None
            skipped.append(s.retained_skipped)
    finally:
        pub.loop_stop()
        pub.disconnect()
    recs = [decode_record(x) for x in all_lines(root)]
    assert len([r for r in recs if r.retain]) == want, [(r.value, r.retain) for r in recs]
    assert sorted((r.value["live"], r.retain) for r in recs if not r.retain) == [(0, False), (1, False)]
    if mode == "none":  # mosquitto honours Retain Handling 2 on MQTT 5; the filter does it on 3.1.1
        assert skipped == ([0, 0] if protocol == 5 else [5, 6])
    elif mode == "new":  # Retain Handling 1 on MQTT 5; on 3.1.1 the session memo says the filter is old
        assert skipped == ([0, 0] if protocol == 5 else [0, 6])
    else:
        assert skipped == [0, 0]


def write_props_root(root: Path) -> None:
    """Two topics in jsonl and json, records with and without properties."""
    from shardlog.ondisk import formats
    from shardlog.topics import topic_to_relpath
    now = 1_763_815_800_000_000
    for topic, key in (("p/a", "jsonl"), ("p/b", "json")):
        d = root / topic_to_relpath(topic)
        d.mkdir(parents=True)
        lines = [encode_record(now + k, 1, False, b'{"i":%d}' % k,
                               props_member({"UserProperty": [("site", f"s{k % 2}"), ("site", "x")],
                                             "ContentType": "application/json", "CorrelationData": b"\x00\x01"})
                               if k % 2 else b"")
                 for k in range(6)]
        fmt = formats.FORMATS[key]
        (d / fmt.current).write_bytes(fmt.pack(lines, 0))


def test_readers_expose_properties(tmp_path: Path) -> None:
    import sqlite3

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    write_props_root(root)
    # the history API (read and tail)
    for topic in ("p/a", "p/b"):
        recs = [r for _t, r in history.read(root, topic)]
        assert [r.properties().get("user") for r in recs] == [
            None, [("site", "s1"), ("site", "x")], None, [("site", "s1"), ("site", "x")], None,
            [("site", "s1"), ("site", "x")]]
        assert [r.props is None for r in history.tail(root, topic, 2)] == [True, False]
        assert recs[1].properties()["correlation_data"] == b"\x00\x01"
    # tail and cat: jsonl lines keep the member; cat's csv has a props column
    r = subprocess.run([sys.executable, "-m", "shardlog", "tail", str(root), "p/b", "-n", "1"],
                       capture_output=True, check=True)
    assert json.loads(r.stdout.splitlines()[-1])["props"]["user"] == [["site", "s1"], ["site", "x"]]
    r = subprocess.run([sys.executable, "-m", "shardlog", "cat", str(root), "p", "--format", "csv"],
                       capture_output=True, check=True)
    import csv
    import io
    rows = list(csv.DictReader(io.StringIO(r.stdout.decode())))
    assert len(rows) == 12 and all(bool(x["props"]) == (json.loads(x["payload"])["i"] % 2 == 1) for x in rows)
    assert {json.loads(x["props"])["content_type"] for x in rows if x["props"]} == {"application/json"}
    # SQL: filter on a user property
    con = history.connect(root)
    got = con.execute("SELECT topic, payload->>'i' FROM records WHERE user_property(props, 'site') = 's1' "
                      "ORDER BY topic, ts").fetchall()
    assert got == [(t, str(i)) for t in ("p/a", "p/b") for i in (1, 3, 5)]
    assert con.execute("SELECT count(*) FROM records WHERE list_contains(user_properties(props, 'site'), 'x')"
                       ).fetchone() == (6,)
    assert con.execute("SELECT count(*) FROM records WHERE props IS NULL").fetchone() == (6,)
    # Parquet: a list of {key, value} structs, filtered by pyarrow without parsing JSON
    out = tmp_path / "out.parquet"
    assert history.export_parquet(root, "p", out) == 12
    table = pq.read_table(out)
    flat = pc.list_flatten(table["user_properties"])
    assert flat.type.field(0).name == "key"
    has = pc.list_value_length(table["user_properties"]).fill_null(0)
    assert pc.sum(has).as_py() == 12
    df = table.to_pandas()
    hits = df[df["user_properties"].map(lambda u: u is not None and any(p["value"] == "s1" for p in u))]
    assert sorted(hits["payload.i"].tolist()) == [1, 1, 3, 3, 5, 5]
    # SQLite
    db = tmp_path / "out.sqlite"
    history.export_sqlite(root, "p", db)
    n = sqlite3.connect(db).execute(
        "SELECT count(*) FROM records WHERE EXISTS (SELECT 1 FROM json_each(props, '$.user') "
        "WHERE value ->> 0 = 'site' AND value ->> 1 = 's1')").fetchone()[0]
    assert n == 6


def test_parquet_payload_is_text_and_keys_in_first_seen_order(tmp_path: Path) -> None:
    """Interchange (issue 23): ``payload``/``props`` are plain strings for pyarrow and pandas
    (not Arrow's JSON extension type), and the flattened columns follow the order the keys
    first appear (first record, then their place in it), not the alphabet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "data"
    d = root / "o"
    d.mkdir(parents=True)
    t0 = 1_763_815_800_000_000
    (d / "+log.jsonl").write_bytes(
        encode_record(t0, 1, False, b'{"zeta":1,"alpha":"a","mid":true}', props_member({"ContentType": "c"}))
        + encode_record(t0 + 1, 1, False, b'{"beta":2,"alpha":"b"}'))
    out = tmp_path / "o.parquet"
    history.export_parquet(root, "o", out)
    table = pq.read_table(out)
    assert table.schema.field("payload").type == pa.string(), table.schema.field("payload").type
    assert table.schema.field("props").type == pa.string()
    assert [c for c in table.column_names if c.startswith("payload.")] == [
        "payload.zeta", "payload.alpha", "payload.mid", "payload.beta"]
    df = pq.read_table(out).to_pandas()
    assert json.loads(df["payload"][0]) == {"zeta": 1, "alpha": "a", "mid": True}
    assert json.loads(df["props"][0]) == {"content_type": "c"} and df["props"].isna()[1]


def test_fast_path_keeps_a_properties_block_it_cannot_read() -> None:
    """A block paho would answer by dropping the connection (so the broker would send the
    message again and again) is recorded whole, base64 under ``raw``; U+FEFF is valid MQTT."""
    from shardlog.recording.properties import _properties

    def block(body: bytes) -> bytes:
        return bytes([len(body)]) + body + b"payload"
    for bad in (b"\x01\x02", b"\x7f\x00", b"\x03\x00\x02\xff\xfe", b"\x01\x01\x01\x00"):
        stop, member = _properties(block(bad), 0, len(block(bad)))
        assert stop == 1 + len(bad), bad
        raw = json.loads(b"{" + member[1:] + b"}")["props"]["raw"]
        assert __import__("base64").b64decode(raw) == bad
    ok = b"\x03\x00\x03\xef\xbb\xbf"  # content type "\ufeff"
    stop, member = _properties(block(ok), 0, len(block(ok)))
    assert member == props_member({"ContentType": "\ufeff"}) and stop == 1 + len(ok)
    assert _properties(block(b"\x23\x00\x01"), 0, 10) == (-1, b"")  # a topic alias: paho's
