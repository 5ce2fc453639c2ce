"""Write formats of a topic's segments (the shard map's ``format`` and ``payload_only``).

The recorder always builds one envelope record line per message (shardlog/records.py); a
format decides how buffered lines become segment bytes, how a torn segment is
repaired, and how a segment's lines read back as envelope record lines, so the
history tools see records whatever the format. A segment's format is written in
its name, so a directory may mix formats (a shard whose format changed):

    key             current segment          one record is
    jsonl           +log.jsonl               an envelope line (the default; docs/design.md)
    json            +log.json                an envelope line inside a JSON array
    csv             +log.csv                 a row ts,qos,retain,payload,enc (header first)
    payload.jsonl   +log.payload.jsonl       the JSON payload alone, one a line
    payload.json    +log.payload.json        the JSON payload alone, inside a JSON array

Rotated segments are ``+log.<8+ digits>.<key>`` (``.gz`` once compressed).

Every format keeps one record per physical line, so reading backwards and repairing a
torn tail stay line based:

- ``json``: ``[\\n<r1>,\\n<r2>\\n]\\n``. An append overwrites the closing ``\\n]\\n`` with
  ``,\\n<r3>\\n]\\n`` in one positioned write, so the file is a valid array after every
  flush.
- ``csv``: RFC 4180 quoting (the csv module), CRLF line ends, a header row at the top of
  each segment. A payload that is not UTF-8 or holds a control character other than a
  tab (a line break above all) is written base64 with ``enc`` = ``base64``; otherwise
  ``enc`` is empty and ``payload`` is the text as published.
- payload-only: the JSON payload exactly as published, except that raw line breaks
  (whitespace between JSON tokens: a raw line break inside a JSON string is invalid
  JSON) become spaces. Such a file stores no ts, qos or retain: readers report the
  segment file's mtime as ts (an upper bound of the reception time), qos 0 and retain
  false. A payload that is not JSON is never written to such a file: it goes to the
  quarantine file (raw bytes, a reason, the ``quarantined`` counter).
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import re
import typing
from collections.abc import Iterable, Iterator

from shardlog.records import _DECODE_ERRORS, _json_decode, decode_record, encode_record

KEYS = ("jsonl", "json", "csv", "payload.jsonl", "payload.json")
CSV_COLUMNS = ("ts", "qos", "retain", "payload", "enc")
_CSV_HEADER = b"ts,qos,retain,payload,enc\r\n"
_OPEN = b"[\n"
_CLOSE = b"\n]\n"
_SEP = b",\n"
_NOT_ITEMS = (b"[\n", b"]\n", b"\n")
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f]")  # a tab stays text


def _valid_envelope(item: bytes) -> bool:
    try:
        obj = _json_decode(item)
    except Exception:  # any decoder complaint means "not a record"
        return False
    return isinstance(obj, dict) and isinstance(obj.get("ts"), int) and "payload" in obj


def _valid_json(item: bytes) -> bool:
    if not item:
        return False
    try:
        _json_decode(item)
    except Exception:
        return False
    return True


def _strip(line: bytes) -> bytes:
    """An array item line without its ``,\n`` or ``\n`` (or ``,]\n``: a crash one byte
    into an append, after the comma overwrote the newline before ``]``)."""
    if line.endswith(b",\n"):
        return line[:-2]
    if line.endswith(b",]\n"):
        return line[:-3]
    return line[:-1] if line.endswith(b"\n") else line


class Format:
    """The default, JSON Lines: buffered envelope lines are the file's bytes."""

    key = "jsonl"
    append = True          # O_APPEND writes; False: positioned writes (pwrite)
    closer = b""           # bytes at the end of a segment that the next append overwrites
    has_ts = True          # records carry ts/qos/retain (not payload-only)
    payload_only = False
    extra_lines = 0        # lines of a non-empty segment that are no record

    @property
    def current(self) -> str:
        return f"+log.{self.key}"

    # -- writing -------------------------------------------------------------------

    def item(self, line: bytes) -> bytes | None:
        """What the buffer holds for an envelope line (None: cannot be stored in this
        format). Only payload-only formats change it."""
        return line

    def pack(self, lines: list[bytes], size: int) -> bytes:
        """The bytes to write for buffered ``lines`` into a segment of ``size`` bytes,
        at offset ``size - len(closer)`` (0 for an empty segment)."""
        return b"".join(lines)

    # -- repair --------------------------------------------------------------------

    def valid_line(self, line: bytes) -> bool:
        """May a repaired segment end with this complete line (newline included)?"""
        return _valid_envelope(line)

    def finish(self, tail: bytes, keep: int, at_start: bool) -> tuple[int, bytes]:
        """After ``valid_tail``: (bytes of ``tail`` to keep, bytes to append after them)."""
        return keep, b""

    # -- reading -------------------------------------------------------------------

    def items(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        """What the write buffer held for complete segment lines (envelope lines, or
        payload items of a payload-only format), in their order; lines that hold no
        record (a header, a bracket) are left out."""
        return iter(lines)

    def envelopes(self, lines: Iterable[bytes], mtime_us: int = 0) -> Iterator[bytes]:
        """Envelope record lines (docs/design.md, "Files on disk") of complete segment
        lines, in their order. ``mtime_us``: the segment's mtime, the ts of payload-only
        records."""
        return self.items(lines)

    def first_ts(self, head: list[bytes]) -> int | None:
        """ts of a segment's first record from its first complete lines."""
        for env in self.envelopes(head):
            try:
                return decode_record(env).ts
            except Exception:  # damage: unknown
                return None
        return None


class JsonArray(Format):
    key = "json"
    append = False
    closer = _CLOSE
    extra_lines = 2

    def pack(self, lines: list[bytes], size: int) -> bytes:
        body = _SEP.join([ln[:-1] for ln in lines])
        return (_SEP if size else _OPEN) + body + _CLOSE

    def valid_line(self, line: bytes) -> bool:
        return line not in _NOT_ITEMS and _valid_envelope(_strip(line))

    def finish(self, tail: bytes, keep: int, at_start: bool) -> tuple[int, bytes]:
        if keep == 0:
            return 0, b""  # not one whole record: an empty segment (the next write opens it)
        begin = tail.rfind(b"\n", 0, keep - 1) + 1
        end = begin + len(_strip(tail[begin:keep]))  # the last valid item ends here
        if tail[end:] == _CLOSE:
            return len(tail), b""  # intact
        return end, _CLOSE

    def items(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        for line in lines:
            if line in _NOT_ITEMS:
                continue
            if line.endswith(b",\n"):
                yield line[:-2] + b"\n"
            else:
                yield line


class Csv(Format):
    key = "csv"
    extra_lines = 1

    def pack(self, lines: list[bytes], size: int) -> bytes:
        rows = [_csv_row_of_line(line) for line in lines]
        data = b"".join(rows)
        return data if size else _CSV_HEADER + data

    def valid_line(self, line: bytes) -> bool:
        return line == _CSV_HEADER or parse_csv_line(line) is not None

    def items(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        for line in lines:
            rec = parse_csv_line(line)
            if rec is not None:
                yield encode_record(*rec)


class PayloadLines(Format):
    key = "payload.jsonl"
    has_ts = False
    payload_only = True

    def item(self, line: bytes) -> bytes | None:
        return payload_item(line)

    def valid_line(self, line: bytes) -> bool:
        return _valid_json(line[:-1])

    def items(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        return (line for line in lines if line != b"\n")

    def envelopes(self, lines: Iterable[bytes], mtime_us: int = 0) -> Iterator[bytes]:
        for item in self.items(lines):
            yield encode_record(mtime_us, 0, False, item[:-1])

    def first_ts(self, head: list[bytes]) -> int | None:
        return None


class PayloadArray(JsonArray):
    key = "payload.json"
    has_ts = False
    payload_only = True

    def item(self, line: bytes) -> bytes | None:
        return payload_item(line)

    def valid_line(self, line: bytes) -> bool:
        return line not in _NOT_ITEMS and _valid_json(_strip(line))

    def envelopes(self, lines: Iterable[bytes], mtime_us: int = 0) -> Iterator[bytes]:
        for item in self.items(lines):
            yield encode_record(mtime_us, 0, False, item[:-1])

    def first_ts(self, head: list[bytes]) -> int | None:
        return None


FORMATS: dict[str, Format] = {f.key: f for f in (Format(), JsonArray(), Csv(), PayloadLines(),
                                                 PayloadArray())}
JSONL = FORMATS["jsonl"]
CURRENTS = tuple(f.current for f in FORMATS.values())


def get(format: str, payload_only: bool = False) -> Format:
    """The format of a shard's settings (``payload_only`` with csv is refused by config)."""
    return FORMATS[f"payload.{format}" if payload_only else format]


def of_name(name: str) -> Format:
    """The format of a segment file name (``+log.json``, ``+log.00000003.csv.gz``, ...)."""
    name = name.removesuffix(".gz")
    for key in ("payload.jsonl", "payload.json", "jsonl", "json", "csv"):
        if name.endswith("." + key):
            return FORMATS[key]
    return JSONL


# -- the pure pieces ------------------------------------------------------------------------

def payload_item(line: bytes) -> bytes | None:
    """The stored item of a payload-only shard for an envelope line: the JSON payload
    with raw line breaks made spaces, newline added; None if the payload is not JSON."""
    i = line.find(b',"payload":')
    if i < 0:
        return None
    if b',"enc":' not in line[:i]:  # embedded JSON: the bytes as published
        return line[i + 11:line.rindex(b"}")] + b"\n"
    try:
        rec = decode_record(line)
    except (ValueError, KeyError, *_DECODE_ERRORS):
        return None
    raw = rec.payload
    if b"\n" not in raw and b"\r" not in raw:
        return None  # encode_record only makes JSON text when it is not JSON
    flat = raw.replace(b"\r", b" ").replace(b"\n", b" ")
    return flat + b"\n" if _valid_json(flat) else None


def csv_row(ts: int, qos: int, retain: bool, payload: bytes) -> list[object]:
    """The CSV columns of one record (CSV_COLUMNS)."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and _CONTROL.search(text) is None:
        return [ts, qos, "true" if retain else "false", text, ""]
    return [ts, qos, "true" if retain else "false", base64.b64encode(payload).decode("ascii"), "base64"]


def _csv_quote(field: bytes) -> bytes:
    """RFC 4180 quoting of a field without line breaks (quoted only when needed)."""
    if b'"' in field or b"," in field:
        return b'"' + field.replace(b'"', b'""') + b'"'
    return field


def _csv_row_of_line(line: bytes) -> bytes:
    """The CSV row (CRLF included) of an envelope line. A JSON payload (strict, on one
    line: valid UTF-8 with no control character but a tab) is cut out of the line as is;
    the others go through csv_row and the csv module."""
    if line.startswith(b'{"ts":'):
        a = line.find(b',"qos":', 6)
        b = line.find(b',"retain":', a)
        if a > 0 and b == a + 8:
            flag = line[b + 10:b + 15]
            retain = flag == b"true,"
            rest = b + (15 if retain else 16)
            if (retain or flag == b"false") and line.startswith(b'"payload":', rest):
                return b"%s,%c,%s,%s,\r\n" % (line[6:a], line[a + 7], b"true" if retain else b"false",
                                              _csv_quote(line[rest + 10:line.rindex(b"}")]))
    rec = decode_record(line)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(csv_row(rec.ts, rec.qos, rec.retain, rec.payload))
    return buf.getvalue().encode("utf-8")


def parse_csv_line(line: bytes) -> tuple[int, int, bool, bytes] | None:
    """(ts, qos, retain, payload bytes) of one complete CSV row; None if it is none."""
    if not line.endswith(b"\n"):
        return None
    try:
        rows = list(csv.reader([line.decode("utf-8")], strict=True))
    except (UnicodeDecodeError, csv.Error):
        return None
    if len(rows) != 1 or len(rows[0]) != 5:
        return None
    ts, qos, retain, payload, enc = rows[0]
    if not ts.isdigit() or qos not in ("0", "1", "2") or retain not in ("true", "false"):
        return None
    raw = csv_payload(payload, enc)
    if raw is None:
        return None
    return int(ts), int(qos), retain == "true", raw


def csv_payload(payload: str, enc: str) -> bytes | None:
    """The payload bytes of a CSV row's ``payload`` and ``enc`` fields; None if invalid."""
    if enc == "":
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError:
            return None
    if enc == "base64":
        try:
            return base64.b64decode(payload, validate=True)
        except binascii.Error:
            return None
    return None


def valid_tail(f: typing.BinaryIO, size: int, valid: typing.Callable[[bytes], bool],
               chunk: int = 64 * 1024) -> tuple[int, bytes, int]:
    """Read the end of a segment and find where its last valid line ends.

    Returns (offset of ``tail`` in the file, ``tail``, length of ``tail`` to keep).
    Reads further back (in growing chunks) while the line under test starts before
    the chunk, so a torn 10 MiB record is found and cut too."""
    while True:
        start = max(0, size - chunk)
        f.seek(start)
        tail = f.read(size - start)
        end = len(tail)
        while end > 0:
            if tail[end - 1] != 0x0A:  # an unterminated (torn) last line
                nl = tail.rfind(b"\n", 0, end)
                if nl < 0 and start > 0:
                    break
                end = nl + 1
                continue
            begin = tail.rfind(b"\n", 0, end - 1) + 1
            if begin == 0 and start > 0:
                break
            if valid(tail[begin:end]):
                return start, tail, end
            end = begin
        else:
            return start, tail, 0
        chunk *= 4


def repair(fmt: Format, data: bytes) -> tuple[int, bytes]:
    """What crash repair makes of a whole segment ``data``: (bytes to keep, bytes to
    append after them). ``data[keep:]`` is what is cut (and quarantined)."""
    start, tail, keep = valid_tail(io.BytesIO(data), len(data), fmt.valid_line)
    keep, suffix = fmt.finish(tail, keep, start == 0)
    return start + keep, suffix
