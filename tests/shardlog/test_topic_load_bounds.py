"""A huge garbage tail on a segment (issue 22, item 9): a 1 GiB run of NUL bytes at the end of
the current segment (a sparse file: no disk used) is cut back on the topic's first open by a
real recorder in bounded memory, and the quarantine keeps a bounded record of it: its first
bytes and how many were cut in all."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from shardlog.records import encode_record
from shardlog.writing import topic_load
from tests.helpers import Mosquitto, Publisher, RecorderProc, wait_for, write_map

GiB = 1 << 30


def vm_hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_a_1_gib_nul_tail_is_cut_in_bounded_memory_with_a_bounded_quarantine_record(
        tmp_path: Path, broker: Mosquitto, publisher: Publisher, recorders: list[RecorderProc]) -> None:
    m = write_map(tmp_path / "shards.yaml", broker.port, [{"name": "all", "prefix": "#"}])
    d = tmp_path / "data" / "t"
    d.mkdir(parents=True)
    now = time.time_ns() // 1000  # recent records: no rotation by age on open
    good = b"".join(encode_record(now + i, 1, False, b'{"i": %d}' % i) for i in range(3))
    seg = d / "+log.jsonl"
    seg.write_bytes(good + b'{"ts":1,"qos":1,"retain":false,"payload":{"torn')  # a crash mid-write ...
    os.truncate(seg, len(good) + GiB)  # ... and the file system's hole behind it
    rec = RecorderProc(m, "all", tmp_path).start()
    recorders.append(rec)
    publisher.publish_many([("t", b'{"i": 3}', 1)])
    wait_for(lambda: (s := rec.stats()) and s.acked >= 1, 60, f"the message acknowledged (log: {rec.stderr_path})")
    assert rec.proc is not None
    peak = vm_hwm_mib(rec.proc.pid)
    lines = seg.read_bytes().splitlines(keepends=True)
    assert lines[:3] == good.splitlines(keepends=True) and json.loads(lines[3])["payload"] == {"i": 3}
    assert len(lines) == 4
    quarantine = tmp_path / "data" / "+quarantine.jsonl"
    assert peak < 300, f"the recorder peaked at {peak:.0f} MiB"
    assert quarantine.stat().st_size < 1 << 20, quarantine.stat().st_size
    q = [json.loads(x) for x in quarantine.read_bytes().splitlines()]
    assert len(q) == 1 and q[0]["reason"].startswith("torn tail")
    kept = base64.b64decode(q[0]["payload"])
    assert kept.startswith(b'{"ts":1,"qos":1,"retain":false,"payload":{"torn\0\0')
    assert kept.endswith(b"\n[shardlog: %d bytes cut in all; the first %d are above]\n"
                         % (GiB, topic_load.QUARANTINE_MAX))
    s = rec.stats()
    assert s is not None and s.repaired == 1 and s.quarantined == 1
    assert "bytes of lines holding NUL bytes at the end" in rec.log()


def test_nul_run_start(tmp_path: Path) -> None:
    p = tmp_path / "f"
    for data, want in [(b"", 0), (b"a\n", 2), (b"a\n\0\0", 2), (b"a\n\0\n\0", 2), (b"a\0\n", 0),
                       (b"a\nb", 3), (b"a\n\0\nb", 5), (b"\0" * 10, 0), (b"ok\n" + b"\0" * 3_000_000 + b"\n\0", 3)]:
        p.write_bytes(data)
        fd = os.open(p, os.O_RDONLY)
        try:
            assert topic_load.nul_run_start(fd, len(data)) == want, data[:20]
        finally:
            os.close(fd)
