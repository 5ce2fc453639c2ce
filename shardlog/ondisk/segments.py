"""Segment files of one topic directory, and the pure decisions about them.

    +log.jsonl                 current segment, append only
    +log.00000041.jsonl        rotated segments: the number only grows, never renamed again
    +log.00000040.jsonl.gz     a rotated segment after compression
    +log.json, +log.csv, ...   the same in another write format (ondisk/formats.py); the
                               numbering is shared by every format of a directory
    +recent.json               the last N records as a JSON array, replaced atomically

Rotation renames the current segment to the next number (like Kafka's segments,
unlike RotatingFileHandler which renames every backup on each rollover).
"""

from __future__ import annotations

import re
from typing import NamedTuple

CURRENT = "+log.jsonl"  # the default format's current segment (formats.CURRENTS: all)
RECENT = "+recent.json"
RECENT_TMP = "+recent.json.spare"  # the previous version, kept for atomic swaps
#: (a shard's branch root) the +recent.json files a stop left stale, written at the next start
RECENT_LEFT = "+recent.left"
TOPIC_FILE = "+topic"
LOCK = "+shard.lock"
QUARANTINE = "+quarantine.jsonl"
SEQ_DIGITS = 8

_SEGMENT_RE = re.compile(r"^\+log\.(\d{8,})\.(?:payload\.)?(?:jsonl|json|csv)(\.gz)?$")


def segment_name(seq: int, compressed: bool = False, key: str = "jsonl") -> str:
    """``key``: the format (formats.KEYS), which is also the extension."""
    return f"+log.{seq:0{SEQ_DIGITS}d}.{key}" + (".gz" if compressed else "")


class Segment(NamedTuple):
    seq: int
    name: str
    compressed: bool


def parse_segment(name: str) -> Segment | None:
    m = _SEGMENT_RE.match(name)
    if m is None:
        return None
    return Segment(int(m.group(1)), name, m.group(2) is not None)


def rotated_segments(names: list[str]) -> list[Segment]:
    """Rotated segments among directory entries, oldest first. If both a plain and a
    ``.gz`` file exist for one number (a compression interrupted by a crash), the
    plain one is listed: it is the complete one."""
    best: dict[int, Segment] = {}
    for name in names:
        seg = parse_segment(name)
        if seg is None:
            continue
        have = best.get(seg.seq)
        if have is None or have.compressed:
            best[seg.seq] = seg
    return [best[k] for k in sorted(best)]


def should_rotate(size: int, adding: int, first_ts_us: int | None, now_us: int,
                  max_bytes: int | None, max_age_s: float | None) -> bool:
    """Rotate the current segment before appending ``adding`` bytes?

    Never rotates an empty segment. Size: the append would pass ``max_bytes``.
    Age: the segment's first record is older than ``max_age_s``."""
    if size == 0:
        return False
    if max_bytes is not None and size + adding > max_bytes:
        return True
    if max_age_s is not None and first_ts_us is not None and now_us - first_ts_us >= max_age_s * 1e6:
        return True
    return False


def segments_to_delete(segments: list[tuple[int, float]], now_s: float,
                       max_segments: int | None, max_age_s: float | None) -> list[int]:
    """Retention. ``segments``: (seq, mtime) of rotated segments. Returns the seqs to
    delete: all but the newest ``max_segments``, and those last written more than
    ``max_age_s`` ago. The current segment is never a candidate."""
    ordered = sorted(segments)
    doomed: set[int] = set()
    if max_segments is not None and len(ordered) > max_segments:
        doomed.update(seq for seq, _ in ordered[: len(ordered) - max_segments])
    if max_age_s is not None:
        doomed.update(seq for seq, mtime in ordered if now_s - mtime > max_age_s)
    return sorted(doomed)
