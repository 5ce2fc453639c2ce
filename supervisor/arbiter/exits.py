"""What happens when a shard's process has exited: a stop that was asked for, a replacement
for a new spec, or a crash that the restart policy (:mod:`supervisor.shards.backoff`) retries
after a backoff or gives up on."""

from __future__ import annotations

import logging

from shardlog.config.schema import SupervisorSettings
from shardlog.counters import read_stats
from supervisor.arbiter.runtime import After, Intent, ShardRuntime, set_state
from supervisor.shards import backoff
from supervisor.shards.process import ExitInfo
from supervisor.shards.states import Event, ShardState

log = logging.getLogger(__name__)


def on_exit(rt: ShardRuntime, returncode: int, now: float, wall: float, *, stopping: bool,
            settings: SupervisorSettings, rand: backoff.Random) -> After:
    """Record the exit of ``rt``'s process (``returncode`` as Popen gives it) and decide."""
    intent = rt.intent
    context = ""
    if intent is Intent.HUNG:
        context = f"hung (no heartbeat for {settings.heartbeat_timeout:g}s)"
    info = ExitInfo.from_returncode(returncode, wall, context)
    pid = rt.pid
    rt.last_exit = info
    rt.child = None
    rt.running_since = None
    rt.kill_at = rt.killed_at = None
    rt.intent = None
    final = read_stats(rt.stats_file)
    if final is not None and final.pid == pid:
        rt.counters = final
    if stopping or intent in (Intent.SHUTDOWN, Intent.REMOVE, Intent.OPERATOR):
        if rt.state is not ShardState.STOPPING:
            set_state(rt, Event.STOP)
        set_state(rt, Event.EXITED)
        level = logging.INFO if returncode == 0 else logging.WARNING
        log.log(level, "shard %s (pid %s) stopped: %s", rt.name, pid, info.reason)
        rt.reason = "stopped by a control command" if intent is Intent.OPERATOR else None
        return After.FORGET if intent is Intent.REMOVE and not stopping else After.NOTHING
    if intent is Intent.REPLACE:
        set_state(rt, Event.EXITED)
        log.info("shard %s (pid %s) stopped for its new configuration: %s", rt.name, pid, info.reason)
        return After.START_PENDING if rt.pending is not None else After.NOTHING
    if returncode == 0 and intent is None:
        info = ExitInfo(0, None, "exit 0 without being asked to stop", info.ts)
        rt.last_exit = info
    decision = backoff.on_exit(rt.history, settings.restart, now, returncode if returncode >= 0 else None, rand)
    rt.next_start = None if decision.retry_in is None else now + decision.retry_in
    rt.reason = decision.reason
    if decision.failed:
        set_state(rt, Event.GIVE_UP)
        log.error("shard %s (pid %s) FAILED: %s; %s", rt.name, pid, info.reason, decision.reason)
    else:
        set_state(rt, Event.CRASH)
        log.warning("shard %s (pid %s) exited: %s; %s", rt.name, pid, info.reason, decision.reason)
    return After.NOTHING
