"""``shardlog supervise`` and ``shardlog status``, added to the ``shardlog`` command
through the ``shardlog.commands`` entry point group."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shardlog.argtypes import http_url, seconds
from shardlog.cli import EX_CONFIG, add_log_level, format_table, load_or_exit, setup_logging
from supervisor.arbiter.loop import Arbiter
from supervisor.broker.supervised import ports_taken
from supervisor.control.controller import Controller
from supervisor.control.mqtt import MqttControl
from supervisor.serve.http import bind, parse_listen
from supervisor.serve.metrics import Sampler
from supervisor.arbiter.sdnotify import Notifier
from supervisor.serve.status import StatusDoc, build_status, encode

log = logging.getLogger(__name__)

EX_FAILED = 1        # status: a shard is failed
EX_UNAVAILABLE = 69  # status: no supervisor answers; supervise: cannot listen
EX_SOFTWARE = 70


# -- supervise ------------------------------------------------------------------------------------

def _cmd_supervise(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "supervisor")
    smap = load_or_exit(args.map)
    taken = ports_taken(smap) if smap.broker.embedded else []
    if taken:
        log.error("broker.embedded: %s already in use (another MQTT broker?). To record that broker, "
                  "set broker.embedded: false; to run the embedded one, give it a free broker.port",
                  " and ".join(taken))
        return EX_CONFIG
    notifier = Notifier()
    arbiter = Arbiter(smap, args.map, host=args.host, log_level=args.log_level, notifier=notifier)
    sampler = Sampler(lambda: arbiter.snapshot)

    def status() -> StatusDoc:
        return build_status(arbiter.snapshot, sampler.sample, arbiter.clock.monotonic())

    controller = Controller(arbiter)

    def control(op: str, body: bytes, source: str) -> dict[str, Any]:
        return controller.execute(body, op, source)

    try:
        server = bind(smap.supervisor.listen, status, control=control)
    except (OSError, ValueError) as exc:
        log.error("cannot serve /status on %s: %s", smap.supervisor.listen, exc)
        return EX_UNAVAILABLE
    server.start()
    sampler.start()
    log.info("serving /status and /metrics on http://%s:%d", *server.address)
    mqtt_control = None
    if MqttControl.wanted(smap):  # the control section applies when the supervisor (re)starts
        mqtt_control = MqttControl(smap, args.host or socket.gethostname(), controller,
                                   lambda: encode(status())).start()
    try:
        return arbiter.run()
    finally:
        if mqtt_control is not None:
            mqtt_control.stop()
        sampler.stop()
        server.stop()


def add_supervise(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("supervise", help="run every shard of this host and restart crashed ones")
    p.add_argument("map", help="the shard map (YAML)")
    p.add_argument("--host", help="run the shards assigned to this host (default: this machine's name; "
                                  "a map without hosts runs everything)")
    add_log_level(p)
    p.set_defaults(func=_cmd_supervise)


# -- status ---------------------------------------------------------------------------------------

def status_url(listen: str) -> str:
    host, port = parse_listen(listen)
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def fetch_status(url: str, timeout: float = 5.0) -> dict[str, Any]:
    with urllib.request.urlopen(url.rstrip("/") + "/status", timeout=timeout) as resp:
        return json.loads(resp.read())


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.1f}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    x = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.0f}{unit}" if unit == "B" else f"{x:.1f}{unit}"
        x /= 1024
    return str(n)  # pragma: no cover


def status_rows(doc: dict[str, Any]) -> list[tuple[str, ...]]:
    now = time.time()
    rows = []
    for s in doc["shards"]:
        c = s.get("counters") or {}
        p = s.get("process") or {}
        d = s.get("disk") or {}
        last_msg = c.get("last_message_ts")
        if s["state"] in ("backoff", "failed", "stopping"):
            note = s.get("reason") or ""
        elif c.get("degraded"):
            note = c.get("degraded_reason") or "degraded"
        elif c and not c.get("connected"):
            note = "not connected to the broker"
        elif c.get("broker_notes"):  # the newest finding about the broker (all: --json)
            note = c["broker_notes"][-1]
        else:
            note = ""
        if not note and s.get("last_exit"):
            note = f"last exit: {s['last_exit']['reason']}"
        rows.append((
            s["name"], s["state"], str(s["pid"] or "-"), _ago(s.get("uptime")), str(s["restarts"]),
            str(c.get("messages", "-")), _ago(now - last_msg / 1e6) if last_msg else "-",
            f"{p['cpu_percent']:.0f}%" if p else "-", _size(p.get("rss")),
            _size(d.get("free")) if d else "-", s["prefix"] or "#", note,
        ))
    return rows


def _cmd_status(args: argparse.Namespace) -> int:
    if args.url:
        url = args.url
    elif not args.map:
        args.parser.error("give the shard map or --url URL")
    else:
        smap = load_or_exit(args.map)
        try:
            url = status_url(smap.supervisor.listen)
        except ValueError as exc:
            print(f"shardlog: {exc}", file=sys.stderr)
            return 78
    try:
        doc = fetch_status(url, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        print(f"shardlog: no supervisor answers at {url}: {why}\n"
              f"(is `shardlog supervise {args.map or 'MAP'}` running, and is supervisor.listen right?)",
              file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        sup = doc["supervisor"]
        print(f"supervisor pid {sup['pid']}, up {_ago(sup['uptime'])}, map {sup['map']}"
              f"{', stopping' if sup['stopping'] else ''}{'' if sup['ready'] else ', not ready yet'}")
        eb = sup.get("embedded_broker")
        if eb:
            print(f"embedded broker: {eb['state']}, pid {eb['pid'] or '-'}, {eb['listen']}, "
                  f"restarts {eb['restarts']}"
                  + (f", last exit: {eb['last_exit']['reason']}" if eb.get("last_exit") else ""))
        print(format_table(("SHARD", "STATE", "PID", "UPTIME", "RESTARTS", "MESSAGES", "LAST MSG", "CPU",
                            "RSS", "ROOT FREE", "PREFIX", "NOTE"), status_rows(doc)))
    failed = [s["name"] for s in doc["shards"] if s["state"] == "failed"]
    if failed:
        print(f"shardlog: FAILED shard(s): {', '.join(failed)}", file=sys.stderr)
        return EX_FAILED
    return 0


def add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="ask the running supervisor for its shards' health")
    p.add_argument("map", nargs="?", help="the shard map (its supervisor.listen is asked)")
    p.add_argument("--url", type=http_url, help="ask this supervisor instead, e.g. http://127.0.0.1:8470")
    p.add_argument("--json", action="store_true", help="print the raw /status document")
    p.add_argument("--timeout", type=seconds(), default=5.0, help="seconds to wait for an answer (default 5)")
    p.set_defaults(func=_cmd_status, parser=p)
