"""shardlog replay: a real shard records broker A, `shardlog replay` republishes the
recording to broker B (a second real mosquitto) where a second real shard records
it; the two recordings must hold the same records apart from the reception time.
Plus pacing (--speed), --rename, MQTT 3.1.1, credentials, a lost or unreachable
broker, the progress bar on a terminal, and unit tests of the pure parts."""

from __future__ import annotations

import itertools
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from shardlog import history
from shardlog.cli.main import main as cli_main
from shardlog.cli.progress import format_progress
from shardlog.records import encode_record
from shardlog.replay.plan import Rename, broker_from_url, delay, parse_rename, parse_speed, rename_topic
from tests.helpers import MOSQUITTO, Mosquitto, Publisher, RecorderProc, free_port, wait_for, write_map

T0 = 1_763_815_800_000_000


def run_cli(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], capture_output=True, timeout=timeout,
                          check=False, env=env)


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[Mosquitto, Mosquitto]]:
    """Two real mosquittos: A (recorded first) and B (the replay's target)."""
    started = []
    try:
        for name in ("broker-a", "broker-b"):
            d = tmp_path / name
            d.mkdir()
            b = Mosquitto(d)
            b.start()
            started.append(b)
        yield started[0], started[1]
    finally:
        for b in started:
            b.stop()


def start_shard(workdir: Path, port: int, recorders: list[RecorderProc]) -> RecorderProc:
    """A catch-all shard recording the broker on ``port`` into ``workdir/data``."""
    workdir.mkdir(exist_ok=True)
    m = write_map(workdir / "shards.yaml", port, [{"name": "all", "prefix": "#"}])
    rec = RecorderProc(m, "all", workdir).start()
    recorders.append(rec)
    return rec


def wait_messages(rec: RecorderProc, n: int) -> None:
    wait_for(lambda: (s := rec.stats()) is not None and s.messages >= n, 60,
             f"{n} records written (log: {rec.stderr_path})")


Rec = tuple[str, bytes, int, bool]


def recorded(root: Path, prefix: str) -> list[tuple[int, Rec]]:
    return [(r.ts, (t, r.payload, r.qos, r.retain)) for t, r in history.read(root, prefix)]


def by_topic(recs: list[Rec]) -> dict[str, list[tuple[bytes, int, bool]]]:
    out: dict[str, list[tuple[bytes, int, bool]]] = defaultdict(list)
    for t, p, q, r in recs:
        out[t].append((p, q, r))
    return dict(out)


RETAINED = [("site/r/json", b'{"state": "on"}', 1), ("site/r/text", b"retained text", 0),
            ("site/r/bin", b"\x00\xff\x01\xfe", 1)]
LIVE = [
    ("site/a", b'{"seq": 1}', 1),
    ("site/a", b' {"spaced" : [1, 2.50, "x"], "u": "\\u00e9"} ', 1),  # JSON kept byte for byte
    ("site/a", b"hello, not json", 0),
    ("site/b/c", bytes(range(256)), 1),                                 # binary -> base64
    ("site/b/c", b"", 1),                                               # empty
    ("site/b/c", b"", 0),
    ("site/e", b'{"multi":\n"line"}', 1),                               # JSON with a raw newline -> text
    ("site/e", "ünïcødé ✓".encode(), 0),
    ("site/e", b"NaN", 1),
    ("site/e", b"\xff\xfe not utf-8", 0),
    ("site/odd %/x", b"42", 1),                                         # an escaped directory name
    *[(f"site/n/{i % 4}", json.dumps({"i": i}).encode(), i % 2) for i in range(40)],
    ("other/x", b"not in the replayed branch", 1),
]


