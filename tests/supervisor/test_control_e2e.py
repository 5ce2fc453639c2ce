"""Control commands end to end: a real supervisor, real recorders, a real mosquitto.

rotate / delete / move while QoS 1 messages flow (nothing lost, nothing written into a deleted or
moved tree afterwards), refused commands (they change nothing on disk and say why), the CLI
(confirmation, --yes), stop/start of one shard. Every wait is a poll with a deadline.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from supervisor.control.cli import post_control
from tests.supervisor.helpers import (
    Flow,
    Listener,
    SupervisorProc,
    make_map,
    payload_ids,
    read_records,
    topic_dir,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)

#: messages per topic in the flow test; SHARDLOG_CONTROL_FLOW=20000 for a long run
FLOW = int(os.environ.get("SHARDLOG_CONTROL_FLOW", "1200"))


def start(supervisors: list[SupervisorProc], map_path: Path, tmp_path: Path) -> SupervisorProc:
    sup = SupervisorProc(map_path, tmp_path)
    supervisors.append(sup)
    return sup.start()


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root``: relative path -> (size, mtime_ns)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def ids_of(root: Path, topic: str) -> list[int]:
    return [r["payload"]["i"] for r in read_records(root, topic)]


def contiguous(ids: list[int]) -> bool:
    return ids == list(range(ids[0], ids[0] + len(ids))) if ids else True


def test_rotate_delete_and_move_while_messages_flow(broker, supervisors, tmp_path: Path) -> None:
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"},
        {"name": "b", "prefix": "b"},
    ], root=str(root))
    sup = start(supervisors, m, tmp_path)
    sup.running("a"), sup.running("b")
    flow = Flow(broker.port, ["a/del", "a/mov", "a/rot", "b/z"], count=FLOW, batch=20, pause=0.03,
                topics_per_branch=1)
    flow.start()
    # rotate: a new segment appears, its current segment starts again
    wait_for(lambda: len(ids_of(root, "a/rot/t0")) >= 50, 20, "a/rot/t0 to hold 50 records")
    r = post_control(sup.url, "rotate", {"prefix": "a/rot"})
    assert r["ok"] and r["shard"] == "a" and r["rotated"] == 1, r
    assert (topic_dir(root, "a/rot/t0") / "+log.00000001.jsonl").stat().st_size > 0
    # delete while a/del keeps receiving: the old records go, the new ones are recorded afresh
    wait_for(lambda: len(ids_of(root, "a/del/t0")) >= 100, 20, "a/del/t0 to hold 100 records")
    on_disk = {t: max(ids_of(root, t)) for t in flow.topics("a/del")}
    r = post_control(sup.url, "delete", {"prefix": "a/del"})
    deleted_at = flow.sent
    assert r["ok"] and r["removed"], r
    # move while a/mov keeps receiving: history at the new place, new messages at the old one
    wait_for(lambda: len(ids_of(root, "a/mov/t0")) >= deleted_at + 50, 20, "a/mov/t0 to grow")
    r = post_control(sup.url, "move", {"src": "a/mov", "dst": "a/archive/mov"})
    moved_at = flow.sent
    assert r["ok"] and r["moved"], r
    moved_tree = tree(topic_dir(root, "a/archive/mov"))
    assert flow.is_alive(), "the flow ended before the commands; make it longer"
    flow.finish()
    everything = list(range(FLOW))
    wait_for(lambda: all(ids_of(root, t)[-1:] == [FLOW - 1] for t in flow.topics("a/del") + flow.topics("a/mov")),
             30, "the last message of every topic on disk")
    wait_for(lambda: sorted(payload_ids(root, flow.topics("b/z"))) == everything, 30, "all of b/z")
    for t in flow.topics("a/rot"):  # rotated, not lost
        assert ids_of(root, t) == everything
    for t in flow.topics("a/del"):
        ids = ids_of(root, t)
        # what was on disk is gone; what came after is complete, in order, with no old record back
        assert contiguous(ids) and ids[-1] == FLOW - 1 and on_disk[t] < ids[0] <= deleted_at + 20, (t, ids[:5])
    for t in flow.topics("a/mov"):
        old = ids_of(root, "a/archive/" + t[2:])
        new = ids_of(root, t)
        # history at dst, the rest at src: together every message exactly once, none lost
        assert old and contiguous(old) and old[0] == 0, (t, old[:5])
        assert new and contiguous(new) and new[0] == old[-1] + 1 and new[-1] == FLOW - 1, (t, new[:5])
        assert old[-1] < moved_at + 20
    assert tree(topic_dir(root, "a/archive/mov")) == moved_tree, "something was written into the moved tree"
    wait_for(lambda: not list(root.glob("+deleting.*")), 10, "the deleted tree to be removed")
    log = sup.log()
    assert "control from http 127.0.0.1: delete 'a/del': done" in log
    assert "control from http 127.0.0.1: move 'a/mov' -> 'a/archive/mov': done" in log


def _raw_post(url: str, op: str, data: bytes, ctype: str = "application/json") -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{url}/control/{op}", data=data, headers={"Content-Type": ctype},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_refused_commands_change_nothing_and_say_why(broker, publisher, supervisors, tmp_path: Path) -> None:
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"},
        {"name": "vip", "prefix": "a/vip"},
        {"name": "b", "prefix": "b"},
    ], root=str(root))
    sup = start(supervisors, m, tmp_path)
    for name in ("a", "vip", "b"):
        sup.running(name)
    topics = ["a/x", "a/y/z", "a/vip/v", "b/w", "a/.."]
    publisher.publish_many([(t, json.dumps({"i": i}).encode(), 1) for i in range(5) for t in topics])
    for t in topics:
        wait_for(lambda t=t: len(read_records(root, t)) == 5, 10, f"5 records of {t}")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    # settled: nothing pending, and every +recent.json holds the 5 records (its thread trails the log)
    from shardlog.topics import topic_to_relpath

    def recent_done(t: str) -> bool:
        try:
            return len(json.loads((root / topic_to_relpath(t) / "+recent.json").read_bytes())) == 5
        except (OSError, ValueError):
            return False

    wait_for(lambda: all(recent_done(t) for t in topics)
             and all(sup.shard(n)["counters"]["pending"] == 0 for n in ("a", "vip", "b")), 10,
             "the shards to settle (every +recent.json written)")
    before = tree(root), tree(outside)
    refusals = [
        ("delete", {"prefix": "../outside"}, "'..' level"),
        ("delete", {"prefix": "a/../../outside"}, "'..' level"),
        ("delete", {"prefix": str(outside)}, "absolute path"),
        ("delete", {"prefix": "a/+"}, "wildcard"),
        ("delete", {"prefix": "a/#"}, "wildcard"),
        ("delete", {"prefix": ""}, "empty"),
        ("delete", {"prefix": "c/x"}, "outside every shard's prefix"),
        ("delete", {"prefix": "a"}, "spans shards 'a' and 'vip'"),
        ("move", {"src": "a/x", "dst": "b/x"}, "a move stays within one shard"),
        ("move", {"src": "a/x", "dst": "a/vip/x"}, "belongs to shard 'vip'"),
        ("move", {"src": "a/x", "dst": "a/x/sub"}, "lies inside src"),
        ("move", {"src": "a/x", "dst": "a/y"}, "exists already"),
        ("move", {"src": "a/nothing", "dst": "a/new"}, "nothing recorded"),
        ("move", {"src": "a", "dst": "a2"}, "outside every shard's prefix"),
        ("move", {"src": "a/x"}, "missing 'dst'"),
        ("rotate", {"prefix": "a/x", "shard": "a"}, "not used"),
        ("stop", {"shard": "nope"}, "no shard named 'nope'"),
        ("delete", {"prefix": "a/x", "force": True}, "bad command"),
    ]
    for op, body, why in refusals:
        code, reply = _raw_post(sup.url, op, json.dumps({"id": 7, **body}).encode())
        assert code == 400 and not reply["ok"] and why in reply["reason"], (op, body, reply)
        assert reply["id"] == 7
    code, reply = _raw_post(sup.url, "delete", b'{"prefix": "a/x"')
    assert code == 400 and "malformed JSON" in reply["reason"]
    # issue 22: a key twice (a decoder keeps the last) is refused, not read as the last one
    code, reply = _raw_post(sup.url, "delete", b'{"id": 8, "prefix": "a/y", "prefix": "a/x"}')
    assert code == 400 and "duplicate key 'prefix'" in reply["reason"] and reply["id"] == 8, reply
    code, reply = _raw_post(sup.url, "delete", b'["a/x"]')
    assert code == 400 and "expected a JSON object" in reply["reason"]
    code, reply = _raw_post(sup.url, "delete", b'{"prefix": "a/x"}', ctype="text/plain")
    assert code == 415  # what a web page could send without a CORS preflight
    code, reply = _raw_post(sup.url, "explode", b'{}')
    assert code == 404
    assert (tree(root), tree(outside)) == before, "a refused command changed something on disk"
    # a topic level '..' is data like any other (stored as %2E%2E): only its name in a command is refused
    assert read_records(root, "a/..") and topic_dir(root, "a/..") == root / "a" / "%2E%2E"
    # rotate across shards is split between them, each rotating its own part
    r = post_control(sup.url, "rotate", {"prefix": "a"})
    assert r["ok"] and set(r["shards"]) == {"a", "vip"}, r
    assert r["shards"]["a"]["rotated"] == 3 and r["shards"]["vip"]["rotated"] == 1
    assert (topic_dir(root, "a/vip/v") / "+log.00000001.jsonl").exists()
    log = sup.log()
    assert "control from http 127.0.0.1: delete '../outside': refused" in log


def _cli(*args: str, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shardlog", *args], stdin=stdin, capture_output=True,
                          text=True, timeout=60)


def _cli_tty(args: list[str], answer: str) -> tuple[int, str]:
    """Run the CLI with a terminal on stdin and answer its question."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "shardlog", *args], stdin=slave, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        os.close(slave)
        os.write(master, answer.encode() + b"\n")
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out
    finally:
        os.close(master)


