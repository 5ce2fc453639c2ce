"""The ``shardlog`` command.

Verbs of the recorder package live here (record, check, init). Verbs of other
packages (``supervise`` and ``status`` from ``supervisor``) are added through the
``shardlog.commands`` entry point group, so this package never imports them.
Exit codes follow sysexits: 0 ok, 64 usage, 65 data error (replay skipped records, a bad SQL query), 66 no input
(history verbs), 69 broker unavailable (replay), 70 internal error, 73 cannot create (export),
78 configuration.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib.metadata
import logging
import os
import sys
from collections.abc import Callable
from importlib import resources

from shardlog import __version__
from shardlog.cli.argtypes import integer, seconds
from shardlog.config.load import load_map
from shardlog.config.schema import ConfigError, ShardMap

EX_USAGE, EX_SOFTWARE, EX_CONFIG = 64, 70, 78

log = logging.getLogger("shardlog")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def setup_logging(level: str, shard: str | None = None) -> None:
    """Daemon logging: stderr, one line per event, the shard (or process role) in each."""
    who = f"shard={shard}" if shard else "shardlog"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)-7s {who} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level for stderr (default: info)")


def load_or_exit(path: str) -> ShardMap:
    try:
        return load_map(path)
    except ConfigError as exc:
        print(f"shardlog: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


# -- record -----------------------------------------------------------------------------

def _cmd_record(args: argparse.Namespace) -> int:
    from shardlog.recording.recorder import Recorder

    try:
        faulthandler.enable()  # a supervisor's SIGABRT on a hung shard prints every thread's stack
    except (RuntimeError, ValueError):  # stderr closed (2>&-) or not a file: record without it
        pass
    setup_logging(args.log_level, args.shard)
    smap = load_or_exit(args.map)
    try:
        shard = smap.shard(args.shard)
    except ConfigError as exc:
        log.error("%s", exc)
        return EX_CONFIG
    cls = Recorder
    if shard.journal.enabled:
        from shardlog.recording.journal_recorder import JournalRecorder
        cls = JournalRecorder
    recorder = cls(smap, shard, stats_file=args.stats_file, parent_pid=args.parent_pid,
                   heartbeat=args.heartbeat, control_path=args.control)
    return recorder.run()


def _add_record(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="run one shard's recorder in the foreground")
    p.add_argument("map", help="the shard map (YAML)")
    p.add_argument("--shard", required=True, help="the shard to record")
    p.add_argument("--stats-file", help="rewrite this JSON stats file every heartbeat")
    p.add_argument("--heartbeat", type=seconds(), default=1.0, help="seconds between stats writes")
    p.add_argument("--parent-pid", type=integer(1), help="stop when this process is no longer the parent")
    p.add_argument("--control", metavar="PATH", help="accept control commands (rotate, delete, move) on "
                                                     "a Unix datagram socket created at PATH (the supervisor's)")
    add_log_level(p)
    p.set_defaults(func=_cmd_record)


# -- check --------------------------------------------------------------------------------

def routing_table(smap: ShardMap) -> list[tuple[str, str, str, str, str]]:
    """(prefix, shard, root, host, broker) rows, most specific prefix first."""
    rows = []
    for s in sorted(smap.shards, key=lambda s: (-len(s.branch.split("/")) if s.branch else 1, s.branch)):
        b = smap.broker_of(s)
        rows.append((s.prefix if s.branch else "#", s.name, s.root, s.host or "-",
                     f"{b.host}:{b.port} (MQTT {'5' if b.mqtt5 else '3.1.1'})"))
    return rows


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip()
                     for row in [header, *rows])


def _cmd_check(args: argparse.Namespace) -> int:
    from shardlog.hooks.loading import check_hooks

    smap = load_or_exit(args.map)
    try:
        n_hooks = check_hooks(smap)  # imports them, as `shardlog record` will
    except ConfigError as exc:
        print(f"shardlog: configuration error: {args.map}: {exc}", file=sys.stderr)
        return EX_CONFIG
    hooks = f", {n_hooks} hook(s) imported" if n_hooks else ""
    print(f"{args.map}: OK, {len(smap.shards)} shard(s){hooks}")
    print(format_table(("PREFIX", "SHARD", "ROOT", "HOST", "BROKER"), routing_table(smap)))
    return 0


def _add_check(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check", help="validate a shard map and print its routing table")
    p.add_argument("map")
    p.set_defaults(func=_cmd_check)


# -- init ---------------------------------------------------------------------------------

def example_map() -> str:
    return resources.files("shardlog").joinpath("example.yaml").read_text(encoding="utf-8")


def _cmd_init(args: argparse.Namespace) -> int:
    if args.path == "-":
        sys.stdout.write(example_map())
        return 0
    if os.path.exists(args.path) and not args.force:
        print(f"shardlog: {args.path} exists; use --force to overwrite", file=sys.stderr)
        return EX_USAGE
    with open(args.path, "w", encoding="utf-8") as f:
        f.write(example_map())
    print(f"wrote {args.path}; check it with: shardlog check {args.path}")
    return 0


def _add_init(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a commented example shard map")
    p.add_argument("path", nargs="?", default="shards.yaml", help="where to write it ('-' for stdout)")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    p.set_defaults(func=_cmd_init)


# -- history: topics, tail, cat, export (shardlog.history) --------------------------------

EX_NOINPUT, EX_CANTCREAT = 66, 73


def _time_arg(value: str) -> int:
    from shardlog.history import parse_time

    try:
        t = parse_time(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert t is not None
    return t


def _with_topic(topic: str, line: bytes) -> bytes:
    """A stored record line with a ``topic`` member put first."""
    import msgspec

    return b'{"topic":' + msgspec.json.encode(topic) + b"," + line[1:]


def _shown_topic(topic: str) -> str:
    import json

    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in topic) or topic.startswith('"'):
        return json.dumps(topic, ensure_ascii=False)
    return topic


def _history_errors(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Missing root/topic -> 66 with a message; a closed pipe (| head) -> quiet exit."""
    def run(args: argparse.Namespace) -> int:
        from shardlog.history import TopicNotFound

        try:
            return func(args)
        except TopicNotFound as exc:
            print(f"shardlog: {exc}", file=sys.stderr)
            return EX_NOINPUT
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
    return run


