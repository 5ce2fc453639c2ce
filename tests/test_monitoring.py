"""deploy/prometheus/alerts.yaml and deploy/grafana/shardlog.json, for real: promtool checks
the rules and runs their unit tests (alerts.test.yaml: each alert fires on the sick
series, not on the healthy ones); Debian's prometheus scrapes a running supervisor
(recording from a real mosquitto) and loads the rules; every dashboard query is run
through it (so it parses), returns data, and names only metrics the supervisor's
/metrics really has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Mosquitto, Publisher, free_port, http_get, wait_for
from tests.supervisor.helpers import SupervisorProc, make_map

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "shardlog.json"
#: Grafana's variables, as a dashboard with every shard selected sends them
GRAFANA_VARS = {"$shard": ".*", "$__rate_interval": "15s", "$__interval": "5s", "$__range": "5m"}
_METRIC = re.compile(r"\bshardlog_[a-zA-Z0-9_]+")


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    if not Path(path).exists():
        pytest.skip(f"needs {name} (apt-get install prometheus; .ci/run installs it)")
    return path


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables filled in) of every panel target."""
    doc = json.loads(DASHBOARD.read_text())
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"{panel['title']}: a variable this test does not know: {expr}"
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_check_and_fire_on_the_right_series() -> None:
    promtool = tool("promtool")
    r = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUCCESS: 11 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], capture_output=True, text=True, timeout=60,
                       cwd=ALERT_TESTS.parent)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    # every alert has a case where it fires (a non-empty exp_alerts), so none is tested only for silence
    firing = {case["alertname"] for t in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for case in t["alert_rule_test"] if case["exp_alerts"]}
    assert firing == {r["alert"] for r in alert_rules()}


class Prometheus:
    """Debian's prometheus on a free loopback port, scraping ``target`` every second."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "prometheus.log"
        rules = workdir / "alerts.yaml"
        shutil.copy(ALERTS, rules)
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "shardlog", "static_configs": [{"targets": [target]}]}],
        }))
        self.argv = [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self._log)
        wait_for(lambda: self._alive() and self.get("/-/ready") is not None, 60, f"prometheus ready (log: {self.log})",
                 interval=0.1)
        return self

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-3000:]}")
        return True

    def get(self, path: str) -> bytes | None:
        return http_get(self.url + path, timeout=10)

    def query(self, expr: str) -> dict[str, Any]:
        """/api/v1/query: the parsed answer, a parse error included (HTTP 400, errorType bad_data)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)
            self._log.close()


@pytest.fixture
def mosquitto_sys(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real mosquitto publishing $SYS every second (so broker_dropped is reported)."""
    d = tmp_path / "broker"
    d.mkdir()
    b = Mosquitto(d, extra_conf="sys_interval 1\n")
    b.start()
    yield b
    b.stop()


def test_prometheus_scrapes_a_supervisor_and_the_dashboard_queries_name_real_metrics(
        tmp_path: Path, mosquitto_sys: Mosquitto, supervisors: list[SupervisorProc]) -> None:
    m = make_map(tmp_path / "shards.yaml", mosquitto_sys.port,
                 [{"name": "chat", "prefix": "chat"}, {"name": "rest", "prefix": "#"}])
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start()
    sup.running("chat")
    sup.running("rest")
    pub = Publisher(mosquitto_sys.port)
    try:
        pub.publish_many([(f"chat/r{i % 3}", b'{"i": %d}' % i, 1) for i in range(60)] +
                         [("sensors/t", b"21.5", 1)] * 5)
    finally:
        pub.close()
    sup.wait_shard("chat", lambda s: (s["counters"] or {}).get("messages") == 60, 30, "60 messages written")
    listen = sup.url.removeprefix("http://")
    (tmp_path / "prom").mkdir()
    prom = Prometheus(tmp_path / "prom", listen).start()
    try:
        def scraped() -> dict[str, float] | None:
            doc = prom.query("shardlog_messages_total")
            got = {r["metric"]["shard"]: float(r["value"][1]) for r in doc["data"]["result"]}
            return got if got == {"chat": 60.0, "rest": 5.0} else None
        wait_for(scraped, 60, f"prometheus to have scraped shardlog_messages_total (log: {prom.log})", interval=0.2)
        up = prom.query('up{job="shardlog"}')["data"]["result"]
        assert [r["value"][1] for r in up] == ["1"], up

        # the names the supervisor exports, from a real scrape (counters with their _total)
        body = sup.get("/metrics")
        assert body is not None
        exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        assert "shardlog_broker_dropped_messages_total" in exported, sorted(exported)

        queries = dashboard_queries()
        assert len(queries) >= 15
        # the trouble counters have a panel and an alert (issue 23)
        for name in ("shardlog_hook_errors_total", "shardlog_hook_dropped_total", "shardlog_retained_skipped_total"):
            assert any(name in expr for _t, expr in queries), f"no dashboard panel shows {name}"
        for name in ("shardlog_hook_errors_total", "shardlog_hook_dropped_total"):
            assert any(name in r["expr"] for r in alert_rules()), f"no alert rule covers {name}"
        for title, expr in queries:
            unknown = set(_METRIC.findall(expr)) - exported
            assert not unknown, f"dashboard panel {title!r} names metrics /metrics does not have: {unknown}"
        for rule in alert_rules():
            unknown = set(_METRIC.findall(rule["expr"])) - exported
            assert not unknown, f"alert {rule['alert']} names metrics /metrics does not have: {unknown}"

        def answers() -> list[str] | None:
            """Every query parses (status success) and returns data once prometheus has a few samples."""
            empty = []
            for title, expr in queries:
                doc = prom.query(expr)
                assert doc["status"] == "success", f"panel {title!r}: {expr}: {doc.get('error')}"
                if not doc["data"]["result"]:
                    empty.append(f"{title}: {expr}")
            return None if empty else queries  # type: ignore[return-value]
        wait_for(answers, 60, "every dashboard query to return data", interval=0.5)
        # a query that does not parse is told apart (the check above can fail)
        assert prom.query("rate(shardlog_messages_total[5m]")["errorType"] == "bad_data"
        # the variable's query: shards by label
        shards = json.loads(prom.get("/api/v1/label/shard/values?match[]=shardlog_shard_info") or b"{}")
        assert shards.get("data") == ["chat", "rest"]
        # prometheus loaded the alerting rules and evaluates them without error
        def rules_ok() -> list[dict[str, Any]] | None:
            doc = json.loads(prom.get("/api/v1/rules") or b"{}")
            rules = [r for g in doc.get("data", {}).get("groups", []) for r in g["rules"]]
            return rules if len(rules) == 11 and all(r.get("health") == "ok" for r in rules) else None
        rules = wait_for(rules_ok, 30, "the 11 alerting rules loaded and evaluated (health ok)", interval=0.2)
        firing = [r["name"] for r in rules if r["state"] != "inactive"]
        assert firing == [], f"alerts pending or firing on a healthy supervisor: {firing}"
    finally:
        prom.stop()
