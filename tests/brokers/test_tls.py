"""Recording over TLS from a real mosquitto: a CA made for the session (tests/certs.py), the
server certificate verified for real, a listener requiring client certificates, one requiring a
password; 100,000 messages of 4 KiB and 20 KiB without a stall, and SIGKILL without loss."""

from __future__ import annotations

import fcntl
import re
import struct
import termios
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.brokers.conftest import client_tls
from tests.brokers.servers import MosquittoTLS
from tests.certs import TestCA
from tests.helpers import FastPublisher, RecorderProc, wait_for, write_map

SEQ = re.compile(rb'"seq":(\d+)')


def tls_map(tmp_path: Path, ca: TestCA, port: int, more: dict[str, Any] | None = None, **tls: Any) -> Path:
    """A map recording branch ``<tmp_path.name>`` over TLS (host "localhost": the name is verified)."""
    keys: dict[str, Any] = {"tls": {"ca_file": str(ca.ca_file), **tls}, "host": "localhost", **(more or {})}
    return write_map(tmp_path / "shards.yaml", port, [{"name": "all", "prefix": tmp_path.name}],
                     broker_keys=keys)


def start(tmp_path: Path, recorders: list[RecorderProc], m: Path, wait: bool = True) -> RecorderProc:
    r = RecorderProc(m, "all", tmp_path).start(wait_subscribed=wait)
    recorders.append(r)
    return r


def seqs_in(root: Path) -> list[int]:
    """Every "seq" of every segment under ``root``, in file order (regex: 1 GB of JSON reads fast)."""
    out: list[int] = []
    for f in sorted(root.rglob("+log*.jsonl")):
        data = f.read_bytes()
        assert not data or data.endswith(b"\n"), f"torn last line in {f}"
        out.extend(int(x) for x in SEQ.findall(data))
    return out


def quiet_log(rec: RecorderProc) -> None:
    """No warning, no error, one connection: what "no stall, no reconnect loop" looks like."""
    text = rec.log()
    bad = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not bad, "the shard warned:\n" + "\n".join(bad[:10])


def test_server_certificate_is_verified(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                        recorders: list[RecorderProc]) -> None:
    rec = start(tmp_path, recorders, tls_map(tmp_path, test_ca, mosquitto_tls.tls_port))
    pub = FastPublisher(mosquitto_tls.tls_port, client_id=f"pub-{tmp_path.name}", tls=client_tls(test_ca))
    pub.publish_many([(f"{tmp_path.name}/t{i % 3}", b'{"seq":%d}' % i) for i in range(3000)])
    pub.wait_acked()
    pub.close()
    wait_for(lambda: (s := rec.stats()) and s.acked >= 3000, 30, "3000 messages over TLS")
    assert rec.stop() == 0
    assert sorted(seqs_in(tmp_path / "data")) == list(range(3000))
    quiet_log(rec)
    # trusting another CA: the handshake fails, the shard says why and keeps retrying (no crash loop)
    other = tmp_path / "other"
    other.mkdir()
    bad = start(other, recorders, tls_map(other, test_ca, mosquitto_tls.tls_port,
                                          ca_file=str(test_ca.other_ca_file)), wait=False)
    wait_for(lambda: "certificate verify failed" in bad.log(), 20, f"the verify failure in {bad.stderr_path}")
    assert bad.proc is not None and bad.proc.poll() is None, "the shard exited instead of retrying"
    assert bad.stop() == 0


def test_client_certificate_required(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                     recorders: list[RecorderProc]) -> None:
    m = tls_map(tmp_path, test_ca, mosquitto_tls.mtls_port,
                cert_file=str(test_ca.client_cert), key_file=str(test_ca.client_key))
    rec = start(tmp_path, recorders, m)
    pub = FastPublisher(mosquitto_tls.mtls_port, client_id=f"pub-{tmp_path.name}", tls=client_tls(test_ca, cert=True))
    pub.publish_many([(f"{tmp_path.name}/x", b'{"seq":%d}' % i) for i in range(500)])
    pub.wait_acked()
    pub.close()
    wait_for(lambda: (s := rec.stats()) and s.acked >= 500, 30, "500 messages over mutual TLS")
    assert rec.stop() == 0
    assert seqs_in(tmp_path / "data") == list(range(500))
    quiet_log(rec)
    # no client certificate: mosquitto ends the handshake; the shard reports it and retries
    other = tmp_path / "nocert"
    other.mkdir()
    bad = start(other, recorders, tls_map(other, test_ca, mosquitto_tls.mtls_port), wait=False)
    # TLS 1.3: the client's handshake ends before the server checks; the refusal comes as an
    # alert (or just an EOF) on the first read, and names itself in the shard's log
    wait_for(lambda: "closed the connection before accepting it" in bad.log(), 20,
             f"the refused handshake in {bad.stderr_path}")
    s = bad.stats()
    assert s is None or not s.subscribed
    assert bad.stop() == 0
    attempts = bad.log().count("closed the connection before accepting it")
    assert 1 <= attempts <= 6, f"{attempts} attempts in a few seconds: no backoff (log: {bad.stderr_path})"


