"""Map MQTT topic names to relative directory paths, reversibly and safely.

A topic is split on ``/`` into levels and each level becomes one directory
name.  The mapping of one level (``encode_level``) is:

* Every character is kept as is, except the ones below, so that ordinary
  topics read naturally on disk and in URLs: ``chat/room42`` -> ``chat/room42``.
* ``%``, ``+``, ``#``, ``\\`` and the control characters (C0 U+0000-U+001F,
  DEL U+007F, C1 U+0080-U+009F) are percent-encoded as ``%XX`` (uppercase hex)
  of their UTF-8 bytes: ``a%b`` -> ``a%25b``, ``a\\nb`` -> ``a%0Ab``,
  U+0085 -> ``%C2%85``.  ``/`` never occurs inside a level.
* Whole-level forms: the empty level is ``%``, ``.`` is ``%2E`` and ``..`` is
  ``%2E%2E``.  So ``/x`` -> ``%/x``, ``a//b`` -> ``a/%/b``,
  ``../../etc`` -> ``%2E%2E/%2E%2E/etc``.  (``.`` is encoded only when it is
  the whole level; ``...`` or ``.hidden`` are kept as is.)
* A level whose encoded name is longer than ``max_name`` UTF-8 bytes (default
  ``MAX_NAME_BYTES`` = 255, the usual file system limit) gets a hashed name:
  a readable prefix of the encoded name (cut on a character boundary, never
  inside a ``%XX`` triple), the marker ``%~``, then the first 32 lowercase
  hex digits of sha256 of the level's UTF-8 bytes; the total is at most
  ``max_name`` bytes.

Properties this gives:

* No directory name is empty, ``.`` or ``..``, contains ``/`` or NUL, or
  starts with ``+`` (``+`` is always encoded), so no topic can collide with
  the recorder's own ``+``-named files.
* In a non-hashed name a ``%`` is always followed by two uppercase hex
  digits, or is the whole name; so ``%~`` never arises from plain encoding
  and hashed names are recognisable (``is_hashed_name``).
* ``decode_level`` is strict: it accepts exactly the names ``encode_level``
  produces (same ``max_name``), so the mapping is a bijection between levels
  and non-hashed names.  A hashed name cannot be decoded from the name alone
  (``HashedNameError``); the writer stores the full topic in a ``+topic``
  file in that directory so readers can reverse it.

``topic_from_bytes`` validates a raw PUBLISH topic name, and ``safe_join`` is
the final guard (like Werkzeug's ``safe_join``) that a relative path stays
inside a root directory even in the presence of symlinks on disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_TOPIC_BYTES",
    "HASH_MARKER",
    "HASH_HEX_CHARS",
    "TopicError",
    "HashedNameError",
    "PathEscapeError",
    "encode_level",
    "decode_level",
    "is_hashed_name",
    "topic_to_relpath",
    "relpath_to_topic",
    "topic_from_bytes",
    "safe_join",
]

#: Longest directory name, in UTF-8 bytes, that encode_level produces.
MAX_NAME_BYTES = 255
#: Longest topic name MQTT allows (a 16-bit length prefix).
MAX_TOPIC_BYTES = 65535
#: Separates the readable prefix from the hash in a hashed name.
HASH_MARKER = "%~"
#: Number of hex digits of sha256 kept in a hashed name.
HASH_HEX_CHARS = 32
_HASH_SUFFIX_BYTES = len(HASH_MARKER) + HASH_HEX_CHARS  # 34

_EMPTY_NAME = "%"
_DOT_NAME = "%2E"
_DOTDOT_NAME = "%2E%2E"
_WHOLE_LEVEL_NAMES = {"": _EMPTY_NAME, ".": _DOT_NAME, "..": _DOTDOT_NAME}
_WHOLE_LEVEL_DECODE = {v: k for k, v in _WHOLE_LEVEL_NAMES.items()}

# Characters that are percent-encoded.
_ESCAPE_CLASS = "%+#\\\\\x00-\x1f\x7f-\x9f"
_ESCAPE_RE = re.compile(f"[{_ESCAPE_CLASS}]")
_ESCAPE_CHAR_RE = re.compile(f"[{_ESCAPE_CLASS}]\\Z")
# Everything that sends encode_level off its fast path: characters to
# escape, "/" (an error) and lone surrogates (not encodable as UTF-8).
_SLOW_ENCODE_RE = re.compile(f"[{_ESCAPE_CLASS}/\ud800-\udfff]")
# Everything that sends decode_level off its fast path: "%" starts an escape;
# the rest (raw characters that should have been escaped, "/", surrogates)
# is an error.
_SLOW_DECODE_RE = _SLOW_ENCODE_RE
# A maximal run of escapes in a name (uppercase hex only).
_ESCAPE_RUN_RE = re.compile(r"(?:%[0-9A-F]{2})+")
_HASHED_NAME_RE = re.compile(r"(?:[^%/]|%[0-9A-F]{2})*%~[0-9a-f]{32}\Z")


class TopicError(ValueError):
    """A topic, level or directory name that cannot be mapped.

    ``reason`` is a short, stable code (``invalid-utf8``, ``nul``, ``empty``,
    ``wildcard``, ``too-long``, ``bad-level``, ``bad-name``, ``hashed``,
    ``path-escape``) suitable for counters and quarantine records.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class HashedNameError(TopicError):
    """A directory name is a hashed name: the level cannot be recovered from it.

    Read the ``+topic`` file in that directory instead.
    """

    def __init__(self, message: str, reason: str = "hashed") -> None:
        super().__init__(message, reason)


