"""One record = one line of strict JSON (the public format: docs/design.md, "Files on disk").

    {"ts":1763815800123456,"qos":1,"retain":false,"payload":{"user":"ann"}}
    {"ts":1763815800123457,"qos":0,"retain":false,"enc":"utf8","payload":"not json"}
    {"ts":1763815800123458,"qos":1,"retain":true,"enc":"base64","payload":"AAEC"}

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
_JSON_RECORD = b'{"ts":%d,"qos":%d,"retain":%s,"payload":%s}\n'
_RETAIN = (b"false", b"true")  # indexed by retain (a bool or 0/1)


def encode_record(ts_us: int, qos: int, retain: bool, payload: bytes) -> bytes:
    """The record line for one message, newline included. Hot path: keep it lean."""
    if payload and b"\n" not in payload and b"\r" not in payload:
        try:
            _json_decode(payload)
        except _DECODE_ERRORS:
            pass
        else:  # one formatting operation: this is most of the records
            return _JSON_RECORD % (ts_us, qos, _RETAIN[retain], payload)
    head = b'{"ts":%d,"qos":%d,"retain":%s' % (ts_us, qos, _RETAIN[retain])
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


class RecordError(ValueError):
    """A line that is no record: not strict JSON, a member missing or of the wrong type, a ts
    outside 64 bits, a payload nested deeper than the decoder goes (about 1,000 levels)."""


_Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class _Head(msgspec.Struct, kw_only=True):
    ts: _Int64
    qos: Annotated[int, msgspec.Meta(ge=0, le=2)]
    retain: bool
    enc: str | None = None


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
            return Record(head.ts, head.qos, head.retain, raw, None)
        if deep:
            raise RecordError("payload nests deeper than the JSON decoder goes (about 1,000 levels)")
        try:
            obj = _json_decode(text)
        except RecursionError:
            raise RecordError("payload nests deeper than the JSON decoder goes (about 1,000 levels)") from None
        return Record(head.ts, head.qos, head.retain, raw, obj)
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
    return Record(head.ts, head.qos, head.retain, raw, s if value else None)


def encode_quarantine(ts_us: int, shard: str, reason: str, topic: bytes, qos: int, retain: bool,
                      payload: bytes) -> bytes:
    """A quarantine line: the raw topic and payload, base64, with the reason."""
    return _json_encode({
        "ts": ts_us, "shard": shard, "reason": reason,
        "topic": base64.b64encode(topic).decode("ascii"),
        "qos": qos, "retain": retain, "enc": "base64",
        "payload": base64.b64encode(payload).decode("ascii"),
    }) + b"\n"
