"""The supervisor's HTTP connections: accept, read each request whole, within limits, hand it to a
small pool of worker threads (supervisor.serve.http answers it into a buffer), then write the
answer.

A thread per connection (``ThreadingHTTPServer``) let every slow or idle client hold a thread for
as long as it liked: 200 slowloris connections were 200 threads, each waiting forever for a header
line. Here one selector thread owns every socket, both while a request arrives and while its answer
is written, so a slow client costs a file descriptor and a buffer, never a worker, and:

- at most ``max_connections`` are open (the next gets ``503`` and is closed at once);
- a request's head (request line and headers) is at most ``max_head`` bytes (``431``), and its
  body at most ``max_body`` (``413``, unread); a body needs a ``Content-Length`` (``411`` for
  ``Transfer-Encoding``); a malformed ``Content-Length`` is ``400``;
- a request must arrive whole within ``request_timeout`` of its first byte (``408``), and an idle
  keep-alive connection is closed after ``idle_timeout``;
- GETs and control POSTs have their own workers (a control command waits up to 30 s for a shard;
  it never holds up ``/status``), each pool with a bounded queue (``503`` when full);
- a worker never writes to a socket: it renders the answer into the connection's buffer and the
  selector thread sends it as the client reads. A client that reads nothing for ``write_timeout``
  is closed. While an answer is being written, the connection's next (pipelined) request is not
  read, so a connection holds one answer at most. (Workers writing with ``sendall`` let four clients
  pipelining ``GET /metrics`` without reading hold all four GET workers: ``/status`` waited ~10 s.)
- a client gone mid-answer (reset, broken pipe) is one DEBUG line, not a traceback.

The framing decision is the pure :func:`supervisor.serve.framing.frame`; the rest is the selector loop.
"""

from __future__ import annotations

import functools
import io
import logging
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable

from supervisor.serve.framing import LINGER, Frame, Limits, error_response, frame
from supervisor.threads import Threads

__all__ = ["LINGER", "Conn", "Frame", "Front", "Handle", "Limits", "OutBuffer", "error_response", "frame"]

log = logging.getLogger(__name__)


class Conn:
    __slots__ = ("sock", "addr", "buf", "started", "idle_since", "continued", "linger_until", "out", "keep",
                 "write_since")

    def __init__(self, sock: socket.socket, addr: tuple, now: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.started: float | None = None  # first byte of the request being received
        self.idle_since = now
        self.continued = False  # "100 Continue" sent for this request
        self.linger_until: float | None = None  # refused: reading what still comes, then closing
        self.out = bytearray()  # the answer a worker rendered, not yet sent
        self.keep = False       # keep the connection open once ``out`` is sent
        self.write_since: float | None = None  # writing ``out``: the last time the client took bytes


class OutBuffer(io.BufferedIOBase):
    """``wfile`` for a handler: every write goes to the connection's buffer (never the socket)."""

    def __init__(self, out: bytearray) -> None:
        self._out = out

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]  # the handler writes bytes only
        self._out += b
        return len(b)


#: (connection, one whole request) -> keep the connection open?
Handle = Callable[[Conn, bytes], bool]


