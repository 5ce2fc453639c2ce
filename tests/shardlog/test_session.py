"""The broker session a shard remembers (shardlog/recording/sessionmemo.py), against a real
mosquitto: the catch-all shard of a shared root does not cry "lost" on its first run (issue 22,
item 15), and a prefix change unsubscribes the old filter from the persistent session (item 13)."""

from __future__ import annotations

import json
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.fallback_broker import mosquitto_only
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

LOST = "although this branch was recorded before"


def forget_session(port: int, client_id: str) -> None:
    """Make the broker drop a client id's session: connect with clean start and expiry 0."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0
    connected: list[bool] = []
    c.on_connect = lambda cl, u, f, r, p: connected.append(True)
    c.connect("127.0.0.1", port, clean_start=True, properties=props)
    wait_for(lambda: (c.loop(0.05), connected)[1], 10, f"a clean connection as {client_id}")
    c.disconnect()
    c.loop(0.1)


def test_catch_all_of_a_shared_root_does_not_warn_on_its_first_run(
        tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc]) -> None:
    """The example map: `chat` and `#` share ./data. The `#` shard's branch is the root, which
    already holds data/chat when it starts: that is not its own recording (it warned that
    messages were lost, and status showed it). A session it did have and lost still warns."""
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "chat", "prefix": "chat"},
                                                          {"name": "rest", "prefix": "#"}])
    chat = RecorderProc(m, "chat", tmp_path).start()
    recorders.append(chat)
    assert (tmp_path / "data" / "chat").is_dir()
    rest = RecorderProc(m, "rest", tmp_path).start()
    recorders.append(rest)
    s = rest.stats()
    assert s is not None and s.broker_notes == [] and s.sessions_lost == 0, (s, rest.log())
    assert LOST not in rest.log()
    assert rest.stop() == 0 and rest.stats().sessions_lost == 0  # type: ignore[union-attr]
    memo = json.loads((tmp_path / "data" / "+session.rest.json").read_text())
    assert memo["subscriptions"][0] == "#" and memo["client_id"].endswith("rest"), memo
    # the check is still alive: a session this client id had, gone from the broker, is reported
    forget_session(broker.port, memo["client_id"])
    rest.start()
    wait_for(lambda: (s := rest.stats()) and s.sessions_lost == 1, 10, f"the lost session ({rest.stderr_path})")
    assert LOST in rest.log()
    assert rest.stop() == 0 and chat.stop() == 0


def test_a_changed_prefix_is_unsubscribed_from_the_session(
        tmp_path: Path, broker: Mosquitto, recorders: list[RecorderProc]) -> None:
    """Prefix old -> new: the persistent session kept old/#, so the shard received and discarded
    the old branch for ever. Now the first CONNACK unsubscribes what the memo lists and the
    shard no longer wants."""
    mosquitto_only(broker, "the session must survive between two recorder runs")
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "s", "prefix": "old"}])
    rec = RecorderProc(m, "s", tmp_path)
    recorders.append(rec)
    rec.start()
    assert rec.stop() == 0  # DISCONNECT: the session (with old/#) stays on the broker
    write_map(tmp_path / "shards.yaml", broker.port, [{"name": "s", "prefix": "new"}])
    rec.start()  # the UNSUBSCRIBE goes before the SUBSCRIBE: by its SUBACK the broker has done both
    s = rec.stats()
    assert s is not None and s.session_present, "the session was not kept: nothing to unsubscribe"
    pub = Publisher(broker.port, client_id=f"pub-{tmp_path.name}")
    try:
        pub.publish_many([(f"old/x{i}", b'{"n":%d}' % i, 1) for i in range(20)] + [("new/y", b'{"n":1}', 1)])
    finally:
        pub.close()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 1, 10, f"new/y recorded (log: {rec.stderr_path})")
    s = rec.stats()
    assert s is not None and s.discarded == 0, f"{s.discarded if s else '?'} messages of the old branch delivered"
    assert "unsubscribing from old/#" in rec.log()
    assert rec.stop() == 0
    memo = json.loads((tmp_path / "data" / "+session.s.json").read_text())
    assert "old/#" not in memo["subscriptions"] and "new/#" in memo["subscriptions"], memo
