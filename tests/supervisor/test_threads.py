"""The supervisor's own threads are supervised (issue 22, item 5): a thread whose target raises is
logged (its traceback once per distinct error), counted, run again after a pause that doubles, and
shown in /status. Real threads, no mocks; waits poll with a deadline."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time

import pytest

from supervisor.serve.http import StatusServer
from supervisor.serve.status import Sample, build_status, encode
from supervisor.snapshot import EMPTY
from supervisor.threads import FIRST_PAUSE, MAX_PAUSE, Threads, restart_pause
from tests.supervisor.helpers import wait_for

pytestmark = pytest.mark.timeout(60)


def test_restart_pause_doubles_up_to_its_cap() -> None:
    assert [restart_pause(n) for n in (1, 2, 3, 4)] == [FIRST_PAUSE, 2 * FIRST_PAUSE, 4 * FIRST_PAUSE, 8 * FIRST_PAUSE]
    assert restart_pause(50) == restart_pause(10_000) == MAX_PAUSE


def test_a_thread_that_dies_is_logged_restarted_counted_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    threads = Threads()
    stop = threading.Event()
    runs: list[float] = []

    def target() -> None:  # what paho's publish did with a response topic 'resp/+'
        runs.append(time.monotonic())
        if len(runs) <= 3:
            raise ValueError("Publish topic cannot contain wildcards.")
        stop.wait()  # then it lives, until asked to stop

    with caplog.at_level(logging.INFO, logger="supervisor.threads"):
        t = threads.start("shardlog-test", target, stop)
        wait_for(lambda: len(runs) == 4, 10, "the fourth run of the target")
    [rec] = threads.view()
    assert rec.name == "shardlog-test" and rec.alive and rec.restarts == 3
    assert rec.last_error == "ValueError: Publish topic cannot contain wildcards." and rec.last_error_ts
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, "one traceback for one kind of error"
    assert sum("died again" in r.getMessage() for r in caplog.records) == 2
    assert runs[3] - runs[2] >= 3 * FIRST_PAUSE, "the pause did not grow"
    doc = build_status(EMPTY, Sample(), time.monotonic(), threads.view())
    [shown] = doc.supervisor.threads
    assert shown.restarts == 3 and shown.alive and "wildcards" in (shown.last_error or "")
    assert b'"threads":[{"name":"shardlog-test"' in encode(doc)
    stop.set()
    t.join(5)
    assert not t.is_alive() and not threads.view()[0].alive


def test_a_thread_that_returns_has_ended_and_one_stopped_is_not_restarted() -> None:
    threads = Threads()
    stop = threading.Event()
    t = threads.start("done", lambda: None, stop)
    t.join(5)
    assert threads.view()[0].restarts == 0 and not threads.view()[0].alive

    def dies_while_stopping() -> None:
        stop.set()
        raise OSError("closed under it")

    t = threads.start("stopping", dies_while_stopping, stop)
    t.join(5)
    assert not t.is_alive() and threads.view()[1].restarts == 0


def test_shardlog_status_names_a_restarted_thread() -> None:
    threads = Threads()
    stop = threading.Event()
    runs: list[int] = []

    def target() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise ValueError("Publish topic cannot contain wildcards.")
        stop.wait()

    threads.start("shardlog-mqtt-control", target, stop)
    wait_for(lambda: len(runs) == 2, 10, "the restart")
    server = StatusServer("127.0.0.1:0",
                          lambda: build_status(EMPTY, Sample(), time.monotonic(), threads.view())).start()
    try:
        host, port = server.address
        r = subprocess.run([sys.executable, "-m", "shardlog", "status", "--url", f"http://{host}:{port}"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert ("supervisor thread shardlog-mqtt-control: restarted 1 times, last error: ValueError: Publish topic "
                "cannot contain wildcards.") in r.stdout, r.stdout
    finally:
        stop.set()
        server.stop()
