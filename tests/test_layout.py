"""The layout rules of the code (issue 16), checked on the source: ``ast`` only, nothing is
imported or run, so this takes well under a second.

- No import cycles in a package listed in :data:`CYCLE_FREE`.
- ``shardlog`` never imports ``supervisor`` (the dependency points one way only).
- No module of a package listed in :data:`SIZE_LIMITED` has more than :data:`MAX_LINES` lines.

What counts as an import: every ``import`` and ``from ... import`` statement anywhere in a
module, at module level or inside a function, a class, a ``try`` or an ``if TYPE_CHECKING:``
block. A lazy import inside a function is still a cycle (it only moves the moment the
partly-initialised module bites), and a type-only import is a dependency a reader has to
follow all the same. Relative imports are resolved against the importing module's package;
``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
Not counted: the implicit import of a parent package (importing ``a.b.c`` runs
``a/__init__.py`` and ``a/b/__init__.py`` first), as in other import-graph tools; an
``__init__`` that imports its own submodules would otherwise be a cycle with each of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: packages whose import graph must have no cycle
CYCLE_FREE = ["supervisor", "shardlog"]
#: packages whose modules must stay at most MAX_LINES lines long
SIZE_LIMITED = ["supervisor", "shardlog"]
MAX_LINES = 400
#: (lower, upper): no module of ``lower`` may import anything of ``upper``
LAYERS = [("shardlog", "supervisor")]
#: the layers inside each package, lowest first (docs/architecture.md): a module may import
#: its own layer and those below it, never one above. A name is a module or a subpackage.
DOWNWARD = {
    "shardlog": [
        ["shardlog", "shardlog.topics", "shardlog.records", "shardlog.counters", "shardlog.routes",
         "shardlog.extras"],
        ["shardlog.config"],
        ["shardlog.ondisk"],
        ["shardlog.writing"],
        ["shardlog.control"],
        ["shardlog.hooks"],
        ["shardlog.recording"],
        ["shardlog.replay"],
        ["shardlog.reading"],
        ["shardlog.cli", "shardlog.history", "shardlog.__main__"],
    ],
    "supervisor": [
        ["supervisor", "supervisor.shards", "supervisor.threads"],
        ["supervisor.snapshot"],
        ["supervisor.serve"],
        ["supervisor.control"],
        ["supervisor.broker"],
        ["supervisor.arbiter"],
        ["supervisor.cli"],
    ],
}


# -- reading the source ----------------------------------------------------------------------------


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` below ``root``."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_names(name: str, path: Path, known: set[str]) -> set[str]:
    """The absolute names module ``name`` (at ``path``) imports, anywhere in its body.

    ``known`` are the module names that exist: ``from pkg import x`` names ``pkg.x`` when
    that is one of them, else ``pkg``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):  # every node: module level, functions, classes, if/try blocks
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def nearest(name: str, known: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (``a.b.C`` -> ``a.b``)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(root: Path, packages: list[str]) -> dict[str, set[str]]:
    """module -> the modules of ``packages`` it imports (edges to other packages left out)."""
    files: dict[str, Path] = {}
    for package in packages:
        files.update(modules(root, package))
    known = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = {nearest(t, known) for t in imported_names(name, path, known)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


# -- the checks ------------------------------------------------------------------------------------


def tangles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan): modules that
    import each other in a loop, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth: at most the number of modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components)