def test_replay_recorded_again_gives_the_same_records(tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto],
                                                      recorders: list[RecorderProc]) -> None:
    a, b = brokers
    # broker A: messages retained before the shard subscribes (recorded with retain true), then live ones
    pub = Publisher(a.port, "replay-test-pub")
    try:
        pub.publish_many(RETAINED, retain=True)
        shard_a = start_shard(tmp_path / "a", a.port, recorders)
        wait_messages(shard_a, len(RETAINED))
        pub.publish_many(LIVE)
        pub.publish_many([("site/live-retained", b"kept", 1)], retain=True)  # live: recorded retain false
        wait_messages(shard_a, len(RETAINED) + len(LIVE) + 1)
    finally:
        pub.close()
    assert shard_a.stop() == 0
    root_a = tmp_path / "a" / "data"
    first = recorded(root_a, "site")
    assert len(first) == len(RETAINED) + len(LIVE)  # other/x is outside the branch
    assert sorted(t for _ts, (t, _p, _q, r) in first if r) == sorted(t for t, _p, _q in RETAINED)
    split = min(ts for ts, (_t, _p, _q, r) in first if not r)
    assert max(ts for ts, (_t, _p, _q, r) in first if r) < split

    # broker B: the retained part first (B keeps it), then a shard subscribes, then the live part
    url = f"mqtt://127.0.0.1:{b.port}"
    root = str(root_a)
    r = run_cli("replay", root, "site", "--broker", url, "--speed", "max", "--until", str(split))
    assert r.returncode == 0, r.stderr
    assert b"replayed 3 records" in r.stderr
    shard_b = start_shard(tmp_path / "b", b.port, recorders)
    wait_messages(shard_b, len(RETAINED))
    r = run_cli("replay", root, "site", "--broker", url, "--speed", "max", "--since", str(split),
                "--window", "2")  # a small window: publishes wait for acknowledgements
    assert r.returncode == 0, r.stderr
    assert f"replayed {len(first) - 3} records".encode() in r.stderr
    wait_messages(shard_b, len(first))
    assert shard_b.stop() == 0
    second = recorded(tmp_path / "b" / "data", "site")
    assert len(second) == len(first)
    assert by_topic([x for _ts, x in second]) == by_topic([x for _ts, x in first])
    assert [x for _ts, x in second if x[3]] == [x for _ts, x in first if x[3]]
    assert not (tmp_path / "b" / "data" / "other").exists()


def write_topic(root: Path, topic: str, stamps: list[int], qos: int = 1) -> None:
    d = root.joinpath(*topic.split("/"))
    d.mkdir(parents=True)
    with open(d / "+log.jsonl", "wb") as f:
        f.writelines(encode_record(ts, qos, False, json.dumps({"topic": topic, "i": i}).encode())
                     for i, ts in enumerate(stamps))


def test_speed_rename_and_mqtt_311(tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto],
                                   recorders: list[RecorderProc]) -> None:
    _a, b = brokers
    src = tmp_path / "src"
    # two topics, one record every 0.3 s alternating between them
    write_topic(src, "gap/a", [T0 + k * 300_000 for k in (0, 2, 4)])
    write_topic(src, "gap/b", [T0 + k * 300_000 for k in (1, 3, 5)], qos=0)
    # 300 records one second apart: 5 minutes of recording
    write_topic(src, "fast/x", [T0 + k * 1_000_000 for k in range(300)])
    shard = start_shard(tmp_path / "b", b.port, recorders)
    url = f"mqtt://127.0.0.1:{b.port}"

    r = run_cli("replay", str(src), "gap", "--broker", url, "--speed", "1", "--rename", "gap=moved/here",
                "--protocol", "3.1.1")
    assert r.returncode == 0, r.stderr
    wait_messages(shard, 6)
    r = run_cli("replay", str(src), "gap", "--broker", url, "--speed", "10", "--rename", "gap=ten")
    assert r.returncode == 0, r.stderr
    wait_messages(shard, 12)
    t0 = time.monotonic()
    r = run_cli("replay", str(src), "fast", "--broker", url, "--speed", "max")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    wait_messages(shard, 312)
    assert shard.stop() == 0
    assert took < 60, f"--speed max took {took:.1f} s for 5 minutes of recording"
    out = tmp_path / "b" / "data"
    got = recorded(out, "moved/here")
    assert [t for _ts, (t, _p, _q, _r) in got] == ["moved/here/a", "moved/here/b"] * 3
    assert [json.loads(p)["i"] for _ts, (_t, p, _q, _r) in got] == [0, 0, 1, 1, 2, 2]
    assert [q for _ts, (_t, _p, q, _r) in got] == [1, 0] * 3
    gaps = [(b_ - a_) / 1e6 for (a_, _), (b_, _) in itertools.pairwise(got)]
    assert all(g >= 0.25 for g in gaps), gaps          # recorded 0.3 s apart
    assert (got[-1][0] - got[0][0]) / 1e6 < 1.5 + 3.0   # 1.5 s recorded; generous on a busy machine
    assert not (out / "gap").exists()
    fast = recorded(out, "fast/x")
    assert [json.loads(p)["i"] for _ts, (_t, p, _q, _r) in fast] == list(range(300))
    ten = recorded(out, "ten")
    assert len(ten) == 6
    span = (ten[-1][0] - ten[0][0]) / 1e6
    assert 0.12 <= span < 1.5 + 3.0, span               # 1.5 s recorded / 10 = 0.15 s


