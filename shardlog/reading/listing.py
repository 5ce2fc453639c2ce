"""List the recorded topics of a root (``history.topics``, ``shardlog topics``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from shardlog.reading.lines import _count_lines, _ts_of
from shardlog.reading.tail import _tail_lines_dir
from shardlog.reading.tree import TopicInfo, _root, _walk, segments_of


def topics(root: str | os.PathLike[str], prefix: str = "", long: bool = False) -> Iterator[TopicInfo]:
    """Recorded topics at or below ``prefix`` (all with ``""``), decoded.

    Without ``long`` only directories are listed (fast on 100,000 topics). With
    ``long``: record count (reads every segment; compressed ones are decompressed),
    bytes on disk and the newest record's ts."""
    root_real = _root(root)
    for topic, path, _files in _walk(root_real, prefix):
        if not long:
            yield TopicInfo(topic, path)
            continue
        count = size = 0
        for seg in segments_of(path):
            try:
                count += _count_lines(seg)
                size += os.stat(seg if os.path.lexists(seg) else seg + ".gz").st_size
            except FileNotFoundError:
                continue  # deleted by retention meanwhile, or skipped (logged): no regular file
        last = _tail_lines_dir(path, 1)
        yield TopicInfo(topic, path, count, size, _last_ts(last))


def _last_ts(last: list[bytes]) -> int | None:
    try:
        return _ts_of(last[-1]) if last else None
    except ValueError:  # no record: unknown (the line was warned about when read)
        return None
