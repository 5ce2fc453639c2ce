"""rm and mv on a live supervisor never delete what is not theirs (issue 22, items 1 and 2).

Two shard maps, each passing `check` on its own, on one disk and one mosquitto: shard a (prefix
a, root r) and, from the other map, shard b (prefix b) whose root r/a/x lies inside a's topic
directories. `shardlog rm MAP1 a/x --yes` used to delete b's live branch, lock included, while
b kept acknowledging messages into the deleted files. Real processes, real broker; every wait
is a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.supervisor.helpers import SupervisorProc, make_map, read_records, topic_dir, wait_for

pytestmark = pytest.mark.timeout(120)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


def ids(root: Path, topic: str) -> list[int]:
    return [r["payload"]["i"] for r in read_records(root, topic)]


def test_rm_and_mv_never_cross_another_recorders_lock_nor_delete_foreign_files(broker, publisher, supervisors,
                                                                               tmp_path: Path) -> None:
    r = tmp_path / "r"
    (tmp_path / "m1").mkdir()
    (tmp_path / "m2").mkdir()
    m1 = make_map(tmp_path / "m1" / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(r))
    m2 = make_map(tmp_path / "m2" / "shards.yaml", broker.port, [{"name": "b", "prefix": "b"}],
                  root=str(r / "a" / "x"))
    for m in (m1, m2):
        assert cli("check", str(m)).returncode == 0  # each map alone is fine
    sup1 = SupervisorProc(m1, tmp_path / "m1")
    sup2 = SupervisorProc(m2, tmp_path / "m2")
    supervisors.extend([sup1, sup2])
    sup1.start(), sup2.start()
    sup1.running("a"), sup2.running("b")
    b_root = r / "a" / "x"
    publisher.publish_many([(t, json.dumps({"i": i}).encode(), 1)
                            for i in range(5) for t in ("a/x/mine", "a/y", "b/t")])
    wait_for(lambda: ids(r, "a/x/mine") == list(range(5)) and ids(r, "a/y") == list(range(5)), 15, "a's records")
    wait_for(lambda: ids(b_root, "b/t") == list(range(5)), 15, "b's records")
    lock = b_root / "b" / "+shard.lock"
    assert lock.exists()
    # someone's own directory inside a's branch (item 2: a directory shardlog never wrote)
    (r / "a" / "docs").mkdir()
    (r / "a" / "docs" / "notes.txt").write_text("precious")
    for args, why in [
        (("rm", str(m1), "a/x", "--yes"), f"{lock} is another recorder's lock: its branch lies inside"),
        (("rm", str(m1), "a/x/b/t", "--yes"), f"{lock} is another recorder's lock: this lies inside its branch"),
        (("mv", str(m1), "a/x", "a/moved", "--yes"), f"{lock} is another recorder's lock"),
        (("rm", str(m1), "a/docs", "--yes"), "notes.txt is not a file shardlog writes"),
        (("rm", str(m1), "a", "--yes"), "notes.txt is not a file shardlog writes|another recorder's lock"),
    ]:
        p = cli(*args)
        assert p.returncode == 1 and any(w in p.stderr for w in why.split("|")), (args, p.returncode, p.stderr)
    assert (r / "a" / "docs" / "notes.txt").read_text() == "precious"
    # b's branch survived and b records on into it: its new messages land in the same live files
    publisher.publish_many([("b/t", json.dumps({"i": i}).encode(), 1) for i in range(5, 10)])
    wait_for(lambda: ids(b_root, "b/t") == list(range(10)), 15, "b's next 5 records in its live files")
    assert lock.exists() and sup2.shard("b")["restarts"] == 0
    assert ids(r, "a/x/mine") == list(range(5))
    # a's own topics are still a's to delete and move
    p = cli("rm", str(m1), "a/y", "--yes")
    assert p.returncode == 0 and not topic_dir(r, "a/y").exists(), p.stderr
    p = cli("mv", str(m1), "a/x/mine", "a/kept", "--yes")
    assert p.returncode == 0 and ids(r, "a/kept") == list(range(5)), p.stderr
    assert ids(b_root, "b/t") == list(range(10))
    assert "refused" in sup1.log()


def test_supervise_refuses_a_root_that_resolves_to_slash(supervisors, tmp_path: Path) -> None:
    os.symlink("/", tmp_path / "slash")
    m = make_map(tmp_path / "shards.yaml", 1883, [{"name": "a", "prefix": "a"}], root=str(tmp_path / "slash"))
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start(wait_ready=False)
    assert sup.wait(30) == 78
    assert "shards[0].root" in sup.log() and "resolves to /" in sup.log()
