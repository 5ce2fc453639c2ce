"""The repository is self-contained and its docs name what exists (issue 24). Pure file
reading (``ast`` for module contents, nothing imported), well under a second.

- The contract is docs/design.md: no file cites another design page (one outside the
  repository, as the first ones did), and no file names a path outside the repository.
- Every module path written in the docs or the code (``shardlog/writing/recent.py``, also
  below ``supervisor/``, ``tests/`` and ``bench/``) exists. (Not directories: ``shardlog/status/#``
  is a topic of the control docs.)
- Every dotted name in backticks (``shardlog.control.operations``,
  ``shardlog.records.decode_record``, :mod:`supervisor.serve.status`) is a module of
  this repository, or a name a module defines, or an entry point group of pyproject.toml;
  ``supervisor.listen`` and the like are shard map keys and /status members, not modules.
"""

from __future__ import annotations

import ast
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: what is scanned: the packages, the tests, the docs and everything else that ships
SCANNED = ["shardlog", "supervisor", "tests", "bench", "deploy", "docs", ".ci", "README.md", "pyproject.toml",
           "shards.example.yaml"]
#: never scanned (tests/brokers/node_modules is a symlink to npm's tree; caches)
SKIP_DIRS = {"node_modules", "__pycache__", ".pytest_cache", ".hypothesis", ".mypy_cache"}
#: the docs whose module names are checked (the code's docstrings are checked too)
DOCS = ["README.md", "docs"]

# Spelled in pieces so that this file, which is scanned too, does not name them.
_DESIGN_RE = re.compile(r"[\w./-]*" + "design" + r"\.md", re.IGNORECASE)
_THE_PAGE = ROOT / "docs" / ("design" + ".md")
#: paths outside the repository that its files once named (the shared contract, a checkout)
_OUTSIDE = ["../" + "shared", "/" + "work/"]

_MODULE_PATH_RE = re.compile(r"(?<![\w./-])((?:shardlog|supervisor|tests|bench)/(?:[\w-]+/)*[\w-]+\.py)\b")
_DOTTED_RE = re.compile(r"`((?:shardlog|supervisor)(?:\.\w+)+)")
#: a dotted name ending in one of these is a file name (deploy/nginx/shardlog.conf), not a module
_FILE_SUFFIXES = {"conf", "json", "yaml", "yml", "log", "md", "py", "toml", "txt", "prof", "service",
                  "html", "js", "lock", "jsonl", "csv", "gz"}
#: (file, name): modules that are gone, named as such (the old name beside the new one)
FORMER = {("docs/architecture.md", "shardlog.recorder")}


def _text_files(tops: list[str]) -> Iterator[tuple[str, str]]:
    """(path relative to ROOT, text) of every UTF-8 text file below ``tops`` (of SCANNED)."""
    for rel, text in _scanned():
        if any(rel == top or rel.startswith(top + "/") for top in tops):
            yield rel, text


@functools.cache
def _scanned() -> tuple[tuple[str, str], ...]:
    return tuple(_read(SCANNED))


def _read(tops: list[str]) -> Iterator[tuple[str, str]]:
    for top in tops:
        start = ROOT / top
        paths = [start] if start.is_file() else []
        if start.is_dir():
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS
                                     and not os.path.islink(os.path.join(dirpath, d)))
                paths.extend(Path(dirpath, f) for f in sorted(filenames))
        for path in paths:
            if path.is_symlink():
                continue
            data = path.read_bytes()
            if b"\0" in data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield path.relative_to(ROOT).as_posix(), text


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_the_contract_is_in_the_repository() -> None:
    assert _THE_PAGE.is_file(), "docs/design.md is the contract; it must exist"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/design.md)" in readme.split("\n## ", 1)[0], "README.md links docs/design.md near the top"
    assert f"({_THE_PAGE.name})" in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")


def test_no_file_cites_a_design_page_outside_the_repository() -> None:
    bad = []
    for rel, text in _text_files(SCANNED):
        here = (ROOT / rel).parent
        for m in _DESIGN_RE.finditer(text):
            cited = m.group(0)
            name = cited.rsplit("/", 1)[-1]
            points_here = any((base / cited).resolve() == _THE_PAGE for base in (here, ROOT))
            if name != name.lower() or not points_here:
                bad.append(f"{rel}:{_line(text, m.start())}: {cited!r} (cite docs/design.md, with the section)")
    assert bad == []


def test_no_file_names_a_path_outside_the_repository() -> None:
    bad = [f"{rel}:{_line(text, m.start())}: {text[m.start():m.start() + 40].splitlines()[0]!r}"
           for rel, text in _text_files(SCANNED)
           for outside in _OUTSIDE
           for m in re.finditer(re.escape(outside), text)]
    assert bad == []


def test_module_paths_exist() -> None:
    bad = []
    for rel, text in _text_files([*DOCS, "shardlog", "supervisor", "tests", "bench"]):
        if not rel.endswith((".md", ".py")):
            continue
        for m in _MODULE_PATH_RE.finditer(text):
            if not (ROOT / m.group(1)).is_file():
                bad.append(f"{rel}:{_line(text, m.start())}: {m.group(1)} does not exist")
    assert bad == []


@functools.cache
def _module_file(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _defined(body: list[ast.stmt]) -> Iterator[str]:
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            yield from ((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.Assign):
            yield from (n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id
        elif isinstance(node, (ast.If, ast.Try)):
            yield from _defined(node.body)
            yield from _defined(node.orelse)
            for handler in getattr(node, "handlers", []):
                yield from _defined(handler.body)
            yield from _defined(getattr(node, "finalbody", []))


@functools.cache
def _names_of(path: Path) -> frozenset[str]:
    return frozenset(_defined(ast.parse(path.read_text(encoding="utf-8")).body))


def _fields(path: Path, cls: str) -> set[str]:
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    raise AssertionError(f"no class {cls} in {path}")


def _entry_point_groups() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    return set(re.findall(r'^\[project\.entry-points\."([^"]+)"\]', text, re.MULTILINE))


def _problem(name: str, not_modules: set[str]) -> str | None:
    """Why a dotted name names nothing of this repository, or None."""
    parts = name.split(".")
    if name in not_modules or ".".join(parts[:2]) in not_modules or parts[-1] in _FILE_SUFFIXES:
        return None
    i = next(i for i in range(len(parts), 0, -1) if _module_file(".".join(parts[:i])))
    if i == len(parts):
        return None
    module = ".".join(parts[:i])
    if parts[i] in _names_of(_module_file(module)):
        return None
    return f"{module} has no {parts[i]!r}" if i > 1 else f"no module {'.'.join(parts[:2])}"


def test_dotted_module_names_exist() -> None:
    # supervisor.listen, supervisor.restart, ...: the shard map's keys; supervisor.ready, ...: /status
    not_modules = _entry_point_groups() | {
        f"supervisor.{f}" for f in _fields(ROOT / "shardlog/config/schema.py", "SupervisorSettings")
        | _fields(ROOT / "supervisor/serve/status.py", "SupervisorStatus")}
    bad = []
    for rel, text in _text_files([*DOCS, "shardlog", "supervisor", "tests", "bench"]):
        if not rel.endswith((".md", ".py")):
            continue
        for m in _DOTTED_RE.finditer(text):
            name = m.group(1)
            if (rel, name) in FORMER:
                continue
            why = _problem(name, not_modules)
            if why:
                bad.append(f"{rel}:{_line(text, m.start())}: `{name}`: {why}")
    assert bad == []
    gone = [name for _, name in FORMER if _problem(name, not_modules) is None]
    assert gone == [], "FORMER names modules that exist: remove them from FORMER"
