"""Starting shards: which are due, one at a time with jitter between starts, and the spawn.

A shard is due when it has no process and its ``next_start`` has come. Starts are spread
by ``start_jitter`` (a random part of it after each start), and a shard started by a reload
waits until the shards that reload stops have exited (one branch, one recorder). A spawn
that fails (``OSError``: too many processes, no memory) is a crash like any other.
"""

from __future__ import annotations

import logging

from shardlog.config.schema import SupervisorSettings
from supervisor.arbiter.runtime import Clock, Intent, ShardRuntime, remove_stats, set_state
from supervisor.control.controller import control_path
from supervisor.shards import backoff
from supervisor.shards.process import Spawn, record_argv
from supervisor.shards.states import Event, ShardState

log = logging.getLogger(__name__)


def reload_stops_pending(shards: dict[str, ShardRuntime]) -> bool:
    return any(rt.state is ShardState.STOPPING and rt.intent in (Intent.REMOVE, Intent.REPLACE)
               for rt in shards.values())


def waiting(shards: dict[str, ShardRuntime]) -> list[ShardRuntime]:
    """Shards with a start scheduled that may happen (not held back by a reload's stops)."""
    gated = reload_stops_pending(shards)
    return [rt for rt in shards.values()
            if rt.child is None and rt.next_start is not None and not (gated and rt.after_reload)]


class Starter:
    """Spawns recorder processes; owns the gate that spreads starts out."""

    def __init__(self, spawn: Spawn, env: dict[str, str], parent_pid: int, log_level: str,
                 rand: backoff.Random) -> None:
        self.spawn = spawn
        self.env = env
        self.parent_pid = parent_pid
        self.log_level = log_level
        self.rand = rand
        self.run_dir = ""
        self.gate = 0.0  # no start before this (monotonic)

    def control_path(self, name: str) -> str | None:
        """The control socket of shard ``name``'s recorder (None if the path would be too long)."""
        return control_path(self.run_dir, name)

    def next_due(self, shards: dict[str, ShardRuntime]) -> list[float]:
        """When the waiting shards may start (for the loop's sleep)."""
        return [max(rt.next_start or 0.0, self.gate) for rt in waiting(shards)]

    def start_due(self, shards: dict[str, ShardRuntime], now: float, clock: Clock, map_copy: str,
                  heartbeat: float, settings: SupervisorSettings) -> None:
        due = sorted((rt for rt in waiting(shards) if rt.next_start is not None and rt.next_start <= now),
                     key=lambda rt: rt.next_start or 0.0)
        for rt in due:
            if now < self.gate:
                return
            self.start(rt, now, clock, map_copy, heartbeat, settings.restart)
            self.gate = now + settings.start_jitter * self.rand()

    def start(self, rt: ShardRuntime, now: float, clock: Clock, map_copy: str, heartbeat: float,
              policy: backoff.Restart) -> None:
        remove_stats(rt, FileNotFoundError)
        argv = record_argv(map_copy, rt.name, rt.stats_file, heartbeat, self.parent_pid, self.log_level,
                           self.control_path(rt.name))
        restart = rt.state in (ShardState.BACKOFF, ShardState.FAILED)
        try:
            child = self.spawn(argv, self.env)
        except OSError as exc:
            log.error("cannot start shard %s: %s", rt.name, exc)
            set_state(rt, Event.SPAWN)
            decision = backoff.on_exit(rt.history, policy, now, None, self.rand)
            set_state(rt, Event.GIVE_UP if decision.failed else Event.CRASH)
            rt.next_start = None if decision.retry_in is None else now + decision.retry_in
            rt.reason = f"cannot start: {exc}; {decision.reason}"
            return
        if restart:
            rt.restarts += 1
        set_state(rt, Event.SPAWN)
        rt.child = child
        rt.spawned_mono = now
        rt.spawned_wall = clock.time()
        rt.last_beat = now
        rt.beat_sig = None
        rt.counters = None
        rt.next_start = None
        rt.after_reload = False
        rt.intent = None
        spec = rt.spec
        log.info("started shard %s (pid %d): %s -> %s%s", rt.name, child.pid, spec.shard.prefix or "#",
                 spec.shard.root, f" (restart {rt.restarts})" if restart else "")