def _cmd_topics(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from shardlog import history

    out = sys.stdout
    found = 0
    for info in history.topics(args.root, args.prefix, long=args.long):
        found += 1
        if args.json:
            doc = {"topic": info.topic}
            if args.long:
                doc.update(records=info.records, bytes=info.bytes, last_ts=info.last_ts)
            out.write(json.dumps(doc, ensure_ascii=False) + "\n")
        elif args.long:
            last = "-" if info.last_ts is None else dt.datetime.fromtimestamp(
                info.last_ts / 1e6, dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
            out.write(f"{_shown_topic(info.topic)}\t{info.records}\t{info.bytes}\t{last}\n")
        else:
            out.write(_shown_topic(info.topic) + "\n")
    out.flush()
    if not found and args.prefix:
        raise history.TopicNotFound(f"no topics at or below {args.prefix!r} under {args.root}")
    return 0


def _add_topics(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("topics", help="list recorded topics (decoded names)")
    p.add_argument("root", help="a recording root (a shard's root directory)")
    p.add_argument("prefix", nargs="?", default="", help="only this topic and the ones below it")
    p.add_argument("--long", "-l", action="store_true",
                   help="also records, bytes on disk and the last record's time (reads every segment)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=_history_errors(_cmd_topics))


def _cmd_tail(args: argparse.Namespace) -> int:
    from shardlog import history

    out = sys.stdout.buffer
    if args.follow:
        for line in history._tail_and_follow(args.root, args.topic, args.n, poll=args.poll):
            out.write(_with_topic(args.topic, line))
            out.flush()
        return 0
    d = history._require_topic(args.root, args.topic)
    for line in history._tail_lines_dir(d, args.n):
        out.write(_with_topic(args.topic, line))
    out.flush()
    return 0


def _add_tail(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tail", help="the last records of a topic (JSON lines with a topic member)")
    p.add_argument("root")
    p.add_argument("topic")
    p.add_argument("-n", type=integer(0), default=6, help="how many records (default 6)")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing records as they arrive")
    p.add_argument("--poll", type=seconds(), default=0.2, help=argparse.SUPPRESS)
    p.set_defaults(func=_history_errors(_cmd_tail))


def _cmd_cat(args: argparse.Namespace) -> int:
    import base64
    import csv
    import io

    from shardlog import history
    from shardlog.records import decode_record

    lines = history._read_lines(args.root, args.topic, args.since, args.until)
    if args.format == "jsonl":
        out = sys.stdout.buffer
        for topic, _ts, line in lines:
            out.write(_with_topic(topic, line))
        out.flush()
        return 0
    text = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="", write_through=False)
    w = csv.writer(text)
    w.writerow(["topic", "ts", "qos", "retain", "payload", "enc"])
    for topic, ts, line in lines:
        try:
            rec = decode_record(line)
        except ValueError:
            continue
        try:
            payload, enc = rec.payload.decode("utf-8"), ""
        except UnicodeDecodeError:
            payload, enc = base64.b64encode(rec.payload).decode("ascii"), "base64"
        w.writerow([topic, ts, rec.qos, "true" if rec.retain else "false", payload, enc])
    text.flush()
    text.detach()
    return 0


def _add_cat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cat", help="records of a topic or a whole branch, in time order")
    p.add_argument("root")
    p.add_argument("topic", metavar="TOPIC-or-PREFIX", help="a topic; the topics below it are included")
    p.add_argument("--since", type=_time_arg, help="from this time on (µs since the epoch or ISO 8601; "
                   "naive = UTC), inclusive")
    p.add_argument("--until", type=_time_arg, help="before this time, exclusive")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl")
    p.set_defaults(func=_history_errors(_cmd_cat))


def _cmd_export(args: argparse.Namespace) -> int:
    from shardlog import history

    parquet = args.to.endswith(".parquet")
    if not parquet and not args.to.endswith((".sqlite", ".sqlite3", ".db")):
        args.parser.error("--to FILE.parquet, or FILE.sqlite|.sqlite3|.db")
    if os.path.exists(args.to):
        if not args.force:
            print(f"shardlog: {args.to} exists; use --force to replace it", file=sys.stderr)
            return EX_CANTCREAT
        os.unlink(args.to)
    tty = sys.stderr.isatty()

    def progress(n: int) -> None:
        if tty:
            sys.stderr.write(f"\rexported {n:,} records")
            sys.stderr.flush()

    try:
        if parquet:
            n = _export_parquet(args, tty)
        else:
            n = history.export_sqlite(args.root, args.prefix, args.to, args.since, args.until, progress=progress)
    except BaseException:
        if os.path.exists(args.to):
            os.unlink(args.to)  # never leave half an export behind
        raise
    if tty:
        sys.stderr.write("\n")
    print(f"exported {n} records to {args.to}", file=sys.stderr)
    return 0


def _export_parquet(args: argparse.Namespace, tty: bool) -> int:
    """The Parquet export (DuckDB), with a progress bar on a terminal."""
    import time

    from shardlog.reading.parquet import export_parquet
    from shardlog.replay.publisher import format_progress

    start = time.monotonic()

    def bar(done: int, total: int) -> None:
        elapsed = time.monotonic() - start
        eta = (total - done) * elapsed / done if done else None
        sys.stderr.write("\r" + format_progress(done, total, elapsed, eta) + "\x1b[K")
        sys.stderr.flush()

    return export_parquet(args.root, args.prefix, args.to, args.since, args.until, progress=bar if tty else None)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a branch to Parquet or SQLite (one table, JSON members as columns)")
    p.add_argument("root")
    p.add_argument("prefix", help="a topic; the topics below it are included ('' for all)")
    p.add_argument("--to", required=True, help="the file to create: .parquet (DuckDB) or .sqlite/.sqlite3/.db")
    p.add_argument("--since", type=_time_arg)
    p.add_argument("--until", type=_time_arg)
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_history_errors(_cmd_export), parser=p)


# -- replay (shardlog.replay) ---------------------------------------------------------------

EX_DATAERR, EX_UNAVAILABLE = 65, 69


class _ReplayProgress:
    """A progress bar on stderr, redrawn at most 10 times a second (only on a terminal)."""

    def __init__(self, total: int | None, last_ts: int | None, speed: float | None) -> None:
        import time

        self.clock = time.monotonic
        self.total, self.last_ts, self.speed = total, last_ts, speed
        self.start = self.clock()
        self.shown = 0.0
        self.done = 0
        self.ts: int | None = None  # the newest record published

    def __call__(self, done: int, ts: int | None, force: bool = False) -> None:
        from shardlog.replay.publisher import format_progress

        self.done = done
        if ts is not None:
            self.ts = ts
        now = self.clock()
        if now - self.shown < 0.1 and not force:
            return
        self.shown = now
        elapsed = now - self.start
        eta = None
        if self.speed is not None and self.ts is not None and self.last_ts is not None:
            eta = (self.last_ts - self.ts) / 1e6 / self.speed
        elif self.total and done and elapsed > 0:
            eta = (self.total - done) * elapsed / done
        sys.stderr.write("\r" + format_progress(done, self.total, elapsed, eta) + "\x1b[K")
        sys.stderr.flush()

    def end(self) -> None:
        self(self.done, None, force=True)
        sys.stderr.write("\n")
        sys.stderr.flush()


def _cmd_replay(args: argparse.Namespace) -> int:
    from shardlog import history
    from shardlog.replay import publisher as replay

    try:
        speed = replay.parse_speed(args.speed)
        rename = replay.parse_rename(args.rename, args.prefix) if args.rename is not None else None
        broker = replay.broker_from_url(args.broker, protocol=args.protocol, ca_file=args.ca_file,
                                        cert_file=args.cert_file, key_file=args.key_file,
                                        insecure=args.insecure, keepalive=args.keepalive)
    except ValueError as exc:
        args.parser.error(str(exc))
    records = history.read(args.root, args.prefix, args.since, args.until)  # TopicNotFound -> 66
    tty = sys.stderr.isatty()
    progress = None
    if tty:  # a bar needs the total: one counting pass first
        total, last_ts = 0, None
        for _t, rec in history.read(args.root, args.prefix, args.since, args.until):
            total, last_ts = total + 1, rec.ts
        progress = _ReplayProgress(total, last_ts, speed)
    client_id = args.client_id or f"{broker.client_id_prefix}{os.getpid()}"
    pub = replay.Publisher(broker, client_id, window=args.window, ack_timeout=args.ack_timeout)
    target = replay.broker_name(broker)
    try:
        pub.connect(args.connect_timeout)
        try:
            summary = replay.replay(records, pub, speed, rename, progress=progress)
        finally:
            if progress is not None:
                progress.end()
        pub.close()
    except replay.ReplayError as exc:
        print(f"shardlog: replay: {exc}", file=sys.stderr)
        return 130 if isinstance(exc, replay.Interrupted) else EX_UNAVAILABLE
    rate = summary.published / summary.seconds if summary.seconds > 0 else 0.0
    where = f" as {rename.new}" if rename is not None else ""
    print(f"replayed {summary.published} records of {args.prefix or 'every topic'!r}{where} to {target} "
          f"in {summary.seconds:.2f} s ({rate:,.0f} records/s; {summary.confirmed} QoS 1/2 publishes "
          f"acknowledged)", file=sys.stderr)
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


# -- nginx-routes (shardlog.nginx_routes) -------------------------------------------------

def _cmd_nginx_routes(args: argparse.Namespace) -> int:
    from shardlog.reading.nginx_routes import MissingUpstream, parse_upstreams, render

    smap = load_or_exit(args.map)
    try:
        text = render(smap, parse_upstreams(args.upstream or []), listen=args.listen,
                      source=os.path.basename(args.map))
    except (MissingUpstream, ValueError) as exc:
        args.parser.error(str(exc))
    sys.stdout.write(text)
    return 0


def _add_nginx_routes(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("nginx-routes", help="print an NGINX front routing each shard's branch to its host")
    p.add_argument("map", help="the shard map (YAML)")
    p.add_argument("--upstream", action="append", metavar="HOST=ADDR",
                   help="where HOST's nginx (deploy/nginx/shardlog.conf) listens, e.g. web1=10.0.0.1:80; "
                        "once per host ('all' for a map without hosts)")
    p.add_argument("--listen", default="127.0.0.1:8080", help="the front's listen (default 127.0.0.1:8080)")
    p.set_defaults(func=_cmd_nginx_routes, parser=p)


# -- main -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shardlog", description="Record an MQTT topic tree as a directory tree.")
    parser.add_argument("--version", action="version", version=f"shardlog {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    from shardlog.cli.sql import add_sql

    for add in (_add_record, _add_check, _add_init, _add_topics, _add_tail, _add_cat, _add_export, add_sql,
                _add_replay, _add_nginx_routes, *_plugin_verbs()):
        add(sub)
    return parser


def _plugin_verbs() -> list[Callable[[argparse._SubParsersAction], None]]:
    found = []
    for ep in sorted(importlib.metadata.entry_points(group="shardlog.commands"), key=lambda e: e.name):
        try:
            found.append(ep.load())
        except ImportError as exc:  # a broken plugin must not take the recorder down
            print(f"shardlog: cannot load verb {ep.name!r}: {exc}", file=sys.stderr)
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except SystemExit:
        raise
    except Exception:  # noqa: BLE001 - last resort: say so, exit 70, never a silent death
        logging.getLogger("shardlog").exception("internal error")
        return EX_SOFTWARE
