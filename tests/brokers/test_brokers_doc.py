"""docs/brokers.md's table is what the suite runs and finds (tests/brokers/table.py)."""

from __future__ import annotations

from tests.brokers.conftest import BROKERS
from tests.brokers.table import FACTS, PROTOCOLS, documented, installed_versions, normalize, table
from tests.brokers.test_compat import CASES, SUITE


def test_the_table_is_the_suites() -> None:
    assert set(SUITE) == set(FACTS) and set(BROKERS) == set(PROTOCOLS)
    for name in SUITE:  # the MQTT versions the table claims are the ones the suite runs
        assert PROTOCOLS[name].split(", ") == [p for b, p in CASES if b == name]
    versions = installed_versions()
    assert "not installed" not in versions.values(), f"a broker is missing (.ci/run installs them): {versions}"
    want = table(versions)
    assert normalize(documented()) == normalize(want), (
        "docs/brokers.md's table is stale: regenerate it with `python -m tests.brokers.table`\n" + want)
