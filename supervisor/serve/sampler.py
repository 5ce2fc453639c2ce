"""Process and disk figures: the sampler thread.

The sampler thread wakes about once a second, reads the main loop's last
snapshot, and gathers for each shard's pid the psutil figures (one cached
``psutil.Process`` per pid, so ``cpu_percent`` measures between samples) and
for each root ``shutil.disk_usage``. It publishes an immutable
:class:`~supervisor.serve.status.Sample` by replacing one attribute. The work runs in
its own thread because ``statvfs`` on a wedged disk or NFS mount can block; the
main loop must never wait on a shard's disk.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable

import psutil

from supervisor.serve.status import Disk, ProcessFigures, Sample
from supervisor.snapshot import Snapshot
from supervisor.threads import Threads

log = logging.getLogger(__name__)

SAMPLE_INTERVAL = 1.0


class Sampler:
    """Owns the psutil.Process cache; only its thread touches it."""

    def __init__(self, source: Callable[[], Snapshot], interval: float = SAMPLE_INTERVAL,
                 threads: Threads | None = None) -> None:
        self.source = source
        self.interval = interval
        self.sample = Sample()
        self._procs: dict[int, psutil.Process] = {}
        self._stop = threading.Event()
        self._threads = threads if threads is not None else Threads()
        self._thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = self._threads.start("shardlog-sampler", self._run, self._stop)  # restarted if it dies
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.collect()
            except Exception:
                log.exception("sampling process and disk figures failed")
            self._stop.wait(self.interval)

    def collect(self) -> Sample:
        snap = self.source()
        pids = {v.pid for v in snap.shards if v.pid is not None}
        for pid in list(self._procs):
            if pid not in pids:
                del self._procs[pid]
        procs: dict[int, ProcessFigures] = {}
        for pid in pids:
            figures = self._process(pid)
            if figures is not None:
                procs[pid] = figures
        disks: dict[str, Disk] = {}
        for root in {v.root for v in snap.shards}:
            try:
                du = shutil.disk_usage(root)
            except OSError:
                continue  # not created yet, or unusable (the shard's state says why)
            disks[root] = Disk(free=du.free, total=du.total)
        self.sample = Sample(ts=time.time(), process=procs, disk=disks)
        return self.sample

    def _process(self, pid: int) -> ProcessFigures | None:
        p = self._procs.get(pid)
        try:
            if p is None or not p.is_running():  # is_running also catches a reused pid
                p = psutil.Process(pid)
                p.cpu_percent(None)  # prime: the first call has nothing to compare with
                self._procs[pid] = p
            with p.oneshot():
                cpu = p.cpu_times()
                try:
                    io = p.io_counters()
                    read_bytes: int | None = io.read_bytes
                    write_bytes: int | None = io.write_bytes
                except (psutil.AccessDenied, AttributeError, NotImplementedError):
                    read_bytes = write_bytes = None
                try:
                    fds: int | None = p.num_fds()
                except (psutil.AccessDenied, AttributeError):
                    fds = None
                return ProcessFigures(cpu_percent=round(p.cpu_percent(None), 1),
                                      cpu_seconds=round(cpu.user + cpu.system, 3),
                                      rss=p.memory_info().rss, read_bytes=read_bytes,
                                      write_bytes=write_bytes, open_fds=fds, threads=p.num_threads())
        except psutil.Error:
            self._procs.pop(pid, None)
            return None
