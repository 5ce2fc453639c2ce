"""Regression tests for what the fault scenarios found (docs/reliability.md, "Found and fixed").
Fast and without a broker; the scenarios themselves are in the other files here."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from shardlog.writing.atomic import swap_in
from tests.supervisor.helpers import FakeChild, FakeSpawner

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


class UnkillableChild(FakeChild):
    """A process blocked in the kernel (state D): signals wait until it returns."""

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self.signals.append(sig)


class UnkillableSpawner(FakeSpawner):
    def __call__(self, argv: list[str], env: dict[str, str]) -> FakeChild:
        self.next_pid += 1
        child = UnkillableChild(self.next_pid, argv, self)
        self.children.append(child)
        return child


def test_a_shard_surviving_sigkill_is_reported(tmp_path: Path) -> None:
    """Found by test_blocking_write_on_a_frozen_file_system: a recorder blocked in a write on
    a frozen file system survives SIGKILL until the thaw, and the supervisor said nothing
    after "SIGKILL". Now its log and /status (the shard's reason) say what is going on."""
    from supervisor.arbiter.stops import STUCK_REASON, UNKILLABLE_GRACE
    from tests.supervisor.test_supervisor_arbiter import Harness

    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.spawner = h.arb.spawn = UnkillableSpawner()  # before the first start
    h.start_all()
    a = h.live("a")
    h.step(5.1)   # no heartbeat for the 5 s timeout: SIGABRT
    h.step(2.0)   # SIGKILL
    assert a.signals[-1] == signal.SIGKILL and h.state("a") == "stopping"
    h.step(UNKILLABLE_GRACE + 0.1)
    assert h.arb.snapshot.shards[0].reason == STUCK_REASON and h.state("a") == "stopping"
    a.exit(-signal.SIGKILL)  # the kernel lets go (the thaw)
    h.step()
    h.step(1.0)
    assert h.live("a") is not a and h.arb.shards["a"].restarts == 1
