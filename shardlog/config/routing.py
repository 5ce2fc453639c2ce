"""Which shard owns a topic: the longest matching prefix wins.

A prefix ``chat`` owns topic ``chat`` and every topic below it; ``""`` (written
``#`` in the shard map) is the catch-all. ``$``-topics belong only to a shard whose
prefix starts with ``$`` (MQTT never delivers them to a ``#`` subscription anyway).
"""

from __future__ import annotations

from collections.abc import Iterable


class Router:
    """Maps topics to the owner's key (a shard name) by longest prefix. Pure."""

    def __init__(self, prefixes: Iterable[tuple[str, str]]) -> None:
        """``prefixes``: (branch, owner) pairs; branch ``""`` is the catch-all."""
        self._owners: dict[str, str] = {}
        for branch, owner in prefixes:
            if branch in self._owners:
                raise ValueError(f"prefix {branch!r} given twice")
            self._owners[branch] = owner

    def owner(self, topic: str) -> str | None:
        owners = self._owners
        candidate = topic
        while True:
            found = owners.get(candidate)
            if found is not None and candidate:
                return found
            cut = candidate.rfind("/")
            if cut < 0:
                break
            candidate = candidate[:cut]
        if topic.startswith("$"):
            return None
        return owners.get("")


def subscription(branch: str) -> str:
    """The MQTT filter a shard subscribes to: ``chat/#`` also matches ``chat`` itself."""
    return f"{branch}/#" if branch else "#"
