#!/usr/bin/env python3
"""Throughput of one shardlog shard next to ``mosquitto_sub``, on a private mosquitto.

    python bench/throughput.py                      # drain, 1,000,000 msgs, 1,000 topics, 3 runs
    python bench/throughput.py --mode drain,live    # both modes
    python bench/throughput.py --quick              # 50k messages, 1 run: a smoke test
    python bench/throughput.py --rss                # shard RSS with 100,000 topics (300k msgs)
    python bench/throughput.py --head               # measure the committed HEAD, not the work tree
    python bench/throughput.py --qos 0,1 --mode drain,live   # both QoS, both modes, one run
    python bench/throughput.py --before-src DIR --sides mosquitto_sub,shardlog,shardlog-before
    python bench/throughput.py --tls                # the same over TLS next to plain, in one run

Every measurement gets a fresh broker (/usr/sbin/mosquitto on a free 127.0.0.1 port,
persistence off, ``max_queued_messages 0``, ``max_inflight_messages 0``). Subscribers:

* ``mosquitto_sub -q 1 -v -t '#' > file`` - the C client, the single-connection
  limit of this machine;
* one shardlog shard, ``python -m shardlog record MAP --shard all`` with a catch-all
  shard (``prefix: "#"``) and the map's defaults (QoS 1, ack after write).

Modes:

* **drain** (the main figure): the subscriber's persistent session is registered
  first, the subscriber stops, the whole backlog is published (queued by the broker
  for the offline session), then the subscriber starts and the clock runs from its
  start until it has received (mosquitto_sub: exited after ``-C N``) or written and
  acknowledged (shardlog: ``acked >= N`` in its stats file) all N messages.
* **live**: the subscriber is connected; the clock runs from the first PUBLISH until
  the subscriber has all N. Publisher, broker and subscriber share the 2 cores.

CPU is user+system seconds per million messages: the subscriber's (psutil, sampled
the moment it is done; every thread included) and the broker's (delta over the same
interval). The publisher is a raw-socket MQTT 3.1.1 client that streams pre-built QoS 1
PUBLISH packets with a window of unacknowledged ones; its rate is reported so you can
see it is not the limit. After each run the output is checked: every message once,
duplicates counted, order kept within each topic.

Progress goes to stderr; the markdown tables go to stdout (and ``--markdown FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_SUB = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
ME = psutil.Process()
TO_DELETE: list[Path] = []
SEQ_RE = re.compile(rb'"seq":(\d+)')


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def cpu_split(p: psutil.Process) -> tuple[float, float]:
    t = p.cpu_times()
    return t.user, t.system


def busy_cpu() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def wait_until(pred: Any, timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# -- the broker --------------------------------------------------------------------------


class Broker:
    """A private mosquitto: no persistence, no queue or inflight limits, quiet log; with ``ca``,
    a second listener (``tls_port``) with TLS, the server certificate signed by that test CA."""

    def __init__(self, workdir: Path, ca: Any = None) -> None:
        self.dir = workdir
        self.port = free_port()
        self.tls_port = free_port()
        tls = (f"listener {self.tls_port} 127.0.0.1\ncafile {ca.ca_file}\ncertfile {ca.server_cert}\n"
               f"keyfile {ca.server_key}\n") if ca is not None else ""
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            ("user root\n" if os.geteuid() == 0 and ca is not None else "")  # it must read the key
            +
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "queue_qos0_messages true\n"  # so a QoS 0 backlog can be drained too
            "log_dest stderr\n"
            "log_type error\n"
            "connection_messages false\n"
            + tls
        )
        self._err = open(workdir / "mosquitto.log", "wb")  # lives as long as the broker
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=self._err)
        self.ps = psutil.Process(self.proc.pid)
        wait_until(self._accepts, 10, f"mosquitto on port {self.port}")

    def _accepts(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"mosquitto exited ({self.proc.returncode}); see {self.dir}/mosquitto.log")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def cpu(self) -> float:
        return cpu_of(self.ps)

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._err.close()


# -- the workload and the publisher ------------------------------------------------------

_PAD = (b"the quick brown fox jumps over the lazy dog while the chat room keeps talking "
        b"about brokers, queues and files; ") * 4


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def topic_names(topics: int) -> list[bytes]:
    """``bench/a/room0000``, ``bench/b/room0001``, ...: two branches, so two shards can split them."""
    width = max(4, len(str(topics - 1)))
    return [b"bench/%s/room%0*d" % (b"ab"[i % 2:i % 2 + 1], width, i) for i in range(topics)]


class Workload:
    """N QoS 1 PUBLISH packets (3.1.1), pre-built in chunks, round-robin over T topics."""

    def __init__(self, messages: int, topics: int, payload_size: int = 150, chunk: int = 1000,
                 seq: bool = True) -> None:
        self.messages = messages
        self.topics = topics
        self.payload_size = payload_size
        self.names = topic_names(topics)
        t0 = time.monotonic()
        heads = [len(t).to_bytes(2, "big") + t for t in self.names]
        self.chunks: list[tuple[int, bytes]] = []
        buf: list[bytes] = []
        payload_bytes = 0
        for i in range(messages):
            k = i % topics
            head = (b'{"user":"u%03d","seq":%d,"text":"' % (k % 1000, i) if seq
                    else b'{"user":"u%03d","warm":true,"text":"' % (k % 1000))
            pad = max(0, payload_size - len(head) - 2)
            payload = head + _PAD[:pad] + b'"}'
            body = heads[k] + ((i % 65535) + 1).to_bytes(2, "big") + payload
            buf.append(b"\x32" + _varint(len(body)) + body)
            payload_bytes += len(payload)
            if len(buf) == chunk:
                self.chunks.append((len(buf), b"".join(buf)))
                buf = []
        if buf:
            self.chunks.append((len(buf), b"".join(buf)))
        self.payload_avg = payload_bytes / max(1, messages)
        self.build_seconds = time.monotonic() - t0


def _connect_packet(client_id: bytes) -> bytes:
    var = b"\x00\x04MQTT\x04\x02\x00\x00"  # 3.1.1, clean session, keepalive off
    body = var + len(client_id).to_bytes(2, "big") + client_id
    return b"\x10" + _varint(len(body)) + body


def publish(port: int, work: Workload, window: int = 20000, client_id: bytes = b"bench-pub") -> float:
    """Stream every packet at QoS 1 with at most ``window`` unacknowledged; return
    seconds from the first byte sent to the last PUBACK received."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    sock.sendall(_connect_packet(client_id))
    connack = b""
    while len(connack) < 4:
        part = sock.recv(4 - len(connack))
        if not part:
            raise RuntimeError("broker closed the publisher connection")
        connack += part
    if connack[0] != 0x20 or connack[3] != 0:
        raise RuntimeError(f"publisher CONNACK refused: {connack!r}")
    acked = [0]
    cond = threading.Condition()
    err: list[BaseException] = []

    def reader() -> None:
        got = 0
        try:
            while got < 4 * work.messages:
                data = sock.recv(1 << 20)
                if not data:
                    raise RuntimeError("broker closed the publisher connection")
                got += len(data)  # only PUBACKs (4 bytes each) come back
                with cond:
                    acked[0] = got // 4
                    cond.notify()
        except BaseException as exc:
            err.append(exc)
            with cond:
                cond.notify()

    th = threading.Thread(target=reader, daemon=True)
    t0 = time.monotonic()
    th.start()
    sent = 0
    for count, data in work.chunks:
        if sent - acked[0] > window:
            with cond:
                cond.wait_for(lambda s=sent: s - acked[0] <= window or bool(err), timeout=60)
            if err:
                raise RuntimeError(f"publisher: {err[0]}")
        sock.sendall(data)
        sent += count
    th.join(600)
    t1 = time.monotonic()
    if err or acked[0] != work.messages:
        raise RuntimeError(f"publisher: {acked[0]} of {work.messages} acknowledged ({err})")
    sock.sendall(b"\xe0\x00")
    sock.close()
    return t1 - t0


