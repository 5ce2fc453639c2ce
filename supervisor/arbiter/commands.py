"""The main loop's answer to a stop or start command (a :class:`~supervisor.control.controller.Job`
from the HTTP API or the MQTT topic). Pure: :func:`decide` says what to do and what to reply;
the loop does it."""

from __future__ import annotations

import enum
from typing import Any

from shardlog.control.commands import ALL, Target
from supervisor.arbiter.runtime import ShardRuntime
from supervisor.shards.states import PROCESS_STATES, ShardState


class Action(enum.Enum):
    NONE = "none"          # only reply
    SHUTDOWN = "shutdown"  # stop the supervisor and every shard
    STOP = "stop"          # stop the shard (it stays stopped until started)
    START = "start"        # start the shard afresh


def decide(t: Target, rt: ShardRuntime | None, stopping: bool, names: list[str]) -> tuple[Action, dict[str, Any]]:
    """What the command ``t`` does, given its shard's runtime (None if this loop has no such
    shard), whether the supervisor is stopping and the names of its shards."""
    if t.shard == ALL:
        if t.op == "start":
            return Action.NONE, {"ok": False, "reason": "start: name a shard"}
        if stopping:
            return Action.NONE, {"ok": True, "note": "already stopping"}
        return Action.SHUTDOWN, {"ok": True, "stopping": sorted(names)}
    if rt is None:
        return Action.NONE, {"ok": False, "reason": f"no shard named {t.shard!r} here"}
    if stopping:
        return Action.NONE, {"ok": False, "reason": "the supervisor is stopping"}
    if t.op == "stop":
        if rt.state in PROCESS_STATES and rt.child is not None:
            if rt.state is ShardState.STOPPING:
                return Action.NONE, {"ok": True, "shard": rt.name, "note": "already stopping"}
            return Action.STOP, {"ok": True, "shard": rt.name, "stopping": rt.pid}
        # not running: the stop cancels a pending restart
        return Action.STOP, {"ok": True, "shard": rt.name, "note": f"was not running ({rt.state.value})"}
    if rt.child is not None:
        return Action.NONE, {"ok": True, "shard": rt.name, "note": f"already {rt.state.value}"}
    return Action.START, {"ok": True, "shard": rt.name, "starting": True}
