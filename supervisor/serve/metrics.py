"""The Prometheus exposition of ``/metrics``.

``/metrics`` is rendered by a custom prometheus_client collector from the same
document as ``/status``: names start with ``shardlog_``, counters end in
``_total``, every series has a ``shard`` label and none has a topic label.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from supervisor.serve.status import StatusDoc
from supervisor.shards.states import REPORTED_STATES

#: recorder counters exported as Prometheus counters: (counter field, metric name, help)
COUNTERS = [
    ("messages", "messages", "Records written to topic files"),
    ("bytes", "written_bytes", "Bytes appended to topic files"),
    ("acked", "acked", "QoS 1 acknowledgements sent to the broker"),
    ("redelivered", "redelivered", "Messages the broker marked as redelivered (DUP)"),
    ("discarded", "discarded", "Messages owned by a more specific shard (acknowledged, not written)"),
    ("dropped_qos0", "dropped_qos0", "QoS 0 messages dropped while the disk could not be written"),
    ("rotations", "rotations", "Segment rotations"),
    ("compressed", "compressed", "Rotated segments compressed"),
    ("deleted_segments", "deleted_segments", "Segments removed by retention"),
    ("quarantined", "quarantined", "Records written to the quarantine file"),
    ("hook_errors", "hook_errors", "Messages quarantined because a hook raised, returned garbage or timed out"),
    ("hook_dropped", "hook_dropped", "Messages a hook dropped (acknowledged, not written)"),
    ("retained_skipped", "retained_skipped", "Retained messages not recorded (retained: new or none)"),
    ("repaired", "repaired", "Torn segment tails cut back on reopen"),
    ("errors", "errors", "I/O errors"),
    ("connects", "connects", "Connections made to the broker"),
]
#: recorder counters exported as gauges
GAUGES = [
    ("topics_open", "topics_open", "Topic files open"),
    ("topics_cached", "topics_cached", "Topics with in-memory state"),
    ("pending", "pending_records", "Records received, not yet written"),
    ("journal_lag_bytes", "journal_lag_bytes", "Journal bytes not yet in the topic files (journal.enabled)"),
    ("recent_stale", "recent_stale", "Topics whose +recent.json is behind their topic file"),
    ("connected", "connected", "1 if connected to the broker"),
    ("subscribed", "subscribed", "1 if the broker granted the subscription"),
    ("degraded", "degraded", "1 if the shard cannot write (disk full or read-only)"),
]


class StatusCollector(Collector):
    """Renders the /status document as metric families (no I/O in here)."""

    def __init__(self, source: Callable[[], StatusDoc]) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        doc = self.source()
        sup = doc.supervisor
        yield _gauge("shardlog_supervisor_start_time_seconds", "Unix time the supervisor started",
                     [], [((), sup.started_ts)])
        yield _counter("shardlog_supervisor_reloads", "Successful shard map reloads (SIGHUP)",
                       [], [((), sup.reloads)])
        yield _gauge("shardlog_supervisor_ready", "1 once every shard has subscribed (or failed)",
                     [], [((), int(sup.ready))])
        yield _counter("shardlog_supervisor_thread_restarts", "Times a supervisor thread died and was restarted",
                       ["thread"], [((t.name,), t.restarts) for t in sup.threads])
        mc = sup.mqtt_control
        if mc is not None:  # control.mqtt: true
            yield _counter("shardlog_control_refused", "MQTT control commands refused before they ran, by why",
                           ["why"], [((k,), getattr(mc, k)) for k in ("too_large", "rate_limited", "retained",
                                                                        "response_topic", "queue_full")])
        eb = sup.embedded_broker
        if eb is not None:  # broker.embedded: true
            yield _gauge("shardlog_embedded_broker_up", "1 while the embedded broker accepts connections",
                         [], [((), int(eb.state == "running"))])
            yield _counter("shardlog_embedded_broker_restarts", "Restarts of the embedded broker",
                           [], [((), eb.restarts)])
        shards = doc.shards
        yield _gauge("shardlog_shard_info", "Static facts about a shard (always 1)",
                     ["shard", "prefix", "root"], [((s.name, s.prefix or "#", s.root), 1) for s in shards])
        yield _gauge("shardlog_shard_state", "1 for the state the shard is in, 0 for the others",
                     ["shard", "state"],
                     [((s.name, st), int(s.state == st)) for s in shards for st in REPORTED_STATES])
        yield _counter("shardlog_shard_restarts", "Restarts after the shard's process exited",
                       ["shard"], [((s.name,), s.restarts) for s in shards])
        yield _gauge("shardlog_shard_uptime_seconds", "Seconds the shard's current process has run",
                     ["shard"], [((s.name,), s.uptime) for s in shards if s.uptime is not None])
        yield _gauge("shardlog_shard_heartbeat_age_seconds", "Seconds since the shard's last heartbeat",
                     ["shard"], [((s.name,), s.heartbeat_age) for s in shards if s.heartbeat_age is not None])
        yield _gauge("shardlog_shard_last_exit_code", "Exit status of the shard's previous process "
                     "(-N: killed by signal N)", ["shard"],
                     [((s.name,), _exit_number(s.last_exit)) for s in shards if s.last_exit is not None])
        procs = [(s.name, s.process) for s in shards if s.process is not None]
        yield _counter("shardlog_shard_cpu_seconds", "CPU time of the shard's process (user + system)",
                       ["shard"], [((n, ), p.cpu_seconds) for n, p in procs])
        yield _gauge("shardlog_shard_resident_memory_bytes", "Resident set size of the shard's process",
                     ["shard"], [((n,), p.rss) for n, p in procs])
        yield _counter("shardlog_shard_io_read_bytes", "Bytes the shard's process read from storage",
                       ["shard"], [((n,), p.read_bytes) for n, p in procs if p.read_bytes is not None])
        yield _counter("shardlog_shard_io_write_bytes", "Bytes the shard's process wrote to storage",
                       ["shard"], [((n,), p.write_bytes) for n, p in procs if p.write_bytes is not None])
        yield _gauge("shardlog_shard_open_fds", "Open file descriptors of the shard's process",
                     ["shard"], [((n,), p.open_fds) for n, p in procs if p.open_fds is not None])
        yield _gauge("shardlog_shard_threads", "Threads of the shard's process",
                     ["shard"], [((n,), p.threads) for n, p in procs])
        counted = [(s.name, s.counters) for s in shards if s.counters is not None]
        for field_name, metric, help_text in COUNTERS:
            yield _counter(f"shardlog_{metric}", help_text, ["shard"],
                           [((n,), getattr(c, field_name, 0)) for n, c in counted])
        for field_name, metric, help_text in GAUGES:
            yield _gauge(f"shardlog_{metric}", help_text, ["shard"],
                         [((n,), int(getattr(c, field_name, 0) or 0)) for n, c in counted])
        yield _gauge("shardlog_recent_lag_seconds", "Seconds since the oldest change not yet in its "
                     "+recent.json (0: every one current)", ["shard"],
                     [((n,), float(getattr(c, "recent_lag", 0.0) or 0.0)) for n, c in counted])
        yield _counter("shardlog_broker_dropped_messages", "Messages the broker says it dropped since it "
                       "started ($SYS/broker/publish/messages/dropped; mosquitto's max_queued_messages)",
                       ["shard"], [((n,), dropped) for n, c in counted  # a counter ShardCounters passes through
                                   if (dropped := getattr(c, "broker_dropped", None)) is not None])
        yield _gauge("shardlog_last_message_timestamp_seconds", "Reception time of the newest message",
                     ["shard"], [((n,), c.last_message_ts / 1e6) for n, c in counted
                                 if c.last_message_ts is not None])
        disks = [(s.name, s.disk) for s in shards if s.disk is not None]
        yield _gauge("shardlog_root_free_bytes", "Free bytes on the file system of the shard's root",
                     ["shard"], [((n,), d.free) for n, d in disks])
        yield _gauge("shardlog_root_size_bytes", "Size in bytes of the file system of the shard's root",
                     ["shard"], [((n,), d.total) for n, d in disks])


def _exit_number(last_exit: object) -> int:
    code = getattr(last_exit, "code", None)
    if code is not None:
        return int(code)
    name = getattr(last_exit, "signal", None) or ""
    try:
        return -int(signal.Signals[name])
    except KeyError:
        return -1


def _gauge(name: str, doc: str, labels: list[str], samples: list[tuple[tuple, float]]) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in samples:
        g.add_metric(list(values), value)
    return g


def _counter(name: str, doc: str, labels: list[str], samples: list[tuple[tuple, float]]) -> Metric:
    c = CounterMetricFamily(name, doc, labels=labels)  # exposed as <name>_total
    for values, value in samples:
        c.add_metric(list(values), value)
    return c


def make_registry(source: Callable[[], StatusDoc]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(source))
    return registry
