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
    """Deadline flushes of ``n`` messages each; the next batch begins ``follow`` s after the ack
    (the batch after a suspicion is the test batch, held probe.delay). The cap found, if any."""
    now = 100.0
    for _ in range(flushes):
        first = now + follow
        last = first + 0.001
        now = max(last + quiet, first + probe.delay) if probe.delay > probe.max_delay else last + quiet
        probe.on_deadline_flush(now, n, first, last)
    return probe.cap


def test_inflight_cap_found_after_a_few_prompt_capped_batches() -> None:
    probe = InflightProbe(batch_max=5000, max_delay=0.02)
    assert capped_run(probe, 20, 4, follow=0.001) is None  # suspected: the test batch comes next
    assert probe.step() == 5000 and probe.delay == 0.06
    assert capped_run(probe, 20, 1, follow=0.001) == 20  # held 60 ms, still 20: found
    assert probe.step() == 20 and probe.delay == 0.02
    assert probe.on_deadline_flush(200.0, 20, 199.0, 199.9) is None  # said once


def test_inflight_cap_found_when_some_capped_batches_follow_late() -> None:
    """A loaded machine: every other capped batch is read 30 ms after the ack (scheduling),
    which is no evidence either way; the prompt ones still add up."""
    probe, now = InflightProbe(batch_max=5000, max_delay=0.02), 100.0
    for k in range(8):
        first = now + (0.001 if k % 2 else 0.03)
        now = first + 0.016
        probe.on_deadline_flush(now, 100, first, first + 0.001)
    assert probe.cap == 100  # suspected after 6 flushes, then the 7th (a test batch) brought 100


def test_inflight_cap_found_when_the_window_comes_in_two_parts() -> None:
    """The window of 100 split in two by a deadline that fell mid-window, and staying split
    (what CI saw with iotcore on a loaded machine): 28, 72, 28, 72 is a window of 100."""
    probe, now, found = InflightProbe(batch_max=5000, max_delay=0.02), 100.0, None
    for n in [80, 20, 28, 72, 28, 72, 28]:
        first = now + 0.001
        now = first + 0.021
        found = probe.on_deadline_flush(now, n, first, first + 0.001) or found
    assert found == 5000 and probe.cap is None  # suspected: a test batch held 60 ms brings 100
    assert probe.on_deadline_flush(now + 0.1, 100, now + 0.001, now + 0.002) == 100 and probe.cap == 100
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


def simulate(probe: InflightProbe, arrivals: list[float], d: float = 0.02, cap: int | None = None,
             rtt: float = 0.0003, until: float = 10.0) -> list[int | None]:
    """The recorder's batches over a message stream, as the probe sees them: a batch begins at
    its first message and is flushed at first + ``d`` (or at ``probe.step()`` messages, by count);
    ``arrivals``: when each message reaches the broker. ``cap``: the broker holds back all but
    ``cap`` unacknowledged, sending the next ones ``rtt`` after our PUBACKs. Returns the caps
    the probe held, in order (a cap found, then None when dropped)."""
    changes: list[int | None] = []
    queue = list(arrivals)
    t, acked_total, sent_unacked = 0.0, 0, 0
    last_flush = 0.0
    while queue and t < until:
        batch: list[float] = []
        deadline = None
        step = probe.step()
        while queue:
            at = max(queue[0], last_flush + rtt) if cap is not None else queue[0]
            if cap is not None and sent_unacked >= cap:
                break  # the broker waits for our PUBACKs
            if deadline is not None and at > deadline:
                break
            queue.pop(0)
            batch.append(at)
            sent_unacked += 1
            if deadline is None:
                deadline = at + probe.delay
            if len(batch) >= step:
                break
        if not batch:
            break
        by_count = len(batch) >= step
        now = batch[-1] if by_count else deadline
        assert now is not None
        before = acked_total
        acked_total += len(batch)
        sent_unacked = 0
        last_flush = now
        if not by_count:
            probe.on_deadline_flush(now, len(batch), batch[0], batch[-1], before)
            if probe.cap != (changes[-1] if changes else None):
                changes.append(probe.cap)
        probe.recheck(now + 0.0001, acked_total)  # the loop's tick
        t = now
    return changes


def steady(rate: float, seconds: float, jitter: float, seed: int) -> list[float]:
    import random
    rnd = random.Random(seed)
    return sorted(k / rate + rnd.uniform(0, jitter) for k in range(int(rate * seconds)))


def paced(burst: int, period: float, seconds: float, seed: int) -> list[float]:
    """``burst`` messages every ``period`` (a publisher paced by a timer, like tests' FastFlow)."""
    import random
    rnd = random.Random(seed)
    out = []
    for k in range(int(seconds / period)):
        t = k * period + rnd.uniform(0, 0.0003)
        out.extend(t + i * 0.00002 for i in range(burst))
    return out


def test_a_stream_merely_slow_is_no_cap() -> None:
    """Issue 22, item 14: mosquitto (no cap) and a publisher at a steady 100-1,000 msg/s made
    shards report "at most 2 (3, 8, 33) unacknowledged" (about rate x max_delay): a batch of a
    steady stream is quiet at its deadline, and now and then followed "promptly" by chance;
    a paced publisher's bursts can follow the deadline every time."""
    streams = {f"steady {rate}/s jitter {jitter} seed {seed}": steady(rate, 10, jitter, seed)
               for rate in (50, 100, 150, 300, 1000) for seed in range(3) for jitter in (0.0005, 0.003)}
    streams.update({f"{burst} every {period * 1000:.0f} ms": paced(burst, period, 10, 0)
                    for burst in (1, 2, 8, 33) for period in (0.01, 0.0205, 0.021, 0.022, 0.024)})
    held = {name: changes for name, s in streams.items() if (changes := simulate(InflightProbe(5000, 0.02), s))}
    assert not held, f"caps found in streams without one: {held}"


def test_a_stalling_publisher_is_no_cap_of_1() -> None:
    """Messages one at a time at random moments: now and then one follows our ack by chance."""
    import random
    for seed in range(20):
        rnd = random.Random(seed)
        t, arrivals = 0.0, []
        while t < 30:
            t += rnd.expovariate(40)  # 40 msg/s on average, bursts and stalls
            arrivals.append(t)
        probe = InflightProbe(5000, 0.02)
        assert not simulate(probe, arrivals, until=30), seed


def test_a_true_cap_is_found_then_rechecked_and_dropped() -> None:
    for cap in (1, 2, 20, 100):
        probe = InflightProbe(5000, 0.02)
        backlog = [0.0] * 20000  # all waiting at the broker
        assert simulate(probe, backlog, cap=cap, until=2.0) == [cap]
        assert probe.cap == cap and probe.step() == cap
        # re-checked while the cap holds: kept
        assert not probe.recheck(probe._recheck_at - 1, 0)
        assert probe.recheck(probe._recheck_at, 0) and probe.step() == 5000
        assert probe.on_deadline_flush(1000.0, cap, 999.98, 999.98, 0) == cap and probe.cap == cap
        # the broker's cap went away: a re-check batch acknowledges more than it
        assert probe.recheck(probe._recheck_at, 10)
        assert probe.on_deadline_flush(2000.0, cap + 5, 1999.98, 1999.99, 10) == 5000
        assert probe.cap is None and probe.step() == 5000
    # flushes by count during the re-check acknowledged more than the cap: dropped too
    probe = InflightProbe(500, 0.02, cap=20)
    assert probe.recheck(0.0, 1000)
    assert probe.on_deadline_flush(1.0, 3, 0.97, 0.975, 1500) == 500 and probe.cap is None
