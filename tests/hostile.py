"""A shared corpus of hostile topics and payloads.

Imported by the topic mapping tests, the recorder tests and the
fault-injection suite.  Every list is plain data; nothing here does I/O.

- ``HOSTILE_TOPICS``: legal MQTT topic names (valid UTF-8, no NUL, no
  ``+``/``#``, at most 65535 bytes) that try to break the topic -> path
  mapping.  Each must be stored, stay inside the root and round-trip.
- ``ILLEGAL_TOPICS``: strings that are not legal PUBLISH topic names (they
  contain wildcards), chiefly ones named like the recorder's own files.  They
  must still encode safely if they ever reach the mapping.
- ``TOO_LONG_PATH_TOPICS``: legal topics whose directory path is longer than
  Linux's PATH_MAX (4096): they cannot be stored and must be quarantined.
- ``INVALID_TOPIC_BYTES``: raw PUBLISH topic fields that ``topic_from_bytes``
  must reject (and the recorder must quarantine, never drop).
- ``HOSTILE_PAYLOADS`` and ``big_payload()``: message bodies for the record
  encoder (JSON / UTF-8 text / base64 and strict-JSON output).
"""

from __future__ import annotations

__all__ = [
    "HOSTILE_TOPICS",
    "ILLEGAL_TOPICS",
    "TOO_LONG_PATH_TOPICS",
    "INVALID_TOPIC_BYTES",
    "HOSTILE_PAYLOADS",
    "DEEP_JSON_DEPTH",
    "big_payload",
]

