"""One shard as the main loop sees it, and the few words the loop's pieces share.

:class:`ShardRuntime` is mutable and only the main loop touches it; every change of its
state goes through :func:`set_state` (that is, :func:`supervisor.shards.states.transition`).
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from shardlog.counters import Counters
from supervisor.shards import backoff
from supervisor.shards.process import Child, ExitInfo
from supervisor.shards.shardmap import ShardSpec
from supervisor.shards.states import Event, ShardState, transition

log = logging.getLogger(__name__)


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    monotonic = staticmethod(time.monotonic)
    time = staticmethod(time.time)


class Intent(enum.Enum):
    """Why a shard is being stopped: what happens when its process has exited."""

    SHUTDOWN = "shutdown"  # the supervisor is stopping
    REMOVE = "remove"      # gone from the map (SIGHUP)
    REPLACE = "replace"    # changed in the map (SIGHUP): start it again with the new spec
    HUNG = "hung"          # heartbeat timeout: a crash, restarted with backoff
    OPERATOR = "operator"  # a stop command (shardlog stop SHARD): stays stopped until started


class After(enum.Enum):
    """What the loop does with a shard once a stop request or an exit has been handled."""

    NOTHING = "nothing"
    FORGET = "forget"                # drop it from the loop's table (removed from the map)
    START_PENDING = "start_pending"  # start it again with its pending (new) spec


@dataclass
class ShardRuntime:
    """One shard as the main loop sees it (mutable; only the main loop touches it)."""

    spec: ShardSpec
    stats_file: str
    state: ShardState = ShardState.STOPPED
    child: Child | None = None
    spawned_mono: float | None = None
    spawned_wall: float | None = None
    running_since: float | None = None
    last_beat: float = 0.0
    beat_sig: tuple[int, int, int] | None = None
    counters: Counters | None = None
    restarts: int = 0
    history: backoff.History = field(default_factory=backoff.History)
    next_start: float | None = None
    reason: str | None = None
    last_exit: ExitInfo | None = None
    intent: Intent | None = None
    kill_at: float | None = None
    killed_at: float | None = None
    pending: ShardSpec | None = None
    after_reload: bool = False  # started by a reload: wait until that reload's stops are done

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None


def set_state(rt: ShardRuntime, event: Event) -> None:
    new = transition(rt.state, event)
    if new is not rt.state:
        log.debug("shard %s: %s -> %s (%s)", rt.name, rt.state.value, new.value, event.value)
    rt.state = new


def fresh_start(rt: ShardRuntime, now: float) -> None:
    """Start ``rt`` as new (a reload, a start command): no backoff history, start it now."""
    rt.history = backoff.History()
    rt.reason = None
    rt.next_start = now
    rt.after_reload = True


def remove_stats(rt: ShardRuntime, ignore: type[OSError] = OSError) -> None:
    """Delete the shard's stats file (and its temporary), before a start or once forgotten."""
    for path in (rt.stats_file, rt.stats_file + ".tmp"):
        try:
            os.unlink(path)
        except ignore:
            pass
