"""Gzip of rotated segments, in a background thread off the hot path."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import queue
import shutil
import threading

from shardlog.counters import Counters

log = logging.getLogger(__name__)


class Compressor:
    """Gzips rotated segments in a background thread, off the hot path.

    Writes ``name.gz.tmp``, renames it to ``name.gz``, then removes ``name``; a crash
    at any point leaves a complete plain segment (listed in preference)."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.queue: queue.Queue[str | None] = queue.Queue()
        #: held while one file is compressed; a move or delete takes it so that no
        #: compression is half done inside the directory it renames
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="compressor", daemon=True)
        self.thread.start()

    def submit(self, path: str) -> None:
        self.queue.put(path)

    def _run(self) -> None:
        while True:
            path = self.queue.get()
            if path is None:
                return
            try:
                with self.lock:
                    self.compress(path)
                self.counters.compressed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                self.counters.errors += 1
                log.warning("cannot compress %s: %s", path, exc)
            except Exception:  # never die silently: the segment stays plain, listed as it is
                self.counters.errors += 1
                log.exception("cannot compress %s", path)

    @staticmethod
    def compress(path: str) -> None:
        tmp = path + ".gz.tmp"
        with open(path, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1024 * 1024)
            info = os.fstat(src.fileno())
        os.utime(tmp, ns=(info.st_atime_ns, info.st_mtime_ns))  # retention by age keeps working
        os.replace(tmp, path + ".gz")
        try:
            os.unlink(path)
        except FileNotFoundError:
            # retention deleted the segment while we compressed it: do not resurrect it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path + ".gz")
            raise

    def alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float) -> None:
        self.queue.put(None)
        self.thread.join(timeout)
