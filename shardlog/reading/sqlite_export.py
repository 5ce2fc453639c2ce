"""Export a branch to one SQLite file (``history.export_sqlite``, ``shardlog export --to X.sqlite``).

One table ``records(topic, ts, qos, retain, payload BLOB, payload_json TEXT, props TEXT)`` plus
a column ``payload.<key>`` for each top-level scalar member of JSON object payloads. ``props``:
the record's MQTT 5 properties member as JSON text (NULL without one); a user property is
``EXISTS (SELECT 1 FROM json_each(props, '$.user') WHERE value ->> 0 = 'k' AND value ->> 1 = 'v')``.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

import msgspec

from shardlog.reading.lines import _decode
from shardlog.reading.ranges import _read_lines
from shardlog.reading.times import TimeArg, parse_time
from shardlog.records import Record, decode_record

_INT64 = (-(2**63), 2**63 - 1)
_FIXED = 7  # topic, ts, qos, retain, payload, payload_json, props
MAX_FLAT_COLUMNS = 1000  # SQLite allows 2000 columns by default
_SKIP = object()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _fold(name: str) -> str:
    # SQLite compares identifiers case-insensitively, ASCII letters only
    return "".join(c.lower() if "A" <= c <= "Z" else c for c in name)


def _utf8_ok(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _scalar(v: object) -> object:
    if v is None or isinstance(v, float):
        return v
    if isinstance(v, str):
        return v if _utf8_ok(v) else _SKIP  # a lone surrogate: it stays in payload_json
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v if _INT64[0] <= v <= _INT64[1] else str(v)
    return _SKIP


def _is_json_record(line: bytes) -> bool:
    """The payload is embedded JSON (no ``enc`` member before ``payload``)."""
    i = line.find(b',"payload":')
    return i >= 0 and b',"enc":' not in line[:i]


def _record(line: bytes) -> Record | None:
    """A line's record; one whose payload nests too deep to decode keeps its bytes (and its
    JSON text in payload_json) without flat columns; None (warned) for a line that is no record."""
    try:
        return decode_record(line)
    except ValueError:
        pass
    try:
        return decode_record(line, value=False)
    except ValueError:
        return _decode(line)  # warns


def export_sqlite(root: str | os.PathLike[str], prefix: str, path: str | os.PathLike[str],
                  since: TimeArg = None, until: TimeArg = None, batch: int = 5000,
                  progress: Callable[[int], None] | None = None) -> int:
    """Write the records of ``prefix`` (and below) to a new SQLite file ``path``: one
    table ``records(topic, ts, qos, retain, payload BLOB, payload_json TEXT)`` plus a
    column ``payload.<key>`` for each top-level scalar member of JSON object payloads
    (added as first seen). One transaction. Returns the number of rows."""
    lo, hi = parse_time(since), parse_time(until)
    if os.path.exists(path):
        raise FileExistsError(f"{os.fspath(path)} exists; remove it first")
    lines = _read_lines(root, prefix, lo, hi)  # raises TopicNotFound before anything is created
    con = sqlite3.connect(os.fspath(path), isolation_level=None)
    try:
        con.execute("PRAGMA synchronous=OFF")  # a new file: on a crash, export again
        con.execute("BEGIN")
        con.execute("CREATE TABLE records (topic TEXT NOT NULL, ts INTEGER NOT NULL, qos INTEGER NOT NULL, "
                    "retain INTEGER NOT NULL, payload BLOB NOT NULL, payload_json TEXT, props TEXT)")
        columns: dict[str, int] = {}   # JSON key -> index in a row
        folded: set[str] = {"topic", "ts", "qos", "retain", "payload", "payload_json", "props"}
        rows: list[list[object]] = []
        n = 0

        def flush() -> None:
            if not rows:
                return
            width = _FIXED + len(columns)
            sql = f"INSERT INTO records VALUES ({','.join('?' * width)})"
            con.executemany(sql, [r + [None] * (width - len(r)) for r in rows])
            rows.clear()

        for topic, _ts, line in lines:
            rec = _record(line)
            if rec is None:
                continue
            is_json = _is_json_record(line)
            row: list[object] = [topic, rec.ts, rec.qos, int(rec.retain), rec.payload,
                                 rec.payload.decode("utf-8") if is_json else None,
                                 None if rec.props is None else msgspec.json.encode(rec.props).decode("utf-8")]
            if is_json and isinstance(rec.value, dict):
                for key, value in rec.value.items():
                    v = _scalar(value)
                    if v is _SKIP:
                        continue
                    idx = columns.get(key)
                    if idx is None:
                        if len(columns) >= MAX_FLAT_COLUMNS or not _utf8_ok(key):
                            continue
                        name = "payload." + key.replace("\x00", "\\u0000")
                        base, k = name, 2
                        while _fold(name) in folded:
                            name, k = f"{base}~{k}", k + 1
                        flush()  # rows so far have the old width
                        con.execute(f"ALTER TABLE records ADD COLUMN {_quote(name)}")
                        folded.add(_fold(name))
                        idx = columns[key] = _FIXED + len(columns)
                    if len(row) <= idx:
                        row.extend([None] * (idx + 1 - len(row)))
                    row[idx] = v
            rows.append(row)
            n += 1
            if len(rows) >= batch:
                flush()
                if progress is not None:
                    progress(n)
        flush()
        con.execute("CREATE INDEX records_topic_ts ON records (topic, ts)")
        con.execute("COMMIT")
        if progress is not None:
            progress(n)
        return n
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    finally:
        con.close()
