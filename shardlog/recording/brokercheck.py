"""What a broker does differently from what the delivery promise needs, read from its answers.

Pure decisions, no I/O: the recorder feeds them CONNACK flags and properties, SUBACK codes and
its flushes, logs each finding once (a WARNING, one line) and lists it in its stats
(``broker_notes``, shown by the supervisor's /status and ``shardlog status``). docs/brokers.md
says which broker does what and what to configure on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from shardlog.ondisk.segments import LOCK

#: a capped batch: the broker went quiet for this share of batch.max_delay with messages unacked
_QUIET_SHARE = 0.5
#: ... after its messages came as a burst: from the first to the last at most this share of
#: the quiet after them (a stream merely slow spreads its batch over the whole max_delay)
_BURST_SHARE = 0.25
#: ... and sent the next message within this many seconds of our PUBACKs
_PROMPT = 0.005
#: ... this many such flushes in a row with the same count: the broker's in-flight cap
_STREAK = 3
#: a test batch (of a suspected cap, or a re-check of one found) is held this many max_delays
_HOLD = 3
#: a cap found is tested again this often
_RECHECK = 10.0

def recorded_before(branch_root: str) -> bool:
    """For a tree without a session memo (shardlog/recording/sessionmemo.py; recorded by an
    older shardlog): whether this branch's own recorder ran here (its lock file) and recorded
    topics beside it. A topic directory alone says nothing: the catch-all ``#`` shard's branch
    is the root, which holds the other shards' branches."""
    try:
        with os.scandir(branch_root) as it:
            names = [e.name for e in it]
    except OSError:
        return False
    return LOCK in names and any(not n.startswith("+") for n in names)


def connack_notes(*, session_present: bool, expect_session: bool, first: bool, mqtt5: bool,
                  props: Mapping[str, int], asked_expiry: int, client_id: str) -> list[str]:
    """Findings from one CONNACK. ``expect_session``: the broker should have this client id's
    session (a reconnect, or a branch recorded before); ``first``: the process's first CONNACK."""
    notes = []
    if expect_session and not session_present:
        if first:
            notes.append(f"the broker has no session for client id {client_id} although this branch was "
                         "recorded before: messages published while the shard was down are lost, unless "
                         "the session expired (broker.session_expiry) or the broker was reset")
        else:
            notes.append(f"the broker kept no session for client id {client_id} across a reconnect: "
                         "messages published while the shard was disconnected are lost; configure the "
                         "broker to keep persistent sessions (docs/brokers.md)")
    if mqtt5 and "SessionExpiryInterval" in props:
        expiry = props["SessionExpiryInterval"]
        if expiry == 0:
            notes.append("the broker keeps no session after a disconnect (it set session expiry 0): "
                         "messages published while the shard is down are lost")
        elif expiry < asked_expiry:
            notes.append(f"the broker caps the session expiry at {expiry}s (asked {asked_expiry}s): a shard "
                         f"down longer than that loses its queued messages")
    if props.get("MaximumQoS", 1) == 0:
        notes.append("the broker supports QoS 0 only: messages are not acknowledged after their write, "
                     "so a crash can lose them")
    if props.get("RetainAvailable", 1) == 0:
        notes.append("the broker has no retained messages")
    return notes


def suback_note(asked_qos: int, granted: int, topic: str) -> str | None:
    """A subscription granted below the QoS asked for: no acknowledgement after the write."""
    if granted < asked_qos:
        return (f"the broker granted QoS {granted} for {topic} (asked {asked_qos}): its messages are not "
                "acknowledged after their write, so a crash can lose them")
    return None


def window(counts: list[int]) -> int | None:
    """The broker's window, from the counts of the latest prompt capped flushes (oldest
    first): the same N _STREAK times in a row; or, on a loaded machine where a window came
    in two parts and stays split (seen in CI with iotcore: 28, 72, 28, 72 for a cap of 100),
    a, b, a, b: the window is a + b."""
    if len(counts) >= _STREAK and len(set(counts[-_STREAK:])) == 1:
        return counts[-1]
    if len(counts) >= 4:
        a, b, c, d = counts[-4:]
        if a == c and b == d and a != b:
            return a + b
    return None


