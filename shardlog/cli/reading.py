"""The history verbs: ``topics``, ``tail``, ``cat`` and ``export`` (shardlog.reading)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shardlog import extras
from shardlog.cli.argtypes import integer, seconds
from shardlog.cli.common import EX_CANTCREAT, EX_DATAERR, EX_UNAVAILABLE, _history_errors, _time_arg


def _with_topic(topic: str, line: bytes) -> bytes:
    """A stored record line with a ``topic`` member put first."""
    import msgspec

    return b'{"topic":' + msgspec.json.encode(topic) + b"," + line[1:]


def _shown_topic(topic: str) -> str:
    import json

    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic) or topic.startswith('"'):
        return json.dumps(topic, ensure_ascii=False)
    return topic


def _cmd_topics(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from shardlog import history

    out = sys.stdout
    found = 0
    for info in history.topics(args.root, args.prefix, long=args.long):
        found += 1
        if args.json:
            doc: dict[str, str | int | None] = {"topic": info.topic}
            if args.long:
                doc.update(records=info.records, bytes=info.bytes, last_ts=info.last_ts)
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        elif args.long:
            last = "-" if info.last_ts is None else dt.datetime.fromtimestamp(
                info.last_ts / 1e6, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            out.write(f"{_shown_topic(info.topic)}\t{info.records}\t{info.bytes}\t{last}\n")
        else:
            out.write(_shown_topic(info.topic) + "\n")
    out.flush()
    if not found and args.prefix:
        raise history.TopicNotFound(f"no topics at or below {args.prefix!r} under {args.root}")
    return 0


def _add_topics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="list recorded topics (decoded names)")
    p.add_argument("root", help="a recording root (a shard's root directory)")
    p.add_argument("prefix", nargs="?", default="", help="only this topic and the ones below it")
    p.add_argument("--long", "-l", action="store_true",
                   help="also records, bytes on disk and the last record's time (reads every segment)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_history_errors(_cmd_topics))


def _cmd_tail(args: argparse.Namespace) -> int:
    from shardlog.reading.follow import _tail_and_follow
    from shardlog.reading.tail import _tail_lines_dir
    from shardlog.reading.tree import _require_topic

    out = sys.stdout.buffer
    if args.follow:
        for line in _tail_and_follow(args.root, args.topic, args.n, poll=args.poll):
            out.write(_with_topic(args.topic, line))
            out.flush()
        return 0
    d = _require_topic(args.root, args.topic)
    for line in _tail_lines_dir(d, args.n):
        out.write(_with_topic(args.topic, line))
    out.flush()
    return 0


def _add_tail(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tail", help="the last records of a topic (JSON lines with a topic member)")
    p.add_argument("root")
    p.add_argument("topic")
    p.add_argument("-n", type=integer(0), default=6, help="how many records (default 6)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing records as they arrive")
    p.add_argument("--poll", type=seconds(), default=0.2, help=argparse.SUPPRESS)
    p.set_defaults(func=_history_errors(_cmd_tail))


def _cmd_cat(args: argparse.Namespace) -> int:
    import base64
    import csv
    import io
    import json

    from shardlog.reading.ranges import _read_lines
    from shardlog.records import decode_record

    lines = _read_lines(args.root, args.topic, args.since, args.until)
    if args.format == "jsonl":
        out = sys.stdout.buffer
        for topic, _ts, line in lines:
            out.write(_with_topic(topic, line))
        out.flush()
        return 0
    text = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=False)
    w = csv.writer(text)
    w.writerow(["topic", "ts", "qos", "retain", "payload", "enc", "props"])
    for topic, ts, line in lines:
        try:
            rec = decode_record(line, value=False)  # the payload's bytes only: any depth
        except ValueError as exc:
            logging.getLogger("shardlog.reading").warning("a line that is no record left out (%s): %.80r",
                                                          exc, line)
            continue
        try:
            payload, enc = rec.payload.decode("utf-8"), ""
        except UnicodeDecodeError:
            payload, enc = base64.b64encode(rec.payload).decode("ascii"), "base64"
        props = "" if rec.props is None else json.dumps(rec.props, ensure_ascii=False, separators=(",", ":"))
        w.writerow([topic, ts, rec.qos, "true" if rec.retain else "false", payload, enc, props])
    text.flush()
    text.detach()
    return 0


def _add_cat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cat", help="records of a topic or a whole branch, in time order")
    p.add_argument("root")
    p.add_argument("topic", metavar="TOPIC-or-PREFIX", help="a topic; the topics below it are included")
    p.add_argument("--since", type=_time_arg, help="from this time on (µs since the epoch or ISO 8601; "
                   "naive = UTC), inclusive")
    p.add_argument("--until", type=_time_arg, help="before this time, exclusive")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.set_defaults(func=_history_errors(_cmd_cat))


def _cmd_export(args: argparse.Namespace) -> int:
    from shardlog import history

    parquet = args.to.endswith(".parquet")
    if not parquet and not args.to.endswith((".sqlite", ".sqlite3", ".db")):
        args.parser.error("--to FILE.parquet, or FILE.sqlite|.sqlite3|.db")
    if parquet:  # before --force removes anything
        try:
            extras.duckdb("export --to FILE.parquet")
        except extras.MissingExtra as exc:
            print(f"shardlog: {exc} (the SQLite export needs nothing more)", file=sys.stderr)
            return EX_UNAVAILABLE
    if os.path.exists(args.to):
        if not args.force:
            print(f"shardlog: {args.to} exists; use --force to replace it", file=sys.stderr)
            return EX_CANTCREAT
        os.unlink(args.to)
    tty = sys.stderr.isatty()

    def progress(n: int) -> None:
        if tty:
            sys.stderr.write(f"\rexported {n:,} records")
            sys.stderr.flush()

    try:
        if parquet:
            n = _export_parquet(args, tty)
        else:
            n = history.export_sqlite(args.root, args.prefix, args.to, args.since, args.until, progress=progress)
    except BaseException as exc:
        if os.path.exists(args.to):
            os.unlink(args.to)  # never leave half an export behind
        if parquet and type(exc).__module__.startswith(("duckdb", "_duckdb")):
            print(f"shardlog: export: {exc}", file=sys.stderr)  # DuckDB's reason, naming the file
            return EX_DATAERR
        raise
    if tty:
        sys.stderr.write("\n")
    print(f"exported {n} records to {args.to}", file=sys.stderr)
    return 0


def _export_parquet(args: argparse.Namespace, tty: bool) -> int:
    """The Parquet export (DuckDB), with a progress bar on a terminal."""
    import time

    from shardlog.cli.progress import format_progress
    from shardlog.reading.parquet import export_parquet

    start = time.monotonic()

    def bar(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        eta = (total - done) * elapsed / done if done else None
        sys.stderr.write("\r" + format_progress(done, total, elapsed, eta) + "\x1b[K")
        sys.stderr.flush()

    return export_parquet(args.root, args.prefix, args.to, args.since, args.until, progress=bar if tty else None)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a branch to Parquet or SQLite (one table, JSON members as columns)")
    p.add_argument("root")
    p.add_argument("prefix", help="a topic; the topics below it are included ('' for all)")
    p.add_argument("--to", required=True, help="the file to create: .parquet (DuckDB) or .sqlite/.sqlite3/.db")
    p.add_argument("--since", type=_time_arg)
    p.add_argument("--until", type=_time_arg)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_history_errors(_cmd_export), parser=p)
