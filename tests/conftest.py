"""Shared fixtures: a real mosquitto broker, a publisher, recorder processes.

The helpers themselves live in tests/helpers.py (importable as ``tests.helpers``)."""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.fallback_broker import IotcoreBroker
from tests.fallback_broker import wanted as fallback_wanted
from tests.helpers import (  # noqa: F401 - re-exported for older imports
    Mosquitto,
    Publisher,
    RecorderProc,
    free_port,
    wait_for,
    write_map,
)
from tests.supervisor.helpers import SupervisorProc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, None, None]:
    """``SHARDLOG_NO_SKIPS=1`` (set by .ci/run): a skipped test fails, naming its reason, so a
    missing install step shows up red on CI instead of as a quiet skip."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("SHARDLOG_NO_SKIPS") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, and SHARDLOG_NO_SKIPS=1 forbids skips (a missing install step?): {reason}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto; without one (or with SHARDLOG_TEST_BROKER=iotcore), the embedded
    broker iotcore, and tests needing what only mosquitto does skip (tests/fallback_broker.py)."""
    d = tmp_path / "broker"
    d.mkdir()
    b = IotcoreBroker(d) if fallback_wanted() else Mosquitto(d)
    b.start()
    yield b  # type: ignore[misc]
    b.stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    p = Publisher(broker.port)
    yield p
    p.close()


@pytest.fixture
def recorders() -> Iterator[list[RecorderProc]]:
    started: list[RecorderProc] = []
    yield started
    for r in started:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait(10)


@pytest.fixture
def supervisors() -> Iterator[list[SupervisorProc]]:
    """``shardlog supervise`` processes a test started; each is killed with its children."""
    started: list[SupervisorProc] = []
    yield started
    for s in started:
        s.kill_all()
