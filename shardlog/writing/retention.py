"""Retention: delete a topic's oldest rotated segments past ``retention.max_segments`` or
``retention.max_age`` (what to delete is the pure :func:`shardlog.ondisk.segments.segments_to_delete`;
this module does the ``stat`` and ``unlink`` calls). Called after each rotation."""

from __future__ import annotations

import os
import time

from shardlog.config.schema import Retention
from shardlog.counters import Counters
from shardlog.ondisk import segments


def apply(path: str, rotated: list[segments.Segment], r: Retention, counters: Counters) -> None:
    """Delete those of the ``rotated`` segments of the topic directory ``path`` that ``r`` no
    longer keeps (counted in ``counters.deleted_segments``)."""
    if r.max_segments is None and r.max_age is None:
        return
    infos = []
    names: dict[int, tuple[str, str]] = {}
    for seg in rotated:
        plain = seg.name[:-3] if seg.compressed else seg.name
        names[seg.seq] = (plain, plain + ".gz")
        # the compressor may turn name into name.gz at any moment: look for both
        for name in names[seg.seq]:
            try:
                infos.append((seg.seq, os.stat(os.path.join(path, name)).st_mtime))
                break
            except FileNotFoundError:
                continue
    for seq in segments.segments_to_delete(infos, time.time(), r.max_segments, r.max_age):
        for name in names[seq]:
            try:
                os.unlink(os.path.join(path, name))
                counters.deleted_segments += 1
            except FileNotFoundError:
                pass
