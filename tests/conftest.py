"""Shared fixtures: a real mosquitto broker, a publisher, recorder processes.

The helpers themselves live in tests/helpers.py (importable as ``tests.helpers``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (  # noqa: F401 - re-exported for older imports
    Mosquitto,
    Publisher,
    RecorderProc,
    free_port,
    wait_for,
    write_map,
)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    d = tmp_path / "broker"
    d.mkdir()
    b = Mosquitto(d)
    b.start()
    yield b
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
