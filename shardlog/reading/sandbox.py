"""DuckDB confined to reading a recording root (``shardlog sql``, ``history.connect``).

Two layers, both on by default and both lifted by ``sandbox=False`` (``shardlog sql --unsafe``):

- the connection (:func:`confine`): DuckDB's file system only reaches the root and a private
  temporary directory (``allowed_directories`` with ``enable_external_access = false``:
  ``read_text('/etc/shadow')``, ``ATTACH 'x.db'``, ``COPY ... TO '/tmp/x'`` and ``INSTALL``
  fail with DuckDB's permission error), no extension is installed or loaded on demand, and the
  configuration is locked (``lock_configuration``), so a query cannot ``SET`` its way out;
- the statements of ``shardlog sql`` (:func:`check`): only the kinds that read or work on
  in-memory tables run; ``COPY``, ``EXPORT``, ``ATTACH``, ``INSTALL``/``LOAD``, ``PRAGMA`` and
  the rest are refused before anything runs (the root itself is writable to DuckDB's file
  system: ``COPY ... TO 'ROOT/x/+log.jsonl'`` would make a bogus topic).

The session time zone is UTC either way, so ``ts`` (TIMESTAMPTZ) prints in UTC.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import duckdb

#: statement kinds a sandboxed query may hold (duckdb.StatementType names)
ALLOWED = frozenset({"SELECT", "EXPLAIN", "CREATE", "CREATE_FUNC", "INSERT", "UPDATE", "DELETE", "MERGE_INTO",
                     "DROP", "ALTER", "CALL", "SET", "VARIABLE_SET", "TRANSACTION", "ANALYZE"})

_PRIVATE: weakref.WeakKeyDictionary[duckdb.DuckDBPyConnection, str] = weakref.WeakKeyDictionary()


class Refused(Exception):
    """A statement the sandbox does not run (``shardlog sql`` exits 77)."""


def _lit(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def private_dir(con: duckdb.DuckDBPyConnection) -> str:
    """A private temporary directory of ``con`` (removed with it): DuckDB's spill files and the
    plain-named symlinks of paths holding glob characters."""
    d = _PRIVATE.get(con)
    if d is None:
        d = _PRIVATE[con] = tempfile.mkdtemp(prefix="shardlog-sql-")
        weakref.finalize(con, shutil.rmtree, d, True)
    return d


def confine(con: duckdb.DuckDBPyConnection, root_real: str) -> None:
    """Let ``con`` reach only ``root_real`` and its private directory, load no extension it
    has not loaded, and lock its configuration."""
    private = private_dir(con)
    for statement in ("SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
                      "SET allow_community_extensions = false", f"SET temp_directory = {_lit(private)}",
                      f"SET allowed_directories = [{_lit(root_real.rstrip(os.sep) + os.sep)}, "
                      f"{_lit(private + os.sep)}]",
                      "SET enable_external_access = false", "SET lock_configuration = true"):
        con.execute(statement)


def check(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Raise :class:`Refused` naming the first statement of ``sql`` of a kind not ``ALLOWED``
    (a syntax error is left to DuckDB's own message)."""
    import duckdb

    try:
        statements = con.extract_statements(sql)
    except duckdb.Error:
        return  # DuckDB says what is wrong when it runs it
    for st in statements:
        kind = st.type.name
        if kind not in ALLOWED:
            text = " ".join(st.query.split())
            raise Refused(f"{kind} statements are refused ({text[:60]!r}): a query may only read the root "
                          "(--unsafe lifts this, for trusted use)")
