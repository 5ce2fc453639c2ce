"""Stopping one shard's process: asked (SIGTERM), aborted when hung (SIGABRT), killed after
its deadline (SIGKILL), and reported when even SIGKILL does not end it.

Each function acts on one :class:`~supervisor.arbiter.runtime.ShardRuntime` at ``now``
(monotonic seconds); what the loop must do with the shard's table entry afterwards is
returned as an :class:`~supervisor.arbiter.runtime.After`.
"""

from __future__ import annotations

import logging
import signal

from supervisor.arbiter.runtime import After, Intent, ShardRuntime, set_state
from supervisor.shards.process import send
from supervisor.shards.states import PROCESS_STATES, Event, ShardState

log = logging.getLogger(__name__)

#: after SIGABRT, a hung recorder gets this long to print its traceback before SIGKILL
ABORT_GRACE = 2.0
#: during shutdown, give up on a process that survives SIGKILL this long (stuck in the kernel)
UNKILLABLE_GRACE = 5.0
STUCK_REASON = ("survives SIGKILL: blocked in the kernel (a frozen, wedged or hung file system?); "
                "replaced once it exits")

_REASONS = {Intent.SHUTDOWN: "supervisor stopping", Intent.REMOVE: "removed from the map",
            Intent.REPLACE: "changed in the map", Intent.OPERATOR: "stopped by a control command"}


def request_stop(rt: ShardRuntime, intent: Intent, now: float, stop_timeout: float) -> After:
    """SIGTERM the shard's process (SIGKILL at ``now + stop_timeout``), or cancel its pending start."""
    if rt.state is ShardState.STOPPING:
        # already on its way down: the newest reason decides what happens at exit
        # (keeping an earlier SIGABRT's shorter deadline)
        rt.intent = intent
        return After.NOTHING
    if rt.state in PROCESS_STATES and rt.child is not None:
        set_state(rt, Event.STOP)
        rt.intent = intent
        rt.next_start = None
        rt.reason = _REASONS.get(intent)
        log.info("stopping shard %s (pid %d): %s", rt.name, rt.child.pid, rt.reason)
        send(rt.child, signal.SIGTERM)
        send(rt.child, signal.SIGCONT)  # a stopped process must run to see the SIGTERM
        rt.kill_at = now + stop_timeout
        return After.NOTHING
    # no process: cancel whatever start was pending
    set_state(rt, Event.STOP)
    rt.next_start = None
    if intent is Intent.REMOVE:
        return After.FORGET
    if intent is Intent.REPLACE and rt.pending is not None:
        return After.START_PENDING
    return After.NOTHING


def abort_grace(stop_timeout: float) -> float:
    return min(ABORT_GRACE, stop_timeout)


def abort_hung(rt: ShardRuntime, now: float, stop_timeout: float) -> None:
    """No heartbeat: SIGABRT (the recorder prints its traceback), SIGKILL after the grace."""
    assert rt.child is not None
    grace = abort_grace(stop_timeout)
    log.error("shard %s (pid %d) sent no heartbeat for %.1fs: aborting it (SIGABRT, traceback "
              "on stderr), SIGKILL in %gs, then restarting it", rt.name, rt.child.pid, now - rt.last_beat, grace)
    set_state(rt, Event.STOP)
    rt.intent = Intent.HUNG
    rt.reason = "hung: no heartbeat"
    send(rt.child, signal.SIGABRT)
    send(rt.child, signal.SIGCONT)  # a SIGSTOPped process must run to take the SIGABRT
    rt.kill_at = now + grace


def kill_now(rt: ShardRuntime, now: float) -> None:
    """SIGKILL at once (a second SIGINT)."""
    if rt.child is not None:
        send(rt.child, signal.SIGKILL)
        rt.kill_at = None
        rt.killed_at = now


def check_kill(rt: ShardRuntime, now: float, stopping: bool) -> bool:
    """SIGKILL a process past its deadline; say so when it survives SIGKILL. True when the
    supervisor, stopping, gives up waiting for it (the process is left behind)."""
    if rt.child is None:
        return False
    if rt.kill_at is not None and now >= rt.kill_at:
        log.warning("shard %s (pid %d) still running after %s; SIGKILL", rt.name, rt.child.pid,
                    "SIGABRT" if rt.intent is Intent.HUNG else "SIGTERM")
        send(rt.child, signal.SIGKILL)
        rt.kill_at = None
        rt.killed_at = now
    elif rt.killed_at is not None and stopping and now - rt.killed_at > UNKILLABLE_GRACE:
        log.error("shard %s (pid %d) survives SIGKILL (stuck in the kernel?); leaving it",
                  rt.name, rt.child.pid)
        rt.child = None
        return True
    elif (rt.killed_at is not None and now - rt.killed_at > UNKILLABLE_GRACE
          and rt.reason != STUCK_REASON):
        # e.g. a write blocked on a frozen or wedged file system (state D): it dies,
        # and is replaced, only when the kernel lets go; until then, say so
        log.error("shard %s (pid %d) survives SIGKILL for %gs: %s", rt.name, rt.child.pid,
                  UNKILLABLE_GRACE, STUCK_REASON)
        rt.reason = STUCK_REASON
    return False
