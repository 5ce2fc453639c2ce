"""The main loop's answer to a stop/start job (supervisor.arbiter.commands.decide) is pure:
every case without a loop, a clock or a process. The loop carrying the answers out is tested
in test_supervisor_arbiter.py (test_a_stop_command_keeps_the_shard_stopped_until_started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardlog.config.load import load_map
from shardlog.control.commands import ALL, Target
from supervisor.arbiter.commands import Action, decide
from supervisor.arbiter.runtime import ShardRuntime
from supervisor.shards.shardmap import specs
from supervisor.shards.states import ShardState
from tests.supervisor.helpers import FakeChild, FakeSpawner


def runtime(tmp_path: Path, state: ShardState, live: bool) -> ShardRuntime:
    path = tmp_path / "shards.yaml"
    path.write_text(f"defaults: {{root: {tmp_path / 'data'}}}\nshards: [{{name: a, prefix: a}}]\n")
    smap = load_map(str(path))
    rt = ShardRuntime(spec=specs(smap, smap.shards)["a"], stats_file=str(tmp_path / "a.stats.json"), state=state)
    if live:
        rt.child = FakeChild(4242, ["--shard", "a"], FakeSpawner())
    return rt


@pytest.mark.parametrize("op, shard, state, live, stopping, action, reply", [
    ("stop", ALL, None, False, False, Action.SHUTDOWN, {"ok": True, "stopping": ["a", "b"]}),
    ("stop", ALL, None, False, True, Action.NONE, {"ok": True, "note": "already stopping"}),
    ("start", ALL, None, False, False, Action.NONE, {"ok": False, "reason": "start: name a shard"}),
    ("stop", "x", None, False, False, Action.NONE, {"ok": False, "reason": "no shard named 'x' here"}),
    ("stop", "a", ShardState.RUNNING, True, True, Action.NONE, {"ok": False, "reason": "the supervisor is stopping"}),
    ("stop", "a", ShardState.RUNNING, True, False, Action.STOP, {"ok": True, "shard": "a", "stopping": 4242}),
    ("stop", "a", ShardState.STOPPING, True, False, Action.NONE,
     {"ok": True, "shard": "a", "note": "already stopping"}),
    ("stop", "a", ShardState.BACKOFF, False, False, Action.STOP,
     {"ok": True, "shard": "a", "note": "was not running (backoff)"}),
    ("start", "a", ShardState.STARTING, True, False, Action.NONE,
     {"ok": True, "shard": "a", "note": "already starting"}),
    ("start", "a", ShardState.STOPPED, False, False, Action.START, {"ok": True, "shard": "a", "starting": True}),
])
def test_decide(tmp_path: Path, op: str, shard: str, state: ShardState | None, live: bool, stopping: bool,
                action: Action, reply: dict) -> None:
    rt = runtime(tmp_path, state, live) if state is not None else None
    assert decide(Target(shard, op, {}), rt, stopping, ["b", "a"]) == (action, reply)
