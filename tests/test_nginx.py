"""deploy/nginx/shardlog.conf, for real: ``nginx -t`` on the shipped file, then nginx serving two
roots written by real recorders (real mosquitto) on a free loopback port, checked with urllib.

Skips when nginx is not installed (.ci/run installs it, so CI runs this)."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardlog.topics import topic_to_relpath
from tests.helpers import RecorderProc, free_port, wait_for, write_map

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "deploy" / "nginx" / "shardlog.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; "
                                             ".ci/run installs it, so CI runs this test)"),
    pytest.mark.timeout(120),
]


def wrapper(tmp: Path, include: Path) -> Path:
    """A minimal nginx.conf around the shipped file (its pid, logs and temp files in ``tmp``)."""
    (tmp / "body").mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""  # pytest's tmp dirs are 0700
    conf.write_text(f"{user}worker_processes 1;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
                    f"events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {tmp}/body;\n"
                    f"  include {include};\n}}\n")
    return conf


def nginx_t(conf: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NGINX, "-t", "-c", str(conf), "-p", str(tmp)], capture_output=True, text=True)


def test_shipped_config_passes_nginx_t(tmp_path: Path) -> None:
    r = nginx_t(wrapper(tmp_path, CONF), tmp_path)
    assert r.returncode == 0, r.stderr


class Http:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no proxy from env

    def up(self) -> bool:
        try:
            return self.get("/")[0] == 200
        except urllib.error.URLError:
            return False

    def get(self, path: str, headers: dict[str, str] | None = None,
            method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.base + path, headers=headers or {}, method=method)
        try:
            with self.opener.open(req, timeout=5) as resp:
                return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def url_of(topic: str, name: str) -> str:
    """The URL path of a topic's file: its directory names, with `%` percent-encoded."""
    return "/" + urllib.request.quote(topic_to_relpath(topic), safe="/") + "/" + name


@pytest.fixture
def served(broker, publisher, recorders, tmp_path: Path):
    disk1, data = tmp_path / "disk1", tmp_path / "data"
    m = write_map(tmp_path / "shards.yaml", broker.port,
                  [{"name": "chat", "prefix": "chat", "root": str(disk1)},
                   {"name": "rest", "prefix": "#", "root": str(data)}],
                  rotate={"max_bytes": "1KiB", "max_age": None}, compress="gzip", recent_interval="50ms")
    for shard in ("chat", "rest"):
        recorders.append(RecorderProc(m, shard, tmp_path).start())
    topics = ["chat/room42", "chat/..", "chat/50%", "sensors/kitchen"]
    msgs = [(t, json.dumps({"i": i, "pad": "x" * 100}).encode(), 1) for i in range(40) for t in topics]
    publisher.publish_many(msgs)
    for t in topics:
        root = disk1 if t.startswith("chat") else data
        d = root / topic_to_relpath(t)
        wait_for(lambda d=d: (d / "+recent.json").exists()
                 and json.loads((d / "+recent.json").read_text())[-1]["payload"]["i"] == 39,
                 20, f"+recent.json of {t} to show the last message")
    wait_for(lambda: list((disk1 / "chat" / "room42").glob("+log.*.jsonl.gz")), 20, "a compressed segment")
    # the shipped config, with its listen port and roots pointed at this test's
    with shipped_nginx(tmp_path, {"root /srv/shardlog/disk1;": f"root {disk1};",
                                  "root /srv/shardlog/data;": f"root {data};"}) as http:
        yield http, disk1, data


@contextlib.contextmanager
def shipped_nginx(tmp_path: Path, replacements: dict[str, str], access_log: bool = False) -> Iterator[Http]:
    """Run nginx with the shipped deploy/nginx/shardlog.conf on a free loopback port, its
    paths replaced as given (each must still be in the file); yields an Http client."""
    port = free_port()
    text = CONF.read_text()
    for old, new in {"listen 80;": f"listen 127.0.0.1:{port};", "listen [::]:80;": "", **replacements}.items():
        assert old in text, f"{old!r} is no longer in {CONF}: update this test"
        text = text.replace(old, new)
    site = tmp_path / "shardlog.conf"
    site.write_text(text)
    nroot = tmp_path / "nginx"
    nroot.mkdir()
    conf = wrapper(nroot, site)
    if access_log:
        conf.write_text(conf.read_text().replace("access_log off;", f"access_log {nroot}/access.log;"))
    r = nginx_t(conf, nroot)
    assert r.returncode == 0, r.stderr
    proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(nroot), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    http = Http(port)
    try:
        wait_for(lambda: proc.poll() is not None or http.up(), 10, "nginx to answer")
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        yield http
    finally:
        proc.terminate()
        proc.wait(10)


