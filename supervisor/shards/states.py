"""Shard states and the one table of transitions between them.

Modelled on supervisord's ``states.py``: the states are an Enum, and every
change of a shard's state goes through :func:`transition`, which looks the
(state, event) pair up in :data:`TRANSITIONS` and refuses anything not listed.
Which event happens (a crash that is retried, or one that gives up) is decided
by the restart policy in :mod:`supervisor.shards.backoff`; this module only says where
each event leads.

``degraded`` is not a state of the machine: ``/status`` reports a *running*
shard as ``degraded`` when its own counters say so (disk full or read-only).
"""

from __future__ import annotations

import enum


class ShardState(enum.StrEnum):
    STARTING = "starting"  # process spawned; no heartbeat from it yet
    RUNNING = "running"    # its heartbeat (stats file) is fresh
    BACKOFF = "backoff"    # exited unexpectedly; waiting before the next start
    STOPPING = "stopping"  # asked to exit (SIGTERM, or SIGABRT/SIGKILL when hung)
    STOPPED = "stopped"    # not running, on purpose
    FAILED = "failed"      # gave up: too many restarts (retried slowly) or exit 78 (never)


#: reported in /status instead of ``running`` when the shard's counters say degraded
DEGRADED = "degraded"

#: every state name /status may show
REPORTED_STATES = tuple(s.value for s in ShardState) + (DEGRADED,)


class Event(enum.StrEnum):
    SPAWN = "spawn"        # a process was started for the shard
    BEAT = "beat"          # the first heartbeat of that process arrived
    STOP = "stop"          # the supervisor wants the shard down (shutdown, reload, hang)
    CRASH = "crash"        # the process exited and will be restarted after a backoff
    GIVE_UP = "give_up"    # the process exited and the policy gives up (failed)
    EXITED = "exited"      # the process exited after being asked to stop


S, E = ShardState, Event

TRANSITIONS: dict[tuple[ShardState, Event], ShardState] = {
    (S.STOPPED, E.SPAWN): S.STARTING,
    (S.BACKOFF, E.SPAWN): S.STARTING,
    (S.FAILED, E.SPAWN): S.STARTING,     # the slow retry (never after exit 78)

    (S.STARTING, E.BEAT): S.RUNNING,

    (S.STARTING, E.STOP): S.STOPPING,
    (S.RUNNING, E.STOP): S.STOPPING,
    (S.BACKOFF, E.STOP): S.STOPPED,      # nothing to kill: cancel the pending start
    (S.FAILED, E.STOP): S.STOPPED,
    (S.STOPPED, E.STOP): S.STOPPED,

    (S.STARTING, E.CRASH): S.BACKOFF,
    (S.RUNNING, E.CRASH): S.BACKOFF,
    (S.STOPPING, E.CRASH): S.BACKOFF,    # killed because it hung: a crash like any other

    (S.STARTING, E.GIVE_UP): S.FAILED,
    (S.RUNNING, E.GIVE_UP): S.FAILED,
    (S.STOPPING, E.GIVE_UP): S.FAILED,

    (S.STOPPING, E.EXITED): S.STOPPED,
}

del S, E

#: states in which the shard has a live process
PROCESS_STATES = frozenset({ShardState.STARTING, ShardState.RUNNING, ShardState.STOPPING})


class InvalidTransition(RuntimeError):
    pass


def transition(state: ShardState, event: Event) -> ShardState:
    """The state ``event`` leads to from ``state``; InvalidTransition if it may not happen."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransition(f"no transition from {state.value} on {event.value}") from None
