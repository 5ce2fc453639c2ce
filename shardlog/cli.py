"""The ``shardlog`` command.

Verbs of the recorder package live here (record, check, init). Verbs of other
packages (``supervise`` and ``status`` from ``supervisor``) are added through the
``shardlog.commands`` entry point group, so this package never imports them.
Exit codes follow sysexits: 0 ok, 64 usage, 70 internal error, 78 configuration.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable
from importlib import resources

from shardlog import __version__
from shardlog.config import ConfigError, ShardMap, load_map

EX_USAGE, EX_SOFTWARE, EX_CONFIG = 64, 70, 78

log = logging.getLogger("shardlog")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def setup_logging(level: str, shard: str | None = None) -> None:
    """Daemon logging: stderr, one line per event, the shard (or process role) in each."""
    who = f"shard={shard}" if shard else "shardlog"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)-7s {who} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level for stderr (default: info)")


def load_or_exit(path: str) -> ShardMap:
    try:
        return load_map(path)
    except ConfigError as exc:
        print(f"shardlog: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


# -- record -----------------------------------------------------------------------------

def _cmd_record(args: argparse.Namespace) -> int:
    from shardlog.recorder import Recorder

    faulthandler.enable()  # a supervisor's SIGABRT on a hung shard prints every thread's stack
    setup_logging(args.log_level, args.shard)
    smap = load_or_exit(args.map)
    try:
        shard = smap.shard(args.shard)
    except ConfigError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    recorder = Recorder(smap, shard, stats_file=args.stats_file, parent_pid=args.parent_pid,
                        heartbeat=args.heartbeat)
    return recorder.run()


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="run one shard's recorder in the foreground")
    p.add_argument("map", help="the shard map (YAML)")
    p.add_argument("--shard", required=True, help="the shard to record")
    p.add_argument("--stats-file", help="rewrite this JSON stats file every heartbeat")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between stats writes")
    p.add_argument("--parent-pid", type=int, help="stop when this process is no longer the parent")
    add_log_level(p)
    p.set_defaults(func=_cmd_record)


# -- check --------------------------------------------------------------------------------

def routing_table(smap: ShardMap) -> list[tuple[str, str, str, str, str]]:
    """(prefix, shard, root, host, broker) rows, most specific prefix first."""
    rows = []
    for s in sorted(smap.shards, key=lambda s: (-len(s.branch.split("/")) if s.branch else 1, s.branch)):
        b = smap.broker_of(s)
        rows.append((s.prefix if s.branch else "#", s.name, s.root, s.host or "-",
                     f"{b.host}:{b.port} (MQTT {'5' if b.mqtt5 else '3.1.1'})"))
    return rows


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _cmd_check(args: argparse.Namespace) -> int:
    smap = load_or_exit(args.map)
    print(f"{args.map}: OK, {len(smap.shards)} shard(s)")
    print(format_table(("PREFIX", "SHARD", "ROOT", "HOST", "BROKER"), routing_table(smap)))
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a shard map and print its routing table")
    p.add_argument("map")
    p.set_defaults(func=_cmd_check)


# -- init ---------------------------------------------------------------------------------

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


# -- main -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardlog", description="Record an MQTT topic tree as a directory tree.")
    parser.add_argument("--version", action="version", version=f"shardlog {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for add in (_add_record, _add_check, _add_init, *_plugin_verbs()):
        add(sub)
    return parser


def _plugin_verbs() -> list[Callable[[argparse._SubParsersAction], None]]:
    found = []
    for ep in sorted(importlib.metadata.entry_points(group="shardlog.commands"), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except ImportError as exc:  # a broken plugin must not take the recorder down
            print(f"shardlog: cannot load verb {ep.name!r}: {exc}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - last resort: say so, exit 70, never a silent death
        logging.getLogger("shardlog").exception("internal error")
        return EX_SOFTWARE