def test_nginx_serves_the_recorded_tree(served) -> None:
    http, disk1, data = served
    # +recent.json: JSON, revalidated every time (no-cache + ETag -> 304), CORS open
    status, h, body = http.get("/chat/room42/+recent.json")
    assert status == 200
    assert h["content-type"].startswith("application/json")
    assert h["cache-control"] == "no-cache"
    assert h["access-control-allow-origin"] == "*"
    assert "etag" in h
    recent = json.loads(body)
    assert [r["payload"]["i"] for r in recent] == list(range(34, 40))
    assert body == (disk1 / "chat" / "room42" / "+recent.json").read_bytes()
    status, h2, _ = http.get("/chat/room42/+recent.json", {"If-None-Match": h["etag"]})
    assert status == 304
    # the current segment: JSON Lines, revalidated
    status, h, body = http.get("/chat/room42/+log.jsonl")
    assert status == 200 and h["content-type"].startswith("application/x-ndjson")
    assert h["cache-control"] == "no-cache"
    # a rotated, compressed segment, asked for by its .jsonl name: gzip_static, immutable
    gz = sorted((disk1 / "chat" / "room42").glob("+log.*.jsonl.gz"))[0]
    plain_name = gz.name[:-3]
    assert not (gz.parent / plain_name).exists()
    status, h, body = http.get(f"/chat/room42/{plain_name}", {"Accept-Encoding": "gzip"})
    assert status == 200, (status, h)
    assert h["content-encoding"] == "gzip"
    assert h["content-type"].startswith("application/x-ndjson")
    assert "immutable" in h["cache-control"] and "max-age=31536000" in h["cache-control"]
    lines = gzip.decompress(body).decode().splitlines()
    assert lines and all(json.loads(x)["payload"]["pad"] for x in lines)
    status, h, body = http.get(f"/chat/room42/{gz.name}")
    assert status == 200 and h["content-type"] == "application/gzip" and body == gz.read_bytes()
    # encoded topic levels: topic chat/.. is directory chat/%2E%2E, URL /chat/%252E%252E/
    assert url_of("chat/..", "+recent.json") == "/chat/%252E%252E/+recent.json"
    assert url_of("chat/50%", "+recent.json") == "/chat/50%2525/+recent.json"
    for topic in ("chat/..", "chat/50%"):
        status, _, body = http.get(url_of(topic, "+recent.json"))
        assert status == 200, topic
        assert json.loads(body)[-1]["payload"]["i"] == 39
    # the second root, through the catch-all location: one tree
    status, _, body = http.get("/sensors/kitchen/+recent.json")
    assert status == 200 and json.loads(body)[-1]["payload"]["i"] == 39
    # a directory lists its subtopics as JSON
    status, h, body = http.get("/chat/")
    assert status == 200
    assert {"room42", "%2E%2E", "50%25"} <= {e["name"] for e in json.loads(body) if e["type"] == "directory"}
    # CORS preflight
    status, h, _ = http.get("/chat/room42/+recent.json", method="OPTIONS")
    assert status == 204 and h["access-control-allow-origin"] == "*"


def test_nginx_refuses_internals_and_the_outside(served) -> None:
    http, disk1, data = served
    lock = [p for p in (data / "+shard.lock", disk1 / "chat" / "+shard.lock") if p.exists()]
    assert lock, "the recorders hold a +shard.lock"
    for path in ("/+shard.lock", "/chat/+shard.lock", "/%2Bshard.lock", "/chat/room42/+recent.json.spare",
                 "/+quarantine.jsonl", "/chat/room42/+log.00000001.jsonl.gz.tmp"):
        status, _, _ = http.get(path)
        assert status == 404, path
    assert http.get("/chat/room42/+recent.json", method="POST")[0] == 405
    # nothing outside the roots: neither by .. nor through a symbolic link planted in the tree
    assert http.get("/../../../../etc/passwd")[0] in (400, 404)
    assert http.get("/%2E%2E/%2E%2E/%2E%2E/etc/passwd")[0] in (400, 404)
    os.symlink("/etc", data / "sensors" / "etc")
    status, _, body = http.get("/sensors/etc/passwd")
    assert status in (403, 404) and b"root:" not in body
