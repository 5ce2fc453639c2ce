"""The restart policy, as pure functions of a shard's history and ``now``.

``now`` is a monotonic time in seconds and randomness is injected, so the
whole policy is tested with a fake clock and a fixed "random" number.

- A crash is retried after an exponential backoff: ``backoff_initial`` doubling
  per consecutive crash up to ``backoff_max``, minus up to 20 % jitter (so the
  delay never exceeds the configured one and shards that crash together do not
  restart in lockstep).
- The count of consecutive crashes goes back to zero once the shard has been
  running (heartbeat fresh) for ``healthy_after`` seconds.
- More than ``max_restarts`` crashes within ``window`` seconds mark the shard
  ``failed``; a failed shard is retried every ``failed_retry`` seconds, and a
  crash during such a retry (before it became healthy again) fails it again.
- Exit 78 (configuration error) is never retried: reason "configuration error".
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from shardlog.config.schema import Restart

EX_CONFIG = 78
#: the backoff is shortened by up to this fraction, at random
JITTER = 0.2

Random = Callable[[], float]  # like random.random: a float in [0, 1)


@dataclass
class History:
    """What the policy remembers about one shard (mutable, owned by the main loop)."""

    crashes: list[float] = field(default_factory=list)  # times of crashes inside the window
    consecutive: int = 0   # crashes since the shard was last healthy
    failed: bool = False   # gave up; only healthy running clears it


@dataclass(frozen=True)
class Decision:
    failed: bool
    retry_in: float | None  # seconds until the next start; None: never
    reason: str             # why (for logs and /status)


def backoff_delay(consecutive: int, policy: Restart, rand: Random = random.random) -> float:
    """Delay before restart number ``consecutive`` (1 for the first crash)."""
    exp = min(max(consecutive, 1) - 1, 63)
    base = min(policy.backoff_max, policy.backoff_initial * (2.0 ** exp))
    return base * (1.0 - JITTER * rand())


def backoff_bounds(consecutive: int, policy: Restart) -> tuple[float, float]:
    """The (lowest, highest) delay :func:`backoff_delay` can return."""
    exp = min(max(consecutive, 1) - 1, 63)
    base = min(policy.backoff_max, policy.backoff_initial * (2.0 ** exp))
    return base * (1.0 - JITTER), base


def on_exit(history: History, policy: Restart, now: float, code: int | None,
            rand: Random = random.random) -> Decision:
    """Record an unexpected exit (``code`` None or negative: killed by a signal) and decide."""
    if code == EX_CONFIG:
        history.failed = True
        return Decision(True, None, "configuration error")
    history.crashes = [t for t in history.crashes if now - t < policy.window] + [now]
    if history.failed:
        return Decision(True, policy.failed_retry,
                        f"failed again after a retry; next retry in {policy.failed_retry:g}s")
    if len(history.crashes) > policy.max_restarts:
        history.failed = True
        return Decision(True, policy.failed_retry,
                        f"{len(history.crashes)} exits within {policy.window:g}s "
                        f"(max_restarts {policy.max_restarts}); next retry in {policy.failed_retry:g}s")
    history.consecutive += 1
    delay = backoff_delay(history.consecutive, policy, rand)
    return Decision(False, delay, f"restart {history.consecutive} in {delay:.2f}s")


def is_healthy(running_since: float | None, policy: Restart, now: float) -> bool:
    return running_since is not None and now - running_since >= policy.healthy_after


def note_running(history: History, running_since: float | None, policy: Restart, now: float) -> bool:
    """Reset the backoff once the shard has run healthily long enough; True if it was reset now."""
    if (history.consecutive or history.failed) and is_healthy(running_since, policy, now):
        history.consecutive = 0
        history.failed = False
        return True
    return False
