"""Serving while writing (issue 7): GETs of a topic's +recent.json through a real NGINX
with the shipped config, while a real recorder replaces that file about 100 times a
second. Every 200 must be a complete JSON document; revalidation must answer 304 only
for the current version.

SHARDLOG_FAULT_GETS sets the number of GETs (default 10,000, the issue's figure).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.faults.test_faults import report
from tests.helpers import FastPublisher, Mosquitto, RecorderProc, wait_for, write_map
from tests.test_nginx import NGINX, shipped_nginx

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx-light; "
                                                       ".ci/run installs it, so CI runs this test)")]


class Replacer(threading.Thread):
    """Publishes QoS 1 messages to one topic, paced, until stopped (each flush of the
    recorder then rewrites the topic's +recent.json, at most once per recent_interval)."""

    def __init__(self, port: int, topic: str, rate: float) -> None:
        super().__init__(daemon=True)
        self.pub = FastPublisher(port, client_id=f"serving-{os.getpid()}")
        self.topic = topic
        self.rate = rate
        self.stop = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        pad = "x" * 1500  # ~10 KB files: large enough to be read in more than one piece
        try:
            t0 = time.monotonic()
            while not self.stop.is_set():
                due = t0 + self.sent / self.rate
                if time.monotonic() < due:
                    self.pub._read_acks(due - time.monotonic())
                    continue
                self.pub.publish_many([(self.topic, json.dumps({"i": self.sent, "pad": pad}).encode())])
                self.sent += 1
            self.pub.wait_acked()
        except BaseException as exc:  # raised by the test
            self.error = exc


class Watcher(threading.Thread):
    """Counts the versions of a file it sees (stat polled every millisecond; a lower bound)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop = threading.Event()
        self.versions = 0

    def run(self) -> None:
        last = None
        while not self.stop.wait(0.001):
            try:
                st = os.stat(self.path)
            except OSError:
                continue
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            if sig != last:
                self.versions += 1
                last = sig


def test_serving_recent_json_while_it_is_replaced(tmp_path: Path, broker: Mosquitto,
                                                  recorders: list[RecorderProc]) -> None:
    data = tmp_path / "data"
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}],
                  root=str(data), recent_interval="5ms", batch={"max_delay": "2ms"})
    recorders.append(RecorderProc(m, "all", tmp_path).start())
    path = data / "live" / "x" / "+recent.json"
    gets = int(os.environ.get("SHARDLOG_FAULT_GETS", "10000"))
    replacer = Replacer(broker.port, "live/x", rate=1000)
    replacer.start()
    wait_for(lambda: path.exists(), 20, "the first +recent.json")
    watcher = Watcher(path)
    watcher.start()
    invalid: list[str] = []
    codes = {200: 0, 304: 0}
    bodies: dict[str, bytes] = {}  # ETag -> the body it named
    collisions: set[str] = set()   # ETags naming two different bodies: a 304 for them may be stale
    with shipped_nginx(tmp_path, {"root /srv/shardlog/disk1;": f"root {data};",
                                  "root /srv/shardlog/data;": f"root {data};"}) as web:
        port = int(web.base.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # keep-alive
        etag = None
        t0 = time.monotonic()
        for n in range(gets):
            headers = {"If-None-Match": etag} if etag is not None and n % 4 == 0 else {}
            try:
                conn.request("GET", "/live/x/+recent.json", headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.HTTPException, OSError) as exc:  # e.g. a short body: IncompleteRead
                invalid.append(f"#{n}: {exc!r}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                continue
            codes[resp.status] = codes.get(resp.status, 0) + 1
            if resp.status == 304:
                continue
            if resp.status != 200:
                invalid.append(f"#{n}: HTTP {resp.status}")
                continue
            try:
                doc = json.loads(body)
                assert isinstance(doc, list) and doc and all(isinstance(r["payload"]["i"], int) for r in doc)
            except (ValueError, AssertionError, KeyError, TypeError) as exc:
                invalid.append(f"#{n}: {exc!r}: {body[:80]!r}...{body[-40:]!r} ({len(body)} bytes)")
                continue
            etag = resp.getheader("ETag")
            assert etag is not None
            if bodies.setdefault(etag, body) != body:
                collisions.add(etag)
        elapsed = time.monotonic() - t0
        conn.close()
    replacer.stop.set()
    watcher.stop.set()
    replacer.join(60)
    watcher.join(5)
    if replacer.error is not None:
        raise replacer.error
    report("serving while writing", gets=gets, get_rate=f"{gets / elapsed:,.0f}/s",
           replacements_seen=f"{watcher.versions} ({watcher.versions / elapsed:.0f}/s)",
           ok_200=codes.get(200, 0), not_modified_304=codes.get(304, 0), distinct_etags=len(bodies),
           etags_naming_two_versions=len(collisions), invalid=len(invalid), published=replacer.sent)
    assert invalid == [], f"{len(invalid)} invalid responses, e.g. {invalid[:5]}"
    assert not collisions, f"{len(collisions)} ETags named two versions (a 304 would keep the older one)"
    assert codes.get(304, 0) > 0 and len(bodies) > 10
