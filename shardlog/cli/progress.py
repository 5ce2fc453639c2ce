"""Progress on a terminal (stderr) for the long verbs: replay and the Parquet export.

:func:`format_progress` is pure (it takes the elapsed time and the estimate);
:class:`ReplayProgress` draws it at most 10 times a second.
"""

from __future__ import annotations

import sys
import time


def _hms(seconds: float) -> str:
    s = int(max(0.0, seconds) + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def format_progress(done: int, total: int | None, elapsed: float, eta: float | None, width: int = 30) -> str:
    """One progress line: ``[#####-----]  1,234/5,000  24%  3,210 rec/s  ETA 0:00:01``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        frac = min(1.0, done / total)
        filled = int(frac * width)
        head = f"[{'#' * filled}{'-' * (width - filled)}] {done:,}/{total:,} {frac * 100:3.0f}%"
    else:
        head = f"{done:,} records"
    tail = f" ETA {_hms(eta)}" if eta is not None else ""
    return f"{head}  {rate:,.0f} rec/s  {_hms(elapsed)}{tail}"


class ReplayProgress:
    """A progress bar on stderr, redrawn at most 10 times a second (only on a terminal)."""

    def __init__(self, total: int | None, last_ts: int | None, speed: float | None) -> None:
        self.clock = time.monotonic
        self.total, self.last_ts, self.speed = total, last_ts, speed
        self.start = self.clock()
        self.shown = 0.0
        self.done = 0
        self.ts: int | None = None  # the newest record published

    def __call__(self, done: int, ts: int | None, force: bool = False) -> None:
        self.done = done
        if ts is not None:
            self.ts = ts
        now = self.clock()
        if now - self.shown < 0.1 and not force:
            return
        self.shown = now
        elapsed = now - self.start
        eta = None
        if self.speed is not None and self.ts is not None and self.last_ts is not None:
            eta = (self.last_ts - self.ts) / 1e6 / self.speed
        elif self.total and done and elapsed > 0:
            eta = (self.total - done) * elapsed / done
        sys.stderr.write("\r" + format_progress(done, self.total, elapsed, eta) + "\x1b[K")
        sys.stderr.flush()

    def end(self) -> None:
        self(self.done, None, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()
