"""The optional parts of shardlog and the extra that installs each (pyproject.toml,
``[project.optional-dependencies]``; sizes in the README, "Installing"):

- ``sql``: DuckDB and NumPy, for ``shardlog sql``, ``shardlog export --to FILE.parquet`` and
  ``history.connect`` / ``history.export_parquet``;
- ``hooks``: cbor2 and msgpack, for the built-in decoder hooks (shardlog/hooks/builtin.py,
  where a missing one is a configuration error naming the extra, exit 78).

None of them is imported by the recorder or the supervisor. A part used without its extra
raises :class:`MissingExtra` (an ImportError) whose message names the extra; the verbs print it
and exit 69 (EX_UNAVAILABLE), the code docs/design.md gives for "DuckDB missing".
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtra", "duckdb"]


class MissingExtra(ModuleNotFoundError):
    """``what`` needs ``module`` (from the extra ``extra``), which cannot be imported."""

    def __init__(self, what: str, module: str, package: str, extra: str, reason: str = "") -> None:
        msg = f"{what} needs {package}: pip install 'shardlog[{extra}]'"
        super().__init__(msg + (f" (import {module} failed: {reason})" if reason else ""), name=module)
        self.extra = extra


def _need(what: str, module: str, package: str, extra: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # not installed: the message says how to install it; installed but broken (a missing
        # shared library, a wrong wheel): the import error too, since installing will not help
        absent = isinstance(exc, ModuleNotFoundError) and exc.name == module
        raise MissingExtra(what, module, package, extra, "" if absent else str(exc)) from None


def duckdb(what: str = "SQL over a recording (history.connect, export_parquet)") -> ModuleType:
    """The ``duckdb`` module, or :class:`MissingExtra` saying ``pip install 'shardlog[sql]'``.
    NumPy too: DuckDB needs it for Python functions (the records view registers one) but does
    not declare it, so DuckDB alone fails at the first query."""
    module = _need(what, "duckdb", "DuckDB", "sql")
    _need(what, "numpy", "NumPy (for DuckDB's Python functions)", "sql")
    return module