def test_unreachable_broker_and_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    write_topic(src, "t/x", [T0, T0 + 1])
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = run_cli("replay", str(src), "t", "--broker", f"mqtt://127.0.0.1:{port}")
    assert r.returncode == 69, r.stderr
    assert f"cannot connect to mqtt://127.0.0.1:{port}".encode() in r.stderr
    assert b"Traceback" not in r.stderr
    assert time.monotonic() - t0 < 30
    url = f"mqtt://127.0.0.1:{port}"
    for args, code, why in [
        (["--speed", "0"], 64, "speed must be a positive number"),
        (["--speed", "fast"], 64, "speed must be a positive number"),
        (["--rename", "nothing"], 64, "expects OLD=NEW"),
        (["--rename", "t=a/+"], 64, "NEW topic contains a wildcard"),
        (["--rename", "other=x"], 64, "renames nothing"),
        (["--rename", "t=$SYS/x"], 64, "NEW may not start with '$'"),
        (["--window", "0"], 64, "--window: expected an integer >= 1"),
        (["--broker", "http://127.0.0.1:1883"], 64, "expected mqtt://"),
        (["--broker", "mqtt://u:hunter2@127.0.0.1:99999"], 64, "out of range"),
        # TLS files are loaded before anything is read or sent (issue 22: /dev/zero hung, a
        # missing file was a traceback)
        (["--ca-file", "/dev/zero"], 64, "broker.tls.ca_file: /dev/zero: not a regular file"),
        (["--ca-file", str(tmp_path / "none.pem")], 64, f"broker.tls.ca_file: {tmp_path / 'none.pem'}: cannot read"),
        (["--key-file", str(src)], 64, "broker.tls.key_file: needs broker.tls.cert_file"),
    ]:
        with pytest.raises(SystemExit) as exit_:  # a usage error: the verb's usage line, exit 64
            cli_main(["replay", str(src), "t", "--broker", url, *args])
        assert exit_.value.code == code, args
        err = capsys.readouterr().err
        assert why in err and "hunter2" not in err and "usage: shardlog replay" in err, (args, err)
    assert cli_main(["replay", str(src), "nothing", "--broker", url]) == 66
    assert "no records" in capsys.readouterr().err
    assert cli_main(["replay", str(tmp_path / "missing"), "t", "--broker", url]) == 66


