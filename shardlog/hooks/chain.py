"""Running a shard's hooks with their errors isolated (:class:`Chain`).

A shard's hooks run in order, each on every message the one before produced
(docs/hooks.md). A hook that raises, returns something that is not a message, or runs
past ``hook_timeout`` makes the chain return a :class:`HookFailure` (the recorder
quarantines the original message with its text) instead of crashing the shard. Time is
enforced by :class:`Watchdog`: a thread that interrupts the main thread (SIGALRM, raising
:class:`HookTimeout` in the hook) when one message's hooks have run longer than the
timeout. Loading them is shardlog/hooks/loading.py; the recorder's glue is
shardlog/hooks/path.py.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from shardlog.hooks.message import HookFailure, LoadedHook, Message, _error_text

log = logging.getLogger(__name__)
_monotonic = time.monotonic

#: a hook that timed out this many times in a row is suspended for SUSPEND_FOR seconds:
#: messages reaching it are quarantined at once instead of each costing hook_timeout
TIMEOUTS_TO_SUSPEND = 3
SUSPEND_FOR = 60.0
#: a hook's errors are logged at most once per this many seconds (with the count since)
LOG_EVERY = 60.0
MAX_REASON = 2000  # characters of a hook's error kept in the quarantine record


class HookTimeout(BaseException):
    """Raised inside a hook that ran past hook_timeout. A BaseException, so that a hook's
    own ``except Exception`` does not swallow it."""


class BadOutput(TypeError):
    """A hook returned something that is not a message (its reason says what)."""


def same_ts(out: Message, given: Message) -> Message:
    """``out`` if it keeps the reception time of the message the hook was given, else
    BadOutput: ``ts`` orders a topic's records and the readers rely on it never going back
    (docs/history.md); a device's own time belongs in the payload (docs/hooks.md)."""
    if out.ts != given.ts:
        raise BadOutput(f"changed ts from {given.ts} to {out.ts}: ts is the reception time, which orders the "
                        "records; put the device's time in the payload (msg.with_json({..., 'device_ts': t}))")
    return out


