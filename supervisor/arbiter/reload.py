"""SIGHUP: read the shard map again. What it changes is :func:`supervisor.shards.shardmap.diff`
and the loop applies it (stop the removed, replace the changed, add the new, leave the rest);
a few settings apply only when the supervisor restarts, and a reload says so."""

from __future__ import annotations

import logging

from shardlog.config.load import load_map, shards_for_host
from shardlog.config.schema import Shard, ShardMap

log = logging.getLogger(__name__)


def load(map_path: str, host: str | None) -> tuple[ShardMap, list[Shard]]:
    """The new map and this host's shards in it; ConfigError if it is bad (the old one stays)."""
    new = load_map(map_path)
    return new, shards_for_host(new, host)



def warn_restart_only(old: ShardMap, new: ShardMap) -> None:
    """Settings a reload cannot apply: said in the log, applied when the supervisor restarts."""
    if (new.broker.embedded, new.broker.port, new.broker.embedded_port_311) != (
            old.broker.embedded, old.broker.port, old.broker.embedded_port_311):
        log.warning("the embedded broker's settings changed; they apply when the supervisor restarts")
    if new.supervisor.listen != old.supervisor.listen:
        log.warning("supervisor.listen changed to %s; it applies when the supervisor restarts "
                    "(still serving %s)", new.supervisor.listen, old.supervisor.listen)
