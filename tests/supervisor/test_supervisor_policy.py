"""The state table, the restart policy and the map diff: pure code, no processes."""

from __future__ import annotations

import pytest

from shardlog.config.load import parse_map
from shardlog.config.schema import Restart
from supervisor.shards import backoff
from supervisor.shards.shardmap import diff, specs
from supervisor.shards.states import (
    TRANSITIONS,
    Event,
    InvalidTransition,
    ShardState,
    transition,
)

S, E = ShardState, Event


def test_transition_table_is_the_only_way() -> None:
    assert transition(S.STOPPED, E.SPAWN) is S.STARTING
    assert transition(S.STARTING, E.BEAT) is S.RUNNING
    assert transition(S.RUNNING, E.CRASH) is S.BACKOFF
    assert transition(S.RUNNING, E.GIVE_UP) is S.FAILED
    assert transition(S.BACKOFF, E.SPAWN) is S.STARTING
    assert transition(S.FAILED, E.SPAWN) is S.STARTING
    assert transition(S.RUNNING, E.STOP) is S.STOPPING
    assert transition(S.STOPPING, E.EXITED) is S.STOPPED
    assert transition(S.STOPPING, E.CRASH) is S.BACKOFF  # killed because it hung
    assert transition(S.BACKOFF, E.STOP) is S.STOPPED
    for bad in [(S.STOPPED, E.BEAT), (S.RUNNING, E.SPAWN), (S.STOPPED, E.CRASH), (S.BACKOFF, E.EXITED),
                (S.FAILED, E.BEAT), (S.STOPPING, E.SPAWN)]:
        assert bad not in TRANSITIONS
        with pytest.raises(InvalidTransition):
            transition(*bad)
    # every state is reachable and every state can be left
    assert {dst for dst in TRANSITIONS.values()} == set(S)
    assert {src for src, _ in TRANSITIONS} == set(S)


POLICY = Restart(backoff_initial=0.5, backoff_max=4.0, healthy_after=60.0, max_restarts=5, window=60.0,
                 failed_retry=300.0)


def test_backoff_doubles_with_jitter_up_to_the_max() -> None:
    assert [backoff.backoff_delay(n, POLICY, lambda: 0.0) for n in range(1, 7)] == [0.5, 1, 2, 4, 4, 4]
    # jitter only shortens the delay, by up to 20 %
    assert backoff.backoff_delay(1, POLICY, lambda: 0.999999) == pytest.approx(0.4, rel=1e-5)
    assert backoff.backoff_delay(3, POLICY, lambda: 0.5) == pytest.approx(1.8)
    assert backoff.backoff_bounds(3, POLICY) == (pytest.approx(1.6), 2.0)
    assert backoff.backoff_delay(500, POLICY, lambda: 0.0) == 4.0  # no overflow


def test_too_many_restarts_in_the_window_fail_then_retry_slowly() -> None:
    h = backoff.History()
    now = 0.0
    delays = []
    for _ in range(5):
        d = backoff.on_exit(h, POLICY, now, 73, lambda: 0.0)
        assert not d.failed
        delays.append(d.retry_in)
        now += d.retry_in + 0.1  # it starts and crashes at once
    assert delays == [0.5, 1, 2, 4, 4]
    d = backoff.on_exit(h, POLICY, now, 73, lambda: 0.0)  # the 6th exit within 60 s
    assert d.failed and d.retry_in == 300.0 and "max_restarts 5" in d.reason
    # the slow retry crashes again before it was ever healthy: failed again at once
    now += 300.0
    d = backoff.on_exit(h, POLICY, now, 73, lambda: 0.0)
    assert d.failed and d.retry_in == 300.0


def test_exits_spread_beyond_the_window_never_fail() -> None:
    h = backoff.History()
    for i in range(20):
        d = backoff.on_exit(h, POLICY, i * 61.0, 1, lambda: 0.0)
        assert not d.failed
    assert d.retry_in == 4.0  # but the backoff keeps growing until healthy


def test_config_error_is_never_retried() -> None:
    d = backoff.on_exit(backoff.History(), POLICY, 0.0, 78, lambda: 0.0)
    assert d.failed and d.retry_in is None and d.reason == "configuration error"


def test_backoff_resets_only_after_healthy_running() -> None:
    h = backoff.History()
    for t in (0.0, 1.0, 3.0):
        backoff.on_exit(h, POLICY, t, 1, lambda: 0.0)
    assert h.consecutive == 3
    assert not backoff.note_running(h, 10.0, POLICY, 69.9)  # running 59.9 s: not yet
    assert h.consecutive == 3
    assert backoff.note_running(h, 10.0, POLICY, 70.0)
    assert h.consecutive == 0 and not h.failed
    assert backoff.on_exit(h, POLICY, 71.0, 1, lambda: 0.0).retry_in == 0.5


def _map(shards: list[dict]) -> object:
    return parse_map({"shards": shards}, base_dir="/srv")


def test_map_diff_added_removed_changed_and_nested() -> None:
    old = _map([{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}, {"name": "c", "prefix": "c"},
                {"name": "rest", "prefix": "#"}])
    new = _map([{"name": "a", "prefix": "a"}, {"name": "c", "prefix": "c", "recent": 3},
                {"name": "d", "prefix": "d"}, {"name": "rest", "prefix": "#"}])
    plan = diff(specs(old, old.shards), specs(new, new.shards))
    assert plan.added == ["d"] and plan.removed == ["b"] and plan.changed == ["c", "rest"]
    assert plan.unchanged == ["a"]
    # "rest" changed although its own entry did not: the prefixes it must discard changed
    nested = _map([{"name": "a", "prefix": "a"}, {"name": "ax", "prefix": "a/x"}, {"name": "b", "prefix": "b"}])
    flat = _map([{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"}])
    plan = diff(specs(flat, flat.shards), specs(nested, nested.shards))
    assert plan.added == ["ax"] and plan.changed == ["a"] and plan.unchanged == ["b"]
    # a shard on another broker does not affect the routing of this one (its own root: two
    # brokers' nested branches in one root are refused, shardlog/config/checks.py)
    other = _map([{"name": "a", "prefix": "a"}, {"name": "b", "prefix": "b"},
                  {"name": "ax", "prefix": "a/x", "root": "/srv/other", "broker": {"host": "elsewhere"}}])
    plan = diff(specs(flat, flat.shards), specs(other, other.shards))
    assert plan.changed == [] and plan.added == ["ax"]
