"""Export a branch to one Parquet file, written by DuckDB over the ``records`` view.

Columns: ``topic, ts (TIMESTAMPTZ, µs, UTC), qos, retain, enc, payload (JSON text)``, then a
typed column ``payload.<key>`` for each top-level member of JSON object payloads that
holds a scalar somewhere (in the order the keys first appear: by the first record holding
each, then by their place in it) (as ``history.export_sqlite`` does; nested values stay in
``payload``). Parquet wants one type per column, so a key's type is decided from all
its values (``column_type``): booleans -> BOOLEAN, integers -> BIGINT, integers and
floats -> DOUBLE, strings -> VARCHAR, anything mixed (or integers beyond 64 bits) ->
VARCHAR holding each value's JSON text. Rows are ordered by topic, then ts.

MQTT 5 properties: ``props`` (the record's member as JSON text, NULL without one) and
``user_properties``, a list of ``{key, value}`` structs in the order received (NULL without
any), so pyarrow, polars or DuckDB filter on a user property without parsing JSON.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from shardlog.reading import sql
from shardlog.reading.sqlite_export import MAX_FLAT_COLUMNS, _utf8_ok
from shardlog.reading.times import TimeArg

if TYPE_CHECKING:
    import duckdb

__all__ = ["column_type", "export_parquet", "flat_columns"]

_USER_PROPERTIES = ("list_transform(CAST(props->'user' AS VARCHAR[][]), "
                    "lambda x: {'key': x[1], 'value': x[2]}) AS user_properties")
_SCALARS = ("BOOLEAN", "BIGINT", "UBIGINT", "DOUBLE", "VARCHAR")
_INTS = {"BIGINT", "UBIGINT"}


def pointer(key: str) -> str:
    """The JSON pointer (RFC 6901) of a top-level member."""
    return "/" + key.replace("~", "~0").replace("/", "~1")


def column_type(json_types: set[str], big_int: bool) -> str:
    """The Parquet (DuckDB) type of a payload key from the JSON types of its values
    (DuckDB's ``json_type`` names); ``big_int``: an integer does not fit 64 bits."""
    kinds = json_types & set(_SCALARS)
    if kinds == {"BOOLEAN"}:
        return "BOOLEAN"
    if kinds and kinds <= _INTS and not big_int:
        return "BIGINT"
    if kinds and kinds <= _INTS | {"DOUBLE"} and "DOUBLE" in kinds:
        return "DOUBLE"
    return "VARCHAR"


def flat_columns(keys: list[tuple[str, set[str], bool]]) -> list[tuple[str, str, str]]:
    """(column name, type, JSON pointer) for (key, json types, big int) in first-seen
    order: keys that only ever hold nested values get none; a name equal to an earlier
    one but for case gets ``~2``, ``~3``; NUL is written ``\\u0000``; at most
    ``sqlite_export.MAX_FLAT_COLUMNS``."""
    taken = {"topic", "ts", "qos", "retain", "enc", "payload", "props", "user_properties"}
    out: list[tuple[str, str, str]] = []
    for key, types, big in keys:
        if not types & (set(_SCALARS) | {"NULL"}) or not _utf8_ok(key):
            continue
        if len(out) >= MAX_FLAT_COLUMNS:
            break
        name = "payload." + key.replace("\x00", "\\u0000")
        base, k = name, 2
        while name.casefold() in taken:
            name, k = f"{base}~{k}", k + 1
        taken.add(name.casefold())
        out.append((name, column_type(types, big), pointer(key)))
    return out


_KEYS = """
WITH kv AS (
    SELECT ts_us, k, i, '/' || replace(replace(k, '~', '~0'), '/', '~1') AS p, payload
    FROM (SELECT ts_us, payload, unnest(json_keys(payload)) AS k,
                 generate_subscripts(json_keys(payload), 1) AS i FROM records
          WHERE enc IS NULL AND json_type(payload) = 'OBJECT'))
SELECT k, list(DISTINCT json_type(payload, p)),
       bool_or(json_type(payload, p) = 'UBIGINT' AND TRY_CAST(payload ->> p AS BIGINT) IS NULL),
       min(ts_us) AS first, arg_min(i, ts_us) AS pos
FROM kv GROUP BY k ORDER BY first, pos, k
"""


def _column(name: str, typ: str, ptr: str) -> str:
    p = sql._lit(ptr)
    scalars = ", ".join(sql._lit(s) for s in _SCALARS)
    value = f"payload ->> {p}"
    if typ != "VARCHAR":
        value = f"TRY_CAST({value} AS {typ})"
    quoted = '"' + name.replace('"', '""') + '"'
    return (f"CASE WHEN enc IS NULL AND json_type(payload) = 'OBJECT' AND json_type(payload, {p}) IN ({scalars}) "
            f"THEN {value} END AS {quoted}")


def export_parquet(root: str | os.PathLike[str], prefix: str, path: str | os.PathLike[str],
                   since: TimeArg = None, until: TimeArg = None,
                   progress: Callable[[int, int], None] | None = None) -> int:
    """Write the records of ``prefix`` (and below) in ``[since, until)`` to a new Parquet
    file ``path`` (refuses an existing one). ``progress(done, total)`` is called about ten
    times a second while DuckDB writes (``done`` estimated from its query progress).
    Returns the number of rows. A failed or interrupted export leaves no file."""
    path = os.fspath(path)
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists; remove it first")
    # our own COPY writes the file: not the sandbox of user queries
    con = sql.connect(root, prefix, since, until, sandbox=False)  # TopicNotFound before anything is created
    try:
        total = con.execute("SELECT count(*) FROM records").fetchall()[0][0]
        keys = [(k, set(types), bool(big)) for k, types, big, _, _ in con.execute(_KEYS).fetchall()]
        # payload and props as plain text (VARCHAR): DuckDB's JSON type becomes Arrow's JSON
        # extension type, which pyarrow shows as extension<arrow.json> and polars as Binary
        cols = ["topic", "ts", "qos", "retain", "enc", "payload::VARCHAR AS payload", "props::VARCHAR AS props",
                _USER_PROPERTIES]
        cols += [_column(*c) for c in flat_columns(keys)]
        copy = (f"COPY (SELECT {', '.join(cols)} FROM records ORDER BY topic, ts_us) "
                f"TO {sql._lit(path)} (FORMAT parquet, COMPRESSION zstd)")
        _run_with_progress(con, copy, total, progress)
        return total
    except BaseException:
        if os.path.exists(path):
            os.unlink(path)  # never half an export
        raise
    finally:
        con.close()


def _run_with_progress(con: duckdb.DuckDBPyConnection, statement: str, total: int,
                       progress: Callable[[int, int], None] | None) -> None:
    if progress is None:
        con.execute(statement)
        return
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            pct = con.query_progress()
            if pct >= 0:
                progress(int(total * min(pct, 100.0) / 100), total)

    t = threading.Thread(target=watch, name="shardlog-export-progress", daemon=True)
    t.start()
    try:
        con.execute(statement)
    finally:
        done.set()
        t.join()
    progress(total, total)