HOSTILE_TOPICS: list[str] = [
    # --- ordinary, as a baseline
    "chat/room42",  # plain topic, must map to itself
    "a",  # single level
    # --- path traversal and dot levels
    "../x",  # classic traversal
    "../../etc/passwd",  # deeper traversal
    "..",  # parent directory as the whole topic
    ".",  # current directory as the whole topic
    "./.",  # two current-directory levels
    "a/../../b",  # traversal in the middle
    "a/./b",  # dot level in the middle
    "...",  # three dots: an ordinary name, kept as is
    ".hidden",  # hidden-file name, kept as is
    "a/.git/config",  # looks like a VCS directory
    # --- slashes and empty levels
    "/",  # two empty levels
    "//",  # three empty levels
    "/x",  # leading slash: empty first level
    "x/",  # trailing slash: empty last level
    "a//b",  # empty middle level
    "///a///",  # many empty levels
    # --- control characters (NUL is illegal in MQTT, the rest are legal)
    "a\x01b",  # C0 control
    "\x1f",  # last C0 control
    "tab\there",  # horizontal tab
    "line\nbreak",  # newline inside a level (JSON Lines, log injection)
    "carriage\rreturn",  # CR inside a level
    "\r\n",  # CRLF as the whole level
    "del\x7f",  # DEL
    "c1\x80\x85\x9f",  # C1 controls (U+0085 is NEL, a line break for some tools)
    "\x1b[31mred\x1b[0m",  # ANSI escape sequence (terminal injection)
    # --- percent signs and things that look like our own encoding
    "%",  # the encoding of an empty level, as a literal
    "%2E",  # the encoding of ".", as a literal
    "%2E%2E/x",  # the encoding of "..", as a literal
    "%25",  # an encoded percent, as a literal
    "%2e",  # lowercase escape, as a literal
    "%2F",  # an encoded slash, as a literal
    "%00",  # an encoded NUL, as a literal
    "%~",  # the hashed-name marker, as a literal
    "x%~0123456789abcdef0123456789abcdef",  # looks exactly like a hashed name
    "%%",  # double percent
    "%zz",  # percent with non-hex digits
    "%2Blog.jsonl",  # looks like an encoded recorder file name
    # --- backslashes (path separators elsewhere)
    "..\\..\\x",  # Windows-style traversal
    "\\",  # a lone backslash
    "a\\b/c",  # backslash inside a level
    # --- names like the recorder's files, without the "+"
    "log.jsonl",  # recorder file name without its "+"
    "x/\uff0btopic",  # fullwidth plus U+FF0B, looks like "+topic"
    # --- case twins (case-insensitive file systems would merge them)
    "Chat",  # upper-case twin of "chat"
    "chat",  # lower-case twin of "Chat"
    "CHAT/Room",  # all-caps twin
    # --- Unicode normalisation and confusables
    "caf\u00e9",  # "café" in NFC (precomposed)
    "cafe\u0301",  # "café" in NFD (e + combining acute); must stay distinct from NFC
    "evil\u202etxt.exe",  # RTL override U+202E
    "zero\u200dwidth",  # zero-width joiner U+200D
    "\u200b",  # zero-width space as the whole level
    "a\uff0fb",  # fullwidth solidus U+FF0F, not a level separator
    "a\u2215b",  # division slash U+2215, not a level separator
    "a\u2044b",  # fraction slash U+2044
    "\u2028\u2029",  # line and paragraph separators (JS line terminators)
    "\ufeffbom",  # byte order mark at the start of a level
    "\ufffe\uffff",  # noncharacters
    "emoji/\U0001f600/\U0001f468\u200d\U0001f469\u200d\U0001f467",  # emoji and a ZWJ sequence
    "\U0010fffd",  # last private-use plane character (4-byte UTF-8)
    # --- length limits of a single level
    "a" * 255,  # exactly 255 bytes: the longest name kept as is
    "a" * 256,  # 256 bytes: one too many, must be hashed
    "\u00e9" * 500,  # 1000 bytes of 2-byte characters, must be hashed
    "\U0001f600" * 250,  # 1000 bytes of 4-byte characters, must be hashed
    "a" * 254 + "\u00e9",  # 256 bytes ending in a multibyte character
    "%" * 85,  # 85 bytes that encode to 255 bytes: kept (at the limit)
    "%" * 86,  # 86 bytes that encode to 258 bytes: hashed
    "a" * 250 + "\n" * 3,  # escape triples straddling the cut point
    # --- depth
    "/".join(f"l{i}" for i in range(100)),  # 100 levels deep
    "/".join(["x"] * 100),  # 100 identical levels
    # --- $-topics and shared subscriptions
    "$SYS/broker/load",  # broker statistics topic
    "$share/x",  # looks like a shared-subscription filter
    "$",  # lone dollar
    # --- shell, URL and quoting metacharacters
    " ",  # a single space
    " leading and trailing ",  # spaces at the ends of a level
    "a.",  # trailing dot (stripped by Windows)
    "\"double\" 'single' `back`",  # quotes
    "~",  # home directory in a shell
    "~root/.ssh",  # tilde-user expansion
    "what?",  # URL query
    "a&b=c",  # URL parameters
    "a;b",  # shell command separator
    "*",  # shell glob
    "[a-z]{1,2}",  # glob and regex metacharacters
    "$(rm -rf ~)",  # command substitution
    "-rf",  # looks like an option
    "<script>alert(1)</script>",  # HTML injection
    "a:b|c>d<e",  # Windows-forbidden characters
    "CON/NUL/aux/COM1/LPT1",  # Windows reserved device names
    "\uff03",  # fullwidth number sign U+FF03, looks like "#"
]

ILLEGAL_TOPICS: list[str] = [
    "+log.jsonl",  # the recorder's current segment
    "+log.00000041.jsonl",  # a rotated segment
    "+recent.json",  # the recent-records file
    "+shard.lock",  # the shard lock file
    "+quarantine.jsonl",  # the quarantine file
    "+topic",  # the full-topic file beside hashed names
    "a/+log.jsonl",  # recorder file name one level down
    "#",  # multi-level wildcard
    "a/#",  # multi-level wildcard at the end
    "+",  # single-level wildcard
    "a/+/b",  # single-level wildcard in the middle
    "a+b#c",  # wildcard characters inside a level
]

TOO_LONG_PATH_TOPICS: list[str] = [
    "/".join(["d" * 250] * 20),  # 20 levels of 250 bytes: over 5000 bytes of path
    "/".join(["\u00e9" * 120] * 20),  # multibyte: 20 levels of 240 bytes
    "/".join(["%%"] * 600),  # 600 short levels that grow: "%%" -> "%25%25", 4800 bytes
]

