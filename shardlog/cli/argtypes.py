"""argparse types for the command line: a malformed value is a usage error (exit 64, with the
verb's usage line) before the verb does anything, never a traceback later on.

Each returns an ``argparse`` ``type=`` callable; its ``__name__`` is what argparse names in
``invalid <name> value``."""

from __future__ import annotations

import math
import urllib.parse
from argparse import ArgumentTypeError
from collections.abc import Callable

#: seconds: the longest a socket or an Event accepts (threading.TIMEOUT_MAX is larger)
MAX_SECONDS = 365 * 86400.0


def seconds(minimum: float = 0.0, exclusive: bool = True) -> Callable[[str], float]:
    """A finite number of seconds above ``minimum`` (or at least it), at most a year."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        low_ok = value > minimum if exclusive else value >= minimum
        if not math.isfinite(value) or not low_ok or value > MAX_SECONDS:
            bound = f"> {minimum:g}" if exclusive else f">= {minimum:g}"
            raise ArgumentTypeError(f"expected seconds {bound} and at most {MAX_SECONDS:g}, got {text!r}")
        return value
    parse.__name__ = "seconds"
    return parse


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A decimal integer within [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            top = f" and <= {maximum}" if maximum is not None else ""
            raise ArgumentTypeError(f"expected an integer >= {minimum}{top}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def http_url(text: str) -> str:
    """``http://host:port`` (or https): the supervisor's address."""
    try:
        u = urllib.parse.urlsplit(text)
        port = u.port  # raises for a port out of range
    except ValueError as exc:
        raise ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}: {exc}") from None
    if u.scheme not in ("http", "https") or not u.hostname or (port is not None and port == 0):
        raise ArgumentTypeError(f"expected http://HOST:PORT, got {text!r}")
    return text
