"""The other brokers the suite records from, each a real server on free loopback ports.

Every class has the surface of tests.helpers.Mosquitto (``port``, ``start()``, ``stop()``,
``proc``) plus what tests/brokers/ needs: ``name`` and ``version`` (for docs/brokers.md),
``protocols`` (the MQTT versions it speaks), ``broker_keys`` (what a shard map needs for it)
and ``log_text()``. Installed by .ci/run: mosquitto, rabbitmq-server, ejabberd and nodejs
(Debian), aedes (npm, in tests/brokers/node_modules), amqtt (the `test` extra). A missing one
skips with the install step named, which SHARDLOG_NO_SKIPS=1 (CI) turns into a failure."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.certs import TestCA
from tests.fallback_broker import IotcoreBroker
from tests.helpers import MOSQUITTO, BrokerProcess, Mosquitto, free_port, wait_for

HERE = Path(__file__).resolve().parent
RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
ERL = shutil.which("erl") or "/usr/bin/erl"
EJABBERD_LIBS = "/usr/lib/x86_64-linux-gnu"  # where Debian's ejabberd puts its Erlang applications
NODE = shutil.which("node") or "/usr/bin/node"


def _need(path: str, how: str) -> None:
    if not os.path.exists(path):
        pytest.skip(f"needs {path} ({how}; .ci/run installs it, so CI runs this test)")


def _deb_version(package: str) -> str:
    r = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def upstream(version: str) -> str:
    """``3.10.8-1.1+deb12u1`` -> ``3.10.8``: the broker's own version, without Debian's revision."""
    return re.sub(r"^\d+:", "", version).split("-")[0].split("+")[0]


#: run as root, mosquitto becomes user "mosquitto", who cannot read pytest's 0700 directories
#: (its log, password file, keys): stay who we are
_STAY = "user root\n" if os.geteuid() == 0 else ""


class _Daemon(BrokerProcess):
    """A broker process with its output in ``workdir/<kind>.out``."""

    name = ""
    protocols: tuple[str, ...] = ("3.1.1",)
    broker_keys: dict[str, Any] = {}

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.out = workdir / f"{self.kind}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = "?"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None, timeout: float = 20) -> None:
        self._out = open(self.out, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, cwd=self.dir,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        wait_for(self._accepts, timeout, f"{self.kind} to listen on port {self.port} (output: {self.out})")

    def exit_report(self) -> str:
        return self.log_text()

    def log_text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the broker and its helpers
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None


class MosquittoBroker(Mosquitto):
    """Debian's mosquitto with the settings docs/brokers.md asks for (the suite's usual broker)."""

    name = "mosquitto"
    protocols = ("5", "3.1.1")
    broker_keys: dict[str, Any] = {}

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir)
        self.conf.write_text(_STAY + self.conf.read_text())
        self.version = upstream(_deb_version("mosquitto"))

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class MosquittoTLS(Mosquitto):
    """mosquitto with, beside its plain listener (``port``), three TLS listeners made with the
    session's test CA: ``tls_port`` (server certificate only, anonymous), ``mtls_port`` (a client
    certificate signed by the CA required; its CN becomes the user name) and ``password_port``
    (TLS, and a user name and password from a mosquitto_passwd file; no anonymous)."""

    name = "mosquitto (TLS)"
    USER, PASSWORD = "recorder", "s3cret-pw"

    def __init__(self, workdir: Path, ca: TestCA) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.tls_port, self.mtls_port, self.password_port = free_port(), free_port(), free_port()
        passwd = workdir / "passwd"
        tls = (f"cafile {ca.ca_file}\ncertfile {ca.server_cert}\nkeyfile {ca.server_key}\n"
               "tls_version tlsv1.2\n")  # the minimum; TLS 1.3 is negotiated where both have it
        super().__init__(workdir, extra_conf=(
            f"listener {self.tls_port} 127.0.0.1\n{tls}allow_anonymous true\n"
            f"listener {self.mtls_port} 127.0.0.1\n{tls}require_certificate true\n"
            "use_identity_as_username true\nallow_anonymous false\n"
            f"listener {self.password_port} 127.0.0.1\n{tls}allow_anonymous false\npassword_file {passwd}\n"))
        self.conf.write_text("per_listener_settings true\n" + _STAY + self.conf.read_text())
        self.passwd = passwd
        self.version = upstream(_deb_version("mosquitto"))

    def start(self) -> None:
        mosquitto_passwd = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        _need(mosquitto_passwd, "apt-get install mosquitto")
        if not self.passwd.exists():
            subprocess.run([mosquitto_passwd, "-c", "-b", str(self.passwd), self.USER, self.PASSWORD],
                           check=True, capture_output=True)
            self.passwd.chmod(0o600)
        super().start()
        for port in (self.tls_port, self.mtls_port, self.password_port):
            self.port, plain = port, self.port
            try:
                wait_for(self._accepts, 10, f"mosquitto's TLS listener on port {port}")
            finally:
                self.port = plain

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Amqtt(_Daemon):
    """amqtt (PyPI, pure Python, MQTT 3.1.1), in-memory sessions."""

    kind = name = "amqtt"
    protocols = ("3.1.1",)
    broker_keys = {"protocol": "3.1.1"}

    def start(self) -> None:
        try:
            from importlib.metadata import version
            self.version = version("amqtt")
        except ImportError:
            pytest.skip("needs amqtt (pip install -e '.[test]'; the test extra has it)")
        conf = self.dir / "amqtt.yaml"
        conf.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: 127.0.0.1:{self.port}\n"
            "plugins:\n"
            "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        self._spawn([sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)])


class Aedes(_Daemon):
    """aedes (npm), run by node from tests/brokers/aedes_broker.js; in-memory persistence."""

    kind = name = "aedes"
    protocols = ("3.1.1",)
    broker_keys = {"protocol": "3.1.1"}

    def start(self) -> None:
        _need(NODE, "apt-get install nodejs npm")
        pkg = HERE / "node_modules" / "aedes" / "package.json"
        _need(str(pkg), "cd tests/brokers && npm ci")
        import json
        self.version = json.loads(pkg.read_text())["version"]
        self._spawn([NODE, str(HERE / "aedes_broker.js"), str(self.port)])


class RabbitMQ(_Daemon):
    """A private RabbitMQ node with its MQTT plugin: its own node name, data directory, ports
    (AMQP, Erlang distribution, epmd) on loopback, and plugins file; MQTT 3.1.1. Slow to start
    (~10 s): the suite starts it once (a session fixture)."""

    kind = name = "rabbitmq"
    protocols = ("3.1.1",)
    broker_keys = {"protocol": "3.1.1"}

    def start(self) -> None:
        _need(RABBITMQ_SERVER, "apt-get install rabbitmq-server")
        self.version = upstream(_deb_version("rabbitmq-server"))
        self.amqp_port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        d = self.dir
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\n"
            # unacknowledged messages it sends one MQTT subscriber (default 10): see docs/brokers.md
            "mqtt.prefetch = 10000\n"
            "log.console = false\nlog.file.level = warning\n")
        (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        self.env = {
            "HOME": str(d), "RABBITMQ_MNESIA_BASE": str(d / "mnesia"), "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_NODENAME": f"shardlog{os.getpid()}-{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.amqp_port),
            "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
        }
        self._spawn([RABBITMQ_SERVER], self.env, timeout=90)

    def log_text(self) -> str:
        logs = sorted((self.dir / "log").glob("*.log")) if (self.dir / "log").exists() else []
        return super().log_text() + "".join(p.read_text(errors="replace") for p in logs)

    def stop(self) -> None:
        super().stop()
        _stop_epmd(self)


class Ejabberd(_Daemon):
    """Debian's ejabberd with only mod_mqtt listening (MQTT 5 and 3.1.1), run by erl directly
    with a private config, spool and log directory: no XMPP port, no system user, no epmd
    name clash (its own epmd port). Users log in with any name (anonymous auth)."""

    kind = name = "ejabberd"
    protocols = ("5", "3.1.1")
    broker_keys = {"username": "shardlog", "password": "unused"}  # anonymous auth wants a name

    def start(self) -> None:
        _need(ERL, "apt-get install ejabberd")
        libs = sorted(Path(EJABBERD_LIBS).glob("ejabberd-*"))
        if not libs:
            pytest.skip("needs ejabberd (apt-get install ejabberd; .ci/run installs it, so CI runs this test)")
        self.version = upstream(_deb_version("ejabberd"))
        self.epmd_port = free_port()
        d = self.dir
        (d / "spool").mkdir(exist_ok=True)
        (d / "logs").mkdir(exist_ok=True)
        conf = d / "ejabberd.yml"
        conf.write_text(
            "hosts: [localhost]\nloglevel: warning\nlog_rotate_count: 0\ncertfiles: []\n"
            f"listen:\n  - port: {self.port}\n    ip: \"127.0.0.1\"\n    module: mod_mqtt\n    backlog: 1000\n"
            "access_rules:\n  mqtt_all:\n    allow: all\n"
            "modules:\n  mod_mqtt:\n"
            "    access_subscribe: {\"#\": mqtt_all}\n    access_publish: {\"#\": mqtt_all}\n"
            # its defaults: max_queue 5000 (an offline session's queue), session_expiry 5 min
            "    max_queue: unlimited\n    session_expiry: 7d\n"
            "auth_method: [anonymous]\nanonymous_protocol: login_anon\nallow_multiple_connections: true\n")
        self.env = {"HOME": str(d), "EJABBERD_CONFIG_PATH": str(conf),
                    "EJABBERD_LOG_PATH": str(d / "logs" / "ejabberd.log"), "ERL_LIBS": EJABBERD_LIBS,
                    "ERL_EPMD_PORT": str(self.epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
                    "ERL_CRASH_DUMP": str(d / "logs" / "erl_crash.dump")}
        self._spawn([ERL, "-sname", f"shardlog{os.getpid()}-{self.port}@localhost", "+K", "true", "-noinput",
                     "-mnesia", "dir", f'"{d / "spool"}"', "-s", "ejabberd"], self.env, timeout=60)

    def log_text(self) -> str:
        p = self.dir / "logs" / "ejabberd.log"
        return super().log_text() + (p.read_text(errors="replace") if p.exists() else "")

    def stop(self) -> None:
        super().stop()
        _stop_epmd(self)


class Iotcore(IotcoreBroker):
    """The embedded broker (iotcore, rumqttd in a wheel), as ``broker.embedded`` runs it: MQTT 5
    on its port, sessions in memory, no $SYS (a $SYS subscription drops the connection)."""

    name = "iotcore"
    protocols = ("5",)
    broker_keys = {"sys_topics": False}

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        from importlib.metadata import version
        self.version = version("iotcore")

    def log_text(self) -> str:
        return self.exit_report()


def _stop_epmd(broker: Any) -> None:
    """The Erlang port mapper the node started on its private port (it outlives the node)."""
    epmd = shutil.which("epmd") or "/usr/bin/epmd"
    if os.path.exists(epmd) and getattr(broker, "epmd_port", None):
        subprocess.run([epmd, "-port", str(broker.epmd_port), "-kill"], capture_output=True, timeout=10)


__all__ = ["MOSQUITTO", "Aedes", "Amqtt", "Ejabberd", "Iotcore", "MosquittoBroker", "MosquittoTLS", "RabbitMQ"]
