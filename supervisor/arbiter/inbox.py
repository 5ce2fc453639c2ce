"""What wakes the main loop: signals, and jobs from other threads.

Shaped like gunicorn's arbiter: the signal handler only appends the signal to a queue, and
``signal.set_wakeup_fd`` writes a byte to a socket pair that :meth:`Inbox.wait` selects on,
so a signal interrupts the loop's sleep at once. Other threads (the HTTP handlers, the MQTT
worker) append a :class:`~supervisor.control.controller.Job` and write the same byte. Only
the main loop pops either queue.
"""

from __future__ import annotations

import select
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

from supervisor.control.controller import Job

#: the signals the supervisor handles (SIGCHLD only wakes the loop: children are polled)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
#: what signal.signal returns and takes back: a function, SIG_DFL or SIG_IGN (ints), or None
_Handler = Callable[[int, FrameType | None], Any] | int | None


class Inbox:
    def __init__(self) -> None:
        self.signals: deque[int] = deque()
        self.jobs: deque[Job] = deque()  # stop/start commands from the HTTP or MQTT threads
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, _Handler] = {}

    def enqueue(self, signum: int, frame: object = None) -> None:
        """The signal handler: only enqueue (set_wakeup_fd wakes the loop)."""
        self.signals.append(signum)

    def install(self) -> None:
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for sig in SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, self.enqueue)

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()
        signal.set_wakeup_fd(-1)
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()
        self._wake_r = self._wake_w = None

    def submit(self, job: Job) -> None:
        """From another thread: queue a stop/start for the main loop and wake it."""
        self.jobs.append(job)
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"\0")
            except OSError:  # the buffer is full: the loop is awake anyway
                pass

    def wait(self, timeout: float) -> None:
        """Sleep until a signal or a job arrives or ``timeout`` passes."""
        if self._wake_r is None:
            time.sleep(timeout)
            return
        ready, _, _ = select.select([self._wake_r], [], [], max(0.0, timeout))
        if ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except (BlockingIOError, InterruptedError):
                pass