@dataclass
class InflightProbe:
    """Detects a broker that sends at most N unacknowledged QoS 1 messages (mosquitto's
    max_inflight_messages, RabbitMQ's mqtt.prefetch) where N is below the batch: each batch
    then waits the whole ``max_delay`` for messages that cannot come, capping the shard at
    N / max_delay messages a second. The recorder then flushes every N messages.

    Suspected after consecutive flushes by deadline with exactly N unacknowledged, that came
    as a burst followed by quiet (a stream merely slow spreads its batch over the whole
    max_delay, and each such flush starts the search again), the first of the next batch
    arriving at once after our PUBACKs; the same N (or a window split a, b, a, b) _STREAK
    times. Then proven by a test batch: one batch held _HOLD times as long, free to grow to
    batch_max, must still bring exactly N (the broker holds the rest back; a stream that only
    looked capped, e.g. one message every max_delay, brings more). A cap found is put to the
    same test every _RECHECK seconds, and a test that acknowledges more than it drops it.
    The recorder reads :meth:`step` (messages per batch) and :attr:`delay` (its max_delay)."""

    batch_max: int
    max_delay: float
    cap: int | None = None
    delay: float = 0.0  # the current batch's max_delay (longer for a test batch)
    _seen: list[int] = field(default_factory=list)  # counts of the latest prompt capped flushes
    _acked_at: float = 0.0  # when the previous deadline flush acknowledged
    _candidate: int = 0     # its count, waiting to see how fast the broker follows
    _testing: int | None = None  # the N a test batch runs for
    _test_from: int = 0          # total acknowledged when it began
    _recheck_at: float = 0.0     # when a cap found is tested again

    def __post_init__(self) -> None:
        self.delay = self.max_delay

    def step(self) -> int:
        """How many messages a batch may hold now: the cap, or batch_max (none, or a test)."""
        if self.cap is None or self._testing is not None:
            return self.batch_max
        return self.cap

    def recheck(self, now: float, total_acked: int) -> bool:
        """Begin the test of a cap found if one is due (the caller then lets the next batch
        grow to :meth:`step`); ``total_acked``: the recorder's acknowledgements so far."""
        if self.cap is None or self._testing is not None or now < self._recheck_at:
            return False
        self._begin_test(self.cap, total_acked)
        return True

    def _begin_test(self, n: int, total_acked: int) -> None:
        self._testing, self._test_from = n, total_acked
        self.delay = _HOLD * self.max_delay

    def on_deadline_flush(self, now: float, acked: int, first_msg: float, last_msg: float,
                          total_before: int = 0) -> int | None:
        """After a flush by deadline that acknowledged ``acked`` messages, the first of which
        arrived at ``first_msg`` and the last at ``last_msg`` (same clock as ``now``);
        ``total_before``: the acknowledgements before it. Returns the new :meth:`step` when
        it changes (a test begun, a cap found, kept after a test, or dropped), else None."""
        if self._testing is not None:
            return self._tested(now, acked, total_before)
        if self.cap is not None:
            return None
        seen, n = self._seen, self._candidate
        burst = last_msg - first_msg <= _BURST_SHARE * (now - last_msg)
        if n:
            if first_msg - self._acked_at < _PROMPT:
                seen.append(n)
                del seen[:-max(_STREAK, 4)]  # what window() looks at
            elif not (n > 1 and burst and n in seen[-2:]):
                seen.clear()
            # a late follower of a burst with a count already seen neither counts nor resets:
            # on a loaded machine our reading of the broker's burst misses _PROMPT now and then
        self._candidate = 0
        suspect = window(seen)
        if suspect is not None and suspect < self.batch_max:
            seen.clear()
            self._begin_test(suspect, total_before + acked)
            return self.batch_max
        quiet = now - last_msg >= _QUIET_SHARE * self.max_delay
        if quiet and burst and 0 < acked < self.batch_max:
            self._candidate = acked
            self._acked_at = now
        else:
            seen.clear()  # the stream was merely slow (or still flowing): start again
        return None

    def _tested(self, now: float, acked: int, total_before: int) -> int | None:
        """The verdict of a test batch on ``self._testing``."""
        n = self._testing
        assert n is not None
        self._testing = None
        self.delay = self.max_delay
        self._recheck_at = now + _RECHECK
        # more than n in the test batch, or in flushes by count (at batch_max) during it
        more = acked > n or total_before - self._test_from > n
        if self.cap is None:  # a suspect: found only if the test brought exactly n
            if acked == n and not more:
                self.cap = n
                return n
            return None
        if more:
            self.cap = None
            return self.batch_max
        return self.cap  # still capped (or too few messages to tell): kept, tested again later