def test_cli_confirms_destructive_commands_and_stops_and_starts_a_shard(broker, publisher, supervisors,
                                                                        tmp_path: Path) -> None:
    verbs = {ep.name for ep in importlib.metadata.entry_points(group="shardlog.commands")}
    assert {"rotate", "rm", "mv", "stop", "start"} <= verbs, (
        "the control verbs are not registered in this environment: re-run "
        "`pip install --no-deps -e .` in the worktree (pyproject.toml's shardlog.commands changed)")
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"},
        {"name": "b", "prefix": "b"},
    ], root=str(root))
    sup = start(supervisors, m, tmp_path)
    sup.running("a"), sup.running("b")
    publisher.publish_many([(t, b'{"i": 1}', 1) for t in ("a/x", "a/y", "a/z", "b/w")])
    for t in ("a/x", "a/y", "a/z", "b/w"):
        wait_for(lambda t=t: read_records(root, t), 10, f"a record of {t}")
    # no terminal and no --yes: refused before anything is sent
    p = _cli("rm", str(m), "a/x")
    assert p.returncode == 64 and "--yes" in p.stderr and topic_dir(root, "a/x").exists()
    # a terminal: asked; "n" changes nothing, "y" deletes
    code, out = _cli_tty(["rm", str(m), "a/x"], "n")
    assert code == 64 and "Delete 'a/x'" in out and topic_dir(root, "a/x").exists(), out
    code, out = _cli_tty(["rm", str(m), "a/x"], "y")
    assert code == 0 and not topic_dir(root, "a/x").exists(), out
    p = _cli("mv", "--url", sup.url, "a/y", "a/old/y", "--yes")
    assert p.returncode == 0, p.stderr
    assert read_records(root, "a/old/y") and not topic_dir(root, "a/y").exists()
    p = _cli("rotate", str(m), "a/z")
    assert p.returncode == 0 and "rotated 1" in p.stdout, p.stdout + p.stderr
    p = _cli("mv", str(m), "a/z", "b/z", "--yes")
    assert p.returncode == 1 and "a move stays within one shard" in p.stderr
    # stop one shard: it stays stopped (no restart) until started
    b_pid = sup.shard("b")["pid"]
    p = _cli("stop", str(m), "b", "--yes")
    assert p.returncode == 0, p.stderr
    sup.wait_shard("b", lambda s: s["state"] == "stopped" and s["pid"] is None, 15, "b stopped")
    assert sup.shard("b")["last_exit"]["code"] == 0 and sup.shard("b")["reason"] == "stopped by a control command"
    p = _cli("rotate", str(m), "b/w")
    assert p.returncode == 1 and "not running" in p.stderr
    p = _cli("start", str(m), "b")
    assert p.returncode == 0, p.stderr
    sup.running("b", not_pid=b_pid)
    assert sup.shard("a")["restarts"] == 0
    # stop the whole supervisor
    p = _cli("stop", str(m), "--yes")
    assert p.returncode == 0, p.stderr
    assert sup.wait(30) == 0


