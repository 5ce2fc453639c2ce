"""Read what shardlog recorded: list topics, tail, read a time range, follow, export.

Pure reading of the on-disk format of docs/design.md ("Files on disk"); nothing here
writes into a recording root. A web app can use it directly::

    from shardlog import history
    for info in history.topics("/srv/mqtt", "chat"):
        print(info.topic)
    last = history.tail("/srv/mqtt", "chat/room42", 6)          # list[Record], oldest first
    for topic, rec in history.read("/srv/mqtt", "chat", since="2026-11-22T10:00:00Z"):
        ...
    history.export_sqlite("/srv/mqtt", "chat", "chat.sqlite")

Records are ``shardlog.records.Record`` (ts, qos, retain, payload bytes as
published, value as JSON.parse would see it).

Every write format (shardlog/ondisk/formats.py: jsonl, json, csv, payload-only) is read:
each segment's lines are turned into envelope record lines by its format (named by
the file's extension), so everything below works on envelope lines.

Assumption: within one topic, ``ts`` does not go backwards (it is the recorder's
reception time); segment skipping in ``read`` relies on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardlog.reading.follow import follow
from shardlog.reading.listing import topics
from shardlog.reading.ranges import read
from shardlog.reading.sqlite_export import export_sqlite
from shardlog.reading.tail import tail
from shardlog.reading.times import TimeArg, parse_time
from shardlog.reading.tree import TopicInfo, TopicNotFound, segments_of, topic_dir
from shardlog.records import Record

if TYPE_CHECKING:
    import duckdb

__all__ = [
    "Record",
    "TopicInfo",
    "TopicNotFound",
    "connect",
    "export_parquet",
    "export_sqlite",
    "follow",
    "parse_time",
    "read",
    "segments_of",
    "tail",
    "topic_dir",
    "topics",
]


# -- SQL and Parquet (DuckDB, imported only by these: shardlog/reading/sql.py, parquet.py) --

def connect(root: str | os.PathLike[str], prefix: str = "", since: TimeArg = None,
            until: TimeArg = None, sandbox: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-process DuckDB connection with a ``records`` view (see shardlog.reading.sql),
    confined to reading ``root`` unless ``sandbox`` is False (shardlog.reading.sandbox)."""
    from shardlog.reading import sql

    return sql.connect(root, prefix, since, until, sandbox=sandbox)


def export_parquet(root: str | os.PathLike[str], prefix: str, path: str | os.PathLike[str],
                   since: TimeArg = None, until: TimeArg = None,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """One Parquet file of ``prefix`` and below, payload keys as typed columns (see shardlog.reading.parquet)."""
    from shardlog.reading import parquet

    return parquet.export_parquet(root, prefix, path, since, until, progress)
