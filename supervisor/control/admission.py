"""What the MQTT control topic lets through, before a command is carried out. Pure: every
decision takes ``now`` (monotonic seconds) and touches nothing but its own state.

- :class:`TokenBucket`: at most ``rate`` commands a second on average, ``burst`` at once;
- :class:`Recent`: commands already carried out, by a key made of the command's ``id`` (or
  MQTT 5 correlation data) and its exact bytes, so that a QoS 1 redelivery (the same PUBLISH sent
  again: DUP set, or a publisher's retry after a lost PUBACK) is answered from memory instead of
  being carried out twice;
- :func:`dedup_key`, :func:`too_large`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

#: the largest command accepted (the same as the HTTP API's body limit)
MAX_COMMAND = 64 * 1024
RATE = 10.0      # commands per second, on average ...
BURST = 20       # ... and at once
REMEMBER = 10_000  # commands remembered for duplicate detection ...
REMEMBER_FOR = 3600.0  # ... for this long (s)


class TokenBucket:
    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        """One command may pass now (and is counted), or not."""
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = max(self.last, now)
        if self.tokens >= 1.0 - 1e-9:  # float sums of rate x dt fall just short
            self.tokens -= 1.0
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next command may pass (after a refused :meth:`take`)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


class Recent:
    """Replies of commands carried out, by :func:`dedup_key`, at most ``size`` of them and none
    older than ``ttl``."""

    def __init__(self, size: int = REMEMBER, ttl: float = REMEMBER_FOR) -> None:
        self.size = size
        self.ttl = ttl
        self.entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, key: str, now: float) -> dict[str, Any] | None:
        self._expire(now)
        entry = self.entries.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: str, reply: dict[str, Any], now: float) -> None:
        self.entries[key] = (now, reply)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def _expire(self, now: float) -> None:
        while self.entries:
            key, (t, _) = next(iter(self.entries.items()))
            if now - t <= self.ttl:
                return
            del self.entries[key]


def dedup_key(ident: object, correlation: bytes | None, payload: bytes) -> str | None:
    """The same command sent again has the same key; a command without an ``id`` or correlation
    data has none (it cannot be told from a deliberate repetition, so it is never suppressed)."""
    if not isinstance(ident, (str, int)) and correlation is None:
        return None
    h = hashlib.sha256()
    for part in (repr(ident).encode(), correlation or b"", payload):
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def too_large(payload: bytes) -> str | None:
    if len(payload) > MAX_COMMAND:
        return f"command too large ({len(payload):,} bytes; at most {MAX_COMMAND:,}): not read"
    return None
