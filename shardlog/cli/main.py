"""The ``shardlog`` command: the parser and ``main``.

Each group of verbs has its module in this package: recording.py (record, check, init),
reading.py (topics, tail, cat, export), sql.py (sql), replaying.py (replay), nginx.py
(nginx-routes). Verbs of other packages (``supervise``, ``status`` and the control verbs
from ``supervisor``) are added through the ``shardlog.commands`` entry point group, so
this package never imports them. Exit codes follow sysexits: 0 ok, 64 usage, 65 data
error (replay skipped records, a bad SQL query), 66 no input (history verbs), 69 unavailable:
the broker (replay) or an optional part not installed (sql and export --to FILE.parquet
without the ``sql`` extra, shardlog/extras.py), 70 internal error, 73 cannot create (export),
78 configuration (also a decoder hook without the ``hooks`` extra).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import sys
from collections.abc import Callable

from shardlog import __version__
from shardlog.cli.common import EX_SOFTWARE, _Parser
from shardlog.cli.nginx import _add_nginx_routes
from shardlog.cli.reading import _add_cat, _add_export, _add_tail, _add_topics
from shardlog.cli.recording import _add_check, _add_init, _add_record
from shardlog.cli.replaying import _add_replay
from shardlog.cli.sql import add_sql


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardlog", description="Record an MQTT topic tree as a directory tree.")
    parser.add_argument("--version", action="version", version=f"shardlog {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for add in (_add_record, _add_check, _add_init, _add_topics, _add_tail, _add_cat, _add_export, add_sql,
                _add_replay, _add_nginx_routes, *_plugin_verbs()):
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
    except Exception:  # last resort: say so, exit 70, never a silent death
        logging.getLogger("shardlog").exception("internal error")
        return EX_SOFTWARE