# -- results -------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    side: str
    mode: str
    run: int
    messages: int
    seconds: float
    cpu: float                 # subscriber CPU seconds (user + system) until done
    cpu_sys: float             # the system part of it
    broker_cpu: float          # broker CPU seconds over the same interval
    pub_seconds: float
    others_cores: float = 0.0  # cores busy with other processes meanwhile (noise indicator)
    peak_rss: int = 0
    rss_samples: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (received, rss)
    check: str = ""
    ok: bool = True
    duplicates: int = 0
    qos: int = 1
    files_seconds: float | None = None  # shardlog: until every record is in its topic file
    recent_seconds: float | None = None  # shardlog: then until every +recent.json is current

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    @property
    def cpu_per_m(self) -> float:
        return self.cpu * 1e6 / self.messages

    @property
    def broker_cpu_per_m(self) -> float:
        return self.broker_cpu * 1e6 / self.messages

    @property
    def pub_rate(self) -> float:
        return self.messages / self.pub_seconds if self.pub_seconds else 0.0


def count_seqs(paths: list[Path], expect: int) -> tuple[int, int, int, bool]:
    """(lines, distinct seqs, missing, ordered within each file)."""
    seen = bytearray(expect)
    lines = 0
    distinct = 0
    ordered = True
    for p in paths:
        data = p.read_bytes()
        seqs = [int(x) for x in SEQ_RE.findall(data)]
        lines += data.count(b"\n")
        last = -1
        for s in seqs:
            if s < last:
                ordered = False
            last = s
            if 0 <= s < expect and not seen[s]:
                seen[s] = 1
                distinct += 1
    return lines, distinct, expect - distinct, ordered


# -- subscribers -------------------------------------------------------------------------------


