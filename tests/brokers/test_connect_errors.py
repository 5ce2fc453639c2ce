"""Connection errors reported once, with the true reason, within the connect timeout (issue 22,
item 16): a wrong password is one line per attempt naming the broker's answer (not a second,
wrong "Protocol error"); a broker that completes TLS and never sends CONNACK is reported as such
after broker.connect_timeout (not 60 s later as a keepalive timeout "the broker closed"), then
retried with the usual backoff. Real mosquitto, a real TLS server that stays silent."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers.servers import MosquittoTLS
from tests.brokers.test_tls import start, tls_map
from tests.certs import TestCA
from tests.helpers import RecorderProc, free_port, wait_for


def problems(rec: RecorderProc) -> list[str]:
    return [line for line in rec.log().splitlines() if " WARNING " in line or " ERROR " in line]


def test_wrong_password_is_one_line_per_attempt_with_the_brokers_reason(
        tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA, recorders: list[RecorderProc],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", "wrong")
    m = tls_map(tmp_path, test_ca, mosquitto_tls.password_port,
                more={"username": MosquittoTLS.USER, "password": "${MQTT_PASSWORD}"})
    rec = start(tmp_path, recorders, m, wait=False)
    wait_for(lambda: rec.log().count("refused the connection") >= 2, 20, f"two refusals in {rec.stderr_path}")
    assert rec.stop() == 0
    lines = problems(rec)
    refused = [x for x in lines if "refused the connection" in x]
    assert all("Not authorized" in x for x in refused), refused
    assert len(lines) == len(refused), "more than one line per attempt:\n" + "\n".join(lines)
    assert "Protocol error" not in rec.log()


class SilentTLSServer(threading.Thread):
    """Accepts, completes the TLS handshake, reads and never answers (no CONNACK)."""

    def __init__(self, ca: TestCA) -> None:
        super().__init__(daemon=True)
        self.port = free_port()
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ctx.load_cert_chain(str(ca.server_cert), str(ca.server_key))
        self.sock = socket.create_server(("127.0.0.1", self.port))
        self.sock.settimeout(0.2)
        self.handshakes = 0
        self.stopping = threading.Event()
        self.held: list[socket.socket] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                conn.settimeout(5)
                tls = self.ctx.wrap_socket(conn, server_side=True)
                tls.setblocking(False)
                self.handshakes += 1
                self.held.append(tls)  # kept open, never written to
            except (ssl.SSLError, OSError):
                conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        for s in self.held:
            s.close()
        self.sock.close()


@pytest.fixture
def silent_server(test_ca: TestCA) -> Iterator[SilentTLSServer]:
    s = SilentTLSServer(test_ca)
    s.start()
    yield s
    s.close()


def test_no_connack_is_reported_within_the_connect_timeout(
        tmp_path: Path, silent_server: SilentTLSServer, test_ca: TestCA, recorders: list[RecorderProc]) -> None:
    m = tls_map(tmp_path, test_ca, silent_server.port, more={"connect_timeout": "2s", "reconnect_max": "2s"})
    rec = start(tmp_path, recorders, m, wait=False)
    t0 = time.monotonic()
    wait_for(lambda: "no CONNACK" in rec.log(), 10, f"the missing CONNACK reported ({rec.stderr_path})")
    took = time.monotonic() - t0
    assert took < 6, f"reported after {took:.1f}s with connect_timeout 2s"
    wait_for(lambda: silent_server.handshakes >= 2, 15, "a second attempt (the usual backoff)")
    wait_for(lambda: rec.log().count("no CONNACK") >= 2, 10, f"the second attempt reported ({rec.stderr_path})")
    assert rec.stop() == 0
    lines = problems(rec)
    assert all("no CONNACK within 2s" in x for x in lines), "\n".join(lines)
    assert "Keep alive" not in rec.log() and "closed the connection" not in rec.log()
