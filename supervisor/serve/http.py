"""The supervisor's HTTP endpoint: ``/status`` (JSON), ``/metrics`` (Prometheus) and the
control API (``POST /control/<op>``, docs/control.md).

Connections are accepted, each request is read whole, within limits, and each answer written by
:mod:`supervisor.serve.front` (one selector thread; slow clients hold no thread); a worker
runs one request through :class:`_Handler` (the stdlib's request parsing) into a buffer. Handlers build their answer
from the last published snapshot and sample (immutable objects read through one
attribute each); they take no lock and do no file or process I/O, so a scrape
never waits on, or slows, the main loop or a recorder. A control request waits in its own
handler thread for the shard that carries it out (supervisor.control.controller).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler

from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# the map's own check of supervisor.listen; status_cli imports it from here
from shardlog.config.checks import parse_listen
from supervisor.serve.front import Conn, Front, Limits, OutBuffer
from supervisor.serve.metrics import make_registry
from supervisor.serve.status import StatusDoc, encode
from supervisor.threads import Threads

log = logging.getLogger(__name__)

#: (op, JSON body, who asked) -> the reply document
ControlFn = Callable[[str, bytes, str], dict]
CONTROL_OPS = ("rotate", "delete", "move", "stop", "start")
LIMITS = Limits()
MAX_BODY = LIMITS.max_body


class _App:
    """What a handler answers from (the ``server`` of a stdlib handler)."""

    def __init__(self, status: Callable[[], StatusDoc], control: ControlFn | None) -> None:
        self.status = status
        self.control = control
        self.registry = make_registry(status)


class _Handler(BaseHTTPRequestHandler):
    """One request, already read whole by the front, answered on its socket."""

    server: _App  # type: ignore[assignment]  # the front passes its _App, no socketserver
    server_version = "shardlog-supervisor"
    protocol_version = "HTTP/1.1"

    def __init__(self, request: bytes, conn: Conn, app: _App) -> None:  # no super(): no socket reads
        self.server = app
        self.client_address = conn.addr
        self.request = self.connection = conn.sock
        self.rfile = io.BytesIO(request)
        self.wfile = OutBuffer(conn.out)  # the front sends it: a handler never blocks on a client
        self.close_connection = True
        self.handle_one_request()

    def handle_expect_100(self) -> bool:
        return True  # the front sent "100 Continue" while the body arrived

    def __getattr__(self, name: str) -> object:
        if name.startswith("do_"):  # any other method: 405, not the stdlib's 501
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self.close_connection = True
        self.send_response(405)
        body = b"method not allowed: GET /status, GET /metrics, POST /control/<op>\n"
        self.send_header("Allow", "GET, POST")
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/status":
                self._send(200, "application/json", encode(self.server.status()))
            elif path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, generate_latest(self.server.registry))
            elif path == "/":
                self._send(200, "text/plain; charset=utf-8",
                           b"shardlog supervisor: /status (JSON), /metrics (Prometheus)\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /status or /metrics\n")
        except Exception:
            log.exception("error serving %s", path)
            self._send(500, "text/plain; charset=utf-8", b"internal error\n")

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        op = path[len("/control/"):] if path.startswith("/control/") else ""
        if op not in CONTROL_OPS or self.server.control is None:
            self._drain()
            self._answer(404, {"ok": False, "reason": f"no such endpoint: POST {path} "
                                                      f"(try /control/{'|'.join(CONTROL_OPS)})"})
            return
        # Only local programs may send commands: never a peer on the network (when listen is
        # 0.0.0.0 for scraping), and never a web page (a browser sends Origin, and cannot send
        # application/json to another origin without a preflight that this server refuses).
        try:
            loopback = ipaddress.ip_address(self.client_address[0].removeprefix("::ffff:")).is_loopback
        except ValueError:
            loopback = False
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if not loopback or self.headers.get("Origin") is not None:
            self._drain()
            self._answer(403, {"ok": False, "reason": "control commands are accepted from local programs only"})
            return
        if ctype != "application/json":
            self._drain()
            self._answer(415, {"ok": False, "reason": "send the command as Content-Type: application/json"})
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > MAX_BODY:
            self.close_connection = True
            self._answer(413 if length and length.isdigit() else 411,
                         {"ok": False, "reason": f"a JSON body with Content-Length up to {MAX_BODY} bytes"})
            return
        body = self.rfile.read(int(length))
        try:
            reply = self.server.control(op, body, f"http {self.client_address[0]}")
        except Exception:
            log.exception("error serving POST %s", path)
            self._answer(500, {"ok": False, "reason": "internal error"})
            return
        self._answer(200 if reply.get("ok") else 400, reply)

    def _drain(self) -> None:
        length = self.headers.get("Content-Length")
        if length and length.isdigit() and int(length) <= MAX_BODY:
            self.rfile.read(int(length))
        else:
            self.close_connection = True

    def _answer(self, code: int, doc: dict) -> None:
        self._send(code, "application/json", json.dumps(doc).encode() + b"\n")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class StatusServer:
    def __init__(self, listen: str, status: Callable[[], StatusDoc], control: ControlFn | None = None,
                 limits: Limits = LIMITS, threads: Threads | None = None) -> None:
        self.listen = listen
        app = _App(status, control)

        def handle(conn: Conn, request: bytes) -> bool:
            return not _Handler(request, conn, app).close_connection

        self.front = Front(parse_listen(listen), handle, limits, threads)

    @property
    def address(self) -> tuple[str, int]:
        return self.front.address

    def start(self) -> StatusServer:
        self.front.start()
        return self

    def stop(self) -> None:
        self.front.stop()


def bind(listen: str, status: Callable[[], StatusDoc], attempts: int = 5, delay: float = 1.0,
         control: ControlFn | None = None, threads: Threads | None = None) -> StatusServer:
    """Bind ``listen``, retrying a few times (a previous supervisor may still be exiting)."""
    for attempt in range(1, attempts + 1):
        try:
            return StatusServer(listen, status, control, threads=threads)
        except OSError as exc:
            if attempt == attempts:
                raise
            log.warning("cannot listen on %s (%s); retrying in %gs", listen, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