class MosquittoSub:
    name = "mosquitto_sub"

    def __init__(self, workdir: Path, protocol: str, qos: int = 1, ca_file: Path | None = None) -> None:
        self.qos = qos
        self.dir = workdir
        self.ca_file = ca_file
        self.out = workdir / "mosquitto_sub.out"
        self.version = "mqttv5" if protocol == "5" else "mqttv311"
        self.cid = f"bench-sub-{os.getpid()}"

    def _cmd(self, port: int) -> list[str]:
        tls = ["--cafile", str(self.ca_file), "-h", "localhost"] if self.ca_file else ["-h", "127.0.0.1"]
        return [MOSQUITTO_SUB, *tls, "-p", str(port), "-V", self.version,
                "-q", str(self.qos), "-v", "-t", "#", "-c", "-i", self.cid]

    def register(self, port: int) -> None:
        subprocess.run(self._cmd(port) + ["-E"], check=True, timeout=30,
                       stdout=subprocess.DEVNULL)

    def start(self, port: int, n: int) -> None:
        self._f = open(self.out, "wb")  # the subscriber's stdout
        self.proc = subprocess.Popen(self._cmd(port) + ["-C", str(n)], stdout=self._f)
        self.ps = psutil.Process(self.proc.pid)
        self.status: int | None = None

    def connected(self, port: int) -> bool:
        try:
            return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
                       for c in self.ps.connections())
        except psutil.Error:
            return False

    def poll(self, n: int) -> tuple[bool, int, tuple[float, float] | None]:
        """(done, received so far (estimate), (user, system) CPU seconds at done)."""
        pid, status, ru = os.wait4(self.proc.pid, os.WNOHANG)
        if pid:
            self.status = os.waitstatus_to_exitcode(status)
            self.proc.returncode = self.status
            self._f.close()
            if self.status != 0:
                raise RuntimeError(f"mosquitto_sub exited with {self.status}")
            return True, n, (ru.ru_utime, ru.ru_stime)
        try:
            received = os.path.getsize(self.out) // 170
        except OSError:
            received = 0
        return False, received, None

    def rss(self) -> int:
        try:
            return self.ps.memory_info().rss
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.status is None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        if not self._f.closed:
            self._f.close()

    def verify(self, n: int) -> tuple[bool, str, int]:
        lines, distinct, missing, ordered = count_seqs([self.out], n)
        ok = missing == 0
        return ok, (f"{distinct:,} of {n:,} received, {lines - distinct:,} duplicates, "
                    f"{'in order' if ordered else 'OUT OF ORDER'}"), lines - distinct

    def cleanup(self) -> None:
        self.out.unlink(missing_ok=True)


