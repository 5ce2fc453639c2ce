"""What the verbs share: the parser class (usage errors exit 64), daemon logging, the shard
map loader that exits 78, a text table, the time option type and the history verbs'
error handling. Exit codes follow sysexits."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from shardlog.config.load import load_map
from shardlog.config.schema import ConfigError, ShardMap
from shardlog.reading.times import parse_time
from shardlog.reading.tree import TopicNotFound

EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_IOERR, EX_NOPERM, EX_CONFIG = \
    0, 64, 65, 66, 69, 70, 73, 74, 77, 78


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
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


def format_table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
                     for row in [header, *rows])


def _time_arg(value: str) -> int:
    try:
        t = parse_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert t is not None
    return t


class _Skips(logging.Handler):
    """The readers' warnings (a file or directory skipped, a damaged segment, a line that
    is no record): each printed once on stderr, and counted."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg not in self.seen:
            self.seen.add(msg)
            sys.stderr.write(f"shardlog: warning: {msg}\n")


def _history_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Missing root/topic -> 66 with a message; a closed pipe (| head) -> quiet exit; anything
    the readers skipped (warned on stderr) -> 74 after the output of what could be read."""
    def run(args: argparse.Namespace) -> int:
        readers = logging.getLogger("shardlog.reading")
        skips = _Skips()
        readers.addHandler(skips)
        propagate, readers.propagate = readers.propagate, False
        try:
            rc = func(args)
        except TopicNotFound as exc:
            print(f"shardlog: {exc}", file=sys.stderr)
            return EX_NOINPUT
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        finally:
            readers.removeHandler(skips)
            readers.propagate = propagate
        if rc == EX_OK and skips.seen:
            print(f"shardlog: {len(skips.seen)} warning(s): the output leaves out what they name", file=sys.stderr)
            return EX_IOERR
        return rc
    return run
