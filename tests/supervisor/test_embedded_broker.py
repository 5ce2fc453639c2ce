"""``broker.embedded: true``: ``shardlog supervise`` runs its own broker (iotcore) as a
supervised child. No mosquitto here: these tests must pass on a machine with only pip.

Every wait is a poll with a deadline (helpers.wait_for)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from shardlog.config.load import load_map, parse_map
from shardlog.config.schema import ConfigError
from supervisor.broker.config import config_toml
from tests.supervisor.helpers import SupervisorProc, free_port, make_map, read_records, wait_for

pytest.importorskip("iotcore", reason="iotcore (the embedded broker) is a dependency: pip install -e .")

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def embedded_map(tmp_path: Path) -> tuple[Path, int, int]:
    port, port311 = free_port(), free_port()
    m = make_map(tmp_path / "shards.yaml", port, [{"name": "chat", "prefix": "chat"},
                                                   {"name": "rest", "prefix": "#"}])
    doc = yaml.safe_load(m.read_text())
    doc["broker"].update({"embedded": True, "embedded_port_311": port311, "reconnect_max": "1s"})
    m.write_text(yaml.safe_dump(doc, sort_keys=False))
    return m, port, port311


def broker_procs(sup: SupervisorProc) -> list[psutil.Process]:
    out = []
    for p in psutil.Process(sup.pid).children():
        try:
            if "supervisor.broker" in p.cmdline():
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def publish(port: int, msgs: list[tuple[str, dict[str, Any]]], protocol: int = mqtt.MQTTv5) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{port}", protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        infos = [c.publish(t, json.dumps(p), 1) for t, p in msgs]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published(), "the embedded broker did not acknowledge a publish"
    finally:
        c.disconnect()
        c.loop_stop()


def ids(root: Path, topic: str) -> list[int]:
    return sorted(r["payload"]["i"] for r in read_records(root, topic))


def all_subscribed(sup: SupervisorProc) -> bool:
    return all(s["state"] == "running" and (s["counters"] or {}).get("subscribed")
               for s in sup.shards().values())


@pytest.fixture
def embedded(supervisors: list[SupervisorProc], tmp_path: Path) -> tuple[SupervisorProc, int, int]:
    m, port, port311 = embedded_map(tmp_path)
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start()  # ready: every shard subscribed at the embedded broker
    return sup, port, port311


def test_records_through_the_embedded_broker(embedded, tmp_path: Path) -> None:
    sup, port, port311 = embedded
    root = tmp_path / "data"
    (proc,) = broker_procs(sup)
    eb = sup.status()["supervisor"]["embedded_broker"]
    assert eb["state"] == "running" and eb["pid"] == proc.pid and eb["restarts"] == 0
    assert eb["listen"] == f"127.0.0.1:{port}"
    publish(port, [("chat/room42", {"i": i}) for i in range(50)])                   # MQTT 5 listener
    publish(port311, [("sensors/t", {"i": i}) for i in range(50)], mqtt.MQTTv311)    # 3.1.1 listener
    big = {"i": 0, "blob": "x" * 100_000}  # past iotcore's 20 KiB default payload cap
    publish(port, [("chat/big", big)])
    wait_for(lambda: ids(root, "chat/room42") == list(range(50)), 15, "50 records of chat/room42")
    wait_for(lambda: ids(root, "sensors/t") == list(range(50)), 15, "50 records of sensors/t")
    wait_for(lambda: ids(root, "chat/big") == [0], 15, "the 100 kB message")
    # one connection each, kept: nothing the recorders send makes this broker hang up
    # (it drops a client that subscribes to $SYS, which the recorders therefore do not do here)
    assert "disconnected from the broker" not in sup.log(), sup.log()
    assert all(s["counters"]["connects"] == 1 for s in sup.shards().values())


def test_a_burst_of_new_topics_keeps_the_connection(embedded, tmp_path: Path) -> None:
    """New topics' records wait for their directories (store.Preparer) while a known topic's
    are written: the PUBACKs must still go out in the order of the PUBLISHes (MQTT 5
    4.6.0-2), or iotcore hangs up (regression: 15 reconnects for 3,000 new topics)."""
    sup, port, _ = embedded
    root = tmp_path / "data"
    msgs: list[tuple[str, dict[str, Any]]] = []
    for i in range(1500):
        msgs.append((f"chat/new{i:04d}", {"i": i}))
        if i % 10 == 0:
            msgs.append(("chat/known", {"i": i}))
    publish(port, msgs)
    # sets: a reconnect redelivers (duplicates), which the assertions below report
    wait_for(lambda: sorted(set(ids(root, "chat/known"))) == list(range(0, 1500, 10)), 30,
             "150 records of chat/known")
    wait_for(lambda: all(set(ids(root, f"chat/new{i:04d}")) == {i} for i in range(0, 1500, 97)), 30,
             "the new topics' records")
    assert "disconnected from the broker" not in sup.log(), sup.log()[-3000:]
    assert sup.shard("chat")["counters"]["connects"] == 1


def test_a_killed_embedded_broker_is_restarted_and_the_shards_record_again(embedded, tmp_path: Path) -> None:
    sup, port, _ = embedded
    root = tmp_path / "data"
    publish(port, [("chat/a", {"i": i}) for i in range(10)])
    wait_for(lambda: ids(root, "chat/a") == list(range(10)), 15, "the first 10 records")
    (old,) = broker_procs(sup)
    old.send_signal(signal.SIGKILL)
    new = wait_for(lambda: [p for p in broker_procs(sup) if p.pid != old.pid], 20,
                   f"a new embedded broker after SIGKILL (log: {sup.log_path})")
    assert len(new) == 1
    # the new broker listens, and each shard has connected a second time and subscribed again
    # (a stale "subscribed" from before the kill is not enough: count the connections)
    wait_for(lambda: sup.status()["supervisor"]["embedded_broker"]["state"] == "running", 20,
             "/status to show the new broker running")
    wait_for(lambda: all_subscribed(sup) and all(s["counters"]["connects"] >= 2 for s in sup.shards().values()),
             30, f"both shards to reconnect and subscribe (log: {sup.log_path})")
    publish(port, [("chat/a", {"i": i}) for i in range(10, 20)] + [("other/b", {"i": i}) for i in range(5)])
    wait_for(lambda: ids(root, "chat/a") == list(range(20)), 15, "the records after the restart")
    wait_for(lambda: ids(root, "other/b") == list(range(5)), 15, "other/b after the restart")
    assert "embedded-broker" in sup.log() and "exited: killed by SIGKILL" in sup.log()
    eb = wait_for(lambda: (e := sup.status()["supervisor"]["embedded_broker"])["state"] == "running" and e, 10,
                  "/status to show the restarted broker running")
    assert eb["pid"] == new[0].pid and eb["restarts"] == 1 and eb["last_exit"]["signal"] == "SIGKILL"
    metrics = (sup.get("/metrics") or b"").decode()
    assert "shardlog_embedded_broker_up 1.0" in metrics and "shardlog_embedded_broker_restarts_total 1.0" in metrics


def test_sigterm_stops_the_recorders_then_the_broker(embedded, tmp_path: Path) -> None:
    sup, port, _ = embedded
    (broker,) = broker_procs(sup)
    shards = sup.shards()
    recorders = [shards["chat"]["pid"], shards["rest"]["pid"]]
    sup.signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    assert not psutil.pid_exists(broker.pid) or broker.status() == psutil.STATUS_ZOMBIE
    log = sup.log()
    broker_stop = log.index("stopping embedded-broker")
    for name, pid in zip(("chat", "rest"), recorders, strict=True):
        stopped = log.index(f"shard {name} (pid {pid}) stopped: exit 0")  # flushed and disconnected
        assert stopped < broker_stop, f"the broker was stopped before shard {name}:\n{log}"
    assert log.index(f"embedded-broker (pid {broker.pid}) stopped") > broker_stop
    assert all(not psutil.pid_exists(p) for p in recorders)


def test_embedded_config_is_checked(tmp_path: Path) -> None:
    base = {"shards": [{"name": "a", "prefix": "#"}]}
    for host in ("localhost", "127.0.0.1", "::1", "127.0.1.1"):
        parse_map({**base, "broker": {"host": host, "embedded": True}})
    with pytest.raises(ConfigError, match=r"broker\.embedded: .*loopback.*'mqtt\.example\.com'"):
        parse_map({**base, "broker": {"host": "mqtt.example.com", "embedded": True}})
    with pytest.raises(ConfigError, match=r"broker\.embedded: .*tls"):
        parse_map({**base, "broker": {"embedded": True, "tls": {"ca_file": "x"}}})
    with pytest.raises(ConfigError, match=r"shards\[0\]\.broker\.embedded: only the map's broker"):
        parse_map({"shards": [{"name": "a", "prefix": "#", "broker": {"embedded": True}}]})
    with pytest.raises(ConfigError, match=r"broker\.embedded_port_311: only used with"):
        parse_map({**base, "broker": {"embedded_port_311": 1884}})
    # the example map turns it on; its TOML raises iotcore's 20 KiB payload cap and binds loopback
    smap = load_map(str(REPO / "shards.example.yaml"), env={})
    assert smap.broker.embedded and smap.broker.embedded_port_311 == 1884
    toml = config_toml(smap)
    assert 'listen = "127.0.0.1:1883"' in toml and "[v5.1]" in toml and "[v4.2]" in toml
    assert f"max_payload_size = {16 * 1024 * 1024}" in toml and "0.0.0.0" not in toml


# -- the arbiter's side, with a fake clock and fake children ---------------------------------------

def test_arbiter_starts_the_broker_first_restarts_it_and_stops_it_last(tmp_path: Path, monkeypatch) -> None:
    from shardlog.config.load import load_map as load
    from supervisor.arbiter.loop import Arbiter
    from supervisor.broker import supervised as broker_mod
    from tests.supervisor.helpers import FakeClock, FakeSpawner

    listening = {"on": False}
    monkeypatch.setattr(broker_mod, "accepts", lambda host, port, timeout=0.2: listening["on"])
    path = tmp_path / "shards.yaml"
    path.write_text(yaml.safe_dump({
        "broker": {"host": "127.0.0.1", "port": 1883, "embedded": True},
        "shards": [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "#"}],
        "defaults": {"root": str(tmp_path / "data")},
        "supervisor": {"start_jitter": "0s", "stop_timeout": "10s"}}))
    clock, spawner = FakeClock(), FakeSpawner()
    arb = Arbiter(load(str(path)), str(path), clock=clock, spawn=spawner, rand=lambda: 0.5, env={})
    (tmp_path / "run").mkdir()
    arb.boot(str(tmp_path / "run"))

    def step(dt: float = 0.0) -> None:
        clock.advance(dt)
        arb.step()

    (b1,) = spawner.children  # the broker, before any shard
    assert b1.argv[1:3] == ["-m", "supervisor.broker"] and b1.argv[3].endswith("broker.toml")
    assert 'listen = "127.0.0.1:1883"' in Path(b1.argv[3]).read_text()
    for _ in range(5):
        step(0.1)
    assert len(spawner.children) == 1, "no shard starts before the broker accepts connections"
    listening["on"] = True
    step(0.1)
    step(0.1)
    assert sorted(c.shard for c in spawner.children[1:]) == ["a", "b"]
    for name in ("a", "b"):
        spawner.live(name).beat()
    step()
    # the broker dies: restarted after a backoff; the shards are left alone
    b1.exit(-signal.SIGKILL)
    listening["on"] = False
    step()
    assert len(spawner.children) == 3
    step(0.6)
    b2 = spawner.live("embedded-broker")
    assert b2 is not b1 and all(spawner.live(n).returncode is None for n in ("a", "b"))
    listening["on"] = True
    step(0.1)
    # SIGTERM: the shards first; the broker only once both have exited
    arb.enqueue(signal.SIGTERM)
    step()
    a, b = spawner.live("a"), spawner.live("b")
    assert signal.SIGTERM in a.signals and signal.SIGTERM in b.signals and not b2.signals
    a.exit(0)
    step(0.1)
    assert not b2.signals
    b.exit(0)
    step(0.1)
    assert b2.signals == [signal.SIGTERM] and not arb.done
    b2.exit(0)
    step(0.1)
    assert arb.done and arb.exit_code == 0


def test_record_alone_with_sys_topics_off_keeps_its_connection_to_iotcore(tmp_path: Path, recorders) -> None:
    """`shardlog record` never starts a broker; pointed at a running iotcore (a production
    rumqttd would be the same) with broker.sys_topics: false it stays connected: without that,
    its $SYS subscription makes rumqttd hang up on it, again and again."""
    import subprocess
    import sys

    from tests.helpers import RecorderProc

    port = free_port()
    smap = parse_map({"broker": {"host": "127.0.0.1", "port": port, "embedded": True},
                      "shards": [{"name": "t", "prefix": "#"}]})
    conf = tmp_path / "broker.toml"
    conf.write_text(config_toml(smap))
    broker = subprocess.Popen([sys.executable, "-m", "supervisor.broker", str(conf), "--parent-pid", str(os.getpid())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from supervisor.broker.supervised import accepts
        wait_for(lambda: accepts("127.0.0.1", port), 10, "iotcore to listen")
        m = make_map(tmp_path / "shards.yaml", port, [{"name": "all", "prefix": "#"}])
        doc = yaml.safe_load(m.read_text())
        doc["broker"]["sys_topics"] = False
        m.write_text(yaml.safe_dump(doc))
        rec = RecorderProc(m, "all", tmp_path).start()
        recorders.append(rec)
        publish(port, [("x/y", {"i": i}) for i in range(20)])
        wait_for(lambda: ids(tmp_path / "data", "x/y") == list(range(20)), 15, "20 records of x/y")
        assert rec.stats().connects == 1 and "disconnected from the broker" not in rec.log()
        assert rec.stop() == 0
    finally:
        broker.terminate()
        broker.wait(10)


def test_a_taken_port_is_refused_not_crash_looped(tmp_path: Path) -> None:
    """Another program (say a system mosquitto) holds the embedded broker's port: the
    supervisor refuses at once with exit 78 and says what to do, instead of restarting
    a broker that cannot bind while the shards record someone else's broker."""
    m, port, _ = embedded_map(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        r = subprocess.run([sys.executable, "-m", "shardlog", "supervise", str(m)], capture_output=True,
                           text=True, timeout=60)
    assert r.returncode == 78
    assert f"127.0.0.1:{port} already in use" in r.stderr and "broker.embedded: false" in r.stderr
