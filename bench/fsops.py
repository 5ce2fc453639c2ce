#!/usr/bin/env python3
"""What each file-system operation of the write path costs, per topic, on one directory tree.

    python bench/fsops.py                     # 20,000 topics below a temporary directory
    python bench/fsops.py --dir /mnt/x --topics 100000

For N topic directories (``a/room0000000`` ...) it times, one pass each: ``mkdir``; creating
``+log.jsonl`` with one record (open O_CREAT + write + close); reopening it to append one
(what a topic whose descriptor was evicted costs); ``stat``; ``os.path.realpath``; creating
a third file (the ``+recent.json`` spare); renaming it; and removing the tree. Wall time and
the process's system and user CPU per operation, in µs. These are the floor of any
file-per-topic design: docs/benchmarks.md, "Many topics", turns them into the limit they
imply. On a journal-less ext4 the creation costs depend on what was deleted in the last
minutes (ext4's recently_deleted inode check): run it right after and right before a
benchmark to see the state the benchmark met.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from shardlog.writing.atomic import create_new, swap_in  # noqa: E402  (the repository's, not an installed copy)


def measure(label: str, fn: Callable[[int], object], n: int) -> None:
    t0, c0 = time.perf_counter(), os.times()
    for i in range(n):
        fn(i)
    wall, c1 = time.perf_counter() - t0, os.times()
    print(f"| {label} | {wall / n * 1e6:.1f} | {(c1.system - c0.system) / n * 1e6:.1f} | "
          f"{(c1.user - c0.user) / n * 1e6:.1f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="where to make the tree (default: a temporary directory)")
    p.add_argument("--topics", type=int, default=20_000)
    a = p.parse_args()
    root = tempfile.mkdtemp(prefix="fsops-", dir=a.dir)
    n = a.topics
    line = b"x" * 150 + b"\n"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT

    def d(i: int) -> str:
        return f"{root}/a/room{i:07d}"

    def append(i: int) -> None:
        fd = os.open(d(i) + "/+log.jsonl", flags, 0o644)
        os.write(fd, line)
        os.close(fd)

    def spare(i: int) -> None:
        fd = os.open(d(i) + "/+recent.json.spare", flags, 0o644)
        os.write(fd, b"[]\n")
        os.close(fd)

    body = b'[{"ts":1,"payload":"x"}]\n'

    def first_swap_in(i: int) -> None:  # the first +recent.json of a new topic, through swap_in
        swap_in(d(i) + "/+recent.json", d(i) + "/+recent.json.spare", body, set())

    def first_created(i: int) -> None:  # the same, knowing the directory is new: create, write, rename
        create_new(d(i) + "/+recent.json", d(i) + "/+recent.json.spare", body, set())

    os.mkdir(root + "/a")
    print(f"{n:,} topics below {root}\n")
    print("| operation | wall µs | system µs | user µs |\n|---|---:|---:|---:|")
    measure("mkdir (new topic)", lambda i: os.mkdir(d(i)), n)
    measure("create +log.jsonl, write, close", append, n)
    measure("reopen, append, close", append, n)
    measure("stat", lambda i: os.stat(d(i) + "/+log.jsonl"), n)
    measure("os.path.realpath", lambda i: os.path.realpath(d(i)), n)
    measure("create a third file (the spare)", spare, n)
    measure("rename it", lambda i: os.rename(d(i) + "/+recent.json.spare", d(i) + "/+recent.json"), n)
    half = n // 2
    for i in range(n):  # a clean start for the first +recent.json: none there yet
        os.unlink(d(i) + "/+recent.json")
    measure(f"first +recent.json, swap_in (topics 1-{half:,})", first_swap_in, half)
    measure(f"first +recent.json, create_new (the other {n - half:,})",
            lambda i: first_created(i + half), n - half)
    measure("replace +recent.json, the second time (swap_in makes the spare)", first_swap_in, n)
    measure("replace +recent.json, later (swap_in: the spare exchanged)", first_swap_in, n)
    t0 = time.perf_counter()
    shutil.rmtree(root)
    print(f"| rm -rf, per topic | {(time.perf_counter() - t0) / n * 1e6:.1f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
