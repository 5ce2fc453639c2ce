"""shardlog/recording/brokercheck.py: the decisions, without a broker (the brokers themselves: tests/brokers/)."""

from __future__ import annotations

from pathlib import Path

from shardlog.recording.brokercheck import InflightProbe, connack_notes, recorded_before, suback_note, window

BASE = dict(mqtt5=True, asked_expiry=604800, client_id="shardlog-all")


def test_a_lost_session_is_reported_at_start_and_on_reconnect() -> None:
    assert connack_notes(session_present=True, expect_session=True, first=True, props={}, **BASE) == []
    assert connack_notes(session_present=False, expect_session=False, first=True, props={}, **BASE) == []
    at_start = connack_notes(session_present=False, expect_session=True, first=True, props={}, **BASE)
    assert len(at_start) == 1 and "recorded before" in at_start[0] and "shardlog-all" in at_start[0]
    later = connack_notes(session_present=False, expect_session=True, first=False, props={}, **BASE)
    assert len(later) == 1 and "across a reconnect" in later[0]


def test_connack_properties_that_break_the_promise() -> None:
    def notes(**props: int) -> list[str]:
        return connack_notes(session_present=False, expect_session=False, first=True, props=props, **BASE)
    assert notes(SessionExpiryInterval=604800) == []
    assert "caps the session expiry at 300s" in notes(SessionExpiryInterval=300)[0]
    assert "keeps no session" in notes(SessionExpiryInterval=0)[0]
    assert "QoS 0 only" in notes(MaximumQoS=0)[0]
    assert "no retained" in notes(RetainAvailable=0)[0]
    v311 = connack_notes(session_present=False, expect_session=False, first=True, props={"SessionExpiryInterval": 0},
                         mqtt5=False, asked_expiry=604800, client_id="x")
    assert v311 == []


def test_suback_granted_below_the_qos_asked() -> None:
    assert suback_note(1, 1, "a/#") is None
    assert "granted QoS 0 for a/#" in (suback_note(1, 0, "a/#") or "")
    assert suback_note(0, 0, "a/#") is None


def test_recorded_before(tmp_path: Path) -> None:
    """The fallback for trees without a session memo: the branch's own lock beside topics."""
    assert not recorded_before(str(tmp_path / "missing"))
    (tmp_path / "chat").mkdir()  # another shard's branch in a shared root (the example's "#")
    assert not recorded_before(str(tmp_path))
    (tmp_path / "+shard.lock").write_text("")
    assert recorded_before(str(tmp_path))


def test_session_memo_decisions(tmp_path: Path) -> None:
    from shardlog.recording.sessionmemo import SessionMemo, expects_session, read_memo, stale_filters, write_memo

    path = str(tmp_path / "+session.all.json")
    assert read_memo(path) is None
    assert not expects_session(None, "c", legacy=False) and expects_session(None, "c", legacy=True)
    write_memo(path, SessionMemo(client_id="c", subscriptions=["old/#", "$SYS/x"]))
    memo = read_memo(path)
    assert memo == SessionMemo(client_id="c", subscriptions=["old/#", "$SYS/x"])
    assert expects_session(memo, "c", legacy=False)
    assert not expects_session(memo, "other", legacy=True)  # a new client id has no session yet
    assert stale_filters(memo, "c", ["new/#", "$SYS/x"]) == ["old/#"]
    assert stale_filters(memo, "other", ["new/#"]) == []
    (tmp_path / "+session.all.json").write_bytes(b"\x00garbage")
    assert read_memo(path) is None  # ignored with a warning: expects no session


def capped_run(probe: InflightProbe, n: int, flushes: int, follow: float, quiet: float = 0.015) -> int | None:
    """Deadline flushes of ``n`` messages each; the next batch begins ``follow`` s after the ack."""
    now, found = 100.0, None
    for _ in range(flushes):
        first = now + follow
        last = first + 0.001
        now = last + quiet
        found = probe.on_deadline_flush(now, n, first, last) or found
    return found


def test_inflight_cap_found_after_a_few_prompt_capped_batches() -> None:
    probe = InflightProbe(batch_max=5000, max_delay=0.02)
    assert capped_run(probe, 20, 4, follow=0.001) == 20
    assert probe.cap == 20
    assert probe.on_deadline_flush(200.0, 20, 199.0, 199.9) is None  # said once


def test_inflight_cap_found_when_some_capped_batches_follow_late() -> None:
    """A loaded machine: every other capped batch is read 30 ms after the ack (scheduling),
    which is no evidence either way; the prompt ones still add up."""
    probe, now, found = InflightProbe(batch_max=5000, max_delay=0.02), 100.0, None
    for k in range(8):
        first = now + (0.001 if k % 2 else 0.03)
        now = first + 0.016
        found = probe.on_deadline_flush(now, 100, first, first + 0.001) or found
    assert found == 100


def test_inflight_cap_found_when_the_window_comes_in_two_parts() -> None:
    """The window of 100 split in two by a deadline that fell mid-window, and staying split
    (what CI saw with iotcore on a loaded machine): 28, 72, 28, 72 is a window of 100."""
    probe, now, found = InflightProbe(batch_max=5000, max_delay=0.02), 100.0, None
    for n in [80, 20, 28, 72, 28, 72, 28]:
        first = now + 0.001
        now = first + 0.021
        found = probe.on_deadline_flush(now, n, first, first + 0.001) or found
    assert found == 100
    assert window([28, 72, 28, 72]) == 100 and window([20, 20, 20]) == 20
    assert window([20, 35, 27, 35]) is None and window([20, 20]) is None


def test_no_cap_for_a_periodic_publisher_or_full_batches() -> None:
    # 20 messages every 100 ms: the next burst follows the publisher's clock, not our acks
    assert capped_run(InflightProbe(5000, 0.02), 20, 10, follow=0.08) is None
    # a stream still flowing at the deadline: not quiet
    assert capped_run(InflightProbe(5000, 0.02), 20, 10, follow=0.001, quiet=0.001) is None
    # a batch that fills up is no cap
    assert capped_run(InflightProbe(100, 0.02), 100, 10, follow=0.001) is None
    # counts that change
    probe, now = InflightProbe(5000, 0.02), 100.0
    for n in [20, 35, 27, 35, 20, 41, 27, 20]:
        assert probe.on_deadline_flush(now + 0.017, n, now + 0.001, now + 0.002) is None
        now += 0.017
