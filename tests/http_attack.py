"""Hostile HTTP clients for the supervisor's server (issue 17), over real sockets: many concurrent
keep-alive clients, slowloris connections, oversized heads and bodies, garbage. Used by
tests/supervisor/test_http_limits.py and bench/http_attack.py."""

from __future__ import annotations

import os
import random
import re
import selectors
import socket
import statistics
import struct
import time

Addr = tuple[str, int]


def _post(body: bytes, path: bytes = b"/control/rotate", ctype: bytes = b"application/json", length: bool = True,
          extra: bytes = b"") -> bytes:
    head = b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n%s" % (path, ctype, extra)
    return head + (b"Content-Length: %d\r\n" % len(body) if length else b"") + b"\r\n" + body


#: (what, raw request, acceptable statuses)
BAD_REQUESTS: list[tuple[str, bytes, tuple[int, ...]]] = [
    ("garbage bytes", random.Random(17).randbytes(4096), (400,)),
    ("NUL and 0xff", b"\x00\xff\xfe\r\n\r\n", (400,)),
    ("an HTTP/0.9 request", b"GET /status\r\n\r\n", (400,)),
    ("a bare newline", b"\r\n\r\n", (400,)),
    ("a TLS client hello", bytes.fromhex("160301020001000001fc0303") + os.urandom(64), (400,)),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,)),
    ("a 1 MB header", b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n", (431,)),
    ("10,000 small headers", b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 10000 + b"\r\n", (431,)),
    ("200 headers within the size", b"GET /status HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n", (431,)),
    ("a 70 KB request line", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", (431,)),
    ("an unknown method", b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n", (405,)),
    ("DELETE", b"DELETE /status HTTP/1.1\r\nHost: x\r\n\r\n", (405,)),
    ("a path with ..", b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", (404,)),
    ("a path with .. to /status", b"GET /x/../status HTTP/1.1\r\nHost: x\r\n\r\n", (404,)),
    ("an encoded ..", b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", (404,)),
    ("a control op with ..", _post(b"{}", path=b"/control/../../status"), (404,)),
    ("an absolute URL", b"GET http://evil/status/../x HTTP/1.1\r\nHost: x\r\n\r\n", (404,)),
    ("non-JSON control body", _post(b"not json!"), (400,)),
    ("a JSON array body", _post(b"[]"), (400,)),
    ("wrong types", _post(b'{"prefix": [1]}'), (400,)),
    ("an oversized body (1 MB)", _post(b"{" * (1 << 20)), (413,)),
    ("a deeply nested JSON body", _post(b"[" * 5000 + b"]" * 5000), (400,)),
    ("a body without length", _post(b"{}", length=False), (411,)),
    ("chunked", _post(b"2\r\n{}\r\n0\r\n\r\n", length=False, extra=b"Transfer-Encoding: chunked\r\n"), (411,)),
    ("two Content-Lengths", _post(b"{}", extra=b"Content-Length: 3\r\n"), (400,)),
    ("a negative Content-Length", _post(b"", length=False, extra=b"Content-Length: -1\r\n"), (400,)),
    ("a form post", _post(b"a=b", ctype=b"application/x-www-form-urlencoded"), (415,)),
    ("a browser's cross-origin post", _post(b"{}", path=b"/control/delete", extra=b"Origin: http://evil\r\n"), (403,)),
    ("a header without a colon", b"GET /status HTTP/1.1\r\nnonsense\r\n\r\n", (200, 400)),
    ("a bad version", b"GET /status HTTP/9.9\r\n\r\n", (400,)),
]


def read_response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes] | None:
    """One response from ``buf`` (bytes already read; more are read from ``sock``), removed from
    it: (status, body), or None if the connection closed first."""
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = bytes(buf[:end])
            m = re.search(rb"\r\ncontent-length: *(\d+)", head, re.I)
            length = int(m.group(1)) if m else 0
            if len(buf) >= end + 4 + length:
                status = int(head.split(b" ", 2)[1])
                body = bytes(buf[end + 4:end + 4 + length])
                del buf[:end + 4 + length]
                return status, body
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buf += chunk


def exchange(addr: Addr, data: bytes, timeout: float = 10.0) -> int | None:
    """Send ``data`` on a new connection; the status of the first response (None: closed without
    one). Sending stops early if the server closes (it refused what came first)."""
    with socket.create_connection(addr, timeout=timeout) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            r = read_response(s, bytearray())
        except ConnectionResetError:
            return None
        return r[0] if r else None


def get_status(addr: Addr, timeout: float = 10.0) -> tuple[int, float]:
    """GET /status on a fresh connection: (status, seconds)."""
    t0 = time.perf_counter()
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        r = read_response(s, bytearray())
    return (r[0] if r else 0), time.perf_counter() - t0


def latencies(addr: Addr, n: int, pause: float = 0.02) -> list[float]:
    """``n`` sequential GET /status (each must be 200), seconds each."""
    out = []
    for _ in range(n):
        status, dt = get_status(addr)
        assert status == 200, f"/status answered {status}"
        out.append(dt)
        time.sleep(pause)  # pacing of the probe, not synchronisation
    return out


def summary(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1000, 2),
            "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 2),
            "max_ms": round(xs[-1] * 1000, 2)}


def concurrent_gets(addr: Addr, clients: int, rounds: int, timeout: float = 60.0) -> dict[int, int]:
    """``clients`` keep-alive connections open at once, each sending ``rounds`` GET /status
    one after the other, all driven from one thread; a count of the statuses seen (0: a
    connection closed without an answer)."""
    sel = selectors.DefaultSelector()
    counts: dict[int, int] = {}
    socks = []
    for _ in range(clients):
        s = socket.create_connection(addr, timeout=timeout)
        socks.append(s)
    req = b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n"
    state = {}
    for s in socks:
        s.sendall(req)
        s.setblocking(False)
        state[s] = [bytearray(), rounds]
        sel.register(s, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while state and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=1.0):
            s = key.fileobj
            buf, left = state[s]
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                counts[0] = counts.get(0, 0) + 1
                sel.unregister(s)
                del state[s]
                continue
            buf += chunk
            while (end := buf.find(b"\r\n\r\n")) >= 0:
                m = re.search(rb"\r\ncontent-length: *(\d+)", bytes(buf[:end]), re.I)
                total = end + 4 + (int(m.group(1)) if m else 0)
                if len(buf) < total:
                    break
                status = int(bytes(buf[:end]).split(b" ", 2)[1])
                counts[status] = counts.get(status, 0) + 1
                del buf[:total]
                left -= 1
                state[s][1] = left
                if left == 0:
                    sel.unregister(s)
                    del state[s]
                    break
                s.setblocking(True)
                s.sendall(req)
                s.setblocking(False)
    for _s in state:
        counts[-1] = counts.get(-1, 0) + 1  # no answer before the deadline
    sel.close()
    for s in socks:
        s.close()
    return counts


class Slowloris:
    """``n`` connections that send a request head slowly, one header line per :meth:`trickle`."""

    def __init__(self, addr: Addr, n: int) -> None:
        self.socks = []
        for _ in range(n):
            s = socket.create_connection(addr, timeout=10)
            s.sendall(b"GET /status HTTP/1.1\r\nHost: x\r\n")
            self.socks.append(s)

    def trickle(self) -> int:
        """One more header line on each still open connection; how many are still open."""
        alive = 0
        for s in self.socks:
            try:
                s.sendall(b"X-a: %d\r\n" % os.getpid())
                alive += 1
            except OSError:
                pass
        return alive

    def waiting(self) -> int:
        """How many connections the server still holds open without an answer (nothing to read)."""
        n = 0
        for s in self.socks:
            s.setblocking(False)
            try:
                s.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                n += 1
            except OSError:
                pass
            finally:
                s.setblocking(True)
        return n

    def answers(self, timeout: float) -> dict[int, int]:
        """Wait for what the server says to each (its timeout): a count of statuses."""
        counts: dict[int, int] = {}
        deadline = time.monotonic() + timeout
        for s in self.socks:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                r = read_response(s, bytearray())
                status = r[0] if r else 0
            except TimeoutError:
                status = -1
            except OSError:
                status = 0
            counts[status] = counts.get(status, 0) + 1
        return counts

    def close(self) -> None:
        for s in self.socks:
            s.close()


def pipeline_without_reading(addr: Addr, n: int, request: bytes, rcvbuf: int = 4096) -> list[socket.socket]:
    """``n`` connections, each pipelining as many copies of ``request`` as its send buffer takes,
    never reading an answer (issue 22: four such clients of GET /metrics stalled /status). A small
    receive buffer, so that the answers back up into the server at once. The caller closes them."""
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.connect(addr)
        s.setblocking(False)
        try:
            for _ in range(10_000):
                s.send(request)
        except BlockingIOError:
            pass  # as much as fits: the server reads one request at a time
        socks.append(s)
    return socks


def reset_mid_answer(addr: Addr, n: int, request: bytes, rcvbuf: int = 4096) -> int:
    """``n`` clients, one after the other: each sends ``request``, reads the first bytes of the
    answer, then resets the connection (SO_LINGER 0: RST) while the server is still writing.
    How many saw the start of an answer."""
    started = 0
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(10)
        s.connect(addr)
        s.sendall(request)
        if s.recv(64):
            started += 1
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    return started
