"""Every registered verb of ``shardlog`` (its own and the entry-point verbs from ``supervisor``)
with missing, extra and malformed arguments: exit 64 with a usage line, never a traceback
(issue 17). In process through ``tests.helpers.run_cli`` (the console script's ``main()``), plus a
few real subprocesses.

Each verb has a *base* command line that parses but then fails fast without a usage error (a
map naming no such shard, a root that does not exist, a port nobody listens on), so every case
below exits 64 only because of what it breaks, and nothing ever starts recording."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from shardlog.cli.main import build_parser
from tests.helpers import free_port, run_cli, write_map

BUILTIN = {"record", "check", "init", "topics", "tail", "cat", "export", "sql", "replay", "nginx-routes"}
NUMBER_BAD = ["abc", "", "nan", "inf", "-1", "1e999", "0x10", "1.5.5"]
TIME_BAD = ["abc", "", "2026-13-45T99:00", "yesterday"]
#: options whose value is a free string checked by the verb itself
STRING_BAD = {
    "--speed": ["abc", "0", "-1", "nan", "inf", ""],
    "--broker": ["nope", "mqtt://", "mqtt://host:99999", "http://127.0.0.1:1883", "mqtt://[::1", ""],
    "--rename": ["noequals", "=x", "a=", "a/#=b", ""],
    "--url": ["nope", "ftp://127.0.0.1:1", "http://", "http://127.0.0.1:99999", "", "http://[::1"],
    "--upstream": ["bad", "=1.2.3.4:80", "all=", "all=:80x"],
    "--to": ["out.txt", "", "out.parquet.bak"],
}


URL_VERBS = {"status", "rotate", "rm", "mv", "stop", "start"}


def verbs() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    tmp = tmp_path_factory.mktemp("cli")
    m = str(write_map(tmp / "shards.yaml", free_port(), [{"name": "a", "prefix": "#"}]))
    root = str(tmp / "no-such-root")
    return {
        "record": [m, "--shard", "no-such-shard"],          # 78
        "check": [str(tmp / "missing.yaml")],                # 78
        "init": [str(tmp / "exists.yaml")],                  # 64 only if it exists: created below
        "topics": [root, "chat"],                            # 66
        "tail": [root, "chat/a"],                            # 66
        "cat": [root, "chat"],                               # 66
        "export": [root, "chat", "--to", str(tmp / "out.sqlite")],   # 66
        "sql": [root, "SELECT 1"],                           # 66
        "replay": [root, "chat", "--broker", "mqtt://127.0.0.1:1"],  # 66
        "nginx-routes": [m, "--upstream", "all=127.0.0.1:80"],      # 0
        "supervise": [str(tmp / "missing.yaml")],            # 78
        "status": [m],                                       # 69: nobody listens
        "rotate": [m, "chat/a"],                             # 69
        "rm": [m, "chat/a", "--yes"],                        # 69
        "mv": [m, "chat/a", "chat/b", "--yes"],              # 69
        "stop": [m, "a", "--yes"],                           # 69
        "start": [m, "a"],                                   # 69
    }


def test_every_registered_verb_is_walked(bases: dict[str, list[str]]) -> None:
    plugins = {ep.name for ep in importlib.metadata.entry_points(group="shardlog.commands")}
    assert {"supervise", "status", "rotate", "rm", "mv", "stop", "start"} <= plugins
    assert set(verbs()) == BUILTIN | plugins == set(bases), "a verb without a base command line here"


def test_the_base_command_lines_fail_fast_but_not_as_usage_errors(bases: dict[str, list[str]]) -> None:
    for verb, argv in bases.items():
        if verb == "init":
            continue
        rc, _, err = run_cli([verb, *argv])
        assert rc not in (64, 70), f"{verb} {argv}: exit {rc}\n{err}"
        assert "Traceback" not in err


def cases(verb: str, parser: argparse.ArgumentParser, base: list[str]) -> list[tuple[str, list[str]]]:
    out: list[tuple[str, list[str]]] = [
        ("an unknown option", [*base, "--no-such-option"]),
        ("extra operands", [*base, "extra1", "extra2", "extra3"]),
    ]
    if verb != "init":  # init alone is valid (it writes ./shards.yaml)
        out.append(("no arguments", []))
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or isinstance(action, argparse._HelpAction):
            continue
        opt = action.option_strings[-1]
        if action.required:
            i = base.index(opt)
            out.append((f"{opt} missing", base[:i] + base[i + 2:]))
            out.append((f"{opt} without its value", base[:i] + base[i + 2:] + [opt]))
        if action.choices:
            bad = ["bogus", ""]
        elif opt in STRING_BAD:
            bad = STRING_BAD[opt]
        elif action.type is None or action.type is str:
            continue
        elif getattr(action.type, "__name__", "") == "_time_arg":
            bad = TIME_BAD
        else:
            bad = NUMBER_BAD
        for value in bad:  # --url replaces the map, the first operand
            argv = base[1:] if opt == "--url" and verb in URL_VERBS else base
            out.append((f"{opt} {value!r}", [*argv, f"{opt}={value}"]))
    return out


def test_every_verb_with_missing_extra_and_malformed_arguments_exits_64_with_usage(
        bases: dict[str, list[str]]) -> None:
    Path(bases["init"][0]).write_text("exists\n")
    failures, walked = [], 0
    for verb, parser in verbs().items():
        for what, argv in cases(verb, parser, bases[verb]):
            walked += 1
            rc, out, err = run_cli([verb, *argv])
            if rc != 64 or "usage: shardlog" not in err or "Traceback" in err + out:
                failures.append(f"shardlog {verb} ({what}): exit {rc}: {err.strip()[-300:]!r}")
    print(f"[bad input] {walked} command lines over {len(bases)} verbs")
    assert walked > 150
    assert not failures, f"{len(failures)} of {walked}:\n" + "\n".join(failures)


@pytest.mark.parametrize("argv", [
    [], ["no-such-verb"], ["check"], ["record", "x.yaml"], ["tail", "root", "t", "-n", "abc"],
    ["status", "--timeout", "nan"], ["rm", "a", "b", "c", "d"],
])
def test_bad_arguments_through_the_real_command(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "shardlog", *argv], capture_output=True, text=True, timeout=60,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 64, r.stderr
    assert r.stderr.startswith("usage: shardlog") and "Traceback" not in r.stderr, r.stderr
