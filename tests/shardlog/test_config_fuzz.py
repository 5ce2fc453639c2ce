"""Property-based fuzzing of the shard map (issue 17): every map `shardlog check` is handed ends
in exit 0, or exit 78 with one line naming the key; never a traceback, never an object built from
a YAML tag, and an alias bomb or deep nesting is refused quickly with bounded memory.

The check runs in process (``tests.helpers.run_cli``: the same ``main()`` the console script
calls) for speed; a few cases also run as real ``python -m shardlog check`` subprocesses."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import run_cli

EXAMPLE = (Path(__file__).resolve().parents[2] / "shards.example.yaml").read_text(encoding="utf-8")
BASE = yaml.safe_load(EXAMPLE)
PREFIX = "shardlog: configuration error: "
#: a key path at the start of a message: broker.port, shards[1].rotate.max_bytes, <top>
KEY_PATH = re.compile(r"^(<top>|shard map|[^\s:\[\]]+(\[\d+\])*(\.[^\s:\[\]]+(\[\d+\])*)*): ")
FUZZ = settings(max_examples=int(os.environ.get("SHARDLOG_FUZZ_EXAMPLES", "150")), deadline=None,
                derandomize=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


PATHS = paths(BASE)


def dotted(path: tuple[Any, ...]) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(path))


def check(tmp: Path, data: bytes) -> tuple[int, str, str]:
    f = tmp / "shards.yaml"
    f.write_bytes(data)
    rc, out, err = run_cli(["check", str(f)])
    assert rc in (0, 78), f"exit {rc} for {data[:300]!r}:\n{err[-2000:]}"
    assert "Traceback" not in err + out, err
    if rc == 0:
        assert out.startswith(f"{f}: OK"), out
        assert err == "", err
    else:
        assert out == "", out
        assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
        assert err.startswith(f"{PREFIX}{f}: "), err
        assert len(err) < 600, f"too long: {err!r}"
    return rc, out, err


def reason(err: str, f: Path) -> str:
    return err[len(f"{PREFIX}{f}: "):].rstrip("\n")


HOSTILE_STRINGS = ["", " ", "${", "${X}", "${SHARDLOG_FUZZ_UNSET}", "${SHARDLOG_FUZZ_UNSET:-}", "$${X}",
                   "${X:-${Y}}", "${1}", "${:-x}", "$", "64MiB", "-1", "1e999", "0", "30s", "-5s", "1.5.5s",
                   "NaN", ".inf", "\x00", "\x7f", "../..", "/", "#", "+", "a/+/b", "a/#", "$SYS", "ü/ß/😀",
                   "\u202e", "a" * 70000, "0x10", "1_000", "yes", "~", "3.1.1", "5", "127.0.0.1:99999", ":",
                   "[::1]:8470", "gzip", "csv", "{host}"]
VALUES = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(HOSTILE_STRINGS),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


def put(doc: Any, path: tuple[Any, ...], value: Any, op: str) -> None:
    *parent_path, last = path
    parent = doc
    for p in parent_path:
        parent = parent[p]
    if op == "delete":
        del parent[last]
    elif op == "rename" and isinstance(parent, dict):
        parent[f"{last}_x"] = parent.pop(last)
    else:
        parent[last] = value


@FUZZ
@given(mutations=st.lists(st.tuples(st.sampled_from(PATHS), VALUES,
                                    st.sampled_from(["set", "set", "delete", "rename"])),
                          min_size=1, max_size=3))
def test_mutated_example_maps_exit_0_or_78_naming_the_key(tmp_path_factory: pytest.TempPathFactory,
                                                          mutations: list[tuple[tuple[Any, ...], Any, str]]) -> None:
    doc = copy.deepcopy(BASE)
    applied = []
    for path, value, op in mutations:
        try:
            put(doc, path, value, op)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
        applied.append((path, op))
    tmp = tmp_path_factory.mktemp("fuzz")
    rc, _, err = check(tmp, yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogatepass"))
    if rc == 78:
        why = reason(err, tmp / "shards.yaml")
        assert KEY_PATH.match(why) or why.startswith("not valid YAML"), f"the message names no key: {why!r}"


@FUZZ
@given(cut=st.integers(min_value=0, max_value=len(EXAMPLE)),
       junk=st.one_of(st.binary(max_size=40), st.sampled_from([
           b"\xff\xfe", b"\x00", b"\t\t", b": :", b"- - -", b"&a", b"*a", b"!!binary AAAA", b"!x", b"? ",
           b"{", b"[", b"'", b'"\\x', b"%YAML 9.9\n", b"---\n", b"<<: *b\n", b"\n  port: 1\n  port: 2\n",
           b"\xef\xbb\xbf", b"\xed\xa0\x80"])),
       keep=st.booleans())
def test_text_mutations_of_the_example_exit_0_or_78(tmp_path_factory: pytest.TempPathFactory, cut: int,
                                                   junk: bytes, keep: bool) -> None:
    data = EXAMPLE.encode()
    data = data[:cut] + junk + (data[cut:] if keep else b"")
    check(tmp_path_factory.mktemp("fuzz"), data)


@FUZZ
@given(line=st.integers(min_value=0, max_value=EXAMPLE.count("\n") - 1))
def test_a_duplicated_line_is_a_duplicate_key_named_by_path(tmp_path_factory: pytest.TempPathFactory,
                                                            line: int) -> None:
    lines = EXAMPLE.splitlines(keepends=True)
    text = lines[line].split("#")[0].strip()
    data = "".join(lines[:line + 1] + [lines[line]] + lines[line + 1:]).encode()
    tmp = tmp_path_factory.mktemp("fuzz")
    rc, _, err = check(tmp, data)
    if re.fullmatch(r"[a-z_0-9]+:.*", text):  # a "key: value" line (not a list item, not a comment)
        key = text.split(":")[0]
        assert rc == 78, f"duplicate {key!r} accepted"
        assert f"duplicate key {key!r}" in err and KEY_PATH.match(reason(err, tmp / "shards.yaml")), err


def nested(n: int, open_: str, close: str) -> str:
    return "shards: [{name: a, prefix: '#'}]\nx: " + open_ * n + close * n + "\n"


BOMB = ("shards: [{name: a, prefix: '#'}]\nlol0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + "".join(f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 10)))
MARKER = "/tmp/shardlog-fuzz-tag-ran"
CASES: dict[str, tuple[str | bytes, str]] = {
    "5,000 nested lists": (nested(5000, "[", "]"), "nested deeper than 64 levels"),
    "5,000 nested mappings": (nested(5000, "{a: ", "}"), "nested deeper than 64 levels"),
    "1,000 block levels": ("shards: [{name: a, prefix: '#'}]\n" + "".join(" " * i + f"k{i}:\n" for i in range(1000)),
                           "nested deeper than 64 levels"),
    "billion laughs": (BOMB, "expands to more than 200,000 values through aliases"),
    "alias to an ancestor": ("shards: [{name: a, prefix: '#'}]\nx: &a [1, *a]\n", "refers to a node that contains it"),
    "aliases nesting past the depth": ("shards: [{name: a, prefix: '#'}]\n" + "".join(
        f"d{i}: &d{i} [[[[[[[[[[{'*d' + str(i - 1) if i else 0}]]]]]]]]]]\n" for i in range(10)),
        "nested deeper than 64 levels once aliases are expanded"),
    "python object tag": ("shards: [{name: a, prefix: '#'}]\n"
                          f"x: !!python/object/apply:os.system ['touch {MARKER}']\n",
                          "tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
    "python name tag on a key": ("shards: [{name: a, prefix: !!python/name:os.system ''}]\n", "shards[0].prefix: tag"),
    "local tag": ("shards: [{name: a, prefix: !secret x}]\n", "shards[0].prefix: tag '!secret'"),
    "binary tag": ("broker: {password: !!binary aGk=}\nshards: [{name: a, prefix: '#'}]\n", "broker.password: tag"),
    "set tag": ("shards: !!set {a, b}\n", "shards: tag"),
    "timestamp tag": ("shards: [{name: a, prefix: !!timestamp 2026-01-01}]\n", "shards[0].prefix: tag"),
    "duplicate top key": ("shards: [{name: a, prefix: '#'}]\nshards: []\n", "shards: duplicate key 'shards'"),
    "duplicate nested key": ("shards: [{name: a, prefix: '#', rotate: {max_bytes: 1MiB, max_bytes: 2MiB}}]\n",
                             "shards[0].rotate.max_bytes: duplicate key"),
    "an int beyond Python's digit limit": ("broker: {port: " + "9" * 5000 + "}\nshards: [{name: a, prefix: '#'}]\n",
                                           "broker.port: cannot read"),
    "a bad explicit int": ("broker: {port: !!int abc}\nshards: [{name: a, prefix: '#'}]\n", "broker.port: cannot read"),
    "a bad explicit bool": ("broker: {embedded: !!bool maybe}\nshards: [{name: a, prefix: '#'}]\n",
                            "broker.embedded: cannot read"),
    "an int key": ("shards: [{name: a, prefix: '#', 5: x}]\n", "shards[0].5: the key '5'"),
    "a null key": ("~: x\nshards: [{name: a, prefix: '#'}]\n", "the key '~'"),
    "an unhashable key": ("? [a]\n: b\nshards: [{name: a, prefix: '#'}]\n", "not valid YAML"),
    "invalid UTF-8": (b"shards: [{name: a, prefix: '\xff'}]\n", "not UTF-8 text: byte 0xff at offset 28"),
    "a UTF-16 file": ("shards: [{name: a, prefix: '#'}]\n".encode("utf-16"), "not UTF-8 text"),
    "a NUL byte": (b"shards: [{name: a, prefix: '#'}]\x00\n", "not valid YAML"),
    "random binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "NUL in a prefix": ('shards: [{name: a, prefix: "a\\0b"}]\n', "shards[0].prefix: NUL"),
    "NUL in a root": ('shards: [{name: a, prefix: "#", root: "a\\0b"}]\n', "shards[0].root: contains NUL"),
    "NaN duration": ("shards: [{name: a, prefix: '#'}]\nsupervisor: {heartbeat_timeout: .nan}\n",
                     "supervisor.heartbeat_timeout: expected >= 1ms, got nan"),
    "infinite duration": ("shards: [{name: a, prefix: '#', lock_wait: .inf}]\n",
                          "shards[0].lock_wait: expected at most"),
    "a duration past threading's limit": ("shards: [{name: a, prefix: '#', lock_wait: 999999999999w}]\n",
                                          "shards[0].lock_wait: expected at most 36500d"),
    "an unset variable": ("shards: [{name: a, prefix: '${SHARDLOG_FUZZ_UNSET}'}]\n",
                          "shards[0].prefix: environment variable SHARDLOG_FUZZ_UNSET is not set"),
    "two documents": ("shards: [{name: a, prefix: '#'}]\n---\nshards: []\n", "not valid YAML"),
    "a list at the top": ("- a\n- b\n", "expected a mapping at the top"),
    "an empty file": ("", "shard map is empty"),
    "only a comment": ("# nothing\n", "shard map is empty"),
    "over 4 MiB": ("shards: [{name: a, prefix: '#'}]\n" + "#" * (5 * 1024 * 1024) + "\n", "larger than 4 MiB"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_maps_are_refused_in_one_line_naming_the_key(tmp_path: Path, name: str) -> None:
    data, expected = CASES[name]
    raw = data.encode() if isinstance(data, str) else data
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        rc, _, err = check(tmp_path, raw)
        elapsed = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rc == 78, f"{name}: accepted"
    assert expected in err, f"{name}: {err!r}"
    assert not os.path.exists(MARKER), "a YAML tag ran a command"
    # sanity bounds, not benchmarks: an unbounded expansion takes minutes and gigabytes
    assert elapsed < 10, f"{name}: took {elapsed:.1f}s"
    assert peak < 64 * 1024 * 1024 + 2 * len(raw), f"{name}: {peak / 1e6:.0f} MB at peak"


def test_merge_keys_and_anchors_within_the_limits_still_work(tmp_path: Path) -> None:
    text = ("base: &base {recent: 3, rotate: {max_bytes: 1MiB}}\n"
            "shards:\n  - {<<: *base, name: a, prefix: a}\n  - {<<: *base, name: b, prefix: '#'}\n")
    rc, out, _ = check(tmp_path, text.replace("base: &base", "x-base: &base").encode())
    # an unknown top-level key is still an error: anchors live inside known keys
    assert rc == 78
    text = ("shards:\n  - &one {name: a, prefix: a, recent: 3}\n  - {<<: *one, name: b, prefix: '#'}\n"
            "defaults: {rotate: {max_age: 2026-01-01x}}\n")
    rc, out, err = check(tmp_path, text.encode())
    assert rc == 78 and "defaults.rotate.max_age" in err
    rc, out, err = check(tmp_path, text.replace("2026-01-01x", "1d").encode())
    assert rc == 0, err
    rc, out, err = check(tmp_path, b"shards: [{name: a, prefix: 2026-01-01}]\n")  # a date-like prefix is text
    assert rc == 0 and "2026-01-01" in out, err


@pytest.mark.parametrize("name", ["5,000 nested lists", "billion laughs", "python object tag", "invalid UTF-8",
                                  "duplicate nested key"])
def test_hostile_maps_through_the_real_command(tmp_path: Path, name: str) -> None:
    data, expected = CASES[name]
    f = tmp_path / "shards.yaml"
    f.write_bytes(data.encode() if isinstance(data, str) else data)
    r = subprocess.run([sys.executable, "-m", "shardlog", "check", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 78, r.stderr
    assert r.stderr.startswith(f"{PREFIX}{f}: ") and r.stderr.count("\n") == 1, r.stderr
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(MARKER)
