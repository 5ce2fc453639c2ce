"""+recent.json off the recording path (shardlog/writing/recent.py): a thread of its own
replaces each stale file at most once per recent_interval, the most stale first, and
never misses the newest records; a real file system, no broker."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from shardlog.writing.topic_state import TopicState
from tests.helpers import wait_for
from tests.shardlog.test_store import T0, make, put


def recent_of(root: Path, topic: str) -> list[int]:
    try:
        return [r["payload"]["i"] for r in json.loads((root / topic / "+recent.json").read_bytes())]
    except FileNotFoundError:
        return []


def spy_writes(store: object) -> list[str]:
    """The names of the threads that replace +recent.json files, one entry per file."""
    files = store.files  # type: ignore[attr-defined]
    real, names = files.write_recent, []

    def spy(st: TopicState) -> None:
        names.append(threading.current_thread().name)
        real(st)

    files.write_recent = spy
    return names


def test_the_recording_thread_never_replaces_a_recent_file(tmp_path: Path) -> None:
    """With the writer thread, a flush only marks its topics; every +recent.json is then
    current (its newest records), written by that thread; the stats say when all are."""
    store, c = make(tmp_path, recent=3, recent_interval=0)
    names = spy_writes(store)
    store.start_recent_writer()
    states: dict[str, TopicState] = {}
    for k in range(300):
        put(store, states, f"t/{k}", 5)
    store.flush(T0, time.monotonic())
    assert threading.current_thread().name not in names
    wait_for(lambda: all(recent_of(tmp_path, f"t/{k}") == [2, 3, 4] for k in range(300)), 30,
             "every +recent.json to hold its topic's last 3 records")
    assert set(names) == {"shardlog-recent"}, names[:5]
    store.report_recent(time.monotonic(), c)
    assert c.recent_stale == 0 and c.recent_lag == 0 and c.recent_written >= 300
    store.close()


def test_a_busy_topic_is_replaced_at_most_once_per_interval(tmp_path: Path) -> None:
    """A topic written every few milliseconds for a second gets a handful of rewrites (one
    per recent_interval), not one per flush; its file ends with its newest record."""
    store, c = make(tmp_path, recent=2, recent_interval=0.4)
    names = spy_writes(store)
    store.start_recent_writer()
    states: dict[str, TopicState] = {}
    i, t_end = 0, time.monotonic() + 1.0
    flushes = 0
    while time.monotonic() < t_end:
        put(store, states, "busy", 1, start=i)
        store.flush(T0, time.monotonic())
        i += 1
        flushes += 1
        threading.Event().wait(0.003)  # a publisher's pace, not a synchronisation
    assert flushes > 50
    assert len(names) <= 1.0 / 0.4 + 2, f"{len(names)} rewrites in 1 s at recent_interval 0.4 s"
    wait_for(lambda: recent_of(tmp_path, "busy") == [i - 2, i - 1], 10, "the newest two records")
    store.close()


def test_records_written_while_a_file_is_being_replaced_are_not_missed(tmp_path: Path) -> None:
    """The recording thread keeps writing while the writer takes its snapshots: after the
    last record (no sleep in between), the file catches up with it."""
    store, _ = make(tmp_path, recent=4, recent_interval=0)
    store.start_recent_writer()
    states: dict[str, TopicState] = {}
    topics = [f"r/{k}" for k in range(20)]
    n = 400
    for i in range(n):
        for t in topics:
            put(store, states, t, 1, start=i)
        store.flush(T0, time.monotonic())
    want = list(range(n - 4, n))
    wait_for(lambda: all(recent_of(tmp_path, t) == want for t in topics), 30,
             "every +recent.json to end with its topic's last record")
    store.close()


def test_close_writes_every_stale_file_and_a_dropped_topic_gets_none(tmp_path: Path) -> None:
    """recent_interval holds files back; close() writes them all. A topic let go of (its
    directory moved away by a control operation) gets no file written into it again."""
    store, _ = make(tmp_path, recent=2, recent_interval=3600)
    store.start_recent_writer()
    states: dict[str, TopicState] = {}
    put(store, states, "keep", 1)
    put(store, states, "gone", 1)
    store.flush(T0, time.monotonic())
    wait_for(lambda: recent_of(tmp_path, "keep") == [0] and recent_of(tmp_path, "gone") == [0], 10,
             "the first +recent.json of each topic (due at once)")
    put(store, states, "keep", 2, start=1)
    put(store, states, "gone", 2, start=1)
    store.flush(T0, time.monotonic())  # both stale now, held back for an hour
    store.forget(states["gone"])
    os.rename(tmp_path / "gone", tmp_path / "moved")
    store.close()
    assert recent_of(tmp_path, "keep") == [1, 2]
    assert not (tmp_path / "gone").exists(), "a write recreated a directory that was moved away"
    assert recent_of(tmp_path, "moved") == [0]
