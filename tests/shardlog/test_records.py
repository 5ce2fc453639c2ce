"""Record lines: always one line of strict JSON, original payload bytes recoverable."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlog.records import decode_record, encode_record
from tests import hostile


def strict_json(line: bytes) -> dict:
    """Parse like a browser's JSON.parse: no NaN/Infinity, one line, UTF-8."""
    def no_constants(name: str) -> None:
        raise ValueError(f"non-standard constant {name}")
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and b"\r" not in line
    return json.loads(line.decode("utf-8"), parse_constant=no_constants)


def check(payload: bytes, qos: int = 1, retain: bool = False) -> dict:
    line = encode_record(1763815800123456, qos, retain, payload)
    obj = strict_json(line)
    assert list(obj)[:3] == ["ts", "qos", "retain"] and list(obj)[-1] == "payload"
    rec = decode_record(line)
    assert rec.payload == payload
    assert (rec.ts, rec.qos, rec.retain) == (1763815800123456, qos, retain)
    return obj


def test_json_payload_is_embedded() -> None:
    obj = check(b'{"user": "ann", "text": "hi"}')
    assert obj["payload"] == {"user": "ann", "text": "hi"} and "enc" not in obj


def test_text_and_binary_are_marked() -> None:
    assert check(b"hello")["enc"] == "utf8"
    assert check(b"\xff\x00\x01")["enc"] == "base64"
    assert check(b"")["enc"] == "utf8"


@pytest.mark.parametrize("payload", [b"NaN", b'{"a": NaN}', b"Infinity", b"-Infinity", b'{"a":\n1}', b"[1,\r\n2]",
                                     b"\xef\xbb\xbf{}", b'"a\x01b"', b"1e999"])
def test_not_strict_json_is_stored_as_text(payload: bytes) -> None:
    assert check(payload)["enc"] == "utf8"


@pytest.mark.parametrize("payload", hostile.HOSTILE_PAYLOADS, ids=range(len(hostile.HOSTILE_PAYLOADS)))
def test_hostile_payloads(payload: bytes) -> None:
    check(payload, qos=0, retain=True)


def test_big_payload() -> None:
    check(hostile.big_payload(2 * 2**20))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.sampled_from([0, 1]), st.booleans())
def test_any_bytes_round_trip(payload: bytes, qos: int, retain: bool) -> None:
    check(payload, qos, retain)


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_any_json_value_is_embedded_verbatim(value: object) -> None:
    payload = json.dumps(value, ensure_ascii=False).encode()
    obj = check(payload)
    assert "enc" not in obj and obj["payload"] == value


@pytest.mark.parametrize("payload", [b"0\t", b" {}", b'{"a": 1} ', b"\t[1]\t"])
def test_json_with_blanks_around_it_comes_back_byte_for_byte(payload: bytes) -> None:
    """Embedded as JSON, ``0\\t`` read back as ``0`` (hypothesis found it through the csv format):
    such a payload is stored as text, and every reader gets the bytes that were sent."""
    line = encode_record(1, 0, False, payload)
    assert b'"enc":"utf8"' in line and decode_record(line).payload == payload