def _cycle_through(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if v != start else [start, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component without a cycle")  # pragma: no cover


def cycle_problems(root: Path, cycle_free: list[str], scanned: list[str]) -> list[str]:
    """One line per import cycle that runs through a package of ``cycle_free``."""
    graph = import_graph(root, scanned)
    out = []
    for tangle in tangles(graph):
        if any(m.split(".")[0] in cycle_free for m in tangle):
            cycle = _cycle_through(graph, set(tangle), tangle[0])  # the imports to follow
            line = "import cycle: " + " -> ".join(cycle)
            if len(cycle) - 1 < len(tangle):
                line += f" (one of the loops among {', '.join(tangle)})"
            out.append(line)
    return out


def layer_problems(root: Path, lower: str, upper: str) -> list[str]:
    """One line per module of ``lower`` that imports anything of ``upper``."""
    files = modules(root, lower)
    out = []
    for name, path in files.items():
        bad = sorted(t for t in imported_names(name, path, set(files)) if t == upper or t.startswith(upper + "."))
        if bad:
            out.append(f"{name} imports {', '.join(bad)} ({lower} must never import {upper})")
    return out


def layer_of(name: str, layers: list[list[str]]) -> int | None:
    """The index of the layer ``name`` belongs to (its longest listed prefix), or None. The
    package itself (a name without a dot) stands for its ``__init__`` only."""
    best, at = "", None
    for i, members in enumerate(layers):
        for m in members:
            if (name == m or ("." in m and name.startswith(m + "."))) and len(m) > len(best):
                best, at = m, i
    return at


def downward_problems(root: Path, package: str, layers: list[list[str]]) -> list[str]:
    """One line per import of ``package`` that points to a higher layer (or a module no layer
    lists: every module must have its place)."""
    files = modules(root, package)
    known = set(files)
    out = []
    for name, path in files.items():
        here = layer_of(name, layers)
        if here is None:
            out.append(f"{name} is in no layer of {package}: add it to DOWNWARD (and docs/architecture.md)")
            continue
        for target in sorted(imported_names(name, path, known)):
            if not (target == package or target.startswith(package + ".")):
                continue
            there = layer_of(target, layers)
            if there is not None and there > here:
                out.append(f"{name} imports {target}: layer {here} ({', '.join(layers[here])}) may not "
                           f"import layer {there} ({', '.join(layers[there])})")
    return out


def size_problems(root: Path, package: str, limit: int = MAX_LINES) -> list[str]:
    """One line per module of ``package`` longer than ``limit`` lines."""
    out = []
    for name, path in modules(root, package).items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > limit:
            out.append(f"{name} ({path.relative_to(root)}) has {n} lines (at most {limit}): split it")
    return out


# -- the rules, on this repository -----------------------------------------------------------------


def test_no_import_cycles() -> None:
    graph = import_graph(ROOT, ["shardlog", "supervisor"])
    # the scanner sees the real imports (an empty graph would pass anything)
    assert "supervisor.arbiter.loop" in graph["supervisor.cli"]
    assert "supervisor.shards.backoff" in graph["supervisor.arbiter.loop"]  # `from supervisor.shards import backoff`
    assert "shardlog.recording.recorder" in graph["shardlog.recording.loop"]  # a TYPE_CHECKING import
    assert "shardlog.hooks.builtin" in graph["shardlog.hooks.loading"]  # `from shardlog.hooks import builtin`
    assert "shardlog.reading.sql" in graph["shardlog.history"]  # a function-level import
    problems = cycle_problems(ROOT, CYCLE_FREE, ["shardlog", "supervisor"])
    assert not problems, "\n".join(problems)


def test_shardlog_never_imports_supervisor() -> None:
    problems = [p for lower, upper in LAYERS for p in layer_problems(ROOT, lower, upper)]
    assert not problems, "\n".join(problems)


def test_imports_point_down_the_layers() -> None:
    problems = [p for package, layers in DOWNWARD.items() for p in downward_problems(ROOT, package, layers)]
    assert not problems, "\n".join(problems)


def test_an_upward_import_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"lib/__init__.py": "", "lib/low/__init__.py": "", "lib/high/__init__.py": "",
                            "lib/low/a.py": "def f():\n    from lib.high import b\n",
                            "lib/high/b.py": "from lib.low import a\n", "lib/stray.py": ""})
    layers = [["lib", "lib.low"], ["lib.high"]]
    assert downward_problems(root, "lib", layers) == [
        "lib.low.a imports lib.high.b: layer 0 (lib, lib.low) may not import layer 1 (lib.high)",
        "lib.stray is in no layer of lib: add it to DOWNWARD (and docs/architecture.md)"]
    (root / "lib/low/a.py").write_text("")
    (root / "lib/stray.py").unlink()
    assert downward_problems(root, "lib", layers) == []


def test_modules_stay_small() -> None:
    problems = [p for package in SIZE_LIMITED for p in size_problems(ROOT, package)]
    assert not problems, "\n".join(problems)


# -- each check can fail: a small package tree written for the occasion ------------------------------


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_is_found_through_relative_submodule_and_function_imports(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "app/__init__.py": "",
        "app/loop.py": "from . import ctl\n",                  # relative; ctl is a submodule
        "app/ctl/__init__.py": "",
        "app/ctl/cmd.py": "def f():\n    from .. import loop\n",  # lazy, one package up
        "app/ctl/__main__.py": "from app.ctl.cmd import f\n",
        "app/plain.py": "import app.loop\nfrom app.loop import Thing\n",  # into the cycle, not part of it
    })
    (root / "app/ctl/__init__.py").write_text("from .cmd import f\n")  # ctl -> ctl.cmd -> loop -> ctl
    graph = import_graph(root, ["app"])
    assert graph["app.loop"] == {"app.ctl"} and graph["app.ctl.cmd"] == {"app.loop"}
    assert graph["app.plain"] == {"app.loop"}
    problems = cycle_problems(root, ["app"], ["app"])
    assert problems == ["import cycle: app.ctl -> app.ctl.cmd -> app.loop -> app.ctl"]
    assert cycle_problems(root, ["other"], ["app"]) == []  # only listed packages fail
    (root / "app/plain.py").write_text("from app import ctl\n")
    (root / "app/ctl/cmd.py").write_text("import app.plain\nfrom .. import loop\n")  # a second loop
    assert cycle_problems(root, ["app"], ["app"]) == [
        "import cycle: app.ctl -> app.ctl.cmd -> app.loop -> app.ctl"
        " (one of the loops among app.ctl, app.ctl.cmd, app.loop, app.plain)"]


def test_a_type_checking_import_counts(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "app/__init__.py": "",
        "app/a.py": "from app.b import B\n",
        "app/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from app.a import A\n",
    })
    assert cycle_problems(root, ["app"], ["app"]) == ["import cycle: app.a -> app.b -> app.a"]
    (root / "app/b.py").write_text("B = 1\n")
    assert cycle_problems(root, ["app"], ["app"]) == []


def test_a_reverse_import_is_found(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "lib/__init__.py": "",
        "lib/ok.py": "import json\nimport appendix\nfrom lib import deep\n",  # appendix: not app
        "lib/deep.py": "def f():\n    import app.core.x as x\n",
        "app/__init__.py": "import lib.ok\n",  # the allowed direction
        "app/core/__init__.py": "",
    })
    assert layer_problems(root, "lib", "app") == ["lib.deep imports app.core.x (lib must never import app)"]
    (root / "lib/deep.py").write_text("from lib.ok import json\n")
    assert layer_problems(root, "lib", "app") == []


def test_a_module_over_the_limit_is_named(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "app/__init__.py": "",
        "app/fits.py": "x = 1\n" * MAX_LINES,
        "app/sub/long.py": "x = 1\n" * (MAX_LINES + 1),
    })
    assert size_problems(root, "app") == [
        f"app.sub.long (app/sub/long.py) has {MAX_LINES + 1} lines (at most {MAX_LINES}): split it"]
