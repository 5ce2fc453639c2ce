"""What hooks are made of: the :class:`Message` a hook takes and returns, the ``Hook``
type, a loaded hook with its error counts, and the failure the chain reports.

A hook takes a :class:`Message` and returns it (unchanged or changed), several
messages (a list, tuple or generator), or ``None`` (dropped). Hook authors import
``Message`` as ``from shardlog.hooks import Message`` (docs/hooks.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import msgspec


class Message(NamedTuple):
    """One message as a hook sees it. ``ts``: reception time, integer microseconds since
    the epoch (it becomes the record's ``ts``; a hook may not change it: it orders the
    records, see docs/hooks.md). Change the rest with ``msg._replace(...)`` or :meth:`replace`."""

    topic: str
    payload: bytes
    ts: int
    qos: int
    retain: bool

    def replace(self, **changes: Any) -> Message:
        return self._replace(**changes)

    def text(self) -> str:
        """The payload as UTF-8 text (raises UnicodeDecodeError if it is not)."""
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        """The payload parsed as JSON (raises msgspec.DecodeError if it is not JSON)."""
        return msgspec.json.decode(self.payload)

    def with_json(self, value: Any, **changes: Any) -> Message:
        """This message with ``value`` encoded as its JSON payload (and other changes)."""
        return self._replace(payload=msgspec.json.encode(value), **changes)


Hook = Callable[[Message], "Message | Iterable[Message] | None"]


class HookFailure(NamedTuple):
    """The chain could not handle a message: quarantine it with ``reason``."""

    reason: str
    hook: int  # index of the hook at fault


class LoadedHook:
    __slots__ = ("name", "fn", "errors", "logged_at", "unlogged", "timeouts_in_a_row", "suspended_until")

    def __init__(self, name: str, fn: Hook) -> None:
        self.name = name
        self.fn = fn
        self.errors = 0
        self.logged_at = -1e18
        self.unlogged = 0           # errors since the last log line
        self.timeouts_in_a_row = 0
        self.suspended_until = -1e18


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
