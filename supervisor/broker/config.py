"""The embedded broker's configuration and command line (``broker.embedded: true``). Pure.

The broker is iotcore (PyPI), a wheel wrapping rumqttd, a Rust MQTT broker: no system
package, nothing to compile. Its quirks handled here: it listens on 0.0.0.0 unless told
otherwise (we bind the map's loopback host), MQTT 5 needs its own listener (the map's
``port`` speaks the map's ``protocol``; ``embedded_port_311`` adds a 3.1.1 one), and payloads
are capped at 20 KiB by default (raised to the shards' largest ``max_payload``).
"""

from __future__ import annotations

import sys

from shardlog.config.schema import Broker, ShardMap

#: the name supervise logs the embedded broker under
NAME = "embedded-broker"


def listen_host(b: Broker) -> str:
    """The address to bind: loopback (config validation guarantees host is loopback)."""
    host = b.host.strip("[]")
    return "127.0.0.1" if host.lower().startswith("localhost") or host.startswith("ip6-") else host


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def max_payload(smap: ShardMap) -> int:
    """What the broker accepts: the largest payload any shard records (at least 1 MiB)."""
    return max([1 << 20] + [int(s.max_payload) for s in smap.shards])


def config_toml(smap: ShardMap) -> str:
    """rumqttd's configuration for the map's broker."""
    b = smap.broker
    host = listen_host(b)
    inflight = max(100, int(b.receive_maximum))
    conn = (f"connection_timeout_ms = 60000\nmax_payload_size = {max_payload(smap)}\n"
            f"max_inflight_count = {inflight}\ndynamic_filters = true\n")
    listeners = []
    main_kind = "v5" if b.mqtt5 else "v4"
    listeners.append((main_kind, b.port))
    if b.embedded_port_311 is not None:
        listeners.append(("v4", b.embedded_port_311))
    out = ["# written by shardlog supervise for broker.embedded: true", "id = 0", "",
           "[router]", "id = 0", "max_connections = 10010", f"max_outgoing_packet_count = {inflight}",
           "max_segment_size = 104857600", "max_segment_count = 10", ""]
    for i, (kind, port) in enumerate(listeners, 1):
        out += [f"[{kind}.{i}]", f'name = "{kind}-{i}"', f'listen = "{address(host, port)}"',
                "next_connection_delay_ms = 1", f"[{kind}.{i}.connections]", conn]
    return "\n".join(out)


def argv(config_path: str, log_level: str, parent_pid: int) -> list[str]:
    return [sys.executable, "-m", "supervisor.broker", config_path, "--log-level", log_level,
            "--parent-pid", str(parent_pid)]
