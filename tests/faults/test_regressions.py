"""Regression tests for what the fault scenarios found (docs/reliability.md, "Found and fixed").
Fast and without a broker; the scenarios themselves are in the other files here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from shardlog.atomic import swap_in

pytestmark = pytest.mark.faults


def nginx_etag(path: Path) -> str:
    """How NGINX builds a static file's ETag: mtime in whole seconds and size, in hex."""
    st = os.stat(path)
    return f'"{st.st_mtime_ns // 1_000_000_000:x}-{st.st_size:x}"'


def test_recent_json_versions_of_one_second_get_distinct_etags(tmp_path: Path) -> None:
    """Found by test_serving: +recent.json rewritten 100 times a second with records of one
    length kept the same ETag, so revalidating clients got 304 and kept an old version."""
    path, spare = tmp_path / "+recent.json", tmp_path / "+recent.json.spare"
    versions: set[tuple[int, int]] = set()
    seen: dict[str, bytes] = {}
    for i in range(50):  # 10..59, the same length every time, well within a second or two
        body = b'[{"ts":1,"payload":{"i":%d}}]\n' % (10 + i)
        swap_in(str(path), str(spare), body, versions)
        data = path.read_bytes()
        assert json.loads(data) == json.loads(body) and data.rstrip(b" \n") == body.rstrip(b"\n")
        etag = nginx_etag(path)
        assert seen.setdefault(etag, data) == data, f"ETag {etag} named two versions"
    assert len(versions) <= 50


def test_recent_json_first_version_differs_from_the_previous_process(tmp_path: Path) -> None:
    path, spare = tmp_path / "+recent.json", tmp_path / "+recent.json.spare"
    swap_in(str(path), str(spare), b"[1]\n", set())      # a previous recorder's last version
    before = nginx_etag(path)
    swap_in(str(path), str(spare), b"[2]\n", set())      # a new process, the same second
    assert nginx_etag(path) != before and json.loads(path.read_bytes()) == [2]
