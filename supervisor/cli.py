"""``shardlog supervise``, added to the ``shardlog`` command through the ``shardlog.commands``
entry point group: builds the main loop (:mod:`supervisor.arbiter.loop`), the HTTP server and
sampler (:mod:`supervisor.serve`) and the control paths (:mod:`supervisor.control`), wires them
together with callables, and runs the loop until it stops."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import Any

from shardlog.cli.common import EX_CONFIG, add_log_level, load_or_exit, setup_logging
from shardlog.config.schema import ConfigError
from shardlog.config.tls import ssl_context
from supervisor.arbiter.loop import Arbiter
from supervisor.arbiter.sdnotify import Notifier
from supervisor.broker.supervised import ports_taken
from supervisor.control.controller import Controller
from supervisor.control.mqtt import MqttControl
from supervisor.serve.http import bind
from supervisor.serve.sampler import Sampler
from supervisor.serve.status import StatusDoc, build_status, encode
from supervisor.threads import Threads

log = logging.getLogger(__name__)

EX_UNAVAILABLE = 69  # cannot listen


def _cmd_supervise(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "supervisor")
    smap = load_or_exit(args.map)
    if MqttControl.wanted(smap) and smap.broker.tls is not None:  # the supervisor's own client
        try:
            ssl_context(smap.broker.tls)
        except ConfigError as exc:
            log.error("configuration error: %s", exc)
            return EX_CONFIG
    taken = ports_taken(smap) if smap.broker.embedded else []
    if taken:
        log.error("broker.embedded: %s already in use (another MQTT broker?). To record that broker, "
                  "set broker.embedded: false; to run the embedded one, give it a free broker.port",
                  " and ".join(taken))
        return EX_CONFIG
    notifier = Notifier()
    arbiter = Arbiter(smap, args.map, host=args.host, log_level=args.log_level, notifier=notifier)
    threads = Threads()  # every thread beside the main loop: restarted if it dies, shown in /status
    sampler = Sampler(lambda: arbiter.snapshot, threads=threads)
    mqtt_control: MqttControl | None = None

    def status() -> StatusDoc:
        return build_status(arbiter.snapshot, sampler.sample, arbiter.clock.monotonic(), threads.view(),
                            mqtt_control.counters() if mqtt_control is not None else None)

    controller = Controller(arbiter)

    def control(op: str, body: bytes, source: str) -> dict[str, Any]:
        return controller.execute(body, op, source)

    try:
        server = bind(smap.supervisor.listen, status, control=control, threads=threads)
    except (OSError, ValueError) as exc:
        log.error("cannot serve /status on %s: %s", smap.supervisor.listen, exc)
        return EX_UNAVAILABLE
    server.start()
    sampler.start()
    log.info("serving /status and /metrics on http://%s:%d", *server.address)
    if MqttControl.wanted(smap):  # the control section applies when the supervisor (re)starts
        mqtt_control = MqttControl(smap, args.host or socket.gethostname(), controller,
                                   lambda: encode(status()), threads).start()
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
