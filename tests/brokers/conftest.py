"""Session-scoped brokers for tests/brokers/: each started once (RabbitMQ takes ~10 s), on free
loopback ports, stopped at the end. Tests keep apart by client id (tests.helpers.write_map puts
the test's directory name in the prefix) and by topic."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from tests.brokers.servers import Aedes, Amqtt, Ejabberd, Iotcore, MosquittoBroker, MosquittoTLS, RabbitMQ
from tests.certs import TestCA, make_test_ca
from tests.helpers import BrokerProcess


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"))


def client_tls(ca: TestCA, cert: bool = False) -> ssl.SSLContext:
    """What a client (the test's publisher) trusts: the test CA; ``cert``: with the client certificate."""
    ctx = ssl.create_default_context(cafile=str(ca.ca_file))
    if cert:
        ctx.load_cert_chain(str(ca.client_cert), str(ca.client_key))
    return ctx


def _session_broker(broker: BrokerProcess) -> Iterator[BrokerProcess]:
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def mosquitto_tls(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA) -> Iterator[MosquittoTLS]:
    yield from _session_broker(MosquittoTLS(tmp_path_factory.mktemp("mosquitto-tls"), test_ca))  # type: ignore[misc]


#: the brokers of the compatibility suite (tests/brokers/test_compat.py), by name
BROKERS = {
    "mosquitto": MosquittoBroker,
    "rabbitmq": RabbitMQ,
    "ejabberd": Ejabberd,
    "aedes": Aedes,
    "amqtt": Amqtt,
    "iotcore": Iotcore,
}


def _make(name: str, tmp: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    yield from _session_broker(BROKERS[name](tmp.mktemp(name)))


def _session_fixture(name: str) -> object:
    @pytest.fixture(scope="session", name=f"{name}_session")
    def broker_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
        yield from _make(name, tmp_path_factory)
    broker_session.__doc__ = f"{name}, started once for the session"
    return broker_session


# mosquitto_session, rabbitmq_session, ejabberd_session, aedes_session, amqtt_session, iotcore_session
for _name in BROKERS:
    globals()[f"{_name}_session"] = _session_fixture(_name)
