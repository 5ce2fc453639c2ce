"""Hooks: user callables a shard applies to each message before it is stored (docs/hooks.md).

Hook authors import :class:`Message` from here: ``from shardlog.hooks import Message``.
"""

from shardlog.hooks.message import Hook, Message

__all__ = ["Hook", "Message"]
