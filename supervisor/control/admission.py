"""What the MQTT control topic lets through, before a command is carried out. Pure: every
decision takes ``now`` (monotonic seconds) and touches nothing but its own state.

- :class:`TokenBucket`: at most ``rate`` commands a second on average, ``burst`` at once;
- :class:`Recent`: commands already carried out, by a key made of the command's ``id`` (or
  MQTT 5 correlation data) and its exact bytes, so that a QoS 1 redelivery (the same PUBLISH sent
  again: DUP set, or a publisher's retry after a lost PUBACK) is answered from memory instead of
  being carried out twice;
- :class:`Refusals`: what was refused before it ran, counted by kind and logged as one line per
  interval (a flood of 3,000 commands is a few lines, not 3,000);
- :func:`dedup_key`, :func:`too_large`, :func:`response_topic_problem` (a reply must go to a topic
  it can be published to, and never to a control topic: it would come back as a command).
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from typing import Any

from shardlog.topics import MAX_TOPIC_BYTES

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


#: refusal kinds (the counters of /status ``supervisor.mqtt_control``)
KINDS = ("too_large", "rate_limited", "retained", "response_topic", "queue_full")
_LABEL = {"too_large": "too large", "rate_limited": "rate limited", "retained": "retained",
          "response_topic": "bad response topic", "queue_full": "queue full"}


class Refusals:
    """Refusals before a command runs, by kind: ``totals`` since the start, and what is logged.
    The first refusal after a quiet interval gets a line of its own (:meth:`add` says so); the
    ones after it within ``interval`` are summed into one line (:meth:`due`)."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.totals = dict.fromkeys(KINDS, 0)
        self.pending: dict[str, int] = {}
        self.logged = float("-inf")

    def add(self, kind: str, now: float) -> bool:
        """Count one refusal of ``kind``; True when it is to be logged on its own line now."""
        self.totals[kind] = self.totals.get(kind, 0) + 1
        if not self.pending and now - self.logged >= self.interval:
            self.logged = now
            return True
        self.pending[kind] = self.pending.get(kind, 0) + 1
        return False

    def due(self, now: float) -> str | None:
        """The summary line of the refusals not logged yet, once ``interval`` has passed since the
        last line (and they are then forgotten); else None."""
        if not self.pending or now - self.logged < self.interval:
            return None
        n = sum(self.pending.values())
        parts = ", ".join(f"{v:,} {_LABEL.get(k, k)}" for k, v in sorted(self.pending.items(), key=lambda kv: -kv[1]))
        since = now - self.logged
        self.pending, self.logged = {}, now
        return (f"{n:,} more commands refused in the last {since:.1f}s ({parts}); "
                f"{sum(self.totals.values()):,} refused since the start")


def is_control_topic(topic: str, template: str) -> bool:
    """``topic`` is the control topic of some host (``template`` with ``{host}`` as any one level's
    text): a message published there is read as a command by a supervisor."""
    rx = re.escape(template).replace(re.escape("{host}"), "[^/]+")
    return re.fullmatch(rx, topic, re.S) is not None


def response_topic_problem(topic: str, template: str) -> str | None:
    """Why a reply cannot be published to ``topic`` (an MQTT 5 response topic, or the reply
    topic), or None. Pure."""
    if topic == "":
        return "empty"
    if "+" in topic or "#" in topic:
        return f"{topic[:200]!r} contains a wildcard ('+' or '#'): a reply needs a topic name"
    if "\x00" in topic:
        return "contains NUL"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return "not valid UTF-8"
    if size > MAX_TOPIC_BYTES:
        return f"{size:,} bytes, longer than an MQTT topic may be"
    if is_control_topic(topic, template):
        return f"{topic!r} is a control topic: the reply would come back as a command"
    return None
