"""The broker in-flight cap (shardlog/recording/brokercheck.py, InflightProbe) against a real
mosquitto: a steady publisher is no cap (issue 22, item 14: "the broker sends at most 2 (3, 8,
33) unacknowledged messages" with mosquitto, which has none), and a true cap (our own MQTT 5
Receive Maximum, which mosquitto honours) is found, proven by a test batch, and used."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fallback_broker import IotcoreBroker, mosquitto_only
from tests.helpers import FastFlow, Mosquitto, Publisher, RecorderProc, wait_for, write_map


def test_a_steady_publisher_is_no_inflight_cap(tmp_path: Path, broker: Mosquitto,
                                               recorders: list[RecorderProc]) -> None:
    mosquitto_only(broker, "the suite's mosquitto has no in-flight cap (max_inflight_messages 0)")
    branch = tmp_path.name
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "s", "prefix": branch}])
    rec = RecorderProc(m, "s", tmp_path).start()
    recorders.append(rec)
    failures = []
    sent = 0
    for rate, count in ((100, 300), (200, 600), (400, 800)):  # 3 s each, paced in 10 ms steps
        flow = FastFlow(broker.port, [branch], count, rate, topics_per_branch=2)
        flow.start()
        flow.finish()
        sent += count
        wait_for(lambda sent=sent: (s := rec.stats()) and s.acked >= sent, 30, f"{sent} messages ({rec.stderr_path})")
        s = rec.stats()
        assert s is not None
        if s.inflight_cap is not None:
            failures.append(f"{rate} msg/s: inflight_cap {s.inflight_cap}")
    assert rec.stop() == 0
    assert not failures, failures
    assert "unacknowledged messages" not in rec.log(), rec.log()


@pytest.fixture
def iotcore(tmp_path: Path) -> Iterator[IotcoreBroker]:
    """The embedded broker (rumqttd): it sends at most 100 unacknowledged messages (docs/brokers.md)."""
    d = tmp_path / "iotcore"
    d.mkdir()
    b = IotcoreBroker(d)
    b.start()
    yield b
    b.stop()


def test_a_true_cap_is_found_and_used(tmp_path: Path, iotcore: IotcoreBroker,
                                      recorders: list[RecorderProc]) -> None:
    """iotcore's cap of 100, with 5,000 messages published at once: found (and proven by a test
    batch held 3 x max_delay), then used: batches of 100, not one per max_delay."""
    branch = tmp_path.name
    m = write_map(tmp_path / "shards.yaml", iotcore.port, [{"name": "s", "prefix": branch}])
    rec = RecorderProc(m, "s", tmp_path).start()
    recorders.append(rec)
    pub = Publisher(iotcore.port, client_id=f"pub-{branch}")  # MQTT 5: iotcore's port speaks no 3.1.1
    try:
        pub.publish_many([(f"{branch}/x", b'{"seq":%d}' % i, 1) for i in range(5000)])
    finally:
        pub.close()
    wait_for(lambda: (s := rec.stats()) and s.inflight_cap == 100, 20, f"the cap of 100 found ({rec.stderr_path})")
    wait_for(lambda: (s := rec.stats()) and s.acked >= 5000, 30, f"all 5000 ({rec.stderr_path})")
    assert rec.stop() == 0
    assert "sends at most 100 unacknowledged" in rec.log()