def test_interrupted_or_lost_broker_says_where_to_resume(tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    _a, b = brokers
    src = tmp_path / "src"
    write_topic(src, "slow/x", [T0 + k * 500_000 for k in range(20)])  # 10 s at --speed 1
    seen: list[bytes] = []
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="replay-test-sub", protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: seen.append(m.payload)
    sub.connect("127.0.0.1", b.port)
    sub.subscribe("slow/#", 1)
    sub.loop_start()
    cmd = [sys.executable, "-m", "shardlog", "replay", str(src), "slow", "--broker", f"mqtt://127.0.0.1:{b.port}"]
    try:
        wait_for(lambda: sub.is_connected(), 10, "the test subscriber to connect")
        # Ctrl-C: exit 130, with where to go on
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: len(seen) >= 2, 20, "two replayed messages")
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=30)
        assert p.returncode == 130, err
        assert b"interrupted after" in err and b"--since " in err and b"Traceback" not in err, err
        # the broker goes away
        seen.clear()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(lambda: len(seen) >= 2, 20, "two replayed messages")
        b.stop()
        _out, err = p.communicate(timeout=30)
    finally:
        sub.loop_stop()
    assert p.returncode == 69, err
    assert b"lost the connection to" in err and b"--since " in err, err
    resume = int(err.rsplit(b"--since ", 1)[1].split()[0])
    assert T0 + 500_000 <= resume <= T0 + 19 * 500_000


def test_credentials_from_the_url_and_the_environment(tmp_path: Path) -> None:
    d = tmp_path / "auth-broker"
    d.mkdir()
    passwd = d / "passwd"
    mosquitto_passwd = os.path.join(os.path.dirname(MOSQUITTO), "mosquitto_passwd")
    if not os.path.exists(mosquitto_passwd):
        mosquitto_passwd = "/usr/bin/mosquitto_passwd"
    if not os.path.exists(mosquitto_passwd):
        pytest.skip("needs mosquitto_passwd (Debian's mosquitto package; CI has it)")
    subprocess.run([mosquitto_passwd, "-b", "-c", str(passwd), "rec", "p@ss:w/rd"], check=True,
                   capture_output=True)
    user = "user root\n" if os.geteuid() == 0 else ""  # pytest's tmp dirs are 0700: keep root to read passwd
    broker = Mosquitto(d, extra_conf=f"allow_anonymous false\npassword_file {passwd}\n{user}")
    broker.start()
    try:
        src = tmp_path / "src"
        write_topic(src, "auth/x", [T0, T0 + 1, T0 + 2])
        base = ["replay", str(src), "auth", "--speed", "max", "--broker"]
        r = run_cli(*base, f"mqtt://rec:p%40ss%3Aw%2Frd@127.0.0.1:{broker.port}")
        assert r.returncode == 0, r.stderr
        assert b"3 QoS 1/2 publishes acknowledged" in r.stderr
        assert b"p%40ss" not in r.stderr and b"p@ss" not in r.stderr
        env = {**os.environ, "MQTT_PASSWORD": "p@ss:w/rd"}
        r = run_cli(*base, f"mqtt://rec@127.0.0.1:{broker.port}", "--protocol", "3.1.1", env=env)
        assert r.returncode == 0, r.stderr
        r = run_cli(*base, f"mqtt://rec:wrong@127.0.0.1:{broker.port}")
        assert r.returncode == 69 and b"refused the connection" in r.stderr, r.stderr
        assert b"wrong" not in r.stderr
    finally:
        broker.stop()


def test_progress_bar_on_a_terminal(tmp_path: Path, brokers: tuple[Mosquitto, Mosquitto]) -> None:
    _a, b = brokers
    src = tmp_path / "src"
    write_topic(src, "bar/x", [T0 + k for k in range(50)])
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "shardlog", "replay", str(src), "bar", "--speed", "max",
                          "--broker", f"mqtt://127.0.0.1:{b.port}"], stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        p.wait(30)
    assert p.returncode == 0, out
    assert b"\r[" in out and b"/50" in out and b"%" in out, out
    assert b"replayed 50 records" in out


# -- the pure parts ---------------------------------------------------------------------------

