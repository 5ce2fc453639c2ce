"""The supervisor's own worker threads, supervised: none may die silently.

Every thread the supervisor runs beside its main loop (the HTTP selector and workers, the sampler,
the MQTT control worker) is started through :meth:`Threads.start`. Its target runs in a loop: when
it returns, the thread has ended as asked (its owner is stopping); when it raises, the error is
logged (with its traceback the first time a given error ends that thread, one line after that),
counted, and the target runs again after a short pause that doubles while it keeps failing (0.1 s
to 10 s; back to 0.1 s after a minute without a failure). ``/status`` shows each thread
(``supervisor.threads``: alive, restarts, the last error), so a thread that keeps dying is seen.

The bookkeeping (:class:`ThreadRecord`) is written by its own thread only and read by /status as
plain attributes (a torn read shows one restart less, never a wrong kind of value).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIRST_PAUSE = 0.1   # seconds before the first restart ...
MAX_PAUSE = 10.0    # ... doubling up to this while the thread keeps dying
HEALTHY_AFTER = 60.0  # a run this long without an error starts the doubling again


def restart_pause(failures_in_a_row: int) -> float:
    """Seconds to wait before running a target again after its ``n``-th failure in a row. Pure."""
    return min(MAX_PAUSE, FIRST_PAUSE * 2 ** max(0, min(failures_in_a_row - 1, 16)))


@dataclass
class ThreadRecord:
    name: str
    alive: bool = False
    restarts: int = 0
    last_error: str | None = None      # "ValueError: ..." of the last death
    last_error_ts: float | None = None  # Unix time of the last death


class Threads:
    """The registry of the supervisor's supervised threads (one per process, shared by its parts)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.records: list[ThreadRecord] = []
        self.clock = clock
        self.lock = threading.Lock()  # guards the list, not the records

    def start(self, name: str, target: Callable[[], None], stop: threading.Event) -> threading.Thread:
        """Run ``target`` in a daemon thread named ``name``, restarted whenever it raises (until
        ``stop`` is set). The thread is returned, started."""
        record = ThreadRecord(name)
        with self.lock:
            self.records.append(record)
        t = threading.Thread(target=self._run, args=(record, target, stop), name=name, daemon=True)
        record.alive = True
        t.start()
        return t

    def view(self) -> list[ThreadRecord]:
        """Copies of every record, in the order the threads were started."""
        with self.lock:
            records = list(self.records)
        return [ThreadRecord(r.name, r.alive, r.restarts, r.last_error, r.last_error_ts) for r in records]

    def _run(self, record: ThreadRecord, target: Callable[[], None], stop: threading.Event) -> None:
        seen: set[str] = set()
        in_a_row = 0
        try:
            while True:
                started = self.clock()
                try:
                    target()
                    return  # ended as asked
                except Exception as exc:  # the point: log it, count it, run again
                    if stop.is_set():
                        return
                    what = f"{type(exc).__name__}: {exc}"
                    in_a_row = 1 if self.clock() - started >= HEALTHY_AFTER else in_a_row + 1
                    record.restarts += 1
                    record.last_error, record.last_error_ts = what, time.time()
                    pause = restart_pause(in_a_row)
                    if what not in seen and len(seen) < 100:
                        seen.add(what)
                        log.exception("thread %s died (restart %d in %.1fs)", record.name, record.restarts, pause)
                    else:
                        log.error("thread %s died again: %s (restart %d in %.1fs; traceback logged before)",
                                  record.name, what, record.restarts, pause)
                if stop.wait(pause):
                    return
        finally:
            record.alive = False
