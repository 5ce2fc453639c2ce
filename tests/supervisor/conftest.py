"""Fixtures for the supervisor tests (the helpers live in tests/supervisor/helpers.py;
the ``broker`` fixture, a real mosquitto, comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.supervisor.helpers import SupervisorProc


@pytest.fixture
def supervisors() -> Iterator[list[SupervisorProc]]:
    started: list[SupervisorProc] = []
    yield started
    for s in started:
        s.kill_all()
