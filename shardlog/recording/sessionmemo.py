"""What a shard remembers of its broker session: ``<root>/+session.<shard>.json``.

The broker keeps a session per client id (the shard's, shardlog/config/load.py ``client_id``),
not per branch, so the memo is named after the shard, in its root, and holds the client id and
the topic filters the session is subscribed to. It is written after each SUBACK and UNSUBACK
that changes them, and read at start:

- a shard expects the broker to have its session only if the memo names the same client id
  (a branch shared with other shards, e.g. the catch-all ``#`` in the root of ``chat``, says
  nothing about this client id: the example map's first run warned "recorded before");
- after a CONNACK with the session present, the filters of the memo the shard no longer wants
  (its prefix changed) are unsubscribed, so the session stops delivering the old branch.

A memo that cannot be read or parsed is ignored (one WARNING): the shard then expects no
session, as on a first run. Trees recorded before the memo existed fall back to the branch's
own lock file beside recorded topics (:func:`shardlog.recording.brokercheck.recorded_before`).
"""

from __future__ import annotations

import logging
import os

import msgspec

log = logging.getLogger(__name__)

PREFIX = "+session."
MAX_BYTES = 1024 * 1024


class SessionMemo(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    client_id: str
    subscriptions: list[str] = msgspec.field(default_factory=list)


def memo_path(root: str, shard: str) -> str:
    return os.path.join(root, f"{PREFIX}{shard}.json")


def read_memo(path: str) -> SessionMemo | None:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read the session memo %s: %s; expecting no session", path, exc.strerror or exc)
        return None
    try:
        return msgspec.json.decode(data, type=SessionMemo)
    except msgspec.DecodeError as exc:
        log.warning("ignoring the session memo %s: %s; expecting no session", path, exc)
        return None


def write_memo(path: str, memo: SessionMemo) -> None:
    """Replace the memo (a new file renamed over it); a failure is one WARNING, not fatal."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(msgspec.json.encode(memo) + b"\n")
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot write the session memo %s: %s", path, exc.strerror or exc)


def expects_session(memo: SessionMemo | None, client_id: str, legacy: bool) -> bool:
    """Whether the broker should hold this client id's session: the memo says it subscribed
    with it; without a memo, ``legacy`` (a tree recorded before memos existed)."""
    if memo is None:
        return legacy
    return memo.client_id == client_id and bool(memo.subscriptions)


def stale_filters(memo: SessionMemo | None, client_id: str, wanted: list[str]) -> list[str]:
    """The filters the session still has (per the memo) that this shard no longer wants."""
    if memo is None or memo.client_id != client_id:
        return []
    return [f for f in memo.subscriptions if f not in wanted]
