"""``shardlog replay``: republish recorded messages to a broker (shardlog.replay)."""

from __future__ import annotations

import argparse
import os
import sys

from shardlog.cli.argtypes import integer, seconds
from shardlog.cli.common import EX_DATAERR, EX_UNAVAILABLE, _history_errors, _time_arg
from shardlog.cli.progress import ReplayProgress


def _cmd_replay(args: argparse.Namespace) -> int:
    from shardlog import history
    from shardlog.replay import plan
    from shardlog.replay.publisher import Publisher
    from shardlog.replay.run import replay

    try:
        speed = plan.parse_speed(args.speed)
        rename = plan.parse_rename(args.rename, args.prefix) if args.rename is not None else None
        broker = plan.broker_from_url(args.broker, protocol=args.protocol, ca_file=args.ca_file,
                                      cert_file=args.cert_file, key_file=args.key_file,
                                      insecure=args.insecure, keepalive=args.keepalive)
    except ValueError as exc:
        args.parser.error(str(exc))
    if broker.tls is not None:  # --ca-file, --cert-file, --key-file: loaded now, as the publisher will
        from shardlog.config.schema import ConfigError
        from shardlog.config.tls import ssl_context
        try:
            ssl_context(broker.tls)
        except ConfigError as exc:
            args.parser.error(f"TLS files (--ca-file, --cert-file, --key-file): {exc}")
    records = history.read(args.root, args.prefix, args.since, args.until)  # TopicNotFound -> 66
    tty = sys.stderr.isatty()
    progress = None
    if tty:  # a bar needs the total: one counting pass first
        total, last_ts = 0, None
        for _t, rec in history.read(args.root, args.prefix, args.since, args.until):
            total, last_ts = total + 1, rec.ts
        progress = ReplayProgress(total, last_ts, speed)
    client_id = args.client_id or f"{broker.client_id_prefix}{os.getpid()}"
    pub = Publisher(broker, client_id, window=args.window, ack_timeout=args.ack_timeout)
    target = plan.broker_name(broker)
    try:
        pub.connect(args.connect_timeout)
        try:
            summary = replay(records, pub, speed, rename, progress=progress)
        finally:
            if progress is not None:
                progress.end()
        pub.close()
    except plan.ReplayError as exc:
        print(f"shardlog: replay: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, plan.Interrupted) else EX_UNAVAILABLE
    rate = summary.published / summary.seconds if summary.seconds > 0 else 0.0
    where = f" as {rename.new}" if rename is not None else ""
    print(f"replayed {summary.published} records of {args.prefix or 'every topic'!r}{where} to {target} "
          f"in {summary.seconds:.2f} s ({rate:,.0f} records/s; {summary.confirmed} QoS 1/2 publishes "
          f"acknowledged)", file=sys.stderr)
    if summary.expired:
        print(f"shardlog: replay: {summary.expired} record(s) not published: their MQTT 5 message "
              "expiry ran out since they were recorded", file=sys.stderr)
    if summary.skipped:
        print(f"shardlog: replay: skipped {summary.skipped} record(s) that cannot be published "
              "(see the warnings above)", file=sys.stderr)
        return EX_DATAERR
    return 0


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="republish recorded messages to a broker, with their original timing")
    p.add_argument("root", help="a recording root")
    p.add_argument("prefix", help="a topic; the topics below it are included ('' for all)")
    p.add_argument("--broker", required=True, metavar="URL",
                   help="mqtt://[user[:password]@]host[:port] (mqtts:// for TLS); a user without a password "
                        "takes it from $MQTT_PASSWORD")
    p.add_argument("--speed", default="1", help="1 (original timing, default), 10 (ten times faster), "
                   "any factor, or max (as fast as the broker acknowledges)")
    p.add_argument("--rename", metavar="OLD=NEW", help="publish topic OLD and the topics below it under NEW")
    p.add_argument("--since", type=_time_arg, help="from this time on (µs or ISO 8601), inclusive")
    p.add_argument("--until", type=_time_arg, help="before this time, exclusive")
    p.add_argument("--protocol", choices=["5", "3.1.1"], default="5", help="MQTT version (default 5)")
    p.add_argument("--client-id", help="default: shardlog-replay-<pid>")
    p.add_argument("--ca-file", help="TLS: CA certificates (default: the system's)")
    p.add_argument("--cert-file", help="TLS: client certificate")
    p.add_argument("--key-file", help="TLS: client key")
    p.add_argument("--insecure", action="store_true", help="TLS: skip host name verification")
    p.add_argument("--keepalive", type=integer(0, 65535), default=60, help="seconds (default 60)")
    p.add_argument("--window", type=integer(1, 65535), default=1000,
                   help="QoS 1/2 publishes unacknowledged at a time (default 1000; never above the broker's "
                        "Receive Maximum)")
    p.add_argument("--ack-timeout", type=seconds(), default=30.0,
                   help="give up when the broker acknowledges nothing for this long (s, default 30)")
    p.add_argument("--connect-timeout", type=seconds(), default=10.0, help="s (default 10)")
    p.set_defaults(func=_history_errors(_cmd_replay), parser=p)