def test_parse_speed() -> None:
    assert parse_speed("max") is None and parse_speed("MAX") is None
    assert parse_speed("1") == 1.0 and parse_speed("10") == 10.0 and parse_speed("0.5") == 0.5
    assert parse_speed("10x") == 10.0
    for bad in ("0", "-1", "nan", "inf", "fast", ""):
        with pytest.raises(ValueError):
            parse_speed(bad)


def test_delay_is_measured_from_the_start() -> None:
    start = 1000.0
    assert delay(T0, T0, start, 1.0, start) == 0.0
    assert delay(T0 + 300_000, T0, start, 1.0, start) == pytest.approx(0.3)
    assert delay(T0 + 300_000, T0, start, 1.0, start + 0.1) == pytest.approx(0.2)
    assert delay(T0 + 3_000_000, T0, start, 10.0, start) == pytest.approx(0.3)
    assert delay(T0 + 300_000, T0, start, 1.0, start + 5.0) < 0  # behind: at once
    assert delay(T0 + 10**12, T0, start, None, start) == 0.0     # max


def test_rename() -> None:
    r = parse_rename("chat=archive/chat", "chat")
    assert r == Rename("chat", "archive/chat")
    assert rename_topic("chat", r) == "archive/chat"
    assert rename_topic("chat/room42", r) == "archive/chat/room42"
    assert rename_topic("chatter", r) == "chatter"
    assert rename_topic("x", None) == "x"
    assert parse_rename("a=b=c", "a") == Rename("a", "b=c")          # split at the first '='
    assert parse_rename("chat/room42=r42", "chat") == Rename("chat/room42", "r42")  # below the prefix
    assert parse_rename("chat=c", "chat/room42") == Rename("chat", "c")           # above it
    assert parse_rename("anything=x", "") == Rename("anything", "x")
    for bad, msg in [("chat", "OLD=NEW"), ("=x", "OLD is empty"), ("chat=", "NEW is empty"),
                     ("chat=a/#", "wildcard"), ("ch+t=x", "wildcard"), ("chat=a\x00b", "U+0000"),
                     ("chat=$x", "'$'"), ("chatter=x", "renames nothing"), ("cha=x", "renames nothing")]:
        with pytest.raises(ValueError, match=msg.replace("$", r"\$").replace("+", r"\+")):
            parse_rename(bad, "chat")


def test_broker_from_url() -> None:
    b = broker_from_url("mqtt://127.0.0.1", env={})
    assert (b.host, b.port, b.mqtt5, b.username, b.password, b.tls) == ("127.0.0.1", 1883, True, None, None, None)
    b = broker_from_url("mqtt://u%40x:p%3Aq%2F@host:1884", protocol="3.1.1", env={})
    assert (b.host, b.port, b.mqtt5, b.username, b.password) == ("host", 1884, False, "u@x", "p:q/")
    b = broker_from_url("mqtts://u@[::1]", env={"MQTT_PASSWORD": "secret"})
    assert (b.host, b.port, b.password) == ("::1", 8883, "secret")
    assert b.tls is not None and b.tls.ca_file is None and not b.tls.insecure
    b = broker_from_url("mqtt://h:1", ca_file="/ca.pem", insecure=True, env={})
    assert b.tls is not None and b.tls.ca_file == "/ca.pem" and b.tls.insecure
    for bad, msg in [("http://h", "expected mqtt://"), ("mqtt://", "no host"), ("mqtt://h:99999", "out of range"),
                     ("mqtt://h/topic", "no path"), ("h:1883", "expected mqtt://")]:
        with pytest.raises(ValueError, match=msg):
            broker_from_url(bad, env={})
    with pytest.raises(ValueError) as exc:
        broker_from_url("mqtt://u:hunter2@h:0", env={})
    assert "hunter2" not in str(exc.value)


def test_format_progress() -> None:
    line = format_progress(25, 100, 2.0, 6.0, width=10)
    assert line.startswith("[##--------] 25/100  25%") and "12 rec/s" in line and "ETA 0:00:06" in line
    assert format_progress(0, None, 0.0, None).startswith("0 records")