class Front:
    """The listening socket, the selector thread and the worker pools."""

    def __init__(self, address: tuple[str, int], handle: Handle, limits: Limits = Limits(),
                 threads: Threads | None = None) -> None:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        # "[::]:PORT" takes IPv4 too, as the stdlib server's socket did (create_server sets V6ONLY)
        dual = family == socket.AF_INET6 and address[0] == "::" and socket.has_dualstack_ipv6()
        self.listener = socket.create_server(address, family=family, backlog=1024, dualstack_ipv6=dual)
        self.listener.setblocking(False)
        self.handle = handle
        self.limits = limits
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.listener, selectors.EVENT_READ, None)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.sel.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.returned: queue.SimpleQueue[Conn] = queue.SimpleQueue()
        self.conns: set[Conn] = set()  # every open connection, reading or being handled
        self.lock = threading.Lock()   # guards conns (the selector thread and the workers)
        self.stopping = threading.Event()
        self.accept_paused_until: float | None = None
        self.pools = {"get": queue.Queue[tuple[Conn, bytes] | None](limits.queue),
                      "control": queue.Queue[tuple[Conn, bytes] | None](limits.queue)}
        self.registry = threads if threads is not None else Threads()
        self.threads: list[threading.Thread] = []

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.listener.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> Front:
        """The selector thread and the workers, each restarted if it dies (supervisor.threads)."""
        self.threads = [self.registry.start("shardlog-http", self._loop, self.stopping)]
        for pool, n in (("get", self.limits.workers), ("control", self.limits.control_workers)):
            work = functools.partial(self._work, self.pools[pool])
            self.threads += [self.registry.start(f"shardlog-http-{pool}-{i}", work, self.stopping)
                             for i in range(n)]
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._wake()
        for q in self.pools.values():
            for _ in range(self.limits.workers + self.limits.control_workers):
                try:
                    q.put_nowait(None)
                except queue.Full:
                    break
        self.threads[0].join(5)
        with self.lock:
            for c in list(self.conns):
                self._close(c)
        self.listener.close()

    def open_connections(self) -> int:
        return len(self.conns)

    # -- the selector thread ------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        next_sweep = time.monotonic()
        while not self.stopping.is_set():
            for key, mask in self.sel.select(timeout=0.25):
                if key.data is None:
                    self._accept()
                elif key.data == "wake":
                    self._returned()
                else:
                    self._event(key.data, mask)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 0.25
        self.sel.close()

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: stop accepting for a moment, keep serving
                log.warning("http: cannot accept a connection (%s); pausing accept for 0.5s", exc)
                self.sel.unregister(self.listener)
                self.accept_paused_until = time.monotonic() + 0.5
                return
            sock.setblocking(False)
            if len(self.conns) >= self.limits.max_connections:
                self._refuse(sock, 503, f"too many connections (at most {self.limits.max_connections})")
                continue
            c = Conn(sock, addr, time.monotonic())
            with self.lock:
                self.conns.add(c)
            self.sel.register(sock, selectors.EVENT_READ, c)

    def _refuse(self, sock: socket.socket, status: int, reason: str) -> None:
        try:
            sock.send(error_response(status, reason))  # non-blocking: what fits, then close
        except OSError:
            pass
        sock.close()

    def _event(self, c: Conn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._write(c)
            else:
                self._read(c)
        except Exception:  # one connection's trouble must not end the selector
            log.exception("http: %s: unexpected error; connection closed", c.addr[0])
            self._drop(c)

    def _read(self, c: Conn) -> None:
        try:
            data = c.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(c)
            return
        if c.linger_until is not None:
            return  # discarded: the client is still sending what was refused
        if c.started is None:
            c.started = time.monotonic()
        c.buf += data
        self._advance(c)

    def _advance(self, c: Conn) -> None:
        """Dispatch the request in ``c.buf`` if it is whole, refuse it if it cannot be."""
        f = frame(c.buf, self.limits)
        if f.status:
            self._drop(c, f.status, f.reason)
        elif f.size:
            request = bytes(c.buf[:f.size])
            del c.buf[:f.size]
            pool = self.pools["control" if request.startswith(b"POST ") else "get"]
            self.sel.unregister(c.sock)
            try:
                pool.put_nowait((c, request))
            except queue.Full:
                self._forget(c)
                self._refuse(c.sock, 503, "too many requests waiting")
        elif f.expect_continue and not c.continued:
            c.continued = True
            try:
                c.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                pass
        elif len(c.buf) > self.limits.max_head + self.limits.max_body + 4:
            self._drop(c, 413, "request too large")  # pragma: no cover - frame() refuses first

    def _returned(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                c = self.returned.get_nowait()
            except queue.Empty:
                return
            if self.stopping.is_set():
                self._drop(c)
                continue
            c.write_since = time.monotonic()
            self.sel.register(c.sock, selectors.EVENT_WRITE, c)
            self._write(c)

    def _write(self, c: Conn) -> None:
        """Send what the client takes of ``c.out`` now; once all is sent, read the next request
        (or close)."""
        try:
            while c.out:
                n = c.sock.send(c.out)
                del c.out[:n]
                c.write_since = time.monotonic()
        except (BlockingIOError, InterruptedError):
            return  # the rest when the socket is writable again
        except OSError as exc:  # reset, broken pipe: the client went away mid-answer
            log.debug("http: %s went away mid-answer (%s)", c.addr[0], exc.strerror or exc)
            self._drop(c)
            return
        c.write_since = None
        if not c.keep or self.stopping.is_set():
            self._drop(c)
            return
        now = time.monotonic()
        c.started = now if c.buf else None  # pipelined bytes start the next request's clock
        c.idle_since = now
        c.continued = False
        self.sel.modify(c.sock, selectors.EVENT_READ, c)
        if c.buf:
            self._advance(c)

    def _sweep(self, now: float) -> None:
        if self.accept_paused_until is not None and now >= self.accept_paused_until:
            self.accept_paused_until = None
            self.sel.register(self.listener, selectors.EVENT_READ, None)
        for key in list(self.sel.get_map().values()):
            c = key.data
            if not isinstance(c, Conn):
                continue
            if c.write_since is not None:
                if now - c.write_since > self.limits.write_timeout:
                    log.debug("http: %s read none of its answer for %gs; closed", c.addr[0], self.limits.write_timeout)
                    self._drop(c)
            elif c.linger_until is not None:
                if now > c.linger_until:
                    self._drop(c)
            elif c.started is not None and now - c.started > self.limits.request_timeout:
                self._drop(c, 408, f"the request did not arrive within {self.limits.request_timeout:g}s")
            elif c.started is None and now - c.idle_since > self.limits.idle_timeout:
                self._drop(c)

    def _drop(self, c: Conn, status: int = 0, reason: str = "") -> None:
        """Close ``c``; with a status, answer it first and linger: a close with unread bytes would
        reset the connection and the client would never see the answer (nginx's lingering_close)."""
        if status and c.linger_until is None:
            c.linger_until = time.monotonic() + LINGER
            c.buf = bytearray()
            try:
                c.sock.send(error_response(status, reason))
                c.sock.shutdown(socket.SHUT_WR)
                return
            except OSError:
                pass
        try:
            self.sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        self._forget(c)
        c.sock.close()

    def _forget(self, c: Conn) -> None:
        with self.lock:
            self.conns.discard(c)

    def _close(self, c: Conn) -> None:
        self.conns.discard(c)
        try:
            c.sock.close()
        except OSError:
            pass

    # -- the workers ----------------------------------------------------------------------------

    def _work(self, q: queue.Queue[tuple[Conn, bytes] | None]) -> None:
        """Answer requests into their connection's buffer; the selector thread sends it."""
        while True:
            item = q.get()
            if item is None or self.stopping.is_set():
                return
            c, request = item
            c.keep = False
            try:
                c.keep = self.handle(c, request)
            except Exception:  # a handler bug: logged, the connection closed
                log.exception("http: %s: error answering a request", c.addr[0])
                c.out.clear()
            self.returned.put(c)
            self._wake()
