"""The ``/status`` document: its schema (msgspec Structs) and how it is built.

These Structs *are* the documented schema: docs/supervisor.md shows the JSON
Schema generated from :class:`StatusDoc` (``python -m supervisor.serve.status``
prints it) and a test checks both that the page is current and that a live
``/status`` validates against it.

Built by :func:`build_status` from two immutable inputs: the main loop's last
:class:`~supervisor.snapshot.Snapshot` and the sampler's last
:class:`Sample`. No I/O happens while building, so serving /status cannot slow
the main loop or a recorder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from shardlog import __version__
from supervisor.snapshot import Snapshot
from supervisor.threads import ThreadRecord

StateName = Literal["starting", "running", "backoff", "stopping", "stopped", "failed", "degraded"]

_CLOSED = {"forbid_unknown_fields": True, "kw_only": True}


class LastExit(msgspec.Struct, **_CLOSED):
    """How the shard's previous process ended."""

    code: int | None   # exit status (78: configuration error, 73: root unusable, 75: branch locked, ...)
    signal: str | None  # e.g. "SIGKILL" when a signal ended it (then code is null)
    reason: str        # human-readable, e.g. "exit 73 (root cannot be created or written)"
    ts: float          # Unix time, seconds


class ProcessFigures(msgspec.Struct, **_CLOSED):
    """From one cached psutil.Process per pid, sampled about once a second."""

    cpu_percent: float  # since the previous sample; 100 = one core
    cpu_seconds: float  # user + system
    rss: int            # bytes
    read_bytes: int | None   # I/O counters (null where the OS does not tell)
    write_bytes: int | None
    open_fds: int | None
    threads: int


class Disk(msgspec.Struct, **_CLOSED):
    """The file system holding the shard's root (shutil.disk_usage)."""

    free: int   # bytes available to the recorder
    total: int  # bytes


class ShardCounters(msgspec.Struct, kw_only=True):
    """The recorder's own counters (shardlog.counters.Counters) as its stats file last said.

    The fields listed are guaranteed; the recorder may add more (they are passed through).
    """

    messages: int              # records written to topic files
    bytes: int                 # bytes appended to topic files
    acked: int                 # QoS 1 acknowledgements sent to the broker
    redelivered: int           # messages the broker marked DUP
    discarded: int             # owned by a more specific shard (acknowledged, not written)
    topics_open: int
    rotations: int
    quarantined: int
    hook_errors: int = 0       # quarantined because a hook raised, returned garbage or timed out (docs/hooks.md)
    hook_dropped: int = 0      # dropped by a hook (acknowledged, not written)
    retained_skipped: int = 0  # retained messages not recorded (`retained: new|none`)
    errors: int
    pending: int               # received, not yet written
    connected: bool
    subscribed: bool
    degraded: bool
    degraded_reason: str | None
    last_message_ts: int | None  # reception time of the newest message, microseconds since the epoch
    # how this shard's broker differs from what no-loss recording needs (docs/brokers.md): one
    # line each, e.g. a session it did not keep, a capped session expiry, an in-flight cap
    broker_notes: list[str] = []
    sessions_lost: int = 0     # CONNACKs without the session this client id should have had
    session_present: bool | None = None  # the last CONNACK's flag
    inflight_cap: int | None = None      # the broker's cap on unacknowledged messages, if found
    recent_lag: float = 0.0    # seconds since the oldest change not yet in its +recent.json
    recent_stale: int = 0      # topics whose +recent.json is behind their topic file
    started_ts: int            # microseconds since the epoch
    updated_ts: int            # microseconds since the epoch: the last heartbeat


class ShardStatus(msgspec.Struct, **_CLOSED):
    name: str
    state: StateName
    pid: int | None              # null when no process runs
    uptime: float | None         # seconds since the current process started
    restarts: int                # restarts after exits, since the supervisor started
    last_exit: LastExit | None
    reason: str | None           # why it is in backoff, failed or stopping
    next_start_in: float | None  # seconds until the next start attempt (backoff, failed)
    heartbeat_age: float | None  # seconds since its stats file last changed
    prefix: str
    root: str
    host: str | None
    client_id: str
    process: ProcessFigures | None
    counters: ShardCounters | None
    disk: Disk | None


class EmbeddedBrokerStatus(msgspec.Struct, **_CLOSED):
    """The broker the supervisor runs itself (broker.embedded: true); see docs/deploy.md."""

    listen: str                # host:port of its main listener
    state: Literal["starting", "running", "backoff", "stopping", "stopped"]
    pid: int | None
    uptime: float | None       # seconds since its current process started
    restarts: int
    last_exit: LastExit | None


class ThreadStatus(msgspec.Struct, **_CLOSED):
    """One of the supervisor's own threads (HTTP, sampler, MQTT control): restarted if it dies."""

    name: str                  # e.g. "shardlog-mqtt-control", "shardlog-http-get-0", "shardlog-sampler"
    alive: bool                # false only once it has ended (the supervisor stopping)
    restarts: int              # times it died (an uncaught error, logged) and was started again
    last_error: str | None     # the error that ended it last, e.g. "ValueError: ..."
    last_error_ts: float | None  # Unix time, seconds


