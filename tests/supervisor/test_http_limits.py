"""The supervisor's HTTP server under hostile clients (issue 17), over real sockets.

In process (a real StatusServer with small limits, so that timeouts and caps show in a second):
every bad request of tests/http_attack.py gets its 4xx, the connection cap answers 503, a slow
request 408, an idle keep-alive connection is closed, pipelined requests are answered in order.
End to end: a real supervisor with a real recording shard, attacked by 300 concurrent clients,
200 slowloris connections held open, 1 MB headers and garbage, while QoS 1 messages flow: /status
keeps answering (median and p99 printed, before and during), nothing is lost, nothing restarts."""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardlog.counters import Counters
from supervisor.serve.framing import Frame, Limits, frame
from supervisor.serve.http import StatusServer
from supervisor.serve.status import Sample, build_status
from supervisor.snapshot import EMPTY, ShardView
from tests.http_attack import (
    BAD_REQUESTS,
    Slowloris,
    concurrent_gets,
    exchange,
    latencies,
    pipeline_without_reading,
    read_response,
    reset_mid_answer,
    summary,
)
from tests.supervisor.helpers import Flow, SupervisorProc, make_map, payload_ids, wait_for

pytestmark = pytest.mark.timeout(180)

SMALL = Limits(max_connections=40, request_timeout=0.6, idle_timeout=0.8, workers=2, control_workers=1)


@pytest.fixture
def server() -> StatusServer:
    s = StatusServer("127.0.0.1:0", lambda: build_status(EMPTY, Sample(), time.monotonic()),
                     control=lambda op, body, who: {"ok": False, "reason": "no shard here"}, limits=SMALL).start()
    yield s
    s.stop()