def _set_dotted(doc: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        doc = doc.setdefault(k, {})
    doc[keys[-1]] = value


#: shardlog variants a run can compare side by side: side name -> extra environment
VARIANTS: dict[str, dict[str, str]] = {
    "shardlog": {},
    "shardlog-stock": {"SHARDLOG_STOCK_PAHO": "1"},  # stock paho: no read buffer, fast path or batched acks
    "shardlog-before": {},     # the shard from --before-src (e.g. a checkout of an older commit)
    "shardlog-2": {},          # `shardlog supervise`: two shards, bench/a and bench/b
    "shardlog-2-scraped": {},  # the same, /metrics and /status scraped once a second
    "shardlog-tls": {},        # one shard over TLS (--tls)
    "shardlog-journal": {},    # journal.enabled: acknowledged after the journal write
}
#: extra shard-map settings of a side (on top of --set)
SIDE_SET: dict[str, list[str]] = {"shardlog-journal": ["defaults.journal.enabled=true"]}
LABELS = {"mosquitto_sub": "`mosquitto_sub -q 1 -v`", "shardlog": "shardlog (1 shard)",
          "shardlog-stock": "shardlog, stock paho", "shardlog-before": "shardlog, --before-src",
          "shardlog-2": "shardlog supervise, 2 shards",
          "shardlog-2-scraped": "2 shards, scraped 1/s",
          "mosquitto_sub-tls": "`mosquitto_sub -q 1 -v`, TLS", "shardlog-tls": "shardlog (1 shard), TLS",
          "shardlog-journal": "shardlog, journal"}
#: the sides that connect over TLS (the publisher stays on the plain listener)
TLS_SIDES = ("mosquitto_sub-tls", "shardlog-tls")


class Shardlog:
    name = "shardlog"
    warm_lines = 0  # records of the untimed warm-up run (--warm), not duplicates

    def __init__(self, workdir: Path, protocol: str, src: Path, map_set: list[str],
                 python_args: list[str] | None = None, heartbeat: float = 0.2,
                 env: dict[str, str] | None = None, qos: int = 1, ca_file: Path | None = None) -> None:
        self.qos = qos
        self.ca_file = ca_file
        self.dir = workdir
        self.env = env or {}
        self.root = workdir / "data"
        self.map = workdir / "shards.yaml"
        self.stats_file = workdir / "all.stats.json"
        self.protocol = protocol
        self.src = src
        self.map_set = map_set
        self.python_args = python_args or []
        self.heartbeat = heartbeat
        self.cid_prefix = f"bench-{os.getpid()}-"

    def write_map(self, port: int) -> None:
        doc: dict[str, Any] = {
            "broker": {"host": "127.0.0.1", "port": port,
                       "protocol": 5 if self.protocol == "5" else "3.1.1",
                       "client_id_prefix": self.cid_prefix},
            "defaults": {"root": str(self.root), "qos": self.qos},
            "shards": [{"name": "all", "prefix": "#"}],
            "supervisor": {"listen": f"127.0.0.1:{free_port()}"},
        }
        if self.ca_file is not None:  # "localhost": the certificate's name is verified
            doc["broker"].update(host="localhost", tls={"ca_file": str(self.ca_file)})
        for item in self.map_set:
            key, _, value = item.partition("=")
            _set_dotted(doc, key, yaml.safe_load(value))
        self.map.write_text(yaml.safe_dump(doc, sort_keys=False))

    def _spawn(self, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        self.stats_file.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(self.src), **self.env)
        self._err = open(self.dir / "shardlog.log", "ab")  # the recorder's stderr
        cmd = [sys.executable, *(extra or []), "-m", "shardlog", "record", str(self.map),
               "--shard", "all", "--stats-file", str(self.stats_file),
               "--heartbeat", str(self.heartbeat), "--log-level", "warning"]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, cwd=self.dir, env=env)

    def stats(self) -> Any:
        from shardlog.counters import read_stats
        return read_stats(str(self.stats_file))

    def _alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"shardlog exited with {self.proc.returncode}:\n"
                               + (self.dir / "shardlog.log").read_text(errors="replace")[-3000:])

    def subscribed(self) -> bool:
        self._alive()
        s = self.stats()
        return bool(s and s.subscribed)

    def register(self, port: int) -> None:
        self.write_map(port)
        self.proc = self._spawn()
        wait_until(self.subscribed, 30, "shardlog to subscribe", 0.02)
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(30)
        self._err.close()
        if rc != 0:
            raise RuntimeError(f"shardlog exited with {rc} on SIGTERM")

    def start(self, port: int, n: int) -> None:
        self.proc = self._spawn(self.python_args)
        self.ps = psutil.Process(self.proc.pid)
        self.final: Any = None

    def connected(self, port: int) -> bool:
        return self.subscribed()

    def poll(self, n: int) -> tuple[bool, int, tuple[float, float] | None]:
        self._alive()
        s = self.stats()
        if s is None:
            return False, 0, None
        got = s.acked if self.qos else s.messages  # QoS 0: nothing to acknowledge
        if got >= n:
            cpu = cpu_split(self.ps)
            self.final = s
            return True, got, cpu
        return False, got, None

    def files_done(self, n: int) -> bool:
        """Every record in its topic file (later than ``acked`` with a journal)."""
        s = self.stats()
        if s is not None and s.messages >= n:
            self.final = s
            return True
        self._alive()
        return False

    def recent_done(self, deadline: float) -> float:
        """Monotonic time when the shard's stats first say no +recent.json is stale (read every
        heartbeat); a RuntimeError past ``deadline``."""
        while True:
            s = self.stats()
            if s is not None and s.recent_stale == 0 and s.messages >= getattr(self.final, "messages", 0):
                return time.monotonic()
            self._alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"+recent.json still stale at the deadline ({s.recent_stale if s else '?'} files)")
            time.sleep(0.02)

    def rss(self) -> int:
        try:
            return self.ps.memory_info().rss
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                rc = -9
            say(f"  shardlog stopped {time.monotonic() - t0:.2f}s after SIGTERM (exit {rc})")
            if rc != 0:
                say(f"  shardlog exited with {rc} on SIGTERM (log: {self.dir / 'shardlog.log'})")
        self._err.close()

    def verify(self, n: int) -> tuple[bool, str, int]:
        files = [p for p in self.root.rglob("+log*.jsonl")]
        topics = sum(1 for p in files if p.name == "+log.jsonl")
        lines, distinct, missing, ordered = count_seqs(files, n)
        s = self.final
        counters = (f"messages={s.messages:,} acked={s.acked:,} redelivered={s.redelivered:,}"
                    if s else "no stats")
        ok = missing == 0 and s is not None and s.messages >= n and (s.acked >= n or not self.qos)
        dups = lines - distinct - self.warm_lines
        return ok, (f"{distinct:,} of {n:,} on disk in {topics:,} topics, {dups:,} duplicates, "
                    f"{'in order' if ordered else 'OUT OF ORDER'} ({counters})"), dups

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Supervised(Shardlog):
    """``shardlog supervise`` running two shards (bench/a, bench/b); progress and CPU of the
    supervisor and both recorders; optionally /metrics + /status scraped every ``scrape`` s."""

    name = "shardlog-2"

    def __init__(self, *args: Any, scrape: float | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.scrape = scrape
        self.listen = f"127.0.0.1:{free_port()}"
        self._stop_scraping = threading.Event()

    def files_done(self, n: int) -> bool:
        return True  # poll() already waits for every shard's records

    def write_map(self, port: int) -> None:
        super().write_map(port)
        doc = yaml.safe_load(self.map.read_text())
        doc["shards"] = [{"name": "a", "prefix": "bench/a"}, {"name": "b", "prefix": "bench/b"}]
        doc["supervisor"] = {"listen": self.listen, "start_jitter": 0}
        self.map.write_text(yaml.safe_dump(doc, sort_keys=False))

    def _spawn(self, extra: list[str] | None = None) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=str(self.src), **self.env)
        self._err = open(self.dir / "shardlog.log", "ab")  # the supervisor's stderr
        cmd = [sys.executable, "-m", "shardlog", "supervise", str(self.map), "--log-level", "warning"]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err, cwd=self.dir, env=env)

    def _status(self) -> list[dict[str, Any]]:
        import urllib.request
        try:
            with urllib.request.urlopen(f"http://{self.listen}/status", timeout=2) as r:
                return json.loads(r.read())["shards"]
        except (OSError, ValueError):
            return []

    def stats(self) -> Any:
        shards = self._status()
        counters = [s.get("counters") for s in shards]
        if len(counters) != 2 or not all(counters):
            return None
        total = {k: sum(c[k] for c in counters) for k in ("acked", "messages", "redelivered")}
        total["subscribed"] = all(c["subscribed"] for c in counters)
        return type("Totals", (), total)()

    def start(self, port: int, n: int) -> None:
        super().start(port, n)
        if self.scrape:
            threading.Thread(target=self._scraper, daemon=True).start()

    def _scraper(self) -> None:
        import urllib.request
        while not self._stop_scraping.wait(self.scrape):
            for path in ("/metrics", "/status"):
                try:
                    with urllib.request.urlopen(f"http://{self.listen}{path}", timeout=2) as r:
                        r.read()
                except OSError:
                    pass

    def poll(self, n: int) -> tuple[bool, int, tuple[float, float] | None]:
        done, acked, _ = super().poll(n)
        if not done:
            return False, acked, None
        procs = [self.ps, *self.ps.children(recursive=True)]
        user = sys_ = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                user += t.user + t.children_user
                sys_ += t.system + t.children_system
            except psutil.Error:
                pass
        return True, acked, (user, sys_)

    def rss(self) -> int:
        try:
            return sum(p.memory_info().rss for p in [self.ps, *self.ps.children(recursive=True)])
        except psutil.Error:
            return 0

    def stop(self) -> None:
        self._stop_scraping.set()
        super().stop()


