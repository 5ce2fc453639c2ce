"""One suite, every broker (tests/brokers/servers.py), every MQTT version it speaks: records in
order with the retained flag, SIGKILL mid-stream loses nothing, messages published while the
shard is down arrive (its persistent session), and the shard's log stays quiet (no warning but
the broker findings docs/brokers.md lists for that broker, one connection per start).
docs/brokers.md's table is checked against this suite (tests/brokers/test_brokers_doc.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.brokers.conftest import BROKERS
from tests.brokers.table import FACTS
from tests.helpers import BrokerProcess, FastPublisher, Publisher, RecorderProc, wait_for, write_map
from tests.supervisor.helpers import SupervisorProc, read_records

#: amqtt is not in the suite: see docs/brokers.md ("amqtt")
SUITE = [name for name in BROKERS if name in FACTS]
#: (broker, protocol) pairs: each broker with each MQTT version it speaks
CASES = [(name, proto) for name in SUITE for proto in BROKERS[name].protocols]


@pytest.fixture(params=CASES, ids=[f"{b}-{p}" for b, p in CASES])
def case(request: pytest.FixtureRequest) -> tuple[BrokerProcess, str]:
    name, proto = request.param
    return request.getfixturevalue(f"{name}_session"), proto


class Sender:
    """QoS 1 publishes to ``broker`` that it has acknowledged: a raw 3.1.1 client where the broker
    speaks 3.1.1 (fast), else paho over MQTT 5."""

    def __init__(self, broker: Any, client_id: str) -> None:
        keys = broker.broker_keys
        self.fast: FastPublisher | None = None
        self.paho: Publisher | None = None
        if "3.1.1" in broker.protocols:
            self.fast = FastPublisher(broker.port, client_id=client_id, window=100,
                                      username=keys.get("username"), password=keys.get("password"))
        else:
            self.paho = Publisher(broker.port, client_id=client_id)

    def send(self, msgs: list[tuple[str, bytes]], retain: bool = False) -> None:
        if self.fast is not None:
            self.fast.publish_many(msgs, retain=retain)
            self.fast.wait_acked(60)
        else:
            assert self.paho is not None
            self.paho.publish_many([(t, p, 1) for t, p in msgs], retain=retain)

    def close(self) -> None:
        (self.fast or self.paho).close()  # type: ignore[union-attr]


def setup(tmp_path: Path, broker: Any, proto: str, recorders: list[RecorderProc]) -> tuple[RecorderProc, str]:
    branch = tmp_path.name.replace("[", "-").replace("]", "").replace(".", "")
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": branch}],
                  broker_keys={**broker.broker_keys, "protocol": proto})
    rec = RecorderProc(m, "all", tmp_path)
    recorders.append(rec)
    return rec, branch


def seqs(root: Path, topic: str) -> list[int]:
    return [r["payload"]["seq"] for r in read_records(root, topic)]


def quiet(rec: RecorderProc, broker: Any, starts: int) -> None:
    """Only the findings expected of this broker, and one connection per start."""
    allowed = FACTS[broker.name].notes
    bad = [line for line in rec.log().splitlines()
           if (" WARNING " in line or " ERROR " in line) and not any(a in line for a in allowed)]
    assert not bad, f"{broker.name}: the shard warned:\n" + "\n".join(bad[:8])
    s = rec.stats()
    assert s is not None and s.connects == 1, f"{broker.name}: {s and s.connects} connections in the last start"
    assert rec.log().count("connected to ") == starts, f"{broker.name}: reconnected ({rec.stderr_path})"


def test_records_in_order_with_retained_flag(tmp_path: Path, case: tuple[Any, str],
                                             recorders: list[RecorderProc]) -> None:
    broker, proto = case
    rec, branch = setup(tmp_path, broker, proto, recorders)
    pub = Sender(broker, f"ret-{branch}")
    try:
        pub.send([(f"{branch}/retained", b'{"seq":-1}')], retain=True)  # before the shard subscribes
    finally:
        pub.close()
    rec.start()
    n, topics = 2000, [f"{branch}/t{k}" for k in range(4)]
    pub = Sender(broker, f"pub-{branch}")
    try:
        pub.send([(topics[i % 4], b'{"seq":%d}' % i) for i in range(n)])
    finally:
        pub.close()
    want = n + FACTS[broker.name].retained_on_wildcard
    wait_for(lambda: (s := rec.stats()) and s.messages >= want, 60,
             f"{want} records from {broker.name} (log: {rec.stderr_path})")
    assert rec.stop() == 0
    root = tmp_path / "data"
    for k, t in enumerate(topics):
        assert seqs(root, t) == list(range(k, n, 4)), f"{broker.name}: {t} out of order or incomplete"
    kept = [r["retain"] for r in read_records(root, f"{branch}/retained")]
    assert kept == ([True] if FACTS[broker.name].retained_on_wildcard else []), f"{broker.name}: retained {kept}"
    assert all(not r["retain"] for t in topics for r in read_records(root, t))
    quiet(rec, broker, 1)
    s = rec.stats()
    assert s is not None
    for note in FACTS[broker.name].notes:  # 2,000 messages are enough to see each finding
        assert any(note in n for n in s.broker_notes), f"{broker.name}: no finding {note!r} in {s.broker_notes}"
    assert len(s.broker_notes) == len(FACTS[broker.name].notes), s.broker_notes


def test_sigkill_mid_stream_loses_nothing(tmp_path: Path, case: tuple[Any, str],
                                          recorders: list[RecorderProc]) -> None:
    broker, proto = case
    rec, branch = setup(tmp_path, broker, proto, recorders)
    rec.start()
    total, topics = 3000, [f"{branch}/t{k}" for k in range(3)]
    pub = Sender(broker, f"pub-{branch}")
    errors: list[BaseException] = []

    def flow() -> None:
        try:
            for i in range(0, total, 100):
                pub.send([(topics[j % 3], b'{"seq":%d}' % j) for j in range(i, i + 100)])
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    thread = threading.Thread(target=flow)
    thread.start()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 600, 60, f"600 records from {broker.name}")
    rec.kill()
    rec.start()
    thread.join(120)
    pub.close()
    assert not errors, errors
    root = tmp_path / "data"
    wait_for(lambda: sum(len(set(seqs(root, t))) for t in topics) >= total, 60,
             f"every message from {broker.name} after the restart (log: {rec.stderr_path})")
    assert rec.stop() == 0
    got = [x for t in topics for x in seqs(root, t)]
    assert set(got) == set(range(total)), f"{broker.name}: lost {sorted(set(range(total)) - set(got))[:10]}"
    s = rec.stats()
    assert s is not None
    assert len(got) - total <= s.redelivered, f"{broker.name}: {len(got) - total} duplicates, {s.redelivered} DUP"
    for t in topics:
        first = list(dict.fromkeys(seqs(root, t)))
        assert first == sorted(first), f"{broker.name}: {t} out of order"
    assert s.session_present and s.sessions_lost == 0, f"{broker.name}: no session after the restart"
    quiet(rec, broker, 2)


def test_published_while_down_arrive(tmp_path: Path, case: tuple[Any, str],
                                     recorders: list[RecorderProc]) -> None:
    broker, proto = case
    rec, branch = setup(tmp_path, broker, proto, recorders)
    rec.start()
    assert rec.stop() == 0  # a clean stop: DISCONNECT, the session stays
    pub = Sender(broker, f"pub-{branch}")
    try:
        pub.send([(f"{branch}/q", b'{"seq":%d}' % i) for i in range(500)])
    finally:
        pub.close()
    rec.start()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 500, 30,
             f"the 500 messages {broker.name} queued (log: {rec.stderr_path})")
    assert rec.stop() == 0
    assert seqs(tmp_path / "data", f"{branch}/q") == list(range(500))
    s = rec.stats()
    assert s is not None and s.session_present and s.sessions_lost == 0
    quiet(rec, broker, 2)



def test_retained_new_records_them_once(tmp_path: Path, case: tuple[Any, str],
                                        recorders: list[RecorderProc]) -> None:
    """`retained: new` (issue 23): a shard restarted on its persistent session records the
    branch's retained message once, not again at each start; live messages in both starts.
    MQTT 5 asks the broker (Retain Handling 1); where it has no such option (3.1.1) or ignores
    it, the shard leaves out what comes with the retain flag (counted retained_skipped)."""
    broker, proto = case
    branch = tmp_path.name.replace("[", "-").replace("]", "").replace(".", "")
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": branch, "retained": "new"}],
                  broker_keys={**broker.broker_keys, "protocol": proto})
    pub = Sender(broker, f"ret-{branch}")
    try:
        pub.send([(f"{branch}/retained", b'{"seq":-1}')], retain=True)
    finally:
        pub.close()
    root = tmp_path / "data"
    skipped = []
    for run in range(2):
        rec = RecorderProc(m, "all", tmp_path)
        recorders.append(rec)
        rec.start()
        pub = Sender(broker, f"pub-{branch}-{run}")
        try:
            pub.send([(f"{branch}/live", b'{"seq":%d}' % run)])
        finally:
            pub.close()
        wait_for(lambda run=run: seqs(root, f"{branch}/live") == list(range(run + 1)), 30,
                 f"live message {run} from {broker.name} (log: {rec.stderr_path})")
        assert rec.stop() == 0
        s = rec.stats()
        assert s is not None
        skipped.append(s.retained_skipped)
    kept = [r["retain"] for r in read_records(root, f"{branch}/retained")]
    print(f"FACT {broker.name} {proto}: retained_skipped per start {skipped}, recorded {kept}")
    assert kept == ([True] if FACTS[broker.name].retained_on_wildcard else []), f"{broker.name}: {kept}"
    assert skipped[0] == 0, f"{broker.name}: skipped retained messages of a new subscription"


MQTT5_CASES = [c for c in CASES if c[1] == "5"]


@pytest.mark.parametrize("name", [b for b, _p in MQTT5_CASES])
def test_properties_round_trip(tmp_path: Path, name: str, request: pytest.FixtureRequest,
                               recorders: list[RecorderProc]) -> None:
    """Issue 23 on every MQTT 5 broker: a message with every PUBLISH property is recorded
    with them, and `shardlog replay --rename` gives them back to an MQTT 5 subscriber."""
    from tests.shardlog.test_mqtt5 import EXPIRY, Client5, expected_props, full_properties, received_props

    broker = request.getfixturevalue(f"{name}_session")
    branch = tmp_path.name.replace("[", "-").replace("]", "").replace(".", "")
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": branch}],
                  broker_keys={**broker.broker_keys, "protocol": 5})
    rec = RecorderProc(m, "all", tmp_path)
    recorders.append(rec)
    rec.start()
    keys = broker.broker_keys
    pub = Client5(broker.port, f"p5-{branch}", keys.get("username"), keys.get("password"))
    watcher = Client5(broker.port, f"w5-{branch}", keys.get("username"), keys.get("password"))
    n = 20
    try:
        watcher.subscribe(f"again{branch}/#")
        pub.publish([(f"{branch}/t", b'{"i":%d}' % i, full_properties(i)) for i in range(n)])
        wait_for(lambda: (s := rec.stats()) is not None and s.messages >= n, 30, f"{n} records ({rec.stderr_path})")
        assert rec.stop() == 0
        user = f"{keys['username']}@" if keys.get("username") else ""
        r = subprocess.run([sys.executable, "-m", "shardlog", "replay", str(tmp_path / "data"), branch, "--broker",
                            f"mqtt://{user}127.0.0.1:{broker.port}", "--speed", "max",
                            "--rename", f"{branch}=again{branch}"],
                           capture_output=True, timeout=120, check=False,
                           env={**__import__("os").environ, "MQTT_PASSWORD": keys.get("password") or ""})
        assert r.returncode == 0, r.stderr
        wait_for(lambda: len(watcher.got) >= n, 30, f"{n} replayed messages from {name}")
    finally:
        pub.close()
        watcher.close()
    for msg in watcher.got:
        i = __import__("json").loads(msg.payload)["i"]
        props = received_props(msg)
        assert EXPIRY - 120 <= props["message_expiry"] <= EXPIRY, props
        props["message_expiry"] = EXPIRY
        assert props == expected_props(i), (name, i, props)


def test_findings_show_in_the_supervisors_status(tmp_path: Path, ejabberd_session: Any,
                                                 supervisors: list[SupervisorProc]) -> None:
    """A broker finding (ejabberd's in-flight cap of 1) reaches /status and `shardlog status`."""
    broker = ejabberd_session
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "ej", "prefix": "sup-ej"}],
                  broker_keys=broker.broker_keys)
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start()
    sup.running("ej")
    pub = Sender(broker, "pub-sup-ej")
    try:
        pub.send([("sup-ej/x", b'{"seq":%d}' % i) for i in range(300)])
    finally:
        pub.close()
    s = sup.wait_shard("ej", lambda s: any("sends at most 1 unacknowledged" in n
                                           for n in (s["counters"] or {}).get("broker_notes", [])),
                       20, "the in-flight finding in /status")
    assert s["counters"]["inflight_cap"] == 1 and s["counters"]["sessions_lost"] == 0
    table = subprocess.run([sys.executable, "-m", "shardlog", "status", str(m)], capture_output=True, text=True,
                           timeout=30)
    assert table.returncode == 0 and "sends at most 1 unacknowledged" in table.stdout, table.stdout
