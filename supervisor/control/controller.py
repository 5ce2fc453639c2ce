"""Control commands in the supervisor: from the HTTP API or the MQTT control topic to the shards.

:meth:`Controller.execute` runs in the caller's thread (an HTTP handler or the MQTT worker):

1. parse and validate the command, check the token (MQTT), and route it to the shard(s) that own
   its branch (:mod:`shardlog.control`, pure); refuse anything that would touch more than one
   shard, a shard this supervisor does not run, or a shard that is not running;
2. ``rotate``/``delete``/``move``: send one JSON datagram to each target recorder's control socket
   (``<run dir>/<shard>.ctl``) and wait for its answer; the recorder does the work in its own
   thread between batches (:mod:`shardlog.control.operations`);
3. ``stop``/``start``: hand the job to the main loop (which owns the processes) and wait.

Nothing here changes the main loop's state directly: it reads its last published snapshot and
map, both replaced atomically by the loop, and submits jobs. The controller sees the loop only
through :class:`MainLoop` (the arbiter is one), so this module never imports the arbiter: the
arbiter depends on control (:class:`Job`, :func:`control_path`), not the reverse. Every command
and its outcome is logged.
"""

from __future__ import annotations

import hmac
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from shardlog.config.schema import ShardMap
from shardlog.control.commands import (
    ALL,
    RECORDER_OPS,
    Command,
    CommandError,
    ShardRef,
    Target,
    parse_command,
    route,
)
from supervisor.snapshot import Snapshot

log = logging.getLogger(__name__)

#: how long a caller waits for a recorder (or the main loop) to answer
TIMEOUT = 30.0
#: longest Unix socket path (sun_path) minus the NUL
MAX_SOCKET_PATH = 107
_RUNNING = ("running", "degraded")


@dataclass
class Job:
    """A stop or start for the main loop; ``result`` is set there."""

    target: Target
    source: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None

    def finish(self, result: dict[str, Any]) -> None:
        self.result = result
        self.done.set()


class MainLoop(Protocol):
    """What the controller needs of the main loop (:class:`supervisor.arbiter.loop.Arbiter`)."""

    @property
    def smap(self) -> ShardMap: ...  # the map it runs (replaced whole on reload)

    @property
    def snapshot(self) -> Snapshot: ...  # its last published snapshot

    def submit(self, job: Job) -> None: ...  # thread-safe: queue a stop/start and wake the loop

    def control_path(self, name: str) -> str | None: ...  # shard ``name``'s control socket


class Controller:
    def __init__(self, loop: MainLoop, timeout: float = TIMEOUT) -> None:
        self.loop = loop
        self.timeout = timeout

    def execute(self, body: bytes | dict[str, Any], op: str | None, source: str,
                check_token: bool = False) -> dict[str, Any]:
        """Carry out one command; the reply document (``ok``, ``reason`` on failure, the
        command's ``id``). Never raises for bad input."""
        cmd: Command | None = None
        try:
            cmd = parse_command(body, op)
            self._check_token(cmd, check_token)
            reply = self._run(cmd, source)
        except CommandError as exc:
            reply = {"ok": False, "reason": str(exc)}
        except Exception as exc:  # the caller gets an answer, the log the traceback
            log.exception("control: internal error")
            reply = {"ok": False, "reason": f"internal error: {exc}"}
        if cmd is not None:
            reply = {"id": cmd.id, "op": cmd.op, **reply}
        elif isinstance(ident := loose_id(body), (str, int)):
            reply = {"id": ident, **reply}
        what = _describe(cmd) if cmd is not None else "a command"
        if reply["ok"]:
            log.info("control from %s: %s: done: %s", source, what, _brief(reply))
        else:
            log.warning("control from %s: %s: refused: %s", source, what, reply["reason"])
        return reply

    def _check_token(self, cmd: Command, check: bool) -> None:
        token = self.loop.smap.control.token
        if not check or not token:
            return
        if cmd.token is None or not hmac.compare_digest(cmd.token.encode(), token.encode()):
            raise CommandError("bad or missing token")

    def _run(self, cmd: Command, source: str) -> dict[str, Any]:
        smap = self.loop.smap
        views = {v.name: v for v in self.loop.snapshot.shards}
        refs = [ShardRef(s.name, s.branch, s.name in views) for s in smap.shards]
        targets = route(cmd, refs)
        if cmd.op in ("stop", "start"):
            return self._to_main_loop(targets[0], source)
        for t in targets:  # every target must be able to act before any does
            v = views[t.shard]
            if v.state not in _RUNNING or v.pid is None:
                raise CommandError(f"shard {t.shard!r} is not running (state {v.state}"
                                   f"{': ' + v.reason if v.reason else ''}); nothing was changed")
        results: dict[str, Any] = {}
        ok = True
        for t in targets:
            res = self._to_recorder(t)
            results[t.shard] = res
            ok = ok and bool(res.get("ok"))
        if len(targets) == 1:
            res = results[targets[0].shard]
            return {"shard": targets[0].shard, **res}
        reasons = [f"{name}: {r['reason']}" for name, r in results.items() if not r.get("ok")]
        return {"ok": ok, "shards": results, **({"reason": "; ".join(reasons)} if reasons else {})}

    def _to_main_loop(self, target: Target, source: str) -> dict[str, Any]:
        job = Job(target, source)
        self.loop.submit(job)
        if not job.done.wait(self.timeout):
            return {"ok": False, "reason": "the supervisor's main loop did not answer in time"}
        assert job.result is not None
        return job.result

    def _to_recorder(self, t: Target) -> dict[str, Any]:
        path = self.loop.control_path(t.shard)
        if path is None:
            return {"ok": False, "reason": f"shard {t.shard!r} has no control socket (its path would be too long)"}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind("")  # an abstract address, so that the recorder can answer
            sock.settimeout(self.timeout)
            try:
                sock.sendto(msgspec.json.encode({"op": t.op, **t.args}), path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                return {"ok": False, "reason": f"shard {t.shard!r} does not answer on its control socket "
                                               f"({exc.strerror}); is it starting? nothing was changed"}
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return {"ok": False, "reason": f"shard {t.shard!r} did not answer within {self.timeout:g}s "
                                               "(the operation may still complete)"}
        finally:
            sock.close()
        try:
            reply = msgspec.json.decode(data)
        except msgspec.DecodeError:
            return {"ok": False, "reason": f"shard {t.shard!r} answered garbage"}
        return reply if isinstance(reply, dict) else {"ok": False, "reason": "bad answer"}


def control_path(run_dir: str, shard: str) -> str | None:
    path = os.path.join(run_dir, f"{shard}.ctl")
    return path if len(os.fsencode(path)) <= MAX_SOCKET_PATH else None


def loose_id(body: bytes | dict[str, Any]) -> object:
    """The ``id`` of a command that did not parse, so that its refusal can still name it."""
    if not isinstance(body, dict):
        try:
            body = msgspec.json.decode(body)
        except (msgspec.DecodeError, RecursionError):
            return None
    return body.get("id") if isinstance(body, dict) else None


def _describe(cmd: Command) -> str:
    if cmd.op == "move":
        return f"move {cmd.src!r} -> {cmd.dst!r}"
    if cmd.op in ("rotate", "delete"):
        return f"{cmd.op} {cmd.prefix!r}"
    return f"{cmd.op} {cmd.shard or 'the supervisor'}"


def _brief(reply: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in reply.items() if k not in ("ok", "id", "op", "topics"))


__all__ = ["ALL", "RECORDER_OPS", "Controller", "Job", "MainLoop", "control_path", "loose_id"]