# -- one measurement -------------------------------------------------------------------------


def measure(side_name: str, mode: str, run: int, work: Workload, args: argparse.Namespace,
            python_args: list[str] | None = None, keep: bool = False, qos: int = 1) -> Result:
    base = Path(tempfile.mkdtemp(prefix=f"shardlog-bench-{side_name}-", dir=args.tmpdir))
    ca = args.ca if side_name in TLS_SIDES else None
    broker = Broker(base, ca)
    sub_port = broker.tls_port if ca is not None else broker.port
    side: MosquittoSub | Shardlog
    if side_name.startswith("mosquitto_sub"):
        side = MosquittoSub(base, args.protocol, qos, ca.ca_file if ca else None)
    elif side_name.startswith("shardlog-2"):
        side = Supervised(base, args.protocol, args.src, args.map_set, python_args,
                          scrape=1.0 if side_name.endswith("scraped") else None, qos=qos)
    else:
        src = args.before_src if side_name == "shardlog-before" else args.src
        side = Shardlog(base, args.protocol, src, args.map_set + SIDE_SET.get(side_name, []),
                        python_args, env=VARIANTS[side_name], qos=qos, ca_file=ca.ca_file if ca else None)
    n = work.messages
    tag = f"{mode} QoS {qos} run {run}: {side_name}"
    try:
        side.register(sub_port)
        if getattr(args, "warm", False) and isinstance(side, Shardlog):  # the topics exist on disk (a restart)
            t = work.topics
            say(f"{tag}: warm-up: one message to each of {t:,} topics, recorded untimed")
            publish(broker.port, Workload(t, t, work.payload_size, seq=False))
            side.start(sub_port, t)
            wait_until(lambda: side.poll(t)[0] and side.files_done(t), args.timeout, "the warm-up records", 0.05)
            side.stop()
            side.warm_lines = t
        pub_seconds = 0.0
        if mode == "drain":
            say(f"{tag}: session registered; publishing {n:,} messages into the broker")
            pub_seconds = publish(broker.port, work)
            say(f"{tag}: published at {n / pub_seconds:,.0f} msg/s (broker RSS "
                f"{broker.rss() / 2**20:,.0f} MiB); starting the subscriber")
            b0, m0, self0 = broker.cpu(), busy_cpu(), cpu_of(ME)
            t0 = time.monotonic()
            side.start(sub_port, n)
        else:
            side.start(sub_port, n)
            wait_until(lambda: side.connected(sub_port), 30, f"{side_name} to connect", 0.02)
            time.sleep(0.2)
            say(f"{tag}: subscriber connected; publishing {n:,} messages live")
            sub0 = cpu_split(side.ps)
            b0, m0, self0 = broker.cpu(), busy_cpu(), cpu_of(ME)
            t0 = time.monotonic()
            pub_result: list[float] = []
            pub_err: list[BaseException] = []

            def _pub() -> None:
                try:
                    pub_result.append(publish(broker.port, work))
                except BaseException as exc:
                    pub_err.append(exc)

            pub_thread = threading.Thread(target=_pub, daemon=True)
            pub_thread.start()
        peak = 0
        samples: list[tuple[int, int]] = []
        next_sample = 0.0
        next_say = time.monotonic() + 10
        deadline = time.monotonic() + args.timeout
        while True:
            done, received, cpu = side.poll(n)
            now = time.monotonic()
            if done:
                t1 = now
                break
            if now >= next_sample:
                r = side.rss()
                peak = max(peak, r)
                samples.append((received, r))
                next_sample = now + 0.1
            if now >= next_say:
                say(f"{tag}: {received:,} of {n:,} after {now - t0:.0f}s")
                next_say = now + 10
            if now > deadline:
                raise RuntimeError(f"{tag}: timed out after {args.timeout}s with {received:,} of {n:,}")
            time.sleep(0.005)
        broker_cpu = broker.cpu() - b0
        others = (busy_cpu() - m0) - (cpu_of(ME) - self0) - broker_cpu
        files_s = None
        if isinstance(side, Shardlog):  # and until every record is in its topic file (journal)
            while not side.files_done(n):
                now = time.monotonic()
                if now > deadline:
                    raise RuntimeError(f"{tag}: timed out waiting for the topic files")
                if now >= next_sample:  # the peak includes filling the topic files
                    peak = max(peak, side.rss())
                    next_sample = now + 0.1
                time.sleep(0.005)
            files_s = time.monotonic() - t0
        recent_s = None
        if type(side) is Shardlog:  # then until every +recent.json is current (the stats say so)
            recent_s = side.recent_done(deadline) - t0 - files_s
        assert cpu is not None
        if mode == "live":
            cpu = (cpu[0] - sub0[0], cpu[1] - sub0[1])  # not its start-up before the clock
        others -= cpu[0] + cpu[1]
        if mode == "live":
            pub_thread.join(120)
            if pub_err:
                raise RuntimeError(f"publisher: {pub_err[0]}")
            pub_seconds = pub_result[0] if pub_result else 0.0
        side.stop()
        res = Result(side_name, mode, run, n, t1 - t0, cpu[0] + cpu[1], cpu[1], broker_cpu, pub_seconds,
                     max(0.0, others / (t1 - t0)), peak, samples, qos=qos, files_seconds=files_s,
                     recent_seconds=recent_s)
        res.ok, res.check, res.duplicates = side.verify(n)
        sys_share = 100 * res.cpu_sys / max(res.cpu, 1e-9)
        files = f" (in the topic files after {files_s:.2f}s)" if files_s is not None else ""
        if recent_s is not None:
            files += f" (every +recent.json current {recent_s:.1f}s later)"
        say(f"{tag}: {res.rate:,.0f} msg/s{files}, {res.cpu_per_m:.1f} CPU s/1M ({sys_share:.0f}% system; "
            f"broker {res.broker_cpu_per_m:.1f}), "
            f"peak RSS {peak / 2**20:.0f} MiB; other processes used {res.others_cores:.2f} cores; "
            f"check: {res.check}")
        if not res.ok:
            say(f"{tag}: CHECK FAILED; files kept in {base}")
            keep = True
        return res
    finally:
        try:
            if getattr(side, "proc", None) is not None and side.proc.poll() is None:
                side.proc.kill()
                side.proc.wait()
        finally:
            broker.stop()
            if not (keep or args.keep):
                # Deleted at the very end: on a journal-less ext4 (this machine's root) every
                # freed inode makes file creation slower for minutes (ext4's recently_deleted
                # check), so deleting a run's tree would slow the next run down.
                TO_DELETE.append(base)


