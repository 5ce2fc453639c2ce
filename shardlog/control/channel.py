"""The recorder's end of the control channel: an ``AF_UNIX`` datagram socket.

The supervisor sends each request as one JSON datagram to the socket at the path given
by ``shardlog record --control PATH`` (in the supervisor's private run directory, mode
0600); the reply is one JSON datagram back to the sender. The recorder reads it without
blocking, between batches (shardlog/control/operations.py).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

import msgspec

log = logging.getLogger(__name__)

_MAX_DATAGRAM = 65536


_MAX_DATAGRAM = 65536


class ControlSocket:
    """The recorder's end of the control channel."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.unlink(path)  # left by a previous run of this shard
        except FileNotFoundError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        os.chmod(path, 0o600)
        self.sock.setblocking(False)

    def receive(self) -> tuple[bytes, Any] | None:
        try:
            return self.sock.recvfrom(_MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return None

    def reply(self, addr: Any, obj: dict[str, Any]) -> None:
        if not addr:
            return  # an unbound sender cannot be answered
        try:
            self.sock.sendto(msgspec.json.encode(obj), addr)
        except OSError as exc:  # the sender gave up waiting
            log.info("cannot answer a control request: %s", exc)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
