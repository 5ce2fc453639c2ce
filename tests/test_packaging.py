"""``python -m build`` makes a wheel and an sdist that install into a fresh venv and run the main
job, ``shardlog supervise shards.example.yaml`` (issue "Quality gates"). Real processes, no mocks.

- The build is of a copy of the files git would commit (``git ls-files --cached --others
  --exclude-standard``: tracked and new ones, not the ignored build/, ``*.egg-info``, data/),
  so a build that only works because of a leftover in the checkout fails here. ``python -m
  build`` (the ``build`` package, from the ``test`` extra) makes the sdist, then the wheel from
  the sdist, in isolated environments: it needs the package index (setuptools), as does the venv.
- The venv is plain, without the system's site-packages, so a dependency pyproject.toml forgot
  is missing there (the system's has everything of the ``test`` extra), and it is the base
  install: no extra, hence no DuckDB, so the recorder, the supervisor, the embedded broker and
  /status are shown to need none, and ``shardlog sql`` exits 69 for real (tests/test_extras.py
  simulates the missing modules instead).
- In it, the wheel and then the sdist (built by pip, from source) are installed over each other
  (``--no-deps``: the dependencies came with the first install). Each one runs the example map,
  its ports moved to free ones, from a temporary directory with no PYTHONPATH, so only the
  installed files can be imported: ready, both shards subscribed, one message published as the
  README publishes it and found in ``+recent.json``, then SIGTERM and exit 0.

25 s measured here with a warm pip cache (a cold one first downloads ~20 MB: setuptools and the
dependencies); marked ``slow``, which only labels it: CI runs it (.ci/run deselects nothing).
Every wait is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port, http_get, wait_for

pytest.importorskip("build", reason="python -m build: pip install -e '.[test]' brings it (build>=1)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
#: what the packages hold besides Python modules ([tool.setuptools.package-data])
PACKAGE_DATA = ["shardlog/example.yaml"]
#: what the sdist holds besides the packages: the README's first command runs the example map
SDIST_EXTRA = ["pyproject.toml", "README.md", "shards.example.yaml", "PKG-INFO"]
#: the environment of everything run from the venv: nothing of this checkout on the path
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "MQTT_HOST",
                          "MQTT_USERNAME", "MQTT_PASSWORD", "SHARDLOG_CONTROL_TOKEN", "VIRTUAL_ENV"}}
PIP = ["-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]


def run(argv: list[str | Path], timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, check=False, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, argv))}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def source_files() -> list[str]:
    """The checkout's files as a commit of everything would hold them (relative paths)."""
    r = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, timeout=60, check=False)
    if r.returncode != 0:  # not a git checkout (an unpacked archive): every file but the usual debris
        skip = {".git", "__pycache__", "build", "dist", "data", ".venv", "node_modules", ".pytest_cache",
                ".hypothesis"}
        return sorted(str(p.relative_to(REPO)) for p in REPO.rglob("*")
                      if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
                      and not any(part.endswith(".egg-info") for part in p.parts))
    return sorted(f for f in r.stdout.decode().split("\0") if f and os.path.lexists(REPO / f))


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(wheel, sdist, the .py files of the packages in the source) built from a copy of the source."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "dist"
    files = source_files()
    for rel in files:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel, follow_symlinks=False)
    run([sys.executable, "-m", "build", "--outdir", out, src], cwd=tmp, env=CLEAN_ENV)
    (wheel,), (sdist,) = sorted(out.glob("*.whl")), sorted(out.glob("*.tar.gz"))
    modules = [f for f in files if f.endswith(".py") and f.split("/")[0] in ("shardlog", "supervisor")]
    assert len(modules) > 50, f"only {len(modules)} modules in the source listing"
    return wheel, sdist, modules


