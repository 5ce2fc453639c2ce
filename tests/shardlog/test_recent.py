"""+recent.json off the recording path (shardlog/writing/recent.py): a thread of its own
replaces each stale file at most once per recent_interval, the most stale first, and
never misses the newest records; a real file system, no broker."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from shardlog.writing import recent
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


def test_a_stop_out_of_time_leaves_the_stale_files_to_the_next_start(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop writes stale files for STOP_BUDGET seconds at most; the rest go with their
    contents into the branch's +recent.left, which the next start's thread writes first
    (skipping a topic whose directory went), then removes (issue 21)."""
    monkeypatch.setattr(recent, "STOP_BUDGET", 0.0)  # out of time after the first 15 files
    store, _ = make(tmp_path, recent=2, recent_interval=3600)
    store.start_recent_writer()
    states: dict[str, TopicState] = {}
    for i in range(100):
        put(store, states, f"t/{i}", 1, start=10 * i)
    store.flush(T0, time.monotonic())
    wait_for(lambda: all(recent_of(tmp_path, f"t/{i}") == [10 * i] for i in range(100)), 20,
             "the first +recent.json of each topic (due at once)")
    for i in range(100):  # stale now, held back for an hour
        put(store, states, f"t/{i}", 2, start=10 * i + 1)
    store.flush(T0, time.monotonic())
    store.close()
    left = tmp_path / "+recent.left"
    fresh = [i for i in range(100) if recent_of(tmp_path, f"t/{i}") == [10 * i + 1, 10 * i + 2]]
    assert len(fresh) == 15 and left.exists()  # 85 left stale, their contents in +recent.left
    assert sum(1 for _ in left.open("rb")) == 85
    (tmp_path / "t" / "99").rename(tmp_path / "moved99")  # gone meanwhile: nothing recreated
    monkeypatch.setattr(recent, "STOP_BUDGET", 2.0)
    store2, _ = make(tmp_path, recent=2, recent_interval=3600)
    store2.start_recent_writer()
    wait_for(lambda: not left.exists(), 20, "the next start to write what the stop left")
    for i in range(99):
        assert recent_of(tmp_path, f"t/{i}") == [10 * i + 1, 10 * i + 2], i
    assert not (tmp_path / "t" / "99").exists()
    store2.close()
    assert not left.exists()  # nothing stale: no file left


def test_a_store_without_the_thread_keeps_what_an_earlier_stop_left(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A store closed without ever starting the writer thread writes the entries already in
    +recent.left back with its own (none is lost)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "+recent.left").write_bytes(json.dumps("a").encode() + b'\t[{"payload":{"i":7}}]\n')
    monkeypatch.setattr(recent, "STOP_BUDGET", 0.0)
    store, _ = make(tmp_path, recent=2, recent_interval=3600)
    states: dict[str, TopicState] = {}
    for i in range(20):
        put(store, states, f"b/{i}", 1, start=i)
    store.flush(T0, 0.0)
    for i in range(20):
        put(store, states, f"b/{i}", 1, start=100 + i)
    store.flush(T0, 1.0)  # held back: stale
    store.close()
    entries = [json.loads(line.partition(b"\t")[0]) for line in (tmp_path / "+recent.left").open("rb")]
    assert entries[0] == "a" and len(entries) == 1 + 20 - 15


def etag(path: Path) -> tuple[int, int]:
    """What NGINX's ETag is made of: the mtime in whole seconds and the size."""
    st = os.stat(path)
    return st.st_mtime_ns // 1_000_000_000, st.st_size


@pytest.mark.parametrize("preparer", [False, True], ids=["opened-in-the-flush", "by-the-preparer"])
def test_a_new_topics_first_recent_file_is_created_then_swapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                preparer: bool) -> None:
    """A topic whose directory this process made gets its first +recent.json through
    create_new (five system calls, not swap_in's nine); every later one is swapped in; a
    topic found on disk is never given create_new's first write (its old version must keep
    a distinct ETag, test below)."""
    from shardlog.writing import topicfiles
    calls: list[tuple[str, str]] = []
    for name in ("create_new", "swap_in"):
        real = getattr(topicfiles, name)
        monkeypatch.setattr(topicfiles, name, lambda p, *a, _n=name, _r=real: (calls.append((_n, p)), _r(p, *a))[1])
    store, _ = make(tmp_path, recent=3, recent_interval=0)
    if preparer:  # the recorder's case: a new topic's directory is made by the preparer thread
        store.start_preparer()
    states: dict[str, TopicState] = {}
    put(store, states, "new/a", 2)
    store.flush(T0, time.monotonic())
    if preparer:
        store.flush(T0, time.monotonic(), wait=True)
    put(store, states, "new/a", 1, start=2)
    store.flush(T0, time.monotonic())
    assert [n for n, _ in calls] == ["create_new", "swap_in"], calls
    assert recent_of(tmp_path, "new/a") == [0, 1, 2]
    store.close()

    calls.clear()  # the next process finds the topic on disk
    store, _ = make(tmp_path, recent=3, recent_interval=0)
    states = {}
    put(store, states, "new/a", 1, start=3)
    store.flush(T0, time.monotonic())
    assert [n for n, _ in calls] == ["swap_in"], calls
    assert recent_of(tmp_path, "new/a") == [1, 2, 3]
    store.close()


def test_create_new_keeps_etags_distinct_and_falls_back_when_not_new(tmp_path: Path) -> None:
    """create_new on a name with a spare beside it, or with earlier versions of this second
    known (a directory removed and made again), goes swap_in's way: the content is right and
    the ETag differs from the earlier version's."""
    from shardlog.writing.atomic import create_new, swap_in
    path, spare = tmp_path / "+recent.json", tmp_path / "+recent.json.spare"
    create_new(str(path), str(spare), b"[1]\n")
    assert path.read_bytes() == b"[1]\n" and not spare.exists()
    versions: set[tuple[int, int]] = set()
    swap_in(str(path), str(spare), b"[2]\n", versions)   # a spare now exists
    first = etag(path)
    create_new(str(path), str(spare), b"[3]\n", versions)
    assert json.loads(path.read_bytes()) == [3] and etag(path) != first
    os.unlink(path)  # the directory emptied and used again in the same second: an HTTP client
    os.unlink(spare)  # may hold the ETag of a version of 4 bytes
    old = (time.time_ns() // 1_000_000_000, 4)
    versions = {old}
    create_new(str(path), str(spare), b"[4]\n", versions)
    assert json.loads(path.read_bytes()) == [4] and etag(path) != old
