"""``shardlog rotate|rm|mv|stop|start``: control commands sent to the running supervisor's
local HTTP API (``POST /control/<op>``, docs/control.md), added to the ``shardlog`` command
through the ``shardlog.commands`` entry point group.

Each verb takes the shard map (its ``supervisor.listen`` is asked) or ``--url URL`` instead.
``rm``, ``mv`` and ``stop`` ask for confirmation on a terminal; ``--yes`` skips it, and without
a terminal they refuse to run unless ``--yes`` is given. Exit codes: 0 done, 1 refused (the
reason is printed), 64 usage or not confirmed, 69 no supervisor answers, 78 bad shard map.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from typing import Any

from shardlog.cli.argtypes import http_url, seconds
from shardlog.cli.common import load_or_exit
from supervisor.serve.status_cli import status_url

EX_REFUSED, EX_USAGE, EX_UNAVAILABLE, EX_CONFIG = 1, 64, 69, 78

#: verb -> (op, operand names, destructive)
VERBS: dict[str, tuple[str, tuple[str, ...], bool]] = {
    "rotate": ("rotate", ("prefix",), False),
    "rm": ("delete", ("prefix",), True),
    "mv": ("move", ("src", "dst"), True),
    "stop": ("stop", ("shard?",), True),
    "start": ("start", ("shard",), False),
}


def post_control(url: str, op: str, body: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """POST a command; the reply document (also for a refusal). Raises URLError/OSError when
    no supervisor answers."""
    req = urllib.request.Request(url.rstrip("/") + f"/control/{op}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        data = exc.read()
        try:
            doc = json.loads(data)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            return doc
        return {"ok": False, "reason": f"HTTP {exc.code}: {data[:200]!r}"}


def _question(verb: str, body: dict[str, Any]) -> str:
    if verb == "rm":
        return f"Delete {body['prefix']!r} and every topic below it, with all their files?"
    if verb == "mv":
        return f"Move {body['src']!r} and every topic below it to {body['dst']!r}?"
    if body.get("shard"):
        return f"Stop shard {body['shard']!r} (it stays stopped until `shardlog start`)?"
    return "Stop the supervisor and every shard it runs?"


def confirm(question: str) -> bool:
    try:
        answer = input(f"{question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def summary(verb: str, reply: dict[str, Any]) -> str:
    parts = []
    shards = reply.get("shards") or ({reply["shard"]: reply} if "shard" in reply else {})
    for name, r in shards.items():
        detail = ", ".join(f"{k} {v}" for k, v in r.items()
                           if k not in ("ok", "id", "op", "shard", "topics", "reason"))
        parts.append(f"shard {name}: {detail}" if detail else f"shard {name}")
    if not shards:
        parts.append(", ".join(f"{k} {v}" for k, v in reply.items() if k not in ("ok", "id", "op")))
    return f"{verb}: done; " + "; ".join(p for p in parts if p)


def _cmd(args: argparse.Namespace) -> int:
    verb = args.verb
    op, names, destructive = VERBS[verb]
    operands = list(args.operands)
    required = [n for n in names if not n.endswith("?")]
    given = len(operands) - (0 if args.url else 1)  # the map comes first unless --url
    if not len(required) <= given <= len(names):
        usage = " ".join(n.rstrip("?").upper() if not n.endswith("?") else f"[{n.rstrip('?').upper()}]"
                         for n in names)
        args.parser.error(f"expected MAP {usage} (or --url URL {usage})")
    if args.url:
        url = args.url
    else:
        smap = load_or_exit(operands.pop(0))
        try:
            url = status_url(smap.supervisor.listen)
        except ValueError as exc:
            print(f"shardlog: {exc}", file=sys.stderr)
            return EX_CONFIG
    body: dict[str, Any] = {n.rstrip("?"): v for n, v in zip(names, operands, strict=False)}
    if destructive and not args.yes:
        if not sys.stdin.isatty():
            print(f"shardlog {verb}: not a terminal, so nothing is asked: add --yes to go ahead", file=sys.stderr)
            return EX_USAGE
        if not confirm(_question(verb, body)):
            print("not confirmed; nothing was changed", file=sys.stderr)
            return EX_USAGE
    try:
        reply = post_control(url, op, body, args.timeout)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or exc
        print(f"shardlog: no supervisor answers at {url}: {why}", file=sys.stderr)
        return EX_UNAVAILABLE
    if args.json:
        print(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        print(f"shardlog {verb}: refused: {reply.get('reason')}", file=sys.stderr)
        return EX_REFUSED
    if not args.json:
        print(summary(verb, reply))
    return 0


_HELP = {
    "rotate": ("close and version the current segments of a topic or branch now", "[MAP] PREFIX"),
    "rm": ("delete a topic and every topic below it (all their files)", "[MAP] PREFIX"),
    "mv": ("move a topic and every topic below it to another topic of the same shard", "[MAP] SRC DST"),
    "stop": ("stop one shard (until `shardlog start`), or the whole supervisor", "[MAP] [SHARD]"),
    "start": ("start a shard stopped by `shardlog stop SHARD`", "[MAP] SHARD"),
}


def _add(sub: argparse._SubParsersAction, verb: str) -> None:
    help_text, usage = _HELP[verb]
    p = sub.add_parser(verb, help=help_text, description=f"{help_text}. Operands: {usage}; MAP is "
                       "omitted with --url. Talks to the running supervisor (docs/control.md).")
    p.add_argument("operands", nargs="*", metavar="ARG", help=usage)
    p.add_argument("--url", type=http_url, help="the supervisor to ask instead of the map's supervisor.listen")
    if VERBS[verb][2]:
        p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    else:
        p.set_defaults(yes=True)
    p.add_argument("--json", action="store_true", help="print the supervisor's reply as JSON")
    p.add_argument("--timeout", type=seconds(), default=60.0, help="seconds to wait (default 60)")
    p.set_defaults(func=_cmd, verb=verb, parser=p)


def add_rotate(sub: argparse._SubParsersAction) -> None:
    _add(sub, "rotate")


def add_rm(sub: argparse._SubParsersAction) -> None:
    _add(sub, "rm")


def add_mv(sub: argparse._SubParsersAction) -> None:
    _add(sub, "mv")


def add_stop(sub: argparse._SubParsersAction) -> None:
    _add(sub, "stop")


def add_start(sub: argparse._SubParsersAction) -> None:
    _add(sub, "start")