INVALID_TOPIC_BYTES: list[bytes] = [
    b"",  # empty topic
    b"\x00",  # NUL alone
    b"a/\x00/b",  # NUL inside
    b"a\x00",  # trailing NUL (C string truncation)
    b"\xff",  # never valid in UTF-8
    b"\xfe\xff",  # UTF-16 BOM bytes
    b"\x80",  # lone continuation byte
    b"a/\xbf/b",  # continuation byte inside a topic
    b"\xc3",  # truncated 2-byte sequence
    b"a\xe2\x82",  # truncated 3-byte sequence
    b"\xf0\x9f\x98",  # truncated 4-byte sequence
    b"\xc0\xaf",  # overlong "/" (2 bytes)
    b"\xe0\x80\xaf",  # overlong "/" (3 bytes)
    b"\xf0\x80\x80\xaf",  # overlong "/" (4 bytes)
    b"\xc0\xae\xc0\xae/x",  # overlong ".." (traversal via overlong dots)
    b"\xc0\x80",  # overlong NUL (Java's modified UTF-8)
    b"\xed\xa0\x80",  # lone high surrogate U+D800 encoded as UTF-8
    b"\xed\xbf\xbf",  # lone low surrogate U+DFFF encoded as UTF-8
    b"\xed\xa0\xbd\xed\xb8\x80",  # CESU-8 surrogate pair for U+1F600
    b"\xf4\x90\x80\x80",  # beyond U+10FFFF
    b"\xf8\x88\x80\x80\x80",  # 5-byte sequence (obsolete)
    b"caf\xe9",  # Latin-1, not UTF-8
    b"+",  # single-level wildcard
    b"#",  # multi-level wildcard
    b"a/+/b",  # wildcard in the middle
    b"sport/#",  # wildcard at the end
    b"+log.jsonl",  # recorder file name
    b"a" * 65536,  # one byte over the MQTT limit of 65535
    b"a/" * 40000,  # far over the limit, many levels
]

DEEP_JSON_DEPTH = 10_000

HOSTILE_PAYLOADS: list[bytes] = [
    b"",  # empty payload (also: a retained-message delete)
    b"\xff\xfe\xfd",  # invalid UTF-8
    b"\x00\x01\x02\x00binary\x00",  # binary with NULs
    b"\xc0\x80",  # overlong NUL
    b"\xed\xa0\x80",  # lone surrogate encoded as UTF-8
    b'{"a":\n1}',  # raw newline inside JSON whitespace (valid JSON, breaks JSON Lines)
    b'{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}\n',  # pretty-printed JSON
    b"\r\n",  # whitespace only (not JSON)
    b"NaN",  # not strict JSON
    b"Infinity",  # not strict JSON
    b"-Infinity",  # not strict JSON
    b'{"a": NaN}',  # NaN nested in an object
    b"1e400",  # a number that overflows a double
    b"-0",  # negative zero
    b"123456789012345678901234567890",  # integer beyond 64 bits
    b"[" * DEEP_JSON_DEPTH + b"]" * DEEP_JSON_DEPTH,  # 10,000 deep array (recursion limits)
    b'{"a":' * DEEP_JSON_DEPTH + b"1" + b"}" * DEEP_JSON_DEPTH,  # 10,000 deep object
    b'"\\ud800"',  # lone surrogate escape in a JSON string
    b'"\\udc00\\ud800"',  # surrogate escapes in the wrong order
    b'"\\u0000"',  # escaped NUL in a JSON string
    b'\xef\xbb\xbf{"a": 1}',  # UTF-8 BOM followed by JSON
    '"line\u2028sep\u2029"'.encode(),  # U+2028/U+2029 in a string (JS line terminators)
    b'"a\nb"',  # raw newline inside a string (invalid JSON, valid text)
    b'"a\tb"',  # raw tab inside a string (invalid JSON, valid text)
    b'{"a":1}{"b":2}',  # two JSON documents
    b'{"a":1}\n{"b":2}\n',  # JSON Lines in one payload
    b'{"a":1,"a":2}',  # duplicate keys
    b'{"a":1',  # truncated JSON
    b"null",  # JSON null
    b'{"__proto__": {"polluted": true}}',  # prototype pollution for browser readers
    b"\x1b[2J\x1b[31mred",  # ANSI escapes (terminal injection)
    b'"\xff"',  # JSON string with an invalid UTF-8 byte
]


def big_payload(n: int = 10 * 2**20) -> bytes:
    """A valid JSON string payload of exactly ``n`` bytes (default 10 MiB).

    Built on demand so importing this module stays cheap.
    """
    if n < 2:
        raise ValueError("n must be at least 2")
    return b'"' + b"x" * (n - 2) + b'"'
