"""``shardlog nginx-routes``: print an NGINX front for a multi-host shard map (shardlog.reading.nginx_routes)."""

from __future__ import annotations

import argparse
import os
import sys

from shardlog.cli.common import load_or_exit


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