@pytest.fixture(scope="module")
def venv(dists: tuple[Path, Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh plain venv with the wheel installed, its dependencies from the index: the python."""
    d = tmp_path_factory.mktemp("venv") / "v"
    run([sys.executable, "-m", "venv", d], env=CLEAN_ENV)
    python = d / "bin" / "python"
    run([python, *PIP, "install", dists[0]], env=CLEAN_ENV)
    return python


def test_the_wheel_and_the_sdist_hold_the_package(dists: tuple[Path, Path, list[str]]) -> None:
    wheel, sdist, modules = dists
    name, version = PYPROJECT["project"]["name"], PYPROJECT["project"]["version"]
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
        entry_points = z.read(f"{name}-{version}.dist-info/entry_points.txt").decode()
        metadata = z.read(f"{name}-{version}.dist-info/METADATA").decode()
    with tarfile.open(sdist) as t:
        top = f"{name}-{version}/"
        in_sdist = {m.name.removeprefix(top) for m in t.getmembers() if m.isfile()}
    assert not [f for f in [*modules, *PACKAGE_DATA] if f not in in_wheel], "missing from the wheel"
    assert not [f for f in [*modules, *PACKAGE_DATA, *SDIST_EXTRA] if f not in in_sdist], "missing from the sdist"
    assert not [f for f in in_sdist if f.startswith("tests/")], "a partial tests/ in the sdist (MANIFEST.in prunes it)"
    # the verbs of supervisor/ reach `shardlog` only through this group: every one is in the wheel
    group = PYPROJECT["project"]["entry-points"]["shardlog.commands"]
    for verb, target in group.items():
        assert f"{verb} = {target}" in entry_points, f"entry point {verb} missing:\n{entry_points}"
    assert "[console_scripts]\nshardlog = shardlog.cli.main:main" in entry_points
    # no extra in the base dependencies; the test extra brings every other extra
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert not any(d.startswith("duckdb") for d in PYPROJECT["project"]["dependencies"])
    assert f"shardlog[{','.join(sorted(set(extras) - {'test'}))}]" in extras["test"]
    assert "Requires-Dist: duckdb>=1.1; extra == \"sql\"" in metadata


def free_ports_map(text: str) -> tuple[str, int, int, int]:
    """The example map with its three ports (1883, 1884, 8470) moved to free ones."""
    port, port311, http = free_port(), free_port(), free_port()
    for old, new in (("\n  port: 1883\n", f"\n  port: {port}\n"),
                     ("embedded_port_311: 1884 ", f"embedded_port_311: {port311} "),
                     ("listen: 127.0.0.1:8470 ", f"listen: 127.0.0.1:{http} ")):
        assert text.count(old) == 1, f"the example map no longer has {old.strip()!r} once: update this test"
        text = text.replace(old, new)
    return text, port, port311, http


class Supervise:
    """``shardlog supervise`` of the venv, killed with its children if a test fails half way."""

    def __init__(self, python: Path, workdir: Path) -> None:
        self.log_path = workdir / "supervise.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([str(python.parent / "shardlog"), "supervise", "shards.example.yaml"],
                                     cwd=workdir, env=CLEAN_ENV, stdout=self.log, stderr=subprocess.STDOUT)
        self.children: set[int] = set()

    def status(self, http: int) -> dict | None:
        assert self.proc.poll() is None, f"supervise exited {self.proc.returncode}:\n{self.text()}"
        body = http_get(f"http://127.0.0.1:{http}/status")
        return json.loads(body) if body is not None else None

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.children |= {c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.children:  # only what this supervisor started
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()


@pytest.fixture
def supervising() -> Iterator[list[Supervise]]:
    started: list[Supervise] = []
    yield started
    for s in started:
        s.kill()


def supervise_the_example(python: Path, workdir: Path, example: str, started: list[Supervise]) -> None:
    """The README's "Two commands", from the installed files only."""
    where = run([python, "-c", "import shardlog, supervisor; print(shardlog.__file__); print(supervisor.__file__)"],
                cwd=workdir, env=CLEAN_ENV).stdout.split()
    site = str(python.parent.parent)
    assert all(p.startswith(site) for p in where), f"not the installed package: {where}"
    text, port, port311, http = free_ports_map(example)
    (workdir / "shards.example.yaml").write_text(text, encoding="utf-8")
    sup = Supervise(python, workdir)
    started.append(sup)

    def ready() -> dict | None:
        doc = sup.status(http)
        ok = doc and doc["supervisor"]["ready"] and len(doc["shards"]) == 2 and all(
            s["state"] == "running" and (s["counters"] or {}).get("subscribed") for s in doc["shards"])
        return doc if ok else None
    doc = wait_for(ready, 60, f"both shards running and subscribed (log: {sup.log_path})", interval=0.05)
    sup.children = {s["pid"] for s in doc["shards"]} | {doc["supervisor"]["embedded_broker"]["pid"]}
    status = subprocess.run([str(python.parent / "shardlog"), "status", "shards.example.yaml"], cwd=workdir,
                            env=CLEAN_ENV, capture_output=True, text=True, timeout=60, check=False)
    assert status.returncode == 0 and "chat" in status.stdout and "rest" in status.stdout, status.stdout + status.stderr
    # the README's publish, on the 3.1.1 listener, with the venv's paho
    payload = {"user": "ann", "text": f"hi from {workdir.name}"}
    run([python, "-c", "import json, sys, paho.mqtt.publish as p; "
         "p.single('chat/room42', sys.argv[1], qos=1, hostname='127.0.0.1', port=int(sys.argv[2]))",
         json.dumps(payload), str(port311)], cwd=workdir, env=CLEAN_ENV, timeout=60)
    recent = workdir / "data" / "chat" / "room42" / "+recent.json"

    def recorded() -> bool:
        sup.status(http)  # still alive
        try:
            return any(r.get("payload") == payload for r in json.loads(recent.read_bytes()))
        except (OSError, ValueError):
            return False
    wait_for(recorded, 30, f"the message in {recent} (log: {sup.log_path})")
    sup.proc.send_signal(signal.SIGTERM)
    rc = sup.proc.wait(60)
    assert rc == 0, f"supervise exited {rc} on SIGTERM:\n{sup.text()}"
    left = [pid for pid in sup.children
            if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert not left, f"children left running after the supervisor stopped: {left}"
    assert "supervisor stopped (exit 0)" in sup.text()


def test_the_wheel_installs_and_runs_the_main_job_without_any_extra(
        dists: tuple[Path, Path, list[str]], venv: Path, tmp_path: Path, supervising: list[Supervise]) -> None:
    run([venv, *PIP, "install", "--no-deps", "--force-reinstall", dists[0]], env=CLEAN_ENV)
    # `shardlog init` writes the example map from the installed package data: the README's file
    run([venv.parent / "shardlog", "init", tmp_path / "init.yaml"], cwd=tmp_path, env=CLEAN_ENV)
    example = (tmp_path / "init.yaml").read_text(encoding="utf-8")
    assert example == (REPO / "shards.example.yaml").read_text(encoding="utf-8")
    supervise_the_example(venv, tmp_path, example, supervising)
    # the base install has no DuckDB: the sql extra's message, for real
    probe = subprocess.run([venv, "-c", "import duckdb"], capture_output=True, timeout=60, env=CLEAN_ENV, check=False)
    assert probe.returncode != 0, "DuckDB came with the base install"
    r = subprocess.run([venv.parent / "shardlog", "sql", tmp_path / "data", "SELECT 1"], cwd=tmp_path,
                       env=CLEAN_ENV, capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode, r.stderr) == (69, "shardlog: sql needs DuckDB: pip install 'shardlog[sql]'\n")


def test_the_sdist_installs_and_runs_the_main_job(
        dists: tuple[Path, Path, list[str]], venv: Path, tmp_path: Path, supervising: list[Supervise]) -> None:
    run([venv, *PIP, "install", "--no-deps", "--force-reinstall", dists[1]],
        env=CLEAN_ENV)
    with tarfile.open(dists[1]) as t:  # the sdist's own example map
        name = f"{PYPROJECT['project']['name']}-{PYPROJECT['project']['version']}/shards.example.yaml"
        example = t.extractfile(name).read().decode("utf-8")  # type: ignore[union-attr]
    supervise_the_example(venv, tmp_path, example, supervising)