def test_mqtt_control_with_token_and_status_topics(broker, publisher, supervisors, tmp_path: Path) -> None:
    root = tmp_path / "data"
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "a", "prefix": "a"},
        {"name": "rest", "prefix": "#"},   # its subscription covers the control topic: never recorded
    ], root=str(root))
    doc = yaml.safe_load(m.read_text())
    doc["control"] = {"mqtt": True, "token": "${CTL_TOKEN}", "status_topic": "st",
                      "supervisor_topic": "sup/{host}", "supervisor_interval": "500ms"}
    m.write_text(yaml.safe_dump(doc))
    sup = SupervisorProc(m, tmp_path, env={"CTL_TOKEN": "s3cret"}, extra=["--host", "h1"])
    supervisors.append(sup)
    listen = Listener(broker.port, ["shardlog/control/h1/reply", "resp/#", "st/#", "sup/h1"])
    try:
        sup.start()
        a0 = sup.running("a")
        sup.running("rest")
        wait_for(lambda: listen.last("st/a") == b"online" and listen.last("st/rest") == b"online", 10,
                 "both shards' retained status online")
        publisher.publish_many([(t, b'{"i": 1}', 1) for t in ("a/x", "a/y")])
        wait_for(lambda: read_records(root, "a/x") and read_records(root, "a/y"), 10, "a/x and a/y recorded")
        ctl = "shardlog/control/h1"
        reply_topic = ctl + "/reply"

        def send(payload: bytes, retain: bool = False, props: Properties | None = None) -> None:
            publisher.client.publish(ctl, payload, qos=1, retain=retain, properties=props).wait_for_publish(10)

        def answer(ident: Any, topic: str = reply_topic) -> dict[str, Any]:
            return wait_for(lambda: listen.reply(topic, ident), 15, f"the reply to command {ident}")[0]

        send(b'{"id": 1, "op": "delete", "prefix": "a/x"')
        assert listen.reply(reply_topic, 1) is None
        wait_for(lambda: any(b"malformed JSON" in p for t, p, _, _ in listen.messages if t == reply_topic), 10,
                 "the refusal of malformed JSON")
        send(b'{"id": 2, "op": "delete", "prefix": "a/x"}')
        assert answer(2) == {"id": 2, "op": "delete", "ok": False, "reason": "bad or missing token"}
        send(b'{"id": 3, "op": "delete", "prefix": "a/x", "token": "guess"}')
        assert answer(3)["reason"] == "bad or missing token"
        send(b'{"id": 4, "op": "explode", "token": "s3cret"}')
        assert "unknown op" in answer(4)["reason"]
        send(b'{"id": 5, "op": "delete", "prefix": "a/y", "token": "s3cret"}', retain=True)
        assert "retained commands are never carried out" in answer(5)["reason"]
        send(b"", retain=True)  # clear it
        assert topic_dir(root, "a/x").exists() and topic_dir(root, "a/y").exists()
        send(b'{"id": 6, "op": "delete", "prefix": "a/x", "token": "s3cret"}')
        assert answer(6)["ok"] and not topic_dir(root, "a/x").exists()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "resp/me"
        props.CorrelationData = b"corr-7"
        send(b'{"id": "r7", "op": "rotate", "prefix": "a/y", "token": "s3cret"}', props=props)
        doc, rprops = wait_for(lambda: listen.reply("resp/me", "r7"), 15, "the reply on the response topic")
        assert doc["ok"] and doc["rotated"] == 1 and rprops.CorrelationData == b"corr-7"
        # the control topic (with its tokens) was never recorded, although rest subscribes to '#'
        assert not (root / "shardlog").exists()
        wait_for(lambda: sup.shard("rest")["counters"]["discarded"] >= 9, 5, "rest to count what it discarded")
        assert "control from mqtt shardlog/control/h1: delete 'a/x': done" in sup.log()
        # the supervisor's /status document, retained
        status = wait_for(lambda: listen.last("sup/h1"), 10, "the supervisor's status document")
        assert {s["name"] for s in json.loads(status)["shards"]} == {"a", "rest"}
        # Last Will: a SIGKILLed shard goes offline, and online again when it is back
        os.kill(a0["pid"], signal.SIGKILL)
        wait_for(lambda: listen.last("st/a") == b"offline", 10, "st/a offline after SIGKILL (Last Will)")
        sup.running("a", not_pid=a0["pid"])
        wait_for(lambda: listen.last("st/a") == b"online", 10, "st/a online again after the restart")
        # a graceful stop (over MQTT) says offline too; start brings it back
        send(b'{"id": 8, "op": "stop", "shard": "a", "token": "s3cret"}')
        assert answer(8)["ok"]
        wait_for(lambda: listen.last("st/a") == b"offline", 10, "st/a offline after a graceful stop")
        sup.wait_shard("a", lambda s: s["state"] == "stopped", 10, "a stopped")
        send(b'{"id": 9, "op": "start", "shard": "a", "token": "s3cret"}')
        assert answer(9)["ok"]
        wait_for(lambda: listen.last("st/a") == b"online", 15, "st/a online after start")
        assert listen.last("st/rest") == b"online"
    finally:
        listen.close()


