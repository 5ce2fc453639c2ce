"""``shardlog status``: ask the running supervisor for ``/status`` and print it as a table (or
the raw document with ``--json``), added to the ``shardlog`` command through the
``shardlog.commands`` entry point group. Exit codes: 0 ok, 1 a shard is failed, 69 no
supervisor answers, 78 bad shard map."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from shardlog.cli.argtypes import http_url, seconds
from shardlog.cli.common import EX_CONFIG, format_table, load_or_exit
from supervisor.serve.http import parse_listen

EX_FAILED = 1        # a shard is failed
EX_UNAVAILABLE = 69  # no supervisor answers


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
    rows: list[tuple[str, ...]] = []
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
            return EX_CONFIG
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
        for t in sup.get("threads") or []:  # a supervisor thread that died and was restarted
            if t["restarts"] or not t["alive"]:
                print(f"supervisor thread {t['name']}: restarted {t['restarts']} times"
                      f"{'' if t['alive'] else ', not running'}"
                      + (f", last error: {t['last_error']}" if t.get("last_error") else ""))
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