# -- report ----------------------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(results: list[Result], mode: str, qos: int = 1) -> str:
    rows = [r for r in results if r.mode == mode and r.qos == qos]
    sides = [s for s in ("mosquitto_sub", "mosquitto_sub-tls", *VARIANTS) if any(r.side == s for r in rows)]
    base = _med([r.rate for r in rows if r.side == "mosquitto_sub"])
    out = [("| subscriber | msg/s (median) | min - max | CPU s per 1M msgs | broker CPU s per 1M | "
            "ratio to mosquitto_sub | publisher msg/s | others' load (cores) | every +recent.json current after |"),
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sides:
        rs = [r for r in rows if r.side == s]
        rate = _med([r.rate for r in rs])
        ratio = "-" if math.isnan(base) else f"{rate / base:.2f}"
        recent = [r.recent_seconds for r in rs if r.recent_seconds is not None]
        current = f"{_med(recent):.1f} s" if recent else "-"
        out.append(
            f"| {LABELS[s].replace('-q 1', f'-q {qos}')} "
            f"| {rate:,.0f} | {min(r.rate for r in rs):,.0f} - {max(r.rate for r in rs):,.0f} "
            f"| {_med([r.cpu_per_m for r in rs]):.1f} | {_med([r.broker_cpu_per_m for r in rs]):.1f} "
            f"| {ratio} | {_med([r.pub_rate for r in rs]):,.0f} | {_med([r.others_cores for r in rs]):.2f} "
            f"| {current} |")
    return "\n".join(out)


def machine_info() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mver = subprocess.run([MOSQUITTO, "-h"], capture_output=True, text=True, check=False).stdout.split("\n")[0]
    except OSError:
        mver = "?"
    try:
        import paho.mqtt
        paho_v = paho.mqtt.__version__
    except ImportError:
        paho_v = "?"
    return {"nproc": str(os.cpu_count()), "cpu": model, "mosquitto": mver.strip(),
            "python": sys.version.split()[0], "paho-mqtt": paho_v, "psutil": psutil.__version__}


def export_head(dest: Path) -> str:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD", "shardlog", "supervisor"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return rev


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=None, help="messages per run (default 1,000,000)")
    p.add_argument("--topics", type=int, default=None, help="distinct topics (default 1,000)")
    p.add_argument("--payload-size", type=int, default=150, help="payload bytes (default 150)")
    p.add_argument("--runs", type=int, default=None, help="runs per subscriber (default 3)")
    p.add_argument("--mode", default="drain", help="drain, live or drain,live (default drain)")
    p.add_argument("--sides", default="mosquitto_sub,shardlog",
                   help="subscribers to measure: mosquitto_sub, shardlog, shardlog-stock, "
                        "shardlog-2 (supervise, two shards), shardlog-2-scraped")
    p.add_argument("--qos", default="1", help="subscription QoS of both sides: 0, 1 or 0,1 (default 1); "
                   "shardlog gets the map's defaults.qos, mosquitto_sub -q")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5",
                   help="MQTT version of both subscribers (default 5); the publisher uses 3.1.1")
    p.add_argument("--quick", action="store_true", help="smoke run: 50,000 messages, 1 run")
    p.add_argument("--tls", action="store_true",
                   help="add the TLS sides (mosquitto_sub-tls, shardlog-tls: a test CA made for the run, "
                        "the subscriber on a TLS listener, the publisher on the plain one)")
    p.add_argument("--rss", action="store_true",
                   help="memory run: shardlog only, drain, 100,000 topics, 300,000 messages")
    p.add_argument("--src", type=Path, default=REPO, help="directory holding the shardlog package")
    p.add_argument("--head", action="store_true", help="measure the committed HEAD (git archive)")
    p.add_argument("--before-src", type=Path, default=None,
                   help="directory holding another shardlog package, measured as side shardlog-before")
    p.add_argument("--set", dest="map_set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a shard-map key, e.g. defaults.batch.max_messages=2000 "
                        "or broker.receive_maximum=5000 (repeatable)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measurement before giving up")
    p.add_argument("--warm", action="store_true",
                   help="shardlog sides: record one untimed message per topic first, so the measured "
                        "drain finds every topic on disk (a restart's case, not a first run's)")
    p.add_argument("--tmpdir", default=None, help="where the brokers' and subscribers' files go")
    p.add_argument("--keep", action="store_true", help="keep the temporary directories")
    p.add_argument("--markdown", type=Path, help="also write the report to this file")
    p.add_argument("--json", type=Path, help="write every run's figures to this file")
    a = p.parse_args(argv)
    if a.rss:
        a.messages = a.messages or 300_000
        a.topics = a.topics or 100_000
        a.runs = a.runs or 1
        if a.sides == "mosquitto_sub,shardlog":  # not given: the shard alone
            a.sides = "shardlog"
        a.mode = "drain"
    if a.quick:
        a.messages = a.messages or 50_000
        a.runs = a.runs or 1
    a.messages = a.messages or 1_000_000
    a.topics = a.topics or 1_000
    a.runs = a.runs or 3
    if a.tls and a.sides == "mosquitto_sub,shardlog":
        a.sides = "mosquitto_sub,mosquitto_sub-tls,shardlog,shardlog-tls"
    return a


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # so the brokers and subscribers we started are stopped


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    args = parse_args(argv)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    for m in modes:
        if m not in ("drain", "live"):
            raise SystemExit(f"unknown mode {m!r}")
    qoss = [int(q) for q in args.qos.split(",") if q.strip()]
    if any(q not in (0, 1) for q in qoss):
        raise SystemExit("--qos: 0, 1 or 0,1")
    for s in sides:
        if s not in ("mosquitto_sub", "mosquitto_sub-tls", *VARIANTS):
            raise SystemExit(f"unknown subscriber {s!r}")
        if s == "shardlog-before" and args.before_src is None:
            raise SystemExit("side shardlog-before needs --before-src DIR")
    headdir = None
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    src_desc = f"work tree at {args.src} (HEAD {rev}, uncommitted changes included)"
    if args.head:
        headdir = Path(tempfile.mkdtemp(prefix="shardlog-bench-src-"))
        rev = export_head(headdir)
        args.src = headdir
        src_desc = f"commit {rev}"
    sys.path.insert(0, str(args.src))
    args.ca = None
    if any(s in TLS_SIDES for s in sides):
        sys.path.insert(0, str(REPO))
        from tests.certs import make_test_ca  # the test suite's CA (the `cryptography` package)
        args.ca = make_test_ca(Path(tempfile.mkdtemp(prefix="shardlog-bench-ca-", dir=args.tmpdir)))
        TO_DELETE.append(args.ca.dir)
    info = machine_info()
    say(f"machine: {info['nproc']} CPUs, {info['cpu']}; {info['mosquitto']}; Python {info['python']}; "
        f"paho-mqtt {info['paho-mqtt']}; shardlog from {src_desc}")
    say(f"building {args.messages:,} QoS 1 packets over {args.topics:,} topics ...")
    work = Workload(args.messages, args.topics, args.payload_size)
    say(f"built in {work.build_seconds:.1f}s (payload {work.payload_avg:.0f} bytes)")
    results: list[Result] = []
    t_start = time.monotonic()
    try:
        for mode in modes:
            for qos in qoss:
                for run in range(1, args.runs + 1):
                    order = sides if run % 2 else list(reversed(sides))
                    for side in order:
                        results.append(measure(side, mode, run, work, args, qos=qos))
    finally:
        if headdir is not None:
            shutil.rmtree(headdir, ignore_errors=True)
        for d in TO_DELETE:
            shutil.rmtree(d, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    lines = [
        (f"Workload: {args.messages:,} messages, {args.topics:,} topics, {work.payload_avg:.0f}-byte JSON "
         f"payloads, published at QoS 1, MQTT {args.protocol} subscribers at QoS {args.qos}; "
         f"medians of {args.runs} run(s) "
         f"(alternating order); shardlog {src_desc}"
         + (f"; map overrides: {', '.join(args.map_set)}" if args.map_set else "") + "."),
        (f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['mosquitto']}, Python {info['python']}, "
         f"paho-mqtt {info['paho-mqtt']}. Total time {elapsed / 60:.1f} min."),
        "",
    ]
    for mode in modes:
        for qos in qoss:
            lines += [f"**{mode}, QoS {qos}**", "", table(results, mode, qos), ""]
            for plain, tls in (("mosquitto_sub", "mosquitto_sub-tls"), ("shardlog", "shardlog-tls")):
                pr = [r.rate for r in results if r.side == plain and r.mode == mode and r.qos == qos]
                tr = [r.rate for r in results if r.side == tls and r.mode == mode and r.qos == qos]
                if pr and tr:
                    lines += [f"- {plain} over TLS / plain: {_med(tr) / _med(pr):.2f}"]
            lines.append("")
    if args.rss or any(r.side in VARIANTS for r in results):
        for r in results:
            lines.append(f"- {r.mode} QoS {r.qos} run {r.run}, {r.side}: {r.rate:,.0f} msg/s, "
                         f"{r.cpu_per_m:.1f} CPU s/1M "
                         f"({100 * r.cpu_sys / max(r.cpu, 1e-9):.0f}% system), peak RSS "
                         f"{r.peak_rss / 2**20:.0f} MiB, others {r.others_cores:.2f} cores; {r.check}")
        if args.rss:
            for r in results:
                if r.side == "shardlog" and r.rss_samples:
                    pts = _rss_profile(r)
                    lines.append(f"- RSS while recording (received: RSS MiB): {pts}")
        lines.append("")
    bad = [r for r in results if not r.ok]
    for r in bad:
        lines.append(f"- **CHECK FAILED** {r.mode} run {r.run} {r.side}: {r.check}")
    report = "\n".join(lines)
    print(report)
    if args.markdown:
        args.markdown.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "machine": info,
                                         "results": [dataclasses.asdict(r) | {"rate": r.rate}
                                                     for r in results]}, indent=1))
    return 1 if bad else 0


def _rss_profile(r: Result) -> str:
    pts = []
    for frac in (0.1, 0.25, 0.5, 0.75, 1.0):
        want = r.messages * frac
        best = next(((rec, rss) for rec, rss in r.rss_samples if rec >= want), r.rss_samples[-1])
        pts.append(f"{best[0]:,}: {best[1] / 2**20:.0f}")
    return ", ".join(pts)


if __name__ == "__main__":
    sys.exit(main())
