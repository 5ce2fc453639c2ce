"""The optional parts without their extras (shardlog/extras.py): each is an error naming the
extra to install, with the CLI's exit code for it (69 for a verb, 78 for a shard map naming a
decoder hook), and nothing else depends on them.

Real subprocesses: ``python -c`` sets ``sys.modules[name] = None`` for the blocked packages
(so ``import duckdb`` raises ModuleNotFoundError, as without the package) and then runs
``shardlog.cli.main.main``, the console script's function. Each case is run once more without
the block, so the failure comes from the missing package and nothing else.
tests/test_packaging.py checks the same for real, in a fresh venv without DuckDB."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.shardlog.test_sql import T0, write_segment

REPO = Path(__file__).resolve().parents[1]
SQL_HINT = "pip install 'shardlog[sql]'"
HOOKS_HINT = "pip install 'shardlog[hooks]'"


def shardlog_without(blocked: list[str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    code = ("import sys\n"
            f"for m in {blocked!r}: sys.modules[m] = None\n"
            "from shardlog.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env=env, check=False)


def a_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_segment(root, "chat/room42", "jsonl", None, [(T0 + i, 1, False, b'{"n": %d}' % i) for i in range(3)])
    return root


def test_sql_without_duckdb_names_the_extra_and_exits_69(tmp_path: Path) -> None:
    root = str(a_root(tmp_path))
    r = shardlog_without(["duckdb"], "sql", root, "SELECT count(*) AS n FROM records", cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (69, "", f"shardlog: sql needs DuckDB: {SQL_HINT}\n")
    ok = shardlog_without([], "sql", root, "SELECT count(*) AS n FROM records", "--format", "csv", cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "n\n3\n"), ok.stderr


def test_parquet_export_without_duckdb_exits_69_and_keeps_the_old_file(tmp_path: Path) -> None:
    root = str(a_root(tmp_path))
    out = tmp_path / "out.parquet"
    out.write_bytes(b"an earlier export")
    r = shardlog_without(["duckdb"], "export", root, "chat", "--to", str(out), "--force", cwd=tmp_path)
    assert r.returncode == 69, r.stderr
    assert r.stderr == (f"shardlog: export --to FILE.parquet needs DuckDB: {SQL_HINT} "
                        "(the SQLite export needs nothing more)\n")
    assert out.read_bytes() == b"an earlier export", "--force removed the file before finding DuckDB missing"
    # the SQLite export is the base install's: it works with DuckDB blocked
    db = tmp_path / "out.sqlite"
    r = shardlog_without(["duckdb"], "export", root, "chat", "--to", str(db), cwd=tmp_path)
    assert r.returncode == 0 and "exported 3 records" in r.stderr, r.stderr
    ok = shardlog_without([], "export", root, "chat", "--to", str(out), "--force", cwd=tmp_path)
    assert ok.returncode == 0 and out.read_bytes()[:4] == b"PAR1", ok.stderr


def test_history_connect_without_duckdb_raises_an_import_error_naming_the_extra(tmp_path: Path) -> None:
    root = str(a_root(tmp_path))
    code = ("import sys\n"
            "sys.modules['duckdb'] = None\n"
            "from shardlog import extras, history\n"
            "for call in (lambda: history.connect(sys.argv[1]),\n"
            "             lambda: history.export_parquet(sys.argv[1], '', sys.argv[2])):\n"
            "    try:\n"
            "        call()\n"
            "    except ImportError as exc:\n"
            "        print(type(exc).__name__, isinstance(exc, extras.MissingExtra), exc.name, exc)\n")
    r = subprocess.run([sys.executable, "-c", code, root, str(tmp_path / "x.parquet")], capture_output=True,
                       text=True, timeout=60, cwd=REPO, check=False)
    line = f"MissingExtra True duckdb SQL over a recording (history.connect, export_parquet) needs DuckDB: {SQL_HINT}"
    assert (r.returncode, r.stdout) == (0, f"{line}\n{line}\n"), r.stderr
    assert not (tmp_path / "x.parquet").exists()


def test_the_recorder_verbs_never_import_duckdb(tmp_path: Path) -> None:
    """`check`, the history verbs other than sql, and `init` run with DuckDB blocked (the
    recorder itself: tests/test_packaging.py runs `supervise` in a venv without it)."""
    root = str(a_root(tmp_path))
    for args in (["init", str(tmp_path / "shards.yaml")], ["check", str(tmp_path / "shards.yaml")],
                 ["topics", root, ""], ["tail", root, "chat/room42"], ["cat", root, "chat"]):
        r = shardlog_without(["duckdb"], *args, cwd=tmp_path)
        assert r.returncode == 0, f"shardlog {' '.join(args)}: exit {r.returncode}\n{r.stderr}"


def test_a_decoder_hook_without_the_hooks_extra_is_a_configuration_error_naming_it(tmp_path: Path) -> None:
    for hook, package in (("cbor_to_json", "cbor2"), ("msgpack_to_json", "msgpack")):
        m = tmp_path / f"{hook}.yaml"
        m.write_text(yaml.safe_dump({"broker": {"host": "127.0.0.1", "port": 1},
                                     "defaults": {"root": str(tmp_path / "data")},
                                     "shards": [{"name": "a", "prefix": "#", "hooks": [hook]}]}))
        reason = f"shards[0].hooks[0]: {hook} needs the Python package {package}: {HOOKS_HINT}"
        r = shardlog_without([package], "check", str(m), cwd=tmp_path)
        assert (r.returncode, r.stderr) == (78, f"shardlog: configuration error: {m}: {reason}\n"), r.stderr
        r = shardlog_without([package], "record", str(m), "--shard", "a", cwd=tmp_path)  # at start, before connecting
        assert r.returncode == 78 and f"configuration error: {reason}\n" in r.stderr, r.stderr
        ok = shardlog_without([], "check", str(m), cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr


def test_duckdb_without_numpy_is_the_same_missing_extra(tmp_path: Path) -> None:
    """DuckDB's Python functions need NumPy, which duckdb does not declare: DuckDB alone (installed
    by hand) would fail at the first query with DuckDB's own "'numpy' is required"."""
    root = str(a_root(tmp_path))
    r = shardlog_without(["numpy"], "sql", root, "SELECT 1", cwd=tmp_path)
    assert (r.returncode, r.stderr) == (69, f"shardlog: sql needs NumPy (for DuckDB's Python functions): {SQL_HINT}\n")