class MqttControlStatus(msgspec.Struct, **_CLOSED):
    """The MQTT control topic (control.mqtt: true): commands received, and those refused before
    they ran, by why (docs/control.md); refusals of the commands themselves are in the log."""

    received: int
    too_large: int
    rate_limited: int          # beyond 10 a second (20 at once), retained ones included
    retained: int              # retained commands (never carried out)
    response_topic: int        # an MQTT 5 response topic with a wildcard, or a control topic
    queue_full: int
    replies_dropped: int       # replies with nowhere to go (the reply topic is a control topic)


class SupervisorStatus(msgspec.Struct, **_CLOSED):
    pid: int
    version: str
    map: str                   # the shard map file
    host: str | None           # --host, if given
    started_ts: float          # Unix time, seconds
    uptime: float              # seconds
    ready: bool                # every shard subscribed (or failed) once
    stopping: bool
    reloads: int               # successful SIGHUP reloads
    sampled_ts: float | None   # when the process and disk figures were gathered
    embedded_broker: EmbeddedBrokerStatus | None = None  # null unless broker.embedded is true
    threads: list[ThreadStatus] = []  # the supervisor's own threads (added in issue 22)
    mqtt_control: MqttControlStatus | None = None  # null unless the MQTT control client runs


class StatusDoc(msgspec.Struct, **_CLOSED):
    supervisor: SupervisorStatus
    shards: list[ShardStatus]


@dataclass(frozen=True)
class Sample:
    """Process and disk figures gathered by the sampler thread (immutable once published)."""

    ts: float | None = None
    process: dict[int, ProcessFigures] = field(default_factory=dict)  # by pid
    disk: dict[str, Disk] = field(default_factory=dict)               # by root


def _r(x: float) -> float:
    return round(x, 3)


def build_status(snap: Snapshot, sample: Sample, now_mono: float, threads: Sequence[ThreadRecord] = (),
                 mqtt_control: dict[str, int] | None = None) -> StatusDoc:
    shards = []
    for v in snap.shards:
        counters = None
        if v.counters is not None:
            # the recorder's own struct: encodes with every counter it has (a superset of ShardCounters)
            counters = v.counters
        shards.append(ShardStatus(
            # state: the snapshot's str holds a ShardState value or "degraded", the StateName values
            name=v.name, state=v.state, pid=v.pid,  # type: ignore[arg-type]
            uptime=_r(now_mono - v.spawned_mono) if v.spawned_mono is not None else None,
            restarts=v.restarts,
            last_exit=(LastExit(code=v.last_exit.code, signal=v.last_exit.signal, reason=v.last_exit.reason,
                                ts=_r(v.last_exit.ts)) if v.last_exit is not None else None),
            reason=v.reason,
            next_start_in=(_r(max(0.0, v.next_start_mono - now_mono)) if v.next_start_mono is not None
                           and v.pid is None else None),
            heartbeat_age=_r(now_mono - v.last_beat_mono) if v.last_beat_mono is not None else None,
            prefix=v.prefix, root=v.root, host=v.host, client_id=v.client_id,
            process=sample.process.get(v.pid) if v.pid is not None else None,
            counters=counters,  # type: ignore[arg-type]  # a Counters: the superset, see above
            disk=sample.disk.get(v.root)))
    sup = SupervisorStatus(pid=snap.pid, version=__version__, map=snap.map_path, host=snap.host,
                           started_ts=_r(snap.started_wall), uptime=_r(now_mono - snap.started_mono),
                           ready=snap.ready, stopping=snap.stopping, reloads=snap.reloads,
                           sampled_ts=_r(sample.ts) if sample.ts is not None else None,
                           embedded_broker=_broker_status(snap, now_mono),
                           threads=[ThreadStatus(name=t.name, alive=t.alive, restarts=t.restarts,
                                                 last_error=t.last_error,
                                                 last_error_ts=_r(t.last_error_ts) if t.last_error_ts else None)
                                    for t in threads],
                           mqtt_control=(msgspec.convert(mqtt_control, MqttControlStatus)
                                         if mqtt_control is not None else None))
    return StatusDoc(supervisor=sup, shards=shards)


def _broker_status(snap: Snapshot, now_mono: float) -> EmbeddedBrokerStatus | None:
    b = snap.broker
    if b is None:
        return None
    return EmbeddedBrokerStatus(
        listen=b.listen, state=b.state, pid=b.pid,  # type: ignore[arg-type]  # a ShardState value, as str
        uptime=_r(now_mono - b.spawned_mono) if b.spawned_mono is not None else None,
        restarts=b.restarts,
        last_exit=(LastExit(code=b.last_exit.code, signal=b.last_exit.signal, reason=b.last_exit.reason,
                            ts=_r(b.last_exit.ts)) if b.last_exit is not None else None))


encode = msgspec.json.Encoder().encode
decoder = msgspec.json.Decoder(StatusDoc)


def json_schema() -> dict:
    """The JSON Schema of /status, its descriptions with white space folded (msgspec
    0.23 stopped dedenting docstrings the way 0.22 did: the schema must not depend on it)."""
    return _fold_descriptions(msgspec.json.schema(StatusDoc))


def _fold_descriptions(node: object) -> Any:
    if isinstance(node, dict):
        return {k: " ".join(v.split()) if k == "description" and isinstance(v, str)
                else _fold_descriptions(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fold_descriptions(v) for v in node]
    return node


if __name__ == "__main__":  # pragma: no cover - regenerates the schema shown in docs/supervisor.md
    print(json.dumps(json_schema(), indent=2))
