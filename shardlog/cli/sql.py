"""``shardlog sql ROOT QUERY``: run SQL over the ``records`` view (shardlog.reading.sql) and print
the result as a table (the default on a terminal), CSV (the default otherwise) or
JSON Lines. Registered by shardlog/cli/main.py like the other verbs."""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import decimal
import io
import json
import sys
import uuid
from collections.abc import Iterator
from typing import Any

from shardlog import extras
from shardlog.cli.common import EX_DATAERR, EX_NOPERM, EX_UNAVAILABLE, _history_errors, _time_arg, format_table

_BATCH = 10_000
_CELL = 60  # widest table cell, in characters


def _value(v: Any, is_json: bool) -> Any:
    """A result value as plain JSON data (JSON columns embedded, times in ISO 8601)."""
    if v is None:
        return None
    if is_json and isinstance(v, str):
        try:
            return json.loads(v)
        except ValueError:
            return v
    if isinstance(v, dt.datetime):
        if v.tzinfo is not None and v.utcoffset() == dt.timedelta(0):
            return v.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"  # ts (TIMESTAMPTZ, UTC)
        return v.isoformat(timespec="microseconds") + ("" if v.tzinfo else "Z")
    if isinstance(v, dt.date | dt.time):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return v.total_seconds()
    if isinstance(v, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(v)).decode("ascii")
    if isinstance(v, decimal.Decimal | uuid.UUID):
        return str(v)
    if isinstance(v, float) and v != v:
        return None
    if isinstance(v, list | tuple):
        return [_value(x, False) for x in v]
    if isinstance(v, dict):
        return {str(k): _value(x, False) for k, x in v.items()}
    return v


def _text(v: Any, is_json: bool) -> str:
    """A result value as one CSV field or table cell."""
    if v is None:
        return ""
    if is_json and isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return v
    data = _value(v, False)
    return data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)


def _rows(cur: Any) -> Iterator[tuple[Any, ...]]:
    while batch := cur.fetchmany(_BATCH):
        yield from batch


def _cell(s: str) -> str:
    s = s.replace("\n", "\\n").replace("\r", "\\r").replace("\t", " ")
    return s if len(s) <= _CELL else s[: _CELL - 1] + "…"


def write_result(cur: Any, fmt: str, out: io.TextIOBase) -> int:
    """Print a DuckDB result in ``fmt`` (table, csv, json); returns the row count."""
    names = [d[0] for d in cur.description]
    is_json = [str(d[1]).upper() == "JSON" for d in cur.description]
    n = 0
    if fmt == "json":
        for row in _rows(cur):
            out.write(json.dumps({k: _value(v, j) for k, v, j in zip(names, row, is_json, strict=True)},
                                 ensure_ascii=False) + "\n")
            n += 1
    elif fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(names)
        for row in _rows(cur):
            w.writerow([_text(v, j) for v, j in zip(row, is_json, strict=True)])
            n += 1
    else:
        cells = [tuple(_cell("NULL" if v is None else _text(v, j)) for v, j in zip(row, is_json, strict=True))
                 for row in _rows(cur)]
        n = len(cells)
        out.write(format_table(tuple(names), cells) + "\n")
        out.write(f"({n} row{'s' if n != 1 else ''})\n")
    return n


def _cmd_sql(args: argparse.Namespace) -> int:
    try:
        duckdb = extras.duckdb("sql")
    except extras.MissingExtra as exc:
        print(f"shardlog: {exc}", file=sys.stderr)  # sql needs DuckDB: pip install 'shardlog[sql]'
        return EX_UNAVAILABLE
    from shardlog.reading import sandbox, sql

    fmt = args.format or ("table" if sys.stdout.isatty() else "csv")
    try:
        cur = sql.query(args.root, args.query, args.prefix, args.since, args.until, sandbox=not args.unsafe)
    except sandbox.Refused as exc:
        print(f"shardlog: sql: {exc}", file=sys.stderr)
        return EX_NOPERM
    except duckdb.Error as exc:
        if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(exc):
            # the sandbox: its file system, extensions, locked settings
            print(f"shardlog: sql: {exc} (a query may only read the root; --unsafe lifts this, for trusted use)",
                  file=sys.stderr)
            return EX_NOPERM
        print(f"shardlog: sql: {exc}", file=sys.stderr)
        return EX_DATAERR
    if cur.description is None:  # a statement without a result (CREATE, SET, ...)
        return 0
    out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=False)
    try:
        write_result(cur, fmt, out)
        out.flush()
    finally:
        out.detach()
    return 0


def add_sql(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sql", help="SQL (DuckDB) over the records of a root: a view `records`",
                       description="Run a query over the view records(topic, ts, ts_us, qos, retain, enc, "
                                   "payload JSON). --prefix/--since/--until select the segment files read.")
    p.add_argument("root", help="a recording root")
    p.add_argument("query", help='e.g. "SELECT topic, count(*) FROM records GROUP BY ALL"')
    p.add_argument("--prefix", default="", help="only this topic and the topics below it (default: all)")
    p.add_argument("--since", type=_time_arg, help="from this time on (µs or ISO 8601), inclusive")
    p.add_argument("--until", type=_time_arg, help="before this time, exclusive")
    p.add_argument("--unsafe", action="store_true",
                   help="trusted use: let the query write files (COPY, EXPORT), ATTACH databases, INSTALL/LOAD "
                        "extensions and read outside the root")
    p.add_argument("--format", choices=["table", "csv", "json"],
                   help="table (default on a terminal), csv (default otherwise) or json (one object a line)")
    p.set_defaults(func=_history_errors(_cmd_sql))
