"""A shard's own counters, and the stats file the supervisor reads.

The recorder rewrites the stats file (atomically) about once a second from its
main loop; the file's freshness is also its heartbeat: a recorder that stops
making progress stops rewriting it.
"""

from __future__ import annotations

import os

import msgspec


class Counters(msgspec.Struct, kw_only=True):
    shard: str = ""
    pid: int = 0
    messages: int = 0          # records written to topic files
    bytes: int = 0             # bytes appended to topic files
    acked: int = 0             # QoS 1 acknowledgements sent
    redelivered: int = 0       # messages the broker marked DUP (possible duplicates)
    discarded: int = 0         # messages owned by a more specific shard (acked, not written)
    dropped_qos0: int = 0      # QoS 0 messages dropped while the disk could not be written
    topics_open: int = 0       # topic files open right now
    topics_cached: int = 0     # topics with in-memory state right now
    rotations: int = 0
    compressed: int = 0
    deleted_segments: int = 0  # removed by retention
    quarantined: int = 0       # records written to the quarantine file
    hook_errors: int = 0       # messages quarantined because a hook raised, returned garbage or timed out
    hook_dropped: int = 0      # messages a hook dropped (acknowledged, not written)
    retained_skipped: int = 0  # retained messages not recorded (`retained: new|none`; acked, not written)
    repaired: int = 0          # torn tails cut back on reopen
    errors: int = 0            # I/O errors (each logged)
    pending: int = 0           # records received, not yet written
    #: seconds since the oldest change not yet in its +recent.json (0: every one current)
    recent_lag: float = 0.0
    recent_stale: int = 0      # topics whose +recent.json is behind their topic file
    recent_written: int = 0    # +recent.json replacements
    journal_lag_bytes: int | None = None  # journal.enabled: journal bytes not yet in topic files
    connected: bool = False
    subscribed: bool = False   # the broker granted this connection's subscription
    connects: int = 0
    degraded: bool = False
    degraded_reason: str | None = None
    broker_dropped: int | None = None   # mosquitto's $SYS/broker/publish/messages/dropped, if it tells
    session_present: bool | None = None  # the last CONNACK's flag (None: not connected yet)
    sessions_lost: int = 0     # CONNACKs without the session this client id should have had
    inflight_cap: int | None = None  # the broker's cap on unacknowledged messages, if detected
    broker_notes: list[str] = msgspec.field(default_factory=list)  # what this broker does differently
    last_message_ts: int | None = None  # reception time (us) of the newest message
    started_ts: int = 0
    updated_ts: int = 0


_encode = msgspec.json.encode
_decoder = msgspec.json.Decoder(Counters)


def write_stats(path: str, counters: Counters) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, _encode(counters))
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_stats(path: str) -> Counters | None:
    """The last stats a recorder wrote, or None if there are none (yet)."""
    try:
        with open(path, "rb") as f:
            return _decoder.decode(f.read())
    except (OSError, msgspec.DecodeError):
        return None
