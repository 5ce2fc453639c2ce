"""A hook that sets ``ts`` from the device's clock (issue 22, item 18): ``ts`` stays the reception
time, the order key the readers rely on (it never goes backwards within a topic), so such a
message is quarantined with a reason saying where the device's time goes (the payload), and
counted; a hook that puts the device time in the payload records normally, and ``cat``,
``sql`` and ``export`` with --since/--until find every record of their range. Real mosquitto,
a real `shardlog record`."""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from shardlog import history
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

HOOKS = '''
def device_clock(m):
    """The device's time as ts (what issue 22 found): a clock that is 1 hour behind on odd
    readings, ahead on even ones."""
    d = m.json()
    return m._replace(ts=m.ts + (3_600_000_000 if d["i"] % 2 else -3_600_000_000))

def device_clock_in_payload(m):
    """The right way: the reception time stays ts, the device's time goes in the payload."""
    d = m.json()
    return m.with_json({**d, "device_ts": m.ts - 3_600_000_000})
'''


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_a_hook_cannot_make_ts_go_backwards_and_time_filters_find_every_record(
        tmp_path: Path, broker: Mosquitto, publisher: Publisher, recorders: list[RecorderProc]) -> None:
    hk = tmp_path / "hk"
    hk.mkdir()
    (hk / "clock_hooks.py").write_text(HOOKS)
    m = write_map(tmp_path / "m.yaml", broker.port,
                  [{"name": "bad", "prefix": "bad", "hooks": ["clock_hooks:device_clock"]},
                   {"name": "good", "prefix": "good", "hooks": ["clock_hooks:device_clock_in_payload"]}],
                  hooks_path=str(hk))
    bad = RecorderProc(m, "bad", tmp_path).start()
    good = RecorderProc(m, "good", tmp_path).start()
    recorders.extend([bad, good])
    n = 40
    publisher.publish_many([(t, json.dumps({"i": i}).encode(), 1) for i in range(n) for t in ("bad/d", "good/d")])
    for rec in (bad, good):
        wait_for(lambda rec=rec: (s := rec.stats()) and s.acked >= n, 60, f"{n} acknowledged ({rec.stderr_path})")
    root = tmp_path / "data"
    # what the readers rely on: within every topic recorded, ts never goes backwards
    for info in history.topics(root):
        stored = [r.ts for _t, r in history.read(root, info.topic)]
        assert stored == sorted(stored), f"{info.topic}: ts goes backwards"
    # the device clock as ts: refused, kept in the quarantine with the reason, counted
    s = bad.stats()
    assert s is not None and s.hook_errors == n and s.quarantined == n
    q = [json.loads(x) for f in root.rglob("+quarantine.jsonl") for x in f.read_bytes().splitlines()]
    assert len(q) == n and all("changed ts from" in r["reason"] and "device's time in the payload" in r["reason"]
                               for r in q)
    assert sorted(json.loads(base64.b64decode(r["payload"]))["i"] for r in q) == list(range(n))
    assert not (root / "bad" / "d" / "+log.jsonl").exists()
    # the device time in the payload: recorded, ts in reception order
    recs = [r for _t, r in history.read(root, "good")]
    assert [r.value["i"] for r in recs] == list(range(n))
    ts = [r.ts for r in recs]
    assert ts == sorted(ts) and all(r.value["device_ts"] == r.ts - 3_600_000_000 for r in recs)
    # every range finds exactly its records: cat, sql and the SQLite export
    for lo, hi in ((ts[5], ts[30]), (ts[0], ts[-1] + 1), (ts[17], ts[18])):
        want = [i for i, t in enumerate(ts) if lo <= t < hi]
        r = run_cli("cat", str(root), "good", "--since", str(lo), "--until", str(hi))
        assert r.returncode == 0 and [json.loads(x)["payload"]["i"] for x in r.stdout.splitlines()] == want
        r = run_cli("sql", str(root), "SELECT payload->>'i' AS i FROM records ORDER BY ts_us", "--since", str(lo),
                    "--until", str(hi))
        assert r.returncode == 0 and [int(x) for x in r.stdout.split()[1:]] == want, r.stderr
        out = tmp_path / f"x{lo}.sqlite"
        r = run_cli("export", str(root), "good", "--to", str(out), "--since", str(lo), "--until", str(hi))
        assert r.returncode == 0
        with sqlite3.connect(out) as con:
            assert [i for (i,) in con.execute('SELECT "payload.i" FROM records ORDER BY ts')] == want
