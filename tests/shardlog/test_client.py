"""The tuned paho client is equivalent to stock paho: the same messages, fields and
order for any stream of packets, however the bytes are split across reads; and its
batched PUBACKs are the bytes paho would send one by one."""

from __future__ import annotations

import itertools
import select
import socket
import struct

import paho.mqtt.client as mqtt
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shardlog.recording.client import BufferedClient, Publish, StockClient, make_client
from shardlog.records import props_member

PROTOCOLS = [mqtt.MQTTv311, mqtt.MQTTv5]


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
            props: bytes | None) -> bytes:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if props is not None:
        body += props
    body += payload
    return bytes([0x30 | (dup << 3) | (qos << 1) | retain]) + varint(len(body)) + body


def mqtt_text(**kw: int) -> st.SearchStrategy[str]:
    """A valid MQTT UTF-8 string: no U+0000 (paho drops a connection that sends one)."""
    return st.text(st.characters(codec="utf-8", exclude_characters="\x00"), **kw)


@st.composite
def v5_properties(draw: st.DrawFn) -> bytes:
    p = Properties(PacketTypes.PUBLISH)
    if draw(st.booleans()):
        p.MessageExpiryInterval = draw(st.integers(0, 2**32 - 1))
    if draw(st.booleans()):
        p.ContentType = draw(mqtt_text(max_size=20))
    if draw(st.booleans()):
        p.ResponseTopic = draw(mqtt_text(min_size=1, max_size=20).filter(lambda t: "+" not in t and "#" not in t))
    if draw(st.booleans()):
        p.CorrelationData = draw(st.binary(max_size=20))
    if draw(st.booleans()):
        p.PayloadFormatIndicator = draw(st.integers(0, 1))
    for _ in range(draw(st.integers(0, 3))):
        p.UserProperty = (draw(mqtt_text(max_size=10)), draw(mqtt_text(max_size=10)))
    if draw(st.booleans()):
        p.SubscriptionIdentifier = draw(st.integers(1, 2**28 - 1))
    return p.pack()


@st.composite
def packet_streams(draw: st.DrawFn) -> tuple[int, list[bytes], list[tuple]]:
    proto = draw(st.sampled_from(PROTOCOLS))
    packets, expected = [], []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["publish"] * 6 + ["qos2", "pingresp", "big"]))
        if kind == "pingresp":
            packets.append(b"\xd0\x00")
            continue
        topic = draw(mqtt_text(min_size=1, max_size=40)).encode()
        payload = draw(st.binary(max_size=300)) if kind != "big" else draw(st.binary(min_size=70_000, max_size=70_100))
        qos = draw(st.sampled_from([0, 1])) if kind != "qos2" else 2
        mid = draw(st.integers(1, 65535)) if qos else 0
        dup, retain = draw(st.booleans()) if qos else False, draw(st.booleans())
        props = draw(v5_properties()) if proto == mqtt.MQTTv5 else None
        packets.append(publish(topic, payload, qos, mid, dup, retain, props))
        expected.append((topic, payload, qos, mid, dup, retain))
    return proto, packets, expected


FAST: list[int] = [0]  # messages the last run() dispatched through the fast path


