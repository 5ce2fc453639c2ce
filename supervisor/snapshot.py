"""What the main loop publishes for the other threads to read.

The main loop builds a new :class:`Snapshot` (immutable) at the end of every
step and replaces the arbiter's ``snapshot`` attribute with it: a single
reference assignment, atomic in CPython. The HTTP and sampler threads only
ever read that attribute, so no lock is shared between them and the main loop.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardlog.counters import Counters
from supervisor.shards.process import ExitInfo


@dataclass(frozen=True)
class ShardView:
    name: str
    state: str                 # a ShardState value, or "degraded"
    pid: int | None
    spawned_mono: float | None  # monotonic time the current process was started
    spawned_wall: float | None
    running_mono: float | None  # monotonic time it became running
    last_beat_mono: float | None
    restarts: int
    last_exit: ExitInfo | None
    reason: str | None         # why it is in backoff / failed / stopping
    next_start_mono: float | None
    prefix: str
    root: str
    host: str | None
    client_id: str
    counters: Counters | None  # the last counters its current (or last) process wrote


@dataclass(frozen=True)
class BrokerView:
    """The embedded broker (broker.embedded: true)."""

    listen: str
    state: str                 # starting, running, backoff, stopping, stopped
    pid: int | None
    spawned_mono: float | None
    restarts: int
    last_exit: ExitInfo | None


@dataclass(frozen=True)
class Snapshot:
    pid: int
    map_path: str
    host: str | None
    started_wall: float
    started_mono: float
    mono: float                # when this snapshot was taken
    ready: bool
    stopping: bool
    reloads: int
    shards: tuple[ShardView, ...]
    broker: BrokerView | None = None  # the embedded broker, if the map has one


EMPTY = Snapshot(pid=0, map_path="", host=None, started_wall=0.0, started_mono=0.0, mono=0.0,
                 ready=False, stopping=False, reloads=0, shards=())