class PathEscapeError(TopicError):
    """A relative path would leave (or is not a proper path below) the root."""

    def __init__(self, message: str, reason: str = "path-escape") -> None:
        super().__init__(message, reason)


def _check_max_name(max_name: int) -> None:
    if max_name <= _HASH_SUFFIX_BYTES:
        raise ValueError(f"max_name must be greater than {_HASH_SUFFIX_BYTES}, got {max_name}")


def _escape_char(m: re.Match[str]) -> str:
    return "".join(f"%{b:02X}" for b in m.group().encode("utf-8"))


def _hashed_name(level: str, encoded: str, encoded_len: int, max_name: int) -> str:
    digest = hashlib.sha256(level.encode("utf-8")).hexdigest()[:HASH_HEX_CHARS]
    raw = encoded.encode("utf-8")
    cut = min(encoded_len, max_name - _HASH_SUFFIX_BYTES)
    # Back off to a character boundary (skip UTF-8 continuation bytes) ...
    # (cut < len(raw) always holds: the encoded name is longer than max_name).
    while cut > 0 and 0x80 <= raw[cut] < 0xC0:
        cut -= 1
    # ... and out of a %XX triple.  Every "%" in an encoded long name starts
    # a triple (hex digits are never "%"), so only the last two bytes matter.
    if cut >= 1 and raw[cut - 1] == 0x25:
        cut -= 1
    elif cut >= 2 and raw[cut - 2] == 0x25:
        cut -= 2
    return raw[:cut].decode("utf-8") + HASH_MARKER + digest


def encode_level(level: str, max_name: int = MAX_NAME_BYTES) -> str:
    """Return the directory name for one topic level.

    Raises ``TopicError`` if ``level`` contains ``/`` or a lone surrogate.
    """
    if not _SLOW_ENCODE_RE.search(level):
        # Fast path: nothing to escape.
        if level in _WHOLE_LEVEL_NAMES:
            return _WHOLE_LEVEL_NAMES[level]
        if len(level) <= max_name >> 2:  # at most 4 bytes per character
            return level
        n = len(level.encode("utf-8"))
        if n <= max_name:
            return level
        _check_max_name(max_name)
        return _hashed_name(level, level, n, max_name)
    if "/" in level:
        raise TopicError(f"topic level contains '/': {level!r}", "bad-level")
    try:
        level.encode("utf-8")
    except UnicodeEncodeError:
        raise TopicError(f"topic level is not valid Unicode (lone surrogate): {level!r}", "invalid-utf8") from None
    encoded = _ESCAPE_RE.sub(_escape_char, level)
    n = len(encoded.encode("utf-8"))
    if n <= max_name:
        return encoded
    _check_max_name(max_name)
    return _hashed_name(level, encoded, n, max_name)


def is_hashed_name(name: str) -> bool:
    """True if ``name`` has the form of a hashed (shortened) directory name."""
    return HASH_MARKER in name and _HASHED_NAME_RE.match(name) is not None


def _decode_run(m: re.Match[str]) -> str:
    run = m.group()
    try:
        text = bytes.fromhex(run.replace("%", "")).decode("utf-8")
    except UnicodeDecodeError:
        raise TopicError(f"escape sequence {run!r} is not valid UTF-8", "bad-name") from None
    for ch in text:
        if not _ESCAPE_CHAR_RE.match(ch):
            raise TopicError(f"escape sequence {run!r} encodes {ch!r}, which is never escaped", "bad-name")
    return text


def decode_level(name: str, max_name: int = MAX_NAME_BYTES) -> str:
    """Return the topic level a directory name stands for.

    Strict inverse of ``encode_level`` (with the same ``max_name``): any name
    that ``encode_level`` cannot produce raises ``TopicError``; a hashed name
    raises ``HashedNameError``.
    """
    if not _SLOW_DECODE_RE.search(name):
        # Fast path: no escapes, nothing forbidden.
        if not name or name in (".", ".."):
            raise TopicError(f"not a valid directory name: {name!r}", "bad-name")
        if len(name) > max_name >> 2 and len(name.encode("utf-8")) > max_name:
            raise TopicError(f"name longer than {max_name} bytes: {name[:40]!r}...", "bad-name")
        return name
    if name in _WHOLE_LEVEL_DECODE:
        return _WHOLE_LEVEL_DECODE[name]
    if is_hashed_name(name):
        raise HashedNameError(f"hashed name, read the +topic file instead: {name!r}")
    level = _ESCAPE_RUN_RE.sub(_decode_run, name)
    # Whatever is left outside the escape runs must be plain characters.
    rest = _ESCAPE_RUN_RE.sub("", name)
    bad = _SLOW_DECODE_RE.search(rest)
    if bad:
        raise TopicError(f"name contains {bad.group()!r} where an escape is required: {name!r}", "bad-name")
    # Belt and braces: exact inverse (also catches length and whole-level forms).
    if encode_level(level, max_name) != name:
        raise TopicError(f"not a canonical encoded name: {name!r}", "bad-name")
    return level