def checked(m: Any) -> Message:
    """A hook's output as a valid Message (a str payload becomes UTF-8), or BadOutput."""
    if m.__class__ is not Message:
        raise BadOutput(f"returned {type(m).__name__} {_short(m)}, expected a Message, a list of "
                        "them or None")
    topic, payload, ts, qos, retain = m
    if topic.__class__ is not str or not topic:
        raise BadOutput(f"returned a message whose topic is {_short(topic)}, expected a non-empty str")
    if payload.__class__ is not bytes:
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        elif isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        else:
            raise BadOutput(f"returned a message whose payload is a {type(payload).__name__}, "
                            "expected bytes or str")
    if ts.__class__ is not int or ts < 0:
        raise BadOutput(f"returned a message whose ts is {_short(ts)}, expected microseconds (int)")
    if qos not in (0, 1, 2) or qos.__class__ is not int:
        raise BadOutput(f"returned a message whose qos is {_short(qos)}, expected 0, 1 or 2")
    if retain.__class__ is not bool:
        raise BadOutput(f"returned a message whose retain is {_short(retain)}, expected a bool")
    try:
        topic.encode("utf-8")
    except UnicodeEncodeError:
        raise BadOutput(f"returned a message whose topic {topic!r} is not valid UTF-8") from None
    if "+" in topic or "#" in topic or "\x00" in topic:
        raise BadOutput(f"returned a message whose topic {topic!r} holds a wildcard or NUL "
                        "(not a topic name)")
    return m if payload is m.payload else m._replace(payload=payload)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Chain:
    """A shard's hooks, applied in order with their errors isolated.

    ``owns(topic)``: None if this shard records ``topic``, else why not (a hook may move a
    message within the shard's branch only). Not thread-safe: the recording thread only.
    """

    def __init__(self, hooks: list[LoadedHook], timeout: float, owns: Callable[[str], str | None],
                 watchdog: Watchdog | None = None) -> None:
        self.hooks = hooks
        self.timeout = timeout
        self.owns = owns
        self.watchdog = watchdog or Watchdog(timeout)
        self.current = 0  # index of the hook running (the one a timeout blames)
        self.strikes = 0  # timeouts since a message last went through (for the suspension)
        self.moved: dict[str, int] | None = None  # topic -> the hook that moved a message there

    def run(self, msg: Message) -> list[Message] | HookFailure:
        """The messages ``msg`` becomes (empty: dropped), or why it must be quarantined."""
        wd = self.watchdog
        started = _monotonic()
        wd.started = started
        wd.seq += 1
        wd.busy = True
        try:
            try:
                out = self._apply(msg, started)
                wd.busy = False
            except Exception as exc:  # the hook's error, isolated
                wd.busy = False
                text = str(exc) if exc.__class__ is BadOutput else _error_text(exc)
                return self._failed(self.current, text, started)
        except HookTimeout:  # raised once per call at most (the handler clears busy first)
            wd.busy = False
            return self._timed_out(started)
        if isinstance(out, HookFailure):
            return out
        if _monotonic() - started > self.timeout:  # interrupted too late, or no watchdog
            return self._timed_out(started)
        if self.strikes:
            self._clear_strikes()
        topic = msg.topic
        for m in out:
            if m.topic is not topic and m.topic != topic:
                problem = self.owns(m.topic)
                if problem is not None:  # blamed on the hook that moved it there, not the last one
                    mover = self.moved.get(m.topic, self.current) if self.moved else self.current
                    return self._failed(mover, f"produced topic {m.topic!r}: {problem}", started)
        return out

    def _apply(self, msg: Message, now: float) -> list[Message] | HookFailure:
        batch = [msg]
        i = 0
        self.moved = None
        for hook in self.hooks:
            self.current = i
            if hook.suspended_until > now:
                return HookFailure(f"hook {hook.name}: suspended after {TIMEOUTS_TO_SUSPEND} timeouts "
                                   f"in a row (retried {hook.suspended_until - now:.0f}s from now)", i)
            fn = hook.fn
            out: list[Message] = []
            for m in batch:
                r = fn(m)
                if r is m:
                    out.append(m)
                elif r is None:
                    continue
                elif r.__class__ is Message:
                    r = same_ts(checked(r), m)
                    if r.topic is not m.topic and r.topic != m.topic:
                        self._moved_by(r.topic, i)
                    out.append(r)
                elif isinstance(r, (list, tuple)) or (hasattr(r, "__next__") and hasattr(r, "__iter__")):
                    for x in r:  # a generator runs here, timed too
                        x = same_ts(checked(x), m)
                        if x.topic is not m.topic and x.topic != m.topic:
                            self._moved_by(x.topic, i)
                        out.append(x)
                else:
                    checked(r)  # raises BadOutput naming what it got
            batch = out
            if not batch:
                break
            i += 1
        return batch

    def _moved_by(self, topic: str, i: int) -> None:
        """Hook ``i`` gave a message the topic ``topic``: it answers for that topic (the
        latest hook to do so), not the last hook of the chain."""
        if self.moved is None:
            self.moved = {}
        self.moved[topic] = i

    def _clear_strikes(self) -> None:
        """A message went through: every hook's run of timeouts is broken."""
        for hook in self.hooks:
            hook.timeouts_in_a_row = 0
        self.strikes = 0

    def _timed_out(self, started: float) -> HookFailure:
        i = self.current
        hook = self.hooks[i]
        hook.timeouts_in_a_row += 1
        self.strikes += 1
        elapsed = _monotonic() - started
        failure = self._failed(i, f"timed out: ran {elapsed:.3f}s, over hook_timeout "
                                  f"{self.timeout:g}s", started)
        if hook.timeouts_in_a_row >= TIMEOUTS_TO_SUSPEND:
            hook.suspended_until = started + elapsed + SUSPEND_FOR
            hook.timeouts_in_a_row = 0
            log.error("hook %s: %d timeouts in a row; suspended for %.0fs (messages that reach it "
                      "are quarantined meanwhile)", hook.name, TIMEOUTS_TO_SUSPEND, SUSPEND_FOR)
        return failure

    def _failed(self, i: int, text: str, now: float) -> HookFailure:
        hook = self.hooks[i] if i < len(self.hooks) else self.hooks[-1]
        hook.errors += 1
        hook.unlogged += 1
        if len(text) > MAX_REASON:  # an exception's text can be anything
            text = text[:MAX_REASON] + f"... ({len(text)} characters)"
        reason = f"hook {hook.name}: {text}"
        if log_due(hook.logged_at, now, LOG_EVERY):
            log.error("%s (%d error(s) from this hook since its last report; the messages are "
                      "quarantined, at most one report a minute)", reason, hook.unlogged)
            hook.logged_at = now
            hook.unlogged = 0
        return HookFailure(reason, i)


def log_due(last: float, now: float, every: float) -> bool:
    """Log again? At most once per ``every`` seconds."""
    return now - last >= every


# -- time limit ------------------------------------------------------------------------


class Watchdog:
    """Interrupts a hook that runs past ``timeout``: a thread looks every ``tick`` and, if
    the same call has been running too long, sends SIGALRM to the main thread, whose handler
    raises HookTimeout in the hook (once per call). Python runs signal handlers between
    bytecodes: code stuck inside one C call (a long regex match, a C extension's loop) is
    interrupted only when that call returns. Without :meth:`start` (not in the main thread),
    a hook's time is only measured after it returns (the message is still quarantined)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(0.05, timeout / 4)
        self.seq = 0          # calls started (written by the main thread only)
        self.started = 0.0    # monotonic start of call number ``seq``
        self.busy = False
        self.target = -1      # the call the watchdog thread asked to interrupt
        self.fired = 0        # interrupts raised
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("hooks run outside the main thread: a hook past hook_timeout is not "
                        "interrupted, only quarantined once it returns")
            return False
        signal.signal(signal.SIGALRM, self._on_alarm)
        main = threading.main_thread().ident
        assert main is not None
        self._thread = threading.Thread(target=self._watch, args=(main,), name="hook-watchdog", daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def overdue(self, now: float) -> int | None:
        """The call to interrupt now, if one is overdue (read in the watchdog thread: seq
        first, then started, then seq again, so a call that just ended is not blamed)."""
        seq = self.seq
        started = self.started
        if self.busy and self.seq == seq and seq != self.target and now - started > self.timeout:
            return seq
        return None

    def _watch(self, main: int) -> None:
        while not self._stop.wait(self.tick):
            seq = self.overdue(_monotonic())
            if seq is not None:
                self.target = seq
                signal.pthread_kill(main, signal.SIGALRM)

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if self.busy and self.seq == self.target:
            self.busy = False  # at most one interrupt per call
            self.fired += 1
            raise HookTimeout()