def run(client_cls: type, proto: int, data: bytes, cuts: list[int],
        fields: bool = False) -> tuple[list[tuple], bytes]:
    """Feed ``data`` to a client over a socketpair in pieces; return what on_message
    saw and the bytes the client sent back (its PUBACKs/PUBCOMPs)."""
    FAST[0] = 0
    a, b = socket.socketpair()
    a.setblocking(False)
    client = client_cls(CallbackAPIVersion.VERSION2, client_id="t", protocol=proto, manual_ack=True)
    seen: list[tuple] = []

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        # the properties as the recorder keeps them: a fast-path message has none (b"")
        props = getattr(m, "properties", None)
        seen.append((m._topic, m.payload, m.qos, m.mid if m.qos else 0, bool(m.dup), bool(m.retain),
                     b"" if props is None else props_member(vars(props))))
        FAST[0] += isinstance(m, Publish)
        if m.qos:
            c.ack(m.mid, m.qos)

    client.on_message = on_message
    if fields:  # the recorder's way: the fast path calls a function with the fields
        def on_fields(topic: bytes, payload: bytes, qos: int, mid: int, dup: bool, retain: bool,
                      props: bytes = b"") -> None:
            seen.append((topic, payload, qos, mid if qos else 0, dup, retain, props))
            FAST[0] += 1
            if qos:
                client.ack(mid, qos)
        client.on_publish_fields = on_fields
    client._sock = a
    client._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < len(data))), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        b.sendall(data[lo:hi])
        # until the client has consumed everything sent so far (bounded: one packet a pass at worst)
        for _ in range(len(data) + 10):
            client.loop(0)
            if isinstance(client, BufferedClient):
                client.read_buffered()
            if not select.select([a], [], [], 0)[0] and not getattr(client, "buffered", 0):
                break
    client.loop_write()
    b.setblocking(False)
    sent = b""
    try:
        while chunk := b.recv(1 << 20):
            sent += chunk
    except BlockingIOError:
        pass
    a.close()
    b.close()
    return seen, sent


@settings(max_examples=150, deadline=None)
@given(packet_streams(), st.lists(st.integers(0, 200_000), max_size=8), st.data())
def test_fast_path_equals_stock_paho(stream: tuple[int, list[bytes], list[tuple]], cuts: list[int],
                                     data: st.DataObject) -> None:
    proto, packets, expected = stream
    raw = b"".join(packets)
    qos01 = [e for e in expected if e[2] < 2]
    ours, our_acks = run(BufferedClient, proto, raw, cuts)
    theirs, their_acks = run(StockClient, proto, raw, cuts)
    by_fields, field_acks = run(BufferedClient, proto, raw, cuts, fields=True)
    assert ours == theirs == by_fields
    assert field_acks == their_acks
    assert [e[:6] for e in ours if e[2] < 2] == qos01
    assert our_acks == their_acks


def test_split_at_every_byte_boundary() -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.UserProperty = ("k", "v")
    props.MessageExpiryInterval = 60
    # (protocol, properties block, messages the fast path takes): one with properties goes
    # to paho, which decodes them, so the recorder keeps them (issue 23)
    for proto, pr, fast in ((mqtt.MQTTv311, None, 3), (mqtt.MQTTv5, b"\x00", 3), (mqtt.MQTTv5, props.pack(), 0)):
        raw = b"".join(publish(f"a/{i}".encode(), b'{"i": %d}' % i, i % 2, i + 1, False, bool(i % 3), pr)
                       for i in range(4))
        want, _ = run(StockClient, proto, raw, [])
        assert FAST[0] == 0
        assert all(bool(w[6]) == (fast == 0) for w in want)
        got, _ = run(BufferedClient, proto, raw, [])
        # paho's loop() reads the first packet after its select; the fast path takes the rest
        assert got == want and FAST[0] == fast, "the fast path did not take the buffered packets"
        # the recorder's way (on_publish_fields) decodes the properties itself: the same records
        got, _ = run(BufferedClient, proto, raw, [], fields=True)
        assert got == want and FAST[0] == 3, "the fast path did not decode the properties"
        for cut in range(1, len(raw)):
            got, _ = run(BufferedClient, proto, raw, [cut])
            assert got == want, f"split at byte {cut}"


def test_ack_many_sends_what_paho_sends() -> None:
    mids = [1, 2, 300, 65535, 7]
    out = []
    for cls in (BufferedClient, StockClient):
        a, b = socket.socketpair()
        c = cls(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv5, manual_ack=True)
        c._sock = a
        c._state = mqtt._ConnectionState.MQTT_CS_CONNECTED
        c.ack_many(mids)
        c.loop_write()
        out.append(b.recv(1 << 16))
        a.close()
        b.close()
    assert out[0] == out[1] == b"".join(b"\x40\x02" + m.to_bytes(2, "big") for m in mids)


def test_stock_switch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    assert isinstance(make_client(CallbackAPIVersion.VERSION2, client_id="x"), BufferedClient)
    monkeypatch.setenv("SHARDLOG_STOCK_PAHO", "1")
    assert isinstance(make_client(CallbackAPIVersion.VERSION2, client_id="x"), StockClient)
