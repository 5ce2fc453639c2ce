"""What the main loop tells the world at the end of every step: the :class:`Snapshot` the HTTP,
sampler and control threads read, and systemd's READY/STATUS/WATCHDOG (:mod:`sdnotify`).

``degraded`` is reported instead of ``running`` when the shard's own counters say so.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from supervisor.arbiter.runtime import ShardRuntime
from supervisor.arbiter.sdnotify import Notifier
from supervisor.broker.supervised import EmbeddedBroker
from supervisor.shards.states import DEGRADED, ShardState
from supervisor.snapshot import BrokerView, ShardView

log = logging.getLogger(__name__)


def reported_state(rt: ShardRuntime) -> str:
    if rt.state is ShardState.RUNNING and rt.counters is not None and rt.counters.degraded:
        return DEGRADED
    return rt.state.value


def status_line(shards: Iterable[ShardRuntime]) -> str:
    """One line for systemd's STATUS= and the log: how many shards are in which state."""
    shards = list(shards)
    counts: dict[str, int] = {}
    for rt in shards:
        st = reported_state(rt)
        counts[st] = counts.get(st, 0) + 1
    parts = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()))
    failed = [rt.name for rt in shards if rt.state is ShardState.FAILED]
    line = f"{len(shards)} shard(s): {parts or 'none'}"
    if failed:
        line += f"; FAILED: {', '.join(sorted(failed))}"
    return line


def all_up(shards: Iterable[ShardRuntime]) -> bool:
    """Every shard subscribed (or given up on, so one bad shard cannot hold the rest hostage)."""
    return all((rt.state is ShardState.RUNNING and rt.counters is not None and rt.counters.subscribed)
               or rt.state is ShardState.FAILED for rt in shards)


def shard_view(rt: ShardRuntime) -> ShardView:
    shard = rt.spec.shard
    live = rt.child is not None
    return ShardView(
        name=rt.name, state=reported_state(rt), pid=rt.pid,
        spawned_mono=rt.spawned_mono if live else None, spawned_wall=rt.spawned_wall if live else None,
        running_mono=rt.running_since, last_beat_mono=rt.last_beat if live else None,
        restarts=rt.restarts, last_exit=rt.last_exit, reason=rt.reason,
        next_start_mono=rt.next_start, prefix=shard.prefix, root=shard.root, host=shard.host,
        client_id=f"{rt.spec.broker.client_id_prefix}{shard.name}", counters=rt.counters)


def broker_view(b: EmbeddedBroker | None) -> BrokerView | None:
    if b is None:
        return None
    return BrokerView(listen=b.listen, state=b.state, pid=b.pid,
                      spawned_mono=b.started_at if b.child is not None else None,
                      restarts=b.restarts, last_exit=b.last_exit)


class Announcer:
    """systemd's view: READY=1 once every shard is up, STATUS= when the status line changes,
    WATCHDOG=1 at half the watchdog interval."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.ready = False
        self.last_status = ""
        self.next_watchdog = 0.0

    def next_due(self) -> float | None:
        return self.next_watchdog if self.notifier.watchdog_interval else None

    def tick(self, shards: list[ShardRuntime], stopping: bool, now: float) -> None:
        if not self.ready and not stopping and all_up(shards):
            self.ready = True
            line = status_line(shards)
            log.info("ready: %s", line)
            self.notifier.ready(line)
            self.last_status = line
        if self.notifier.enabled:
            line = status_line(shards)
            if line != self.last_status:
                self.last_status = line
                self.notifier.status(line)
            if self.notifier.watchdog_interval and now >= self.next_watchdog:
                self.notifier.watchdog()
                self.next_watchdog = now + self.notifier.watchdog_interval
