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
from typing import Any, NamedTuple

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


def decode_record(line: bytes) -> Record:
    """Parse one record line and recover the payload's original bytes."""
    obj = _json_decode(line)
    enc = obj.get("enc")
    if enc is None:
        start = line.index(_PAYLOAD_KEY) + len(_PAYLOAD_KEY)
        end = line.rstrip(b"\r\n").rindex(b"}")
        raw = line[start:end]
    elif enc == "utf8":
        raw = obj["payload"].encode("utf-8")
    elif enc == "base64":
        try:
            raw = base64.b64decode(obj["payload"], validate=True)
        except binascii.Error as exc:
            raise ValueError(f"bad base64 payload: {exc}") from None
    else:
        raise ValueError(f"unknown payload encoding {enc!r}")
    return Record(obj["ts"], obj["qos"], obj["retain"], raw, obj["payload"])


def encode_quarantine(ts_us: int, shard: str, reason: str, topic: bytes, qos: int, retain: bool,
                      payload: bytes) -> bytes:
    """A quarantine line: the raw topic and payload, base64, with the reason."""
    return _json_encode({
        "ts": ts_us, "shard": shard, "reason": reason,
        "topic": base64.b64encode(topic).decode("ascii"),
        "qos": qos, "retain": retain, "enc": "base64",
        "payload": base64.b64encode(payload).decode("ascii"),
    }) + b"\n"