def test_password_over_tls(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                           recorders: list[RecorderProc], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", MosquittoTLS.PASSWORD)  # the map says ${MQTT_PASSWORD}
    m = tls_map(tmp_path, test_ca, mosquitto_tls.password_port,
                more={"username": MosquittoTLS.USER, "password": "${MQTT_PASSWORD}"})
    assert MosquittoTLS.PASSWORD not in m.read_text()
    rec = start(tmp_path, recorders, m)
    pub = FastPublisher(mosquitto_tls.password_port, client_id=f"pub-{tmp_path.name}", tls=client_tls(test_ca),
                        username=MosquittoTLS.USER, password=MosquittoTLS.PASSWORD)
    pub.publish_many([(f"{tmp_path.name}/x", b'{"seq":%d}' % i) for i in range(500)])
    pub.wait_acked()
    pub.close()
    wait_for(lambda: (s := rec.stats()) and s.acked >= 500, 30, "500 messages with a password")
    assert rec.stop() == 0
    assert seqs_in(tmp_path / "data") == list(range(500))
    quiet_log(rec)
    monkeypatch.setenv("MQTT_PASSWORD", "wrong")
    other = tmp_path / "wrong"
    other.mkdir()
    bad = start(other, recorders, tls_map(other, test_ca, mosquitto_tls.password_port,
                                          more={"username": MosquittoTLS.USER, "password": "${MQTT_PASSWORD}"}),
                wait=False)
    wait_for(lambda: "refused the connection" in bad.log(), 20, f"the refusal in {bad.stderr_path}")
    assert bad.stop() == 0


def _payloads(n: int, prefix: str) -> list[tuple[str, bytes]]:
    """Message i: 4 KiB for even i, 20 KiB for odd i, JSON with its "seq" first."""
    pads = {0: b"a" * (4096 - 40), 1: b"b" * (20480 - 40)}
    return [(f"{prefix}/t{i % 8}", b'{"seq":%d,"pad":"%s"}' % (i, pads[i % 2])) for i in range(n)]


@pytest.mark.slow
def test_100k_large_messages_over_tls_do_not_stall(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                                   recorders: list[RecorderProc]) -> None:
    """100,000 messages (half 4 KiB, half 20 KiB: 1.2 GB) over TLS, in a backlog and live. The
    publisher uses the plain listener (its TLS is not under test); every record arrives, in order,
    on one connection; progress never stops for more than a few seconds."""
    total = 100_000
    rec = start(tmp_path, recorders, tls_map(tmp_path, test_ca, mosquitto_tls.tls_port),
                )
    rec.stop()  # the session is registered: the first half waits for it as a backlog
    msgs = _payloads(total, tmp_path.name)
    pub = FastPublisher(mosquitto_tls.port, client_id=f"pub-{tmp_path.name}", window=500)
    pub.publish_many(msgs[:total // 2])
    pub.wait_acked(120)
    rec.start()
    live = threading.Thread(target=lambda: (pub.publish_many(msgs[total // 2:]), pub.wait_acked(300)))
    live.start()
    last, last_change, t0 = -1, time.monotonic(), time.monotonic()
    while True:  # progress, polled: a stall is a failure with the figures, not a timeout
        s = rec.stats()
        acked = s.acked if s else 0
        now = time.monotonic()
        if acked != last:
            last, last_change = acked, now
        if acked >= total:
            break
        assert now - last_change < 15, f"stalled at {acked} of {total} acknowledged (log: {rec.stderr_path})"
        assert now - t0 < 280, f"only {acked} of {total} after {now - t0:.0f}s"
        time.sleep(0.2)
    live.join(60)
    pub.close()
    assert rec.stop() == 0
    s = rec.stats()
    assert s is not None and s.connects == 1, f"{s.connects if s else '?'} connections: it reconnected"
    seqs = seqs_in(tmp_path / "data")
    assert len(seqs) == total and set(seqs) == set(range(total))
    for k in range(8):  # per topic, in publish order
        mine = [x for x in seqs if x % 8 == k]
        assert mine == sorted(mine)
    quiet_log(rec)


def test_sigkill_over_tls_loses_nothing(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                        recorders: list[RecorderProc]) -> None:
    total = 20_000
    rec = start(tmp_path, recorders, tls_map(tmp_path, test_ca, mosquitto_tls.tls_port))
    pub = FastPublisher(mosquitto_tls.tls_port, client_id=f"pub-{tmp_path.name}", window=200,
                        tls=client_tls(test_ca))
    msgs = [(f"{tmp_path.name}/t{i % 20}", b'{"seq":%d,"pad":"%s"}' % (i, b"x" * 1000)) for i in range(total)]
    flow = threading.Thread(target=lambda: (pub.publish_many(msgs), pub.wait_acked(120)))
    flow.start()
    wait_for(lambda: (s := rec.stats()) and s.messages >= 4000, 60, "4000 messages before the kill")
    rec.kill()
    rec.start()
    flow.join(150)
    pub.close()
    wait_for(lambda: len(set(seqs_in(tmp_path / "data"))) >= total, 60, "every message after the restart")
    assert rec.stop() == 0
    seqs = seqs_in(tmp_path / "data")
    assert set(seqs) == set(range(total)), f"lost: {sorted(set(range(total)) - set(seqs))[:10]}"
    s = rec.stats()
    assert s is not None and len(seqs) - total <= s.redelivered, (len(seqs) - total, s.redelivered)
    quiet_log(rec)


class Probe:
    """A :class:`~shardlog.recording.client.BufferedClient` subscribed over TLS at QoS 0 to ``topic/#``,
    driven as the recorder drives it: paho's ``loop()``, then :meth:`read_buffered`."""

    def __init__(self, name: str, ca: TestCA, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from shardlog.recording.client import BufferedClient

        self.got: list[int] = []
        subscribed: list[int] = []
        c = self.client = BufferedClient(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=str(ca.ca_file))
        c.on_publish_fields = lambda topic, payload, qos, mid, dup, retain: self.got.append(mid)
        c.on_message = lambda cl, u, m: self.got.append(m.mid)
        c.on_connect = lambda cl, u, f, r, p: cl.subscribe(f"{topic}/#", 0)
        c.on_subscribe = lambda cl, u, mid, r, p: subscribed.append(mid)
        c.connect("localhost", port)
        wait_for(lambda: (self.turn(0.02), subscribed)[1], 10, f"{name}'s SUBACK")

    def turn(self, timeout: float) -> None:
        self.client.loop(timeout)
        if self.client.buffered:
            self.client.read_buffered()

    def read(self, total: int, timeout: float = 20) -> int:
        """Turns until ``total`` messages arrived (or the deadline): how many turns it took."""
        turns, deadline = 0, time.monotonic() + timeout
        while len(self.got) < total and time.monotonic() < deadline:
            self.turn(0.1)
            turns += 1
        self.client.disconnect()
        assert len(self.got) == total, f"stalled with {total - len(self.got)} of {total} messages unread"
        return turns


def test_small_reads_over_tls_lose_no_packet(mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The buffered client over TLS with reads far smaller than a packet (1,000 bytes for 3 KB
    messages): packets split across reads and TLS records; the stream then ends, so nothing new
    wakes select. One turn of the recorder's loop (paho's ``loop()``, which checks
    ``SSLSocket.pending()`` before selecting, then :meth:`read_buffered`) must take them all.
    With the default read size (64 KiB, above the 16 KiB TLS record maximum) no read leaves
    bytes inside the SSL object at all; docs/brokers.md, "TLS"."""
    import shardlog.recording.client

    monkeypatch.setattr(shardlog.recording.client, "READ_SIZE", 1000)  # below a 16 KiB TLS record
    probe = Probe("pending-probe", test_ca, mosquitto_tls.tls_port, "pending")
    total = 300
    pub = FastPublisher(mosquitto_tls.port, client_id="pending-pub")
    pub.publish_many([("pending/x", b"%05d" % i + b"p" * 3000) for i in range(total)])
    pub.wait_acked()
    pub.close()
    probe.read(total)


def test_tls_records_are_read_many_at_a_time(mosquitto_tls: MosquittoTLS, test_ca: TestCA) -> None:
    """mosquitto writes one TLS record per packet, and a recv returns one record: reading them one
    by one cost shardlog four fifths of its speed over TLS (docs/benchmarks.md). A backlog of
    2,000 small messages must take a few turns of the loop (64 KiB buffer fills), not one each."""
    probe = Probe("records-probe", test_ca, mosquitto_tls.tls_port, "records")
    total = 2000
    pub = FastPublisher(mosquitto_tls.port, client_id="records-pub")
    pub.publish_many([("records/x", b"%05d" % i + b"r" * 100) for i in range(total)])
    pub.wait_acked()
    pub.close()

    def unread() -> int:  # bytes waiting in the kernel for the probe's socket
        sock = probe.client.socket()
        assert sock is not None
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]

    wait_for(lambda: unread() >= 64 * 1024, 10, "a backlog in the probe's socket")  # a full buffer fill
    turns = probe.read(total)
    assert turns < total // 20, f"{turns} turns (a select each) for {total} messages: TLS records read one by one"
