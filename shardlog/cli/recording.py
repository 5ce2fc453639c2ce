"""The recorder's verbs: ``record`` (one shard in the foreground), ``check`` (validate a map,
print its routing table), ``init`` (write the commented example map)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import sys
from importlib import resources

from shardlog.cli.argtypes import integer, seconds
from shardlog.cli.common import EX_CONFIG, EX_USAGE, add_log_level, format_table, load_or_exit, setup_logging
from shardlog.config.schema import ConfigError, ShardMap

log = logging.getLogger(__name__)


def _cmd_record(args: argparse.Namespace) -> int:
    from shardlog.recording.loop import RecorderLoop
    from shardlog.recording.recorder import Recorder

    try:
        faulthandler.enable()  # a supervisor's SIGABRT on a hung shard prints every thread's stack
    except (RuntimeError, ValueError):  # stderr closed (2>&-) or not a file: record without it
        pass
    setup_logging(args.log_level, args.shard)
    smap = load_or_exit(args.map)
    try:
        shard = smap.shard(args.shard)
    except ConfigError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    loop = RecorderLoop(Recorder(smap, shard), stats_file=args.stats_file, parent_pid=args.parent_pid,
                        heartbeat=args.heartbeat, control_path=args.control)
    return loop.run()


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="run one shard's recorder in the foreground")
    p.add_argument("map", help="the shard map (YAML)")
    p.add_argument("--shard", required=True, help="the shard to record")
    p.add_argument("--stats-file", help="rewrite this JSON stats file every heartbeat")
    p.add_argument("--heartbeat", type=seconds(), default=1.0, help="seconds between stats writes")
    p.add_argument("--parent-pid", type=integer(1), help="stop when this process is no longer the parent")
    p.add_argument("--control", metavar="PATH", help="accept control commands (rotate, delete, move) on "
                                                     "a Unix datagram socket created at PATH (the supervisor's)")
    add_log_level(p)
    p.set_defaults(func=_cmd_record)


def routing_table(smap: ShardMap) -> list[tuple[str, str, str, str, str]]:
    """(prefix, shard, root, host, broker) rows, most specific prefix first."""
    rows = []
    for s in sorted(smap.shards, key=lambda s: (-len(s.branch.split("/")) if s.branch else 1, s.branch)):
        b = smap.broker_of(s)
        rows.append((s.prefix if s.branch else "#", s.name, s.root, s.host or "-",
                     f"{b.host}:{b.port} (MQTT {'5' if b.mqtt5 else '3.1.1'})"))
    return rows


def _cmd_check(args: argparse.Namespace) -> int:
    from shardlog.config.tls import check_tls
    from shardlog.hooks.loading import check_hooks

    smap = load_or_exit(args.map)
    try:
        check_tls(smap)  # loads every TLS file, as `shardlog record` will
        n_hooks = check_hooks(smap)  # imports them, as `shardlog record` will, calling no factory
    except ConfigError as exc:
        print(f"shardlog: configuration error: {args.map}: {exc}", file=sys.stderr)
        return EX_CONFIG
    hooks = f", {n_hooks} hook(s) imported" if n_hooks else ""
    print(f"{args.map}: OK, {len(smap.shards)} shard(s){hooks}")
    print(format_table(("PREFIX", "SHARD", "ROOT", "HOST", "BROKER"), routing_table(smap)))
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a shard map and print its routing table")
    p.add_argument("map")
    p.set_defaults(func=_cmd_check)


def example_map() -> str:
    return resources.files("shardlog").joinpath("example.yaml").read_text(encoding="utf-8")


def _cmd_init(args: argparse.Namespace) -> int:
    if args.path == "-":
        sys.stdout.write(example_map())
        return 0
    if os.path.exists(args.path) and not args.force:
        print(f"shardlog: {args.path} exists; use --force to overwrite", file=sys.stderr)
        return EX_USAGE
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(example_map())
    print(f"wrote {args.path}; check it with: shardlog check {args.path}")
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented example shard map")
    p.add_argument("path", nargs="?", default="shards.yaml", help="where to write it ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_init)
