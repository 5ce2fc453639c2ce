"""docs/brokers.md's compatibility table, from what the suite runs and finds.

``python -m tests.brokers.table`` prints it; tests/brokers/test_brokers_doc.py checks the page
holds exactly this (versions to major.minor, so a Debian security update does not fail it)."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from tests.brokers.servers import HERE, upstream


@dataclass(frozen=True)
class Facts:
    """What the suite shows of a broker (tests/brokers/test_compat.py asserts each one)."""

    retained_on_wildcard: bool  # a retained message reaches a new `branch/#` subscription
    notes: tuple[str, ...] = ()  # what the shard finds and warns about (shardlog/recording/brokercheck.py)
    tls: bool = False            # tests/brokers/test_tls.py runs against it over TLS


FACTS = {
    "mosquitto": Facts(True, tls=True),
    "rabbitmq": Facts(False),  # RabbitMQ 3.10 sends retained messages to exact-topic subscriptions only
    "ejabberd": Facts(True, ("sends at most 1 unacknowledged",)),
    "aedes": Facts(True),
    "iotcore": Facts(True, ("sends at most 100 unacknowledged",)),
}

#: what to set on each broker so a shard loses nothing (the suite's brokers run with these)
CONFIGURE = {
    "mosquitto": "`persistence true`; `max_queued_messages 0` (default 1000 drops the rest of an offline "
                 "session's queue); the suite also sets `max_inflight_messages 0`",
    "rabbitmq": "`mqtt.prefetch` ≥ `batch.max_messages` (its documented default is 10; the suite sets "
                "10000); retained messages only reach exact-topic subscriptions",
    "ejabberd": "`mod_mqtt`: `max_queue: unlimited` (default 5000 per offline session), `session_expiry` ≥ "
                "the longest outage (default 5 min); a user name (any, with anonymous auth)",
    "aedes": "a persistence that outlives the process (aedes-persistence-redis/mongodb): the default "
             "keeps sessions in memory only",
    "iotcore": "none possible: sessions in memory only; for laptops and demos (docs/deploy.md)",
    "amqtt": "cannot: it drops a QoS 1 message unacknowledged for 5 s (see below); not in the suite",
}

PROTOCOLS = {"mosquitto": "5, 3.1.1", "rabbitmq": "3.1.1", "ejabberd": "5, 3.1.1", "aedes": "3.1.1",
             "iotcore": "5", "amqtt": "3.1.1"}


def _deb(package: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return upstream(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else "not installed"


def _pip(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def installed_versions() -> dict[str, str]:
    pkg = HERE / "node_modules" / "aedes" / "package.json"
    return {
        "mosquitto": _deb("mosquitto"), "rabbitmq": _deb("rabbitmq-server"), "ejabberd": _deb("ejabberd"),
        "aedes": json.loads(pkg.read_text())["version"] if pkg.exists() else "not installed",
        "iotcore": _pip("iotcore"), "amqtt": _pip("amqtt"),
    }


def table(versions: dict[str, str]) -> str:
    rows = ["| broker | version | MQTT | TLS tested | retained on `branch/#` | what the shard finds | "
            "configure for no loss |", "|---|---|---|---|---|---|---|"]
    for name in [*FACTS, "amqtt"]:
        f = FACTS.get(name)
        if f is None:
            rows.append(f"| {name} | {versions[name]} | {PROTOCOLS[name]} | no | - | not run | {CONFIGURE[name]} |")
            continue
        notes = "; ".join(f"“{n} …”" for n in f.notes) or "nothing"
        rows.append(f"| {name} | {versions[name]} | {PROTOCOLS[name]} | {'yes' if f.tls else 'no'} | "
                    f"{'yes' if f.retained_on_wildcard else '**no**'} | {notes} | {CONFIGURE[name]} |")
    return "\n".join(rows) + "\n"


def normalize(text: str) -> str:
    """Versions cut to major.minor (``3.10.8`` -> ``3.10``)."""
    return re.sub(r"\| (\d+)\.(\d+)(\.[0-9A-Za-z.~]+)? \|", r"| \1.\2 |", text)


DOC = Path(__file__).resolve().parents[2] / "docs" / "brokers.md"
START, END = "<!-- broker-table:start -->\n", "<!-- broker-table:end -->"


def documented() -> str:
    text = DOC.read_text()
    return text[text.index(START) + len(START):text.index(END)]


if __name__ == "__main__":
    print(table(installed_versions()), end="")