def topic_to_relpath(topic: str, max_name: int = MAX_NAME_BYTES) -> str:
    """Return the relative directory path (levels joined by ``/``) for a topic.

    Does not check MQTT legality (see ``topic_from_bytes``): wildcards and
    NUL are simply encoded.  Raises ``TopicError`` for lone surrogates.
    """
    return "/".join([encode_level(level, max_name) for level in topic.split("/")])


def relpath_to_topic(relpath: str, max_name: int = MAX_NAME_BYTES) -> str:
    """Reverse ``topic_to_relpath``.

    Raises ``TopicError`` if any component is not a valid encoded name, and
    otherwise ``HashedNameError`` if any component is a hashed name.
    """
    levels: list[str] = []
    hashed: str | None = None
    for name in relpath.split("/"):
        try:
            levels.append(decode_level(name, max_name))
        except HashedNameError:
            hashed = name
    if hashed is not None:
        raise HashedNameError(f"path contains a hashed name, read its +topic file: {hashed!r}")
    return "/".join(levels)


def topic_from_bytes(raw: bytes) -> str:
    """Decode and validate the topic name of a PUBLISH packet.

    Raises ``TopicError`` (with ``reason``) for: longer than 65535 bytes
    (``too-long``), empty (``empty``), invalid UTF-8 including overlong forms
    and encoded surrogates (``invalid-utf8``), U+0000 (``nul``), and the
    wildcard characters ``+``/``#`` (``wildcard``).
    """
    raw = bytes(raw)
    if len(raw) > MAX_TOPIC_BYTES:
        raise TopicError(f"topic is {len(raw)} bytes, MQTT allows at most {MAX_TOPIC_BYTES}", "too-long")
    if not raw:
        raise TopicError("empty topic", "empty")
    try:
        topic = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TopicError(f"topic is not valid UTF-8: {e.reason} at byte {e.start}", "invalid-utf8") from None
    if "\x00" in topic:
        raise TopicError("topic contains U+0000", "nul")
    if "+" in topic or "#" in topic:
        raise TopicError("topic contains a wildcard character ('+' or '#')", "wildcard")
    return topic


def safe_join(root_real: str, relpath: str, resolve: bool = True) -> str:
    """Join ``relpath`` to ``root_real``, refusing anything that could escape it.

    ``root_real`` must be an absolute, already resolved path
    (``os.path.realpath``).  Rejects absolute ``relpath``s, NUL, and any
    component that is empty, ``.`` or ``..``; then checks that the joined
    path, with symlinks on disk resolved, is ``root_real`` or below it.
    Returns the joined, unresolved path.  Raises ``PathEscapeError``.
    ``resolve=False`` skips the check on disk (no system calls): for a path that is
    checked again, resolved, right before it is first used.
    """
    if not os.path.isabs(root_real):
        raise PathEscapeError(f"root is not an absolute path: {root_real!r}")
    if "\x00" in relpath:
        raise PathEscapeError(f"path contains NUL: {relpath!r}")
    if os.path.isabs(relpath):
        raise PathEscapeError(f"path is absolute: {relpath!r}")
    parts = [relpath]
    for sep in (os.sep, os.altsep):
        if sep:
            parts = [p for part in parts for p in part.split(sep)]
    for part in parts:
        if part in ("", ".", ".."):
            raise PathEscapeError(f"path has an empty, '.' or '..' component: {relpath!r}")
    joined = os.path.join(root_real, relpath)
    if not resolve or not _has_symlink(root_real, parts):
        return joined  # no symlink below the (resolved) root: the path is inside it
    real = os.path.realpath(joined)
    root = root_real.rstrip(os.sep) or os.sep
    if real != root and not real.startswith(root if root == os.sep else root + os.sep):
        raise PathEscapeError(f"path resolves outside the root: {relpath!r} -> {real!r}")
    return joined


def _has_symlink(root_real: str, parts: list[str]) -> bool:
    """Is any existing level of ``root_real/parts...`` a symlink? One lstat per level
    below the root (realpath would lstat the root's own levels too); a missing level
    ends the walk, since nothing below it exists."""
    path = root_real
    for part in parts:
        path = os.path.join(path, part)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                return True
        except FileNotFoundError:
            return False
        except NotADirectoryError:
            return False  # a file where a directory should be: opening below it fails
    return False
