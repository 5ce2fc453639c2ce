"""The supervisor's view of the shard map: what each shard runs with, what a
reload changes, and the frozen copy of the map its recorders read.

Two things here go beyond comparing ``Shard`` structs:

- A shard's recorder also depends on the prefixes nested below its own (on the
  same broker): it discards, and acknowledges, the topics those shards own. So
  adding or removing a nested shard changes the shard it is nested in, which is
  restarted too; otherwise both would write the nested branch.
- Recorders never read the operator's map file directly. The supervisor writes
  the map it loaded (validated, ``${VAR}`` expanded, roots absolute) into its
  run directory and passes that copy, so a shard restarted after a crash runs
  with the same configuration as its siblings even if the file was edited
  since; edits apply on SIGHUP only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import msgspec
import yaml

from shardlog.config.load import load_map
from shardlog.config.schema import Broker, ConfigError, Shard, ShardMap

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSpec:
    """Everything that decides how one shard's recorder behaves."""

    shard: Shard
    broker: Broker
    nested: tuple[str, ...]  # branches of more specific shards below this one (same broker)

    @property
    def name(self) -> str:
        return self.shard.name


def _below(branch: str, parent: str) -> bool:
    if parent == "":
        return branch != "" and not branch.startswith("$")
    return branch.startswith(parent + "/")


def specs(smap: ShardMap, shards: list[Shard]) -> dict[str, ShardSpec]:
    """name -> spec for the given shards (this host's) of ``smap``."""
    out = {}
    for shard in shards:
        broker = smap.broker_of(shard)
        nested = tuple(sorted(s.branch for s in smap.shards
                              if s is not shard and smap.broker_of(s) == broker
                              and _below(s.branch, shard.branch)))
        out[shard.name] = ShardSpec(shard, broker, nested)
    return out


@dataclass(frozen=True)
class Plan:
    added: list[str]
    removed: list[str]
    changed: list[str]
    unchanged: list[str]

    def __str__(self) -> str:
        return (f"added {self.added or '-'}, removed {self.removed or '-'}, "
                f"changed {self.changed or '-'}, unchanged {len(self.unchanged)}")


def diff(old: dict[str, ShardSpec], new: dict[str, ShardSpec]) -> Plan:
    return Plan(
        added=[n for n in new if n not in old],
        removed=[n for n in old if n not in new],
        changed=[n for n in new if n in old and old[n] != new[n]],
        unchanged=[n for n in new if n in old and old[n] == new[n]],
    )


def _escape(value: Any) -> Any:
    """Make every string survive a second ``${VAR}`` expansion unchanged."""
    if isinstance(value, str):
        return value.replace("${", "$${")
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value


def _plain(obj: Any) -> Any:
    """Sizes and durations are int and float subclasses: write them as plain numbers."""
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    raise NotImplementedError(f"cannot write {type(obj).__name__} into the shard map copy")


def write_copy(smap: ShardMap, original: str, path: str) -> str:
    """Write ``smap`` as a YAML file at ``path`` (mode 0600: it may hold expanded secrets).

    Returns the path recorders should read: ``path``, or ``original`` if the copy
    would not load back into an equal map (logged; never expected).
    """
    doc = _escape(msgspec.to_builtins(smap, enc_hook=_plain))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(f"# frozen copy of {original}, written by shardlog supervise; do not edit\n")
        yaml.safe_dump(doc, f, sort_keys=False, allow_unicode=True)
    try:
        again = load_map(path)
    except ConfigError as exc:
        log.warning("frozen copy of the shard map does not load (%s); recorders read %s", exc, original)
        return original
    if again != smap:
        log.warning("frozen copy of the shard map differs from the original; recorders read %s", original)
        return original
    return path
