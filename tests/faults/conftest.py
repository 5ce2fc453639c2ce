"""The fault-injection suite (issue 7): run alone with ``python -m pytest -m faults -s``."""

from __future__ import annotations

import pytest

# the supervisors fixture comes from tests/conftest.py (visible here without an import)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers",
                            "faults: fault-injection scenarios (tests/faults; figures in docs/reliability.md)")
