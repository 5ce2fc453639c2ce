"""The fast path's decoder of a PUBLISH's MQTT 5 properties block (shardlog/recording/client.py):
straight into the record's ``props`` member (shardlog.records.props_member), without paho's
``Properties`` object (~200 µs a message). Pure functions over the packet's bytes."""

from __future__ import annotations

import base64

from shardlog.records import props_member


def _utf8(buf: bytes, i: int, end: int) -> tuple[int, str]:
    """An MQTT UTF-8 string at ``buf[i]``: (index after it, text); raises ValueError when it
    runs past ``end`` or is not a valid MQTT string (paho then decides)."""
    j = i + 2 + ((buf[i] << 8) | buf[i + 1])
    if j > end:
        raise ValueError("string past the block")
    text = buf[i + 2:j].decode("utf-8")
    if "\x00" in text:  # MQTT-1.5.4-2 (U+FEFF is valid: MQTT-1.5.4-3)
        raise ValueError("NUL in a string")
    return j, text


def _properties(buf: bytes, i: int, end: int) -> tuple[int, bytes]:
    """The PUBLISH properties block at ``buf[i]``: (index of the payload, the record's
    ``props`` member, shardlog.records.props_member), or (-1, b"") for what paho should
    decode itself: a topic alias, a block past ``end``. A block it cannot read (an
    unknown or repeated property, a bad string or value), which paho would answer by
    dropping the connection (and the broker would send the message again, forever), is
    kept whole instead: ``"props":{"raw":"<base64 of the block>"}``. paho's own
    ``Properties.unpack`` costs ~200 µs a message."""
    start, length = _varint(buf, i, end)
    if start < 0 or start + length > end:
        return -1, b""
    stop = start + length
    try:
        return _decode_properties(buf, start, stop)
    except _Undecodable:
        return stop, b',"props":{"raw":"%s"}' % base64.b64encode(buf[start:stop])


class _Undecodable(Exception):
    pass


def _decode_properties(buf: bytes, start: int, stop: int) -> tuple[int, bytes]:
    attrs: dict[str, object] = {}
    user: list[tuple[str, str]] = []
    j = start
    try:
        while j < stop:
            ident = buf[j]
            j += 1
            if ident == 0x26:  # user property: a pair of strings, repeatable
                j, k = _utf8(buf, j, stop)
                j, v = _utf8(buf, j, stop)
                user.append((k, v))
                continue
            if ident == 0x23:
                return -1, b""  # a topic alias: paho's
            name = _PROPERTY.get(ident)
            if name is None or name in attrs:
                raise _Undecodable
            if ident == 0x01:
                if j >= stop or buf[j] > 1:
                    raise _Undecodable
                attrs[name] = buf[j]
                j += 1
            elif ident == 0x02:
                if j + 4 > stop:
                    raise _Undecodable
                attrs[name] = int.from_bytes(buf[j:j + 4], "big")
                j += 4
            elif ident == 0x09:
                n = j + 2 + ((buf[j] << 8) | buf[j + 1])
                if n > stop:
                    raise _Undecodable
                attrs[name] = buf[j + 2:n]
                j = n
            elif ident == 0x0B:  # subscription identifier (the connection's, not kept)
                j, _ = _varint(buf, j, stop)
                if j < 0:
                    raise _Undecodable
            else:  # 0x03 content type, 0x08 response topic
                j, attrs[name] = _utf8(buf, j, stop)
    except (ValueError, IndexError, UnicodeDecodeError):
        raise _Undecodable from None
    if j != stop:
        raise _Undecodable
    if user:
        attrs["UserProperty"] = user
    return stop, props_member(attrs)


#: PUBLISH property identifiers the fast path decodes -> paho's attribute names (0x23, the
#: topic alias, is not here: paho keeps those)
_PROPERTY = {0x01: "PayloadFormatIndicator", 0x02: "MessageExpiryInterval", 0x03: "ContentType",
             0x08: "ResponseTopic", 0x09: "CorrelationData", 0x0B: "SubscriptionIdentifier"}


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """MQTT variable byte integer at ``buf[i]``: (index after it, value), or (-1, 0)
    when it runs past ``end`` or is longer than four bytes."""
    value = 0
    shift = 0
    for j in range(i, min(end, i + 4)):
        b = buf[j]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return j + 1, value
        shift += 7
    return -1, 0

