"""The fault-injection suite (issue 7): run alone with ``python -m pytest -m faults -s``."""

from __future__ import annotations

import pytest

from tests.supervisor.conftest import supervisors  # noqa: F401 - the fixture, shared


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: fault-injection scenarios (tests/faults; figures in docs/reliability.md)")
