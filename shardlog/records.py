"""One record = one line of strict JSON (the public format: docs/design.md, "Files on disk").

    {"ts":1763815800123456,"qos":1,"retain":false,"payload":{"user":"ann"}}
    {"ts":1763815800123457,"qos":0,"retain":false,"enc":"utf8","payload":"not json"}
    {"ts":1763815800123458,"qos":1,"retain":true,"enc":"base64","payload":"AAEC"}
    {"ts":1763815800123459,"qos":1,"retain":false,"props":{"user":[["k","v"]],"content_type":"text/plain"},"enc":"utf8","payload":"hi"}

``props`` (MQTT 5 PUBLISH properties) is there only when the message carried some that a
record keeps (:func:`props_member`): a message without them gets the same bytes as before.
``payload`` is always the last member. A JSON payload is embedded byte for byte as
it arrived (so its original bytes are the text between ``"payload":`` and the final
``}``); a JSON payload holding a raw line break is stored as text instead, so every
record stays on one line. msgspec's decoder is the strictness check: it rejects
NaN/Infinity, control characters in strings, invalid UTF-8 and a leading BOM.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, NamedTuple

import msgspec

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError)
_PAYLOAD_KEY = b',"payload":'
_JSON_RECORD = b'{"ts":%d,"qos":%d,"retain":%s%s,"payload":%s}\n'
_RETAIN = (b"false", b"true")  # indexed by retain (a bool or 0/1)

#: paho's Properties attribute -> the record's ``props`` key, in the order written. Left out:
#: TopicAlias and SubscriptionIdentifier, which belong to one connection, not to the message.
PROPS = (("UserProperty", "user"), ("ContentType", "content_type"),
         ("PayloadFormatIndicator", "payload_format"), ("ResponseTopic", "response_topic"),
         ("CorrelationData", "correlation_data"), ("MessageExpiryInterval", "message_expiry"))


def props_member(attrs: dict[str, Any]) -> bytes:
    """``,"props":{...}`` for the attributes of a received paho ``Properties`` (its
    ``__dict__``), or b"" when none of them is kept. ``user``: [[key, value], ...] in the
    order received, repeated keys kept; ``correlation_data``: standard base64;
    ``message_expiry``: seconds as received (the broker's remaining lifetime)."""
    out: dict[str, Any] = {}
    for attr, key in PROPS:
        value = attrs.get(attr)
        if value is None:
            continue
        if key == "correlation_data":
            value = base64.b64encode(value).decode("ascii")
        elif key == "user":
            value = [[k, v] for k, v in value]
        out[key] = value
    return b',"props":%s' % _json_encode(out) if out else b""


#: a JSON payload with blanks around it is stored as text: embedded as JSON, a reader would get
#: the value without them, not the bytes that were sent (``0\t`` read back as ``0``)
_EDGE_SPACE = frozenset(b" \t")


def encode_record(ts_us: int, qos: int, retain: bool, payload: bytes, props: bytes = b"") -> bytes:
    """The record line for one message, newline included (``props``: :func:`props_member`'s
    bytes, empty for most messages). Hot path: keep it lean."""
    if (payload and b"\n" not in payload and b"\r" not in payload
            and payload[0] not in _EDGE_SPACE and payload[-1] not in _EDGE_SPACE):
        try:
            _json_decode(payload)
        except _DECODE_ERRORS:
            pass
        else:  # one formatting operation: this is most of the records
            return _JSON_RECORD % (ts_us, qos, _RETAIN[retain], props, payload)
    head = b'{"ts":%d,"qos":%d,"retain":%s%s' % (ts_us, qos, _RETAIN[retain], props)
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return b'%s,"enc":"base64","payload":"%s"}\n' % (head, base64.b64encode(payload))
    return b'%s,"enc":"utf8","payload":%s}\n' % (head, _json_encode(text))


class Record(NamedTuple):
    ts: int
    qos: int
    retain: bool
    payload: bytes
    value: Any  # the payload as JSON.parse would see it (object, string, ...)
    props: dict[str, Any] | None = None  # the record's "props" member as stored, if any

    def properties(self) -> dict[str, Any]:
        """The MQTT 5 properties as values: ``user`` a list of (key, value) tuples,
        ``correlation_data`` bytes, the others as stored; {} when there are none."""
        if not self.props:
            return {}
        out = dict(self.props)
        if "user" in out:
            out["user"] = [(k, v) for k, v in out["user"]]
        if "correlation_data" in out:
            out["correlation_data"] = base64.b64decode(out["correlation_data"])
        return out


class RecordError(ValueError):
    """A line that is no record: not strict JSON, a member missing or of the wrong type, a ts
    outside 64 bits, a payload nested deeper than the decoder goes (about 1,000 levels)."""


_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Head(msgspec.Struct, kw_only=True):
    ts: _Int64
    qos: Annotated[int, msgspec.Meta(ge=0, le=2)]
    retain: bool
    enc: str | None = None
    props: dict[str, Any] | None = None  # MQTT 5 properties, before the payload


class _Envelope(_Head, kw_only=True):
    payload: msgspec.Raw


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_HEAD = msgspec.json.Decoder(_Head)


def _envelope(line: bytes) -> tuple[_Head, bytes, bool]:
    """(the members before the payload, the payload's JSON text, whether it nests too deep
    to decode). A payload too deep for msgspec is cut out of the line (it is the last member)."""
    try:
        env = _ENVELOPE.decode(line)
    except RecursionError:
        i = line.find(_PAYLOAD_KEY)
        if i < 0:
            raise RecordError("not a record: nested too deep") from None
        try:
            head = _HEAD.decode(line[:i] + b"}")
        except (msgspec.DecodeError, RecursionError) as exc:
            raise RecordError(f"not a record: {exc}") from None
        return head, line[i + len(_PAYLOAD_KEY):line.rstrip(b"\r\n").rindex(b"}")], True
    except msgspec.DecodeError as exc:  # ValidationError included
        raise RecordError(f"not a record: {exc}") from None
    return env, bytes(env.payload), False


def decode_record(line: bytes, value: bool = True) -> Record:
    """Parse one record line and recover the payload's original bytes. ``value=False``:
    ``Record.value`` is None and the payload is not decoded (a payload nested deeper than
    the decoder goes still gives its bytes). Raises :class:`RecordError` (a ValueError)."""
    head, text, deep = _envelope(line)
    enc = head.enc
    if enc is None:
        raw = text
        if not value:
            return Record(head.ts, head.qos, head.retain, raw, None, head.props)
        if deep:
            raise RecordError("payload nests deeper than the JSON decoder goes (about 1,000 levels)")
        try:
            obj = _json_decode(text)
        except RecursionError:
            raise RecordError("payload nests deeper than the JSON decoder goes (about 1,000 levels)") from None
        return Record(head.ts, head.qos, head.retain, raw, obj, head.props)
    try:
        s = _json_decode(text, type=str)
    except msgspec.DecodeError as exc:
        raise RecordError(f"not a record: payload with enc {enc!r} is no string: {exc}") from None
    if enc == "utf8":
        raw = s.encode("utf-8")
    elif enc == "base64":
        try:
            raw = base64.b64decode(s, validate=True)
        except binascii.Error as exc:
            raise RecordError(f"bad base64 payload: {exc}") from None
    else:
        raise RecordError(f"unknown payload encoding {enc!r}")
    return Record(head.ts, head.qos, head.retain, raw, s if value else None, head.props)


def encode_quarantine(ts_us: int, shard: str, reason: str, topic: bytes, qos: int, retain: bool,
                      payload: bytes, props: bytes = b"") -> bytes:
    """A quarantine line: the raw topic and payload, base64, with the reason (and the
    message's ``props`` member, :func:`props_member`'s bytes, when it had one)."""
    line = _json_encode({
        "ts": ts_us, "shard": shard, "reason": reason,
        "topic": base64.b64encode(topic).decode("ascii"),
        "qos": qos, "retain": retain, "enc": "base64",
        "payload": base64.b64encode(payload).decode("ascii"),
    })
    if props:
        i = line.rindex(b',"enc":')
        line = line[:i] + props + line[i:]
    return line + b"\n"
