"""What a topic routes to, besides a place to write it: the kinds the recorder's one
per-message path tells apart (pure values, no I/O).

``Recorder.routes`` maps a topic's bytes to its sink's target (a
:class:`shardlog.writing.topic_state.TopicState`, or a journal key), or to a :class:`Skip`.
A topic that cannot be stored is :class:`Unstorable` (not cached: each message of it is
quarantined with the reason).
"""

from __future__ import annotations

import enum


class Skip(enum.Enum):
    """Topics the shard receives but does not record."""

    #: owned by a more specific shard, or a control topic: acknowledged, counted ``discarded``
    DISCARD = "discard"
    #: mosquitto's dropped-messages counter ($SYS): read into ``broker_dropped``, not recorded
    BROKER_DROPPED = "broker-dropped"


class Unstorable:
    """A topic no file can hold (invalid UTF-8, a level too long, ...): its messages are
    quarantined with ``reason``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"Unstorable({self.reason!r})"
