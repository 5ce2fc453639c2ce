"""Hooks for bench/hotpath.py --sides hook (loaded through hooks_path: this directory)."""

from shardlog.hooks import Message


def same(msg: Message) -> Message:
    """The trivial hook: the message unchanged (what the hook machinery alone costs)."""
    return msg
