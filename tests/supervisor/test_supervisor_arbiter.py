"""The arbiter's main loop with a fake clock, fake children and injected signals: no
processes, no sleeps. Each test calls :meth:`Arbiter.step` as the real loop does."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from shardlog.config.load import load_map
from supervisor.arbiter.loop import Arbiter
from supervisor.serve.status import Sample, StatusDoc, build_status, encode
from tests.supervisor.helpers import FakeChild, FakeClock, FakeSpawner

SUP = {"heartbeat_timeout": "5s", "stop_timeout": "10s", "start_jitter": "200ms",
       "restart": {"backoff_initial": "500ms", "backoff_max": "4s", "healthy_after": "60s",
                   "max_restarts": 3, "window": "60s", "failed_retry": "5m"}}


def write(path: Path, shards: list[dict[str, Any]], **sup: Any) -> Path:
    path.write_text(yaml.safe_dump({"shards": shards, "defaults": {"root": str(path.parent / "data")},
                                    "supervisor": {**SUP, **sup}}))
    return path


class Harness:
    def __init__(self, tmp_path: Path, shards: list[dict[str, Any]], rand: float = 0.5, host: str | None = None,
                 **sup: Any) -> None:
        self.map_path = write(tmp_path / "shards.yaml", shards, **sup)
        self.clock = FakeClock()
        self.spawner = FakeSpawner()
        self.rand = rand
        self.arb = Arbiter(load_map(str(self.map_path)), str(self.map_path), clock=self.clock,
                           spawn=self.spawner, rand=lambda: self.rand, env={}, host=host)
        run = tmp_path / "run"
        run.mkdir()
        self.arb.boot(str(run))

    def step(self, advance: float = 0.0) -> None:
        self.clock.advance(advance)
        self.arb.step()

    def state(self, name: str) -> str:
        return self.arb.shards[name].state.value

    def live(self, name: str) -> FakeChild:
        return self.spawner.live(name)

    def start_all(self) -> None:
        """Step until every shard has a process, then let each send its first heartbeat."""
        for _ in range(100):
            self.step(0.05)
            if all(rt.child is not None for rt in self.arb.shards.values()):
                break
        for name in self.arb.shards:
            self.live(name).beat()
        self.step()
        assert all(self.state(n) == "running" for n in self.arb.shards)


def test_starts_every_shard_with_jitter_between_starts(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}])
    h.step()
    assert [c.shard for c in h.spawner.children] == ["a"]  # one start, then 200ms * 0.5 of jitter
    h.step(0.09)
    assert len(h.spawner.children) == 1
    h.step(0.02)
    assert [c.shard for c in h.spawner.children] == ["a", "b"]
    argv = h.spawner.children[0].argv
    assert argv[1:5] == ["-m", "shardlog", "record", h.arb.map_copy]
    assert argv[argv.index("--parent-pid") + 1] == str(h.arb.pid)
    assert h.state("a") == "starting"
    h.live("a").beat(subscribed=False)
    h.step()
    assert h.state("a") == "running" and not h.arb.ready
    h.live("b").beat()
    h.live("a").beat()
    h.step()
    assert h.arb.ready  # every shard subscribed


def test_crash_backoff_schedule_then_failed_then_slow_retry(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "bad", "prefix": "x"}, {"name": "good", "prefix": "g"}])
    h.start_all()
    good = h.live("good")
    expected = [0.45, 0.9, 1.8]  # 0.5 s doubling, shortened by 20 % * rand (0.5)
    for n, delay in enumerate(expected, start=1):
        h.live("bad").exit(73)
        h.step()
        assert h.state("bad") == "backoff"
        h.step(delay - 0.01)
        assert h.state("bad") == "backoff", f"restart {n} came too early"
        h.step(0.02)
        assert h.state("bad") == "starting" and h.arb.shards["bad"].restarts == n
    h.live("bad").exit(73)
    h.step()
    rt = h.arb.shards["bad"]
    assert rt.state.value == "failed" and "max_restarts 3" in (rt.reason or "")
    assert rt.last_exit is not None and rt.last_exit.code == 73
    for _ in range(299):  # 299 s later, good beating all along
        good.beat()
        h.step(1.0)
    assert h.state("bad") == "failed"
    good.beat()
    h.step(1.1)
    assert h.state("bad") == "starting"  # the slow retry
    assert h.live("good") is good and good.signals == []  # never disturbed


def test_exit_78_is_never_retried(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.start_all()
    h.live("a").exit(78)
    h.step()
    rt = h.arb.shards["a"]
    assert rt.state.value == "failed" and rt.reason == "configuration error" and rt.next_start is None
    h.step(86400)
    assert len(h.spawner.children) == 1


def test_backoff_resets_after_healthy_running(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}], rand=0.0)
    h.start_all()
    h.live("a").exit(1)
    h.step()
    h.step(0.5)
    h.live("a").beat()
    h.step()
    h.live("a").exit(1)
    h.step()
    assert h.arb.shards["a"].next_start == pytest.approx(h.clock.mono + 1.0)  # second crash: 1 s
    h.step(1.0)
    for _ in range(14):  # run healthily for > 60 s, beating every 5 s minus a bit
        h.live("a").beat()
        h.step(4.9)
    h.live("a").beat()
    h.step()
    h.live("a").exit(1)
    h.step()
    assert h.arb.shards["a"].next_start == pytest.approx(h.clock.mono + 0.5)  # reset to the first


def test_hung_shard_is_aborted_killed_and_restarted(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}])
    h.start_all()
    a, b = h.live("a"), h.live("b")
    for _ in range(4):  # b keeps beating, a is silent
        h.step(1.3)
        b.beat()
    h.step()
    assert h.state("a") == "stopping"
    assert a.signals == [signal.SIGABRT, signal.SIGCONT]
    h.step(1.9)
    assert a.signals[-1] == signal.SIGABRT or a.signals[-1] == signal.SIGCONT
    b.beat()
    h.step(0.2)  # 2 s after SIGABRT: SIGKILL
    assert a.signals[-1] == signal.SIGKILL
    h.step()
    rt = h.arb.shards["a"]
    assert rt.state.value == "backoff" and rt.last_exit is not None
    assert rt.last_exit.signal == "SIGKILL" and "hung" in rt.last_exit.reason
    h.step(0.5)
    assert h.live("a") is not a and h.arb.shards["a"].restarts == 1
    assert h.live("b") is b and b.signals == []


def test_sigterm_stops_gracefully_and_kills_after_the_stop_timeout(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"},
                           {"name": "c", "prefix": "c"}])
    h.start_all()
    a, b = h.live("a"), h.live("b")
    h.live("c").exit(1)
    h.step()
    assert h.state("c") == "backoff"
    h.arb.enqueue(signal.SIGTERM)
    h.step()
    assert a.signals == [signal.SIGTERM, signal.SIGCONT] and b.signals == a.signals
    assert h.state("a") == "stopping" and h.state("c") == "stopped"
    a.exit(0)
    h.step(9.9)
    assert h.state("a") == "stopped" and h.state("b") == "stopping" and not h.arb.done
    h.step(5.0)  # nothing is started while stopping, even though c's backoff is over
    assert b.signals[-1] == signal.SIGKILL and len(h.spawner.children) == 3
    h.step()
    assert h.arb.done and h.arb.exit_code == 0


def test_second_sigint_stops_now(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.start_all()
    a = h.live("a")
    h.arb.enqueue(signal.SIGINT)
    h.step()
    assert a.signals == [signal.SIGTERM, signal.SIGCONT]
    h.arb.enqueue(signal.SIGINT)
    h.step()
    assert a.signals[-1] == signal.SIGKILL
    h.step()
    assert h.arb.done


def test_sighup_adds_removes_changes_and_keeps_the_unchanged(tmp_path: Path) -> None:
    shards = [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}, {"name": "c", "prefix": "c"}]
    h = Harness(tmp_path, shards)
    h.start_all()
    a, b, c = h.live("a"), h.live("b"), h.live("c")
    write(h.map_path, [{"name": "a", "prefix": "a"}, {"name": "c", "prefix": "c", "recent": 3},
                       {"name": "d", "prefix": "d"}])
    h.arb.enqueue(signal.SIGHUP)
    h.step()
    assert b.signals[0] == signal.SIGTERM and c.signals[0] == signal.SIGTERM and a.signals == []
    h.step(1.0)
    # stop first: nothing new starts while b and c are still stopping
    assert len(h.spawner.children) == 3
    c.exit(0)
    h.step()
    assert len(h.spawner.children) == 3  # b (removed) is still stopping
    b.exit(0)
    h.step(0.3)
    h.step(0.3)
    assert "b" not in h.arb.shards
    c2 = h.live("c")
    assert h.live("d").shard == "d"
    assert c2 is not c and h.arb.shards["c"].spec.shard.recent == 3 and h.arb.shards["c"].restarts == 0
    assert h.live("a") is a and a.signals == []
    assert h.arb.reloads == 1 and h.arb.map_copy.endswith("map.2.yaml")
    assert load_map(h.arb.map_copy).shard("c").recent == 3


def test_sighup_with_a_bad_map_keeps_the_running_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.start_all()
    a = h.live("a")
    h.map_path.write_text("shards:\n  - name: a\n    prefix: a\n    rotate: {max_bytes: 1}\n")
    h.arb.enqueue(signal.SIGHUP)
    h.step(1.0)
    assert h.live("a") is a and a.signals == [] and h.arb.reloads == 0


def test_sighup_retries_a_failed_shard(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.start_all()
    h.live("a").exit(78)
    h.step()
    assert h.state("a") == "failed"
    h.arb.enqueue(signal.SIGHUP)
    h.step(0.2)  # past the start jitter of the last start
    assert h.state("a") == "starting"


def test_spawn_failure_is_a_crash(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}])
    h.spawner.fail = OSError(24, "Too many open files")
    h.step()
    rt = h.arb.shards["a"]
    assert rt.state.value == "backoff" and "cannot start" in (rt.reason or "")
    h.spawner.fail = None
    h.step(0.5)
    assert h.state("a") == "starting"


def test_status_document_from_the_snapshot_validates(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "#"}])
    h.start_all()
    h.live("a").beat(messages=5, degraded=True, degraded_reason="disk full")
    h.live("b").exit(70)
    h.step(0.1)
    doc = build_status(h.arb.snapshot, Sample(), h.clock.monotonic())
    parsed = msgspec.json.decode(encode(doc), type=StatusDoc)
    shards = {s.name: s for s in parsed.shards}
    assert shards["a"].state == "degraded" and shards["a"].counters is not None
    assert shards["a"].counters.messages == 5
    assert shards["b"].state == "backoff" and shards["b"].pid is None
    assert shards["b"].last_exit is not None and shards["b"].last_exit.code == 70
    assert shards["b"].next_start_in == pytest.approx(0.45, abs=0.01)
    assert shards["b"].prefix == "#"


def test_host_runs_only_its_shards(tmp_path: Path) -> None:
    h = Harness(tmp_path, [{"name": "a", "prefix": "a", "host": "web1"}, {"name": "b", "prefix": "b", "host": "web2"},
                           {"name": "c", "prefix": "c", "host": "web1"}], host="web1")
    h.start_all()
    assert sorted(h.arb.shards) == ["a", "c"]
    assert {c.shard for c in h.spawner.children} == {"a", "c"}
    # the recorders read the whole map (routing needs every prefix), frozen
    assert load_map(h.arb.map_copy).shard("b").host == "web2"


def test_a_stop_command_keeps_the_shard_stopped_until_started(tmp_path: Path) -> None:
    from shardlog.control.commands import ALL, Target
    from supervisor.control.controller import Job

    h = Harness(tmp_path, [{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}])
    h.start_all()
    a = h.live("a")
    assert a.argv[a.argv.index("--control") + 1] == str(tmp_path / "run" / "a.ctl")
    job = Job(Target("a", "stop", {}), "test")
    h.arb.submit(job)
    h.step()
    assert job.done.is_set() and job.result == {"ok": True, "shard": "a", "stopping": a.pid}
    assert a.signals == [signal.SIGTERM, signal.SIGCONT] and h.state("a") == "stopping"
    a.exit(0)
    h.step()
    assert h.state("a") == "stopped" and h.arb.shards["a"].reason == "stopped by a control command"
    for _ in range(60):  # no restart, however long (b keeps beating)
        h.live("b").beat()
        h.step(2)
    assert len(h.spawner.of("a")) == 1 and h.state("a") == "stopped"
    h.map_path.write_text(h.map_path.read_text())
    h.arb.signals.append(signal.SIGHUP)  # a reload that leaves it unchanged keeps it stopped
    h.step(1)
    assert len(h.spawner.of("a")) == 1
    job = Job(Target("a", "start", {}), "test")
    h.arb.submit(job)
    h.step(1)
    assert job.result == {"ok": True, "shard": "a", "starting": True}
    assert len(h.spawner.of("a")) == 2 and h.state("a") == "starting"
    assert h.arb.shards["a"].restarts == 0 and h.live("b").signals == []
    job = Job(Target(ALL, "stop", {}), "test")
    h.arb.submit(job)
    h.step()
    assert job.result == {"ok": True, "stopping": ["a", "b"]} and h.arb.stopping
