"""Where things are in a recording root: topic directories and their segments.

Only directory listings (and the ``+topic`` file of a hashed, over-long level): no
segment is read here. A directory that cannot be listed (no permission) is left out with
a warning (``shardlog.reading.tree``; the read verbs then exit non-zero), never silently.
Topic names are decoded from the directory path by :mod:`shardlog.topics`, never guessed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from shardlog.ondisk.formats import CURRENTS
from shardlog.ondisk.segments import TOPIC_FILE, parse_segment, rotated_segments
from shardlog.topics import HashedNameError, TopicError, decode_level, safe_join, topic_to_relpath

log = logging.getLogger(__name__)


def _unlistable(path: str, exc: OSError) -> None:
    log.warning("%s: cannot be listed (%s); left out", path, exc.strerror)


class TopicNotFound(FileNotFoundError):
    """No recording root, or no records for the topic or prefix below it."""


class TopicInfo(NamedTuple):
    topic: str
    path: str                    # the topic's directory
    records: int | None = None   # the rest only with long=True
    bytes: int | None = None     # on disk (compressed segments count compressed)
    last_ts: int | None = None   # ts of the newest record, µs


def _root(root: str | os.PathLike[str]) -> str:
    real = os.path.realpath(os.fspath(root))
    if not os.path.isdir(real):
        raise TopicNotFound(f"no such recording root: {os.fspath(root)}")
    return real


def _prefix_dir(root_real: str, prefix: str) -> str:
    if not prefix:
        return root_real
    try:
        return safe_join(root_real, topic_to_relpath(prefix))
    except TopicError as exc:
        raise TopicNotFound(f"not a storable topic {prefix!r}: {exc}") from None


def topic_dir(root: str | os.PathLike[str], topic: str) -> str:
    """The directory of ``topic`` under ``root`` (which need not exist yet)."""
    return _prefix_dir(_root(root), topic)


def _is_topic(names: Iterable[str]) -> bool:
    return any(n in CURRENTS or (n.startswith("+log.") and parse_segment(n)) for n in names)


def _current_name(names: Iterable[str]) -> str | None:
    """The current segment's name among directory entries (one format's; None if none)."""
    have = set(names)
    return next((c for c in CURRENTS if c in have), None)


def segments_of(topic_dir: str) -> list[str]:
    """Paths of a topic's segments, oldest first: rotated ones (plain or ``.gz``), then
    the current one (``+log.jsonl``, ``+log.csv``, ...) if it exists."""
    try:
        names = os.listdir(topic_dir)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        _unlistable(topic_dir, exc)
        return []
    out = [os.path.join(topic_dir, s.name) for s in rotated_segments(names)]
    out.extend(os.path.join(topic_dir, c) for c in CURRENTS if c in names)
    return out


def _walk(root_real: str, prefix: str) -> Iterator[tuple[str, str, list[str]]]:
    """(topic, directory, file names) of every topic directory at or below ``prefix``,
    in directory-name order; only directory listings, no file reads (except the
    ``+topic`` file of a hashed level)."""
    start = _prefix_dir(root_real, prefix)
    if prefix:
        if not os.path.isdir(start):
            return
        base_topic: str | None = prefix
    else:
        base_topic = None  # the root itself is no topic
    stack: list[tuple[str, str | None]] = [(start, base_topic)]
    while stack:
        path, topic = stack.pop()
        files: list[str] = []
        subdirs: list[tuple[str, str]] = []
        try:
            with os.scandir(path) as it:
                for e in it:
                    name = e.name
                    if name.startswith("+"):
                        files.append(name)
                    elif e.is_dir(follow_symlinks=False):
                        subdirs.append((name, e.path))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as exc:  # no permission, I/O error: said, not silently left out
            _unlistable(path, exc)
            continue
        if topic is not None and _is_topic(files):
            yield topic, path, files
        for name, sub in sorted(subdirs, reverse=True):
            try:
                level = decode_level(name)
            except HashedNameError:
                try:
                    with open(os.path.join(sub, TOPIC_FILE), encoding="utf-8") as f:
                        full = f.read()
                except OSError:
                    continue  # no +topic: not something the recorder made
                stack.append((sub, full))
                continue
            except TopicError:
                continue  # not a name the recorder makes: not ours
            stack.append((sub, level if topic is None else f"{topic}/{level}"))


def _require_topic(root: str | os.PathLike[str], topic: str) -> str:
    d = topic_dir(root, topic)
    if not segments_of(d):
        raise TopicNotFound(f"no records for topic {topic!r} under {os.fspath(root)}")
    return d


def _safe_listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        _unlistable(path, exc)
        return []
