"""Heartbeats: a recorder rewrites its stats file every ``heartbeat`` seconds; the loop notices
a new one by the file's (inode, mtime, size), reads its counters, and calls a shard hung
when none came within the timeout (plus, while it starts, the time it may wait for the branch
lock)."""

from __future__ import annotations

import logging
import os

from shardlog.counters import read_stats
from supervisor.arbiter.runtime import ShardRuntime, set_state
from supervisor.shards.states import Event, ShardState

log = logging.getLogger(__name__)


def beat_interval(heartbeat_timeout: float) -> float:
    """How often recorders rewrite their stats file: a fifth of the timeout, at most 1 s."""
    return max(0.05, min(1.0, heartbeat_timeout / 5))


def check_heartbeat(rt: ShardRuntime, now: float, heartbeat_timeout: float) -> bool:
    """Take in a new heartbeat of ``rt``'s process, if any; True if the process is hung."""
    try:
        st = os.stat(rt.stats_file)
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        sig = None
    if sig is not None and sig != rt.beat_sig:
        rt.beat_sig = sig
        counters = read_stats(rt.stats_file)
        if counters is not None and counters.pid == rt.pid:
            rt.last_beat = now
            rt.counters = counters
            if rt.state is ShardState.STARTING:
                set_state(rt, Event.BEAT)
                rt.running_since = now
                rt.reason = None
                log.info("shard %s (pid %s) running", rt.name, rt.pid)
    if rt.state not in (ShardState.STARTING, ShardState.RUNNING):
        return False
    limit = heartbeat_timeout
    if rt.state is ShardState.STARTING:
        limit += rt.spec.shard.lock_wait  # it may wait that long for the branch lock
    return now - rt.last_beat > limit
