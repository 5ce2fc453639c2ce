"""HTTP/1.1 framing for the supervisor's front (supervisor.serve.front): the limits, whether a
buffer holds one whole request (:func:`frame`), and the error answers. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_connections: int = 512
    max_head: int = 16 * 1024
    max_body: int = 64 * 1024
    request_timeout: float = 10.0
    idle_timeout: float = 30.0
    write_timeout: float = 5.0
    workers: int = 4
    control_workers: int = 2
    # requests read whole and waiting for a worker; a connection has at most one in the queue, so
    # this equals max_connections: a burst of every connection at once waits, it is not refused
    queue: int = 512


@dataclass(frozen=True)
class Frame:
    """What :func:`frame` makes of a connection's buffer: ``size`` bytes form one complete
    request (0: not yet), or ``status`` is the error to answer before closing."""

    size: int = 0
    status: int = 0
    reason: str = ""
    expect_continue: bool = False


_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~]+ HTTP/1\.[01]\r?\n")
_LINE_SO_FAR = re.compile(rb"[ -~]*\r?")  # what a request line may start with (garbage fails at once)
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"^content-length[ \t]*:[ \t]*(.*?)[ \t]*\r?$", re.I | re.M)
_TRANSFER_ENCODING = re.compile(rb"^transfer-encoding[ \t]*:", re.I | re.M)
_EXPECT_CONTINUE = re.compile(rb"^expect[ \t]*:[ \t]*100-continue[ \t]*\r?$", re.I | re.M)


def frame(buf: bytes | bytearray, limits: Limits) -> Frame:
    """Is there one whole request at the start of ``buf``, and how long is it? Pure."""
    eol = buf.find(b"\n", 0, limits.max_head)
    if (not _REQUEST_LINE.match(buf, 0, eol + 1) if eol >= 0
            else not _LINE_SO_FAR.fullmatch(buf, 0, min(len(buf), limits.max_head))):
        return Frame(status=400, reason="malformed request line (expected METHOD /path HTTP/1.x)")
    m = _HEAD_END.search(buf, 0, limits.max_head + 4)
    if m is None:
        if len(buf) > limits.max_head:
            return Frame(status=431, reason=f"request head larger than {limits.max_head} bytes")
        return Frame()
    head = bytes(buf[:m.start()])
    if _TRANSFER_ENCODING.search(head):
        return Frame(status=411, reason="send the body with Content-Length (Transfer-Encoding is not supported)")
    lengths = {v.strip() for v in _CONTENT_LENGTH.findall(head)}
    length = 0
    if lengths:
        value = lengths.pop()
        if lengths or not value.isdigit() or len(value) > 18:
            return Frame(status=400, reason="malformed Content-Length")
        length = int(value)
    if length > limits.max_body:
        return Frame(status=413, reason=f"a body of at most {limits.max_body} bytes")
    total = m.end() + length
    if len(buf) < total:
        return Frame(expect_continue=bool(_EXPECT_CONTINUE.search(head)))
    return Frame(size=total)


#: seconds a refused connection is read (and discarded) before it is closed
LINGER = 2.0

_REASONS = {400: "Bad Request", 408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def error_response(status: int, reason: str) -> bytes:
    quoted = reason.replace('"', "'")
    body = f'{{"ok": false, "reason": "{quoted}"}}\n'.encode()
    return (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n").encode() + body
