"""deploy/www/ (the history page), for real: a real recorder records through a real broker, the
shipped nginx config serves the tree and the page on a free loopback port, and headless Chromium
opens the page; the recorded messages must appear in its DOM.

Skips when nginx or chromium is not installed (.ci/run installs both, so CI runs this).
SHARDLOG_SCREENSHOT=docs/history-page.png keeps the page's screenshot there."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shardlog.topics import topic_to_relpath
from tests.helpers import RecorderProc, wait_for, write_map
from tests.test_nginx import NGINX, shipped_nginx

REPO = Path(__file__).resolve().parents[1]
WWW = REPO / "deploy" / "www"
CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)

pytestmark = [
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; "
                                             ".ci/run installs it, so CI runs this test)"),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; "
                                                ".ci/run installs it, so CI runs this test)"),
    pytest.mark.timeout(180),
]

BINARY = b"\xff\xfe\x00raw"


@pytest.fixture
def site(broker, publisher, recorders, tmp_path: Path):
    data = tmp_path / "data"
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#", "root": str(data)}],
                  rotate={"max_bytes": "1KiB", "max_age": None}, compress="gzip", recent_interval="50ms")
    recorders.append(RecorderProc(m, "all", tmp_path).start())
    room = "chat/room42"
    msgs = [(room, json.dumps({"user": "ann", "text": f"hello {i:02d}", "pad": "x" * 60}).encode(), 1)
            for i in range(24)]
    msgs += [(room, b"plain words, not JSON", 1), (room, BINARY, 1),
             ("chat/room42/general", json.dumps({"user": "bob", "text": "in general"}).encode(), 1)]
    publisher.publish_many(msgs)
    d = data / topic_to_relpath(room)
    wait_for(lambda: (d / "+recent.json").exists()
             and json.loads((d / "+recent.json").read_text())[-1].get("enc") == "base64",
             20, "+recent.json of chat/room42 to show the last message")
    wait_for(lambda: list(d.glob("+log.*.jsonl.gz")), 20, "a compressed segment")
    wait_for(lambda: (d / "general" / "+recent.json").exists(), 20, "the subtopic's +recent.json")
    # the shipped config: its listen port, roots and the page's alias pointed at this test's
    with shipped_nginx(tmp_path, {"root /srv/shardlog/disk1;": f"root {data};",
                                  "root /srv/shardlog/data;": f"root {data};",
                                  "alias /srv/shardlog/www/;": f"alias {WWW}/;"}, access_log=True) as http:
        yield http, tmp_path


def chromium(tmp: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"  # a new, empty one per run
    profile.mkdir()
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-proxy-server", f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args, url],
        capture_output=True, text=True, timeout=90)


def test_page_is_served_with_its_types(site) -> None:
    http, _ = site
    status, h, body = http.get("/+www/")
    assert status == 200 and h["content-type"].startswith("text/html") and b"app.js" in body
    status, h, _ = http.get("/+www/app.js")
    assert status == 200 and h["content-type"].startswith("text/javascript")
    status, h, _ = http.get("/+www/style.css")
    assert status == 200 and h["content-type"].startswith("text/css")


def test_history_page_shows_recorded_messages(site) -> None:
    http, tmp = site
    page = f"{http.base}/+www/?topic=chat%2Froom42"
    # the recent messages (+recent.json: the last 6), the subtopic from the JSON autoindex
    r = chromium(tmp, page, "--dump-dom")
    dom = r.stdout
    assert r.returncode == 0 and "<ol id=\"records\">" in dom, r.stderr[-2000:]
    for i in range(20, 24):
        assert f"hello {i:02d}" in dom, (i, dom)
    assert "hello 19" not in dom  # older than +recent.json: only after paging back
    assert "plain words, not JSON" in dom
    assert base64.b64encode(BINARY).decode() in dom and ">base64<" in dom
    assert "?topic=chat%2Froom42%2Fgeneral" in dom and ">general<" in dom
    # live refresh: +recent.json polled again with If-None-Match, and nginx answered 304
    log = (tmp / "nginx" / "access.log").read_text()
    assert '"GET /chat/room42/+recent.json HTTP/1.1" 200' in log, log
    assert '"GET /chat/room42/+recent.json HTTP/1.1" 304' in log, log
    # paging back through every segment, the gzipped rotated ones included (&back=N)
    dom = chromium(tmp, page + "&back=99", "--dump-dom").stdout
    for i in range(24):
        assert f"hello {i:02d}" in dom, (i, dom)
    assert "from the first one kept" in dom
    # the subtopic's page
    dom = chromium(tmp, f"{http.base}/+www/?topic=chat/room42/general", "--dump-dom").stdout
    assert "in general" in dom and "hello 23" not in dom
    # a screenshot, kept in docs/ when asked for
    shot = tmp / "page.png"
    r = chromium(tmp, page, f"--screenshot={shot}", "--window-size=1000,1000", "--hide-scrollbars")
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", r.stderr[-2000:]
    if os.environ.get("SHARDLOG_SCREENSHOT"):
        shutil.copyfile(shot, REPO / os.environ["SHARDLOG_SCREENSHOT"])
