"""The test suite's broker when mosquitto is not installed: iotcore, the broker that
``broker.embedded: true`` runs (``python -m supervisor.broker``), on a free loopback port.

CI always has mosquitto (``.ci/run`` installs it) and uses it. Without it, ``pip install -e
'.[test]' && python3 -m pytest`` still runs: the ``broker`` fixture falls back to this class
(``SHARDLOG_TEST_BROKER=iotcore`` forces it, to try the fallback on a machine with mosquitto).
What iotcore cannot do is skipped with the reason, never faked: it keeps sessions in memory
only, so a test that restarts the broker to check persistence is skipped when it restarts it;
its port speaks MQTT 5 only; such tests call :func:`mosquitto_only` with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import BrokerProcess, free_port, wait_for

#: ports of the running fallback brokers: maps written for them turn broker.sys_topics off
PORTS: set[int] = set()

NEEDS_MOSQUITTO = "needs mosquitto (apt-get install mosquitto; CI has it): the fallback broker, iotcore, "


def wanted() -> bool:
    """Use the fallback? (mosquitto missing, or SHARDLOG_TEST_BROKER=iotcore)"""
    from tests.helpers import MOSQUITTO
    choice = os.environ.get("SHARDLOG_TEST_BROKER", "")
    if choice == "iotcore":
        return True
    if choice == "mosquitto":
        return False
    return not os.path.exists(MOSQUITTO)


class IotcoreBroker(BrokerProcess):
    """Same surface as tests.helpers.Mosquitto: ``port``, ``start()``, ``stop()``, ``proc``."""

    kind = "iotcore"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        self.conf = workdir / "broker.toml"
        self.log = workdir / "broker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        if self.starts:
            pytest.skip(NEEDS_MOSQUITTO + "keeps sessions in memory only, and this test restarts the broker")
        from shardlog.config.load import parse_map
        from supervisor.broker.config import config_toml
        smap = parse_map({"broker": {"host": "127.0.0.1", "port": self.port, "embedded": True},
                          "shards": [{"name": "t", "prefix": "#", "max_payload": "255MiB"}]})
        self.conf.write_text(config_toml(smap))
        self._log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor.broker", str(self.conf),
                                      "--parent-pid", str(os.getpid())],
                                     stdout=subprocess.DEVNULL, stderr=self._log)
        self.starts += 1
        PORTS.add(self.port)
        wait_for(self._accepts, 10, f"iotcore to listen on port {self.port} (log: {self.log})")

    def exit_report(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        PORTS.discard(self.port)
        super().stop()



def mosquitto_only(broker: object, why: str) -> None:
    """Skip the calling test when ``broker`` is the iotcore fallback, saying why."""
    if getattr(broker, "kind", "") == "iotcore":
        pytest.skip(NEEDS_MOSQUITTO + why)