def test_frame_decides_from_the_bytes_alone() -> None:
    L = Limits()
    assert frame(b"GET / HTTP/1.1\r\nHost: x\r\n", L) == Frame()
    assert frame(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET", L) == Frame(size=27)
    assert frame(b"GET / HTTP/1.1\n\n", L) == Frame(size=16)
    assert frame(b"POST /c HTTP/1.1\r\nContent-Length: 2\r\n\r\n{", L) == Frame()
    assert frame(b"POST /c HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n", L).expect_continue
    assert frame(b"POST /c HTTP/1.1\r\ncontent-length:2\r\n\r\n{}", L).size == 40
    assert frame(b"POST /c HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", L).status == 413
    assert frame(b"POST /c HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", L).status == 400
    assert frame(b"GET / HTTP/1.1\r\n" + b"a" * 20000, L).status == 431
    assert frame(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n", L).status == 400  # a TLS hello
    assert frame(b"GET / HTTP/1.1", L) == Frame()  # not a line yet


@pytest.mark.parametrize("what", [w for w, _, _ in BAD_REQUESTS])
def test_each_bad_request_gets_its_4xx(server: StatusServer, what: str) -> None:
    data, expected = next((d, e) for w, d, e in BAD_REQUESTS if w == what)
    assert exchange(server.address, data) in expected
    assert exchange(server.address, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n") == 200


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.binary(min_size=1, max_size=300), head=st.sampled_from([b"", b"GET ", b"GET /status HTTP/1.1\r\n",
                                                                       b"POST /control/rotate HTTP/1.1\r\n"]))
def test_random_bytes_get_a_4xx_or_an_answer_never_a_hang(server: StatusServer, junk: bytes, head: bytes) -> None:
    status = exchange(server.address, head + junk + b"\r\n\r\n", timeout=5)
    assert status is not None and (400 <= status < 500 or status == 200), status


def test_connection_cap_slow_requests_idle_connections_and_pipelining(server: StatusServer) -> None:
    addr = server.address
    held = [socket.create_connection(addr) for _ in range(SMALL.max_connections)]
    wait_for(lambda: server.front.open_connections() == SMALL.max_connections, 5, "the connections to be accepted")
    assert exchange(addr, b"GET /status HTTP/1.1\r\n\r\n") == 503
    for s in held:
        s.close()
    wait_for(lambda: exchange(addr, b"GET /status HTTP/1.1\r\n\r\n") == 200, 5, "a free slot")
    slow = Slowloris(addr, 5)  # heads never finished: 408 after request_timeout
    t0 = time.monotonic()
    assert slow.answers(5) == {408: 5}
    assert time.monotonic() - t0 < 3
    slow.close()
    with socket.create_connection(addr, timeout=5) as s:  # an idle keep-alive connection is closed
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(s, bytearray())[0] == 200
        t0 = time.monotonic()
        assert s.recv(65536) == b"", "the server answered more than asked"
        assert time.monotonic() - t0 < 3, "the idle connection was not closed after idle_timeout"
    with socket.create_connection(addr, timeout=5) as s:  # two pipelined requests, answered in order
        s.sendall(b"GET /status HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n")
        buf = bytearray()
        assert read_response(s, buf)[0] == 200 and read_response(s, buf)[0] == 404


def test_a_slow_control_command_does_not_hold_up_status() -> None:
    release = threading.Event()

    def control(op: str, body: bytes, who: str) -> dict:
        release.wait(10)  # a shard that takes its time
        return {"ok": True}

    s = StatusServer("127.0.0.1:0", lambda: build_status(EMPTY, Sample(), time.monotonic()), control=control,
                     limits=SMALL).start()
    try:
        post = b"POST /control/rotate HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        threads = [threading.Thread(target=exchange, args=(s.address, post), daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        xs = latencies(s.address, 10, pause=0)
        assert max(xs) < 2, summary(xs)
    finally:
        release.set()
        s.stop()


def _big_status():
    """A /status of 300 shards: /metrics is about a megabyte, more than the socket buffers hold."""
    views = tuple(ShardView(name=f"shard{i}", state="running", pid=None, spawned_mono=None, spawned_wall=None,
                            running_mono=None, last_beat_mono=None, restarts=0, last_exit=None, reason=None,
                            next_start_mono=None, prefix=f"p{i}", root=f"/data/{i}", host=None, client_id=f"c{i}",
                            counters=Counters(shard=f"shard{i}", pid=i)) for i in range(300))
    snap = dataclasses.replace(EMPTY, shards=views)
    return lambda: build_status(snap, Sample(), time.monotonic())


METRICS = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"


def test_clients_pipelining_without_reading_do_not_stall_status() -> None:
    """Issue 22, item 7: four clients pipelining GET /metrics without reading held the four GET
    workers in a blocking write (5 s each, then the next): /status waited ~10 s."""
    s = StatusServer("127.0.0.1:0", _big_status(), limits=Limits(workers=4)).start()
    hogs = pipeline_without_reading(s.address, 4, METRICS)
    try:
        xs = latencies(s.address, 20, pause=0.05)
        print(f"\n[bad input] /status while 4 clients pipeline /metrics without reading: {summary(xs)}")
        # a stall is write_timeout (5 s) per blocked worker (9 s seen before the fix); the first
        # answer to each hog costs a render (~1 MB of /metrics) that /status may queue behind
        # (0.4-0.9 s seen on a loaded 2-core machine): the bound sits between the two
        assert max(xs) < 4.0, summary(xs)
    finally:
        for h in hogs:
            h.close()
        s.stop()


def test_clients_resetting_mid_answer_are_a_quiet_line_not_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 22, item 7: 100 clients resetting mid-answer were 100 ERROR tracebacks."""
    s = StatusServer("127.0.0.1:0", _big_status(), limits=Limits(workers=4)).start()
    try:
        with caplog.at_level(logging.DEBUG, logger="supervisor.serve"):
            started = reset_mid_answer(s.address, 100, METRICS)
            assert started == 100, f"only {started} of 100 clients saw the start of an answer"
            wait_for(lambda: s.front.open_connections() == 0, 20, "the reset connections to be closed")
            assert exchange(s.address, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n") == 200
        ours = [r for r in caplog.records if r.name.startswith("supervisor.serve")]
        loud = [r for r in ours if r.levelno >= logging.WARNING or r.exc_info]
        assert not loud, f"{len(loud)} loud records, e.g. {loud[0].name}: {loud[0].getMessage()}"
        quiet = [r for r in ours if "went away" in r.getMessage()]
        assert 1 <= len(quiet) <= 100 and all(r.levelno <= logging.INFO for r in quiet), \
            f"{len(quiet)} 'went away' lines; the records: {[r.getMessage() for r in ours][:5]}"
    finally:
        s.stop()


def test_status_answers_and_recording_goes_on_under_attack(broker, supervisors, tmp_path: Path) -> None:
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(root))
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start()
    pid = sup.running("a")["pid"]
    host, port = sup.url.removeprefix("http://").rsplit(":", 1)
    addr = (host, int(port))
    before = latencies(addr, 40)
    flow = Flow(broker.port, ["a/x"], count=1500, batch=50, pause=0.02)
    flow.start()
    slow = Slowloris(addr, 200)
    slow_since = time.monotonic()
    during: list[float] = []
    probe = threading.Thread(target=lambda: during.extend(latencies(addr, 60, pause=0.05)), daemon=True)
    probe.start()
    crowd = concurrent_gets(addr, 300, rounds=3)
    bad = {what: exchange(addr, data) for what, data, _ in BAD_REQUESTS}
    alive = slow.trickle()
    held = slow.waiting() if time.monotonic() - slow_since < 9 else None  # 10 s: their timeout
    probe.join(60)
    flow.finish(90)
    print(f"\n[bad input] /status before: {summary(before)}; during 300 clients x 3 + 200 slowloris + "
          f"{len(BAD_REQUESTS)} bad requests: {summary(during)}; crowd statuses {crowd}; "
          f"slowloris held open {held}/200")
    assert crowd == {200: 900}, crowd
    wrong = {w: s for w, s in bad.items() if s not in next(e for x, _, e in BAD_REQUESTS if x == w)}
    assert not wrong, wrong
    assert alive == 200 and held in (200, None), f"slowloris connections answered or closed early: {held}"
    assert len(during) == 60 and max(during) < 3, summary(during)  # a sanity bound; the figures are printed
    ids = wait_for(lambda: (x := payload_ids(root, flow.topics("a/x"))) and len(set(x)) == 1500 and x, 30,
                   "every message recorded")
    assert sorted(set(ids)) == list(range(1500))
    assert sup.shard("a")["pid"] == pid and sup.shard("a")["restarts"] == 0
    assert slow.answers(15) == {408: 200}  # request_timeout: 10 s from the first byte
    slow.close()


def test_listen_on_every_ipv6_address_takes_ipv4_too() -> None:
    """``listen: "[::]:PORT"`` answers IPv4 clients, as the stdlib server's socket did."""
    s = StatusServer("[::]:0", lambda: build_status(EMPTY, Sample(), time.monotonic())).start()
    try:
        assert exchange(("127.0.0.1", s.address[1]), b"GET /status HTTP/1.1\r\n\r\n") == 200
    finally:
        s.stop()