DOCS = Path(__file__).resolve().parents[2] / "docs" / "control.md"


def documented_acl() -> str:
    """The mosquitto ACL block of docs/control.md (the one with ``user operator``)."""
    blocks = DOCS.read_text().split("```")
    return next(b for b in blocks[1::2] if "user operator" in b).strip("\n") + "\n"


def test_the_documented_mosquitto_acl_lets_only_operators_send_commands(supervisors, tmp_path: Path) -> None:
    from tests.helpers import MOSQUITTO, Mosquitto

    if not os.path.exists(MOSQUITTO):
        pytest.skip("needs mosquitto itself (its ACL file is what is tested); .ci/run installs it")
    bdir = tmp_path / "broker"
    bdir.mkdir()
    pw = bdir / "passwd"
    for i, user in enumerate(("recorder", "operator", "device", "other")):
        subprocess.run(["mosquitto_passwd", "-b", *([] if i else ["-c"]), str(pw), user, f"{user}-pw"],
                       check=True, capture_output=True)
    acl = bdir / "acl"
    acl.write_text(documented_acl() + "\nuser device\ntopic write a/#\n")
    # as root, mosquitto would switch to the user mosquitto, who cannot read files in a 0700 tmp dir
    run_as = "user root\n" if os.geteuid() == 0 else ""
    broker = Mosquitto(bdir, extra_conf=f"password_file {pw}\nacl_file {acl}\n{run_as}")
    broker.start()
    try:
        root = tmp_path / "data"
        m = make_map(tmp_path / "shards.yaml", broker.port, [{"name": "a", "prefix": "a"}], root=str(root))
        doc = yaml.safe_load(m.read_text())
        doc["broker"].update(username="recorder", password="recorder-pw")
        doc["control"] = {"mqtt": True, "status_topic": "shardlog/status"}
        m.write_text(yaml.safe_dump(doc))
        sup = SupervisorProc(m, tmp_path, extra=["--host", "h1"])
        supervisors.append(sup)
        sup.start()   # the recorder may publish its Will: else mosquitto would refuse its connection
        sup.running("a")

        def client(user: str | None) -> mqtt.Client:
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"acl-{user}-{os.getpid()}", protocol=mqtt.MQTTv5)
            if user:
                c.username_pw_set(user, f"{user}-pw")
            c.connect("127.0.0.1", broker.port)
            c.loop_start()
            return c

        device = client("device")
        for t in ("a/x", "a/y"):
            device.publish(t, b'{"i": 1}', qos=1).wait_for_publish(10)
        wait_for(lambda: read_records(root, "a/x") and read_records(root, "a/y"), 10, "a/x and a/y recorded")
        listen = Listener.__new__(Listener)  # as the operator: replies and status
        listen.messages, listen.lock = [], threading.Lock()
        op = client("operator")
        op.on_message = listen._on_message
        got = threading.Event()
        op.on_subscribe = lambda *a: got.set()
        op.subscribe([("shardlog/control/h1/reply", 1), ("shardlog/status/#", 1)])
        assert got.wait(10)
        wait_for(lambda: listen.last("shardlog/status/a") == b"online", 10, "a's status, readable by anyone")
        others = [client("other"), client(None), device]
        for i, c in enumerate(others):  # not operators: the broker drops their commands
            c.publish("shardlog/control/h1", json.dumps({"id": f"x{i}", "op": "delete", "prefix": "a/y"}),
                      qos=1).wait_for_publish(10)
        op.publish("shardlog/control/h1", b'{"id": "op1", "op": "delete", "prefix": "a/x"}', qos=1).wait_for_publish(10)
        reply = wait_for(lambda: listen.reply("shardlog/control/h1/reply", "op1"), 15, "the operator's reply")[0]
        assert reply["ok"] and not topic_dir(root, "a/x").exists()
        assert topic_dir(root, "a/y").exists(), "a command from a non-operator was carried out"
        assert not any(listen.reply("shardlog/control/h1/reply", f"x{i}") for i in range(3))
        assert "delete 'a/y'" not in sup.log()
        for c in [op, *others]:
            c.disconnect()
            c.loop_stop()
    finally:
        broker.stop()
