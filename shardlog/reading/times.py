"""Time arguments of the history API and the command line: µs ints, datetimes, ISO 8601. Pure."""

from __future__ import annotations

import datetime as _dt
from typing import TypeAlias

#: a ``since`` or ``until`` argument: µs (int), a datetime, an ISO 8601 string, or None
TimeArg: TypeAlias = float | str | _dt.datetime | None


def parse_time(value: TimeArg) -> int | None:
    """µs since the epoch from an int (µs), a datetime (naive = UTC) or an ISO 8601
    string (naive = UTC; a plain integer string is µs). ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a time: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        s = value.strip()
        if s.lstrip("-").isdigit():
            return int(s)
        if s.endswith(("Z", "z")):
            s = s[:-1] + "+00:00"
        try:
            value = _dt.datetime.fromisoformat(s)
        except ValueError:
            raise ValueError(f"not a time (µs since the epoch or ISO 8601): {value!r}") from None
    if isinstance(value, _dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=_dt.UTC)
        delta = value - _dt.datetime(1970, 1, 1, tzinfo=_dt.UTC)
        return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    raise ValueError(f"not a time: {value!r}")
