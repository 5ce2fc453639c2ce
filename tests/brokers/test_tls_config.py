"""Bad TLS files (issue 22, item 10): ``check`` builds the TLS context as ``record`` does and
exits 78 naming the key and the file; ``record`` exits 78 with the same message (never 70 with a
traceback, so ``supervise`` never restarts it in a loop); an encrypted key never prompts on a
terminal. The certificates come from tests/certs.py."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization

from tests.brokers.servers import MosquittoTLS
from tests.certs import TestCA
from tests.helpers import Mosquitto, RecorderProc, wait_for, write_map
from tests.supervisor.helpers import SupervisorProc, make_map

PASSWORD = "s3cret-key"


def tls_map(tmp_path: Path, port: int, **tls: Any) -> Path:
    return write_map(tmp_path / "shards.yaml", port, [{"name": "all", "prefix": tmp_path.name}],
                     broker_keys={"host": "localhost", "tls": tls})


def encrypted_key(ca: TestCA, path: Path) -> Path:
    key = serialization.load_pem_private_key(ca.client_key.read_bytes(), None)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.BestAvailableEncryption(PASSWORD.encode())))
    return path


def shardlog(*argv: str, timeout: float = 30) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "shardlog", *argv], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


def bad_cases(tmp_path: Path, ca: TestCA) -> list[tuple[str, dict[str, Any], str]]:
    """(case, tls keys, what the error must say)."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    ca_file = str(ca.ca_file)
    return [
        ("missing ca", {"ca_file": str(tmp_path / "nope.pem")},
         f"broker.tls.ca_file: {tmp_path / 'nope.pem'}: cannot read: No such file or directory"),
        ("garbage ca", {"ca_file": str(garbage)}, f"broker.tls.ca_file: {garbage}: no CA certificate"),
        ("directory ca", {"ca_file": str(tmp_path)}, f"broker.tls.ca_file: {tmp_path}: a directory"),
        ("/dev/zero ca", {"ca_file": "/dev/zero"}, "broker.tls.ca_file: /dev/zero: not a regular file"),
        ("missing cert", {"ca_file": ca_file, "cert_file": str(tmp_path / "no-cert.pem"),
                          "key_file": str(ca.client_key)},
         f"broker.tls.cert_file: {tmp_path / 'no-cert.pem'}: cannot read"),
        ("garbage cert", {"ca_file": ca_file, "cert_file": str(garbage), "key_file": str(ca.client_key)},
         f"broker.tls.cert_file: {garbage}: no certificate in PEM format"),
        ("key mismatch", {"ca_file": ca_file, "cert_file": str(ca.client_cert), "key_file": str(ca.server_key)},
         f"broker.tls.key_file: {ca.server_key}: the private key does not match the certificate"),
        ("cert as key", {"ca_file": ca_file, "cert_file": str(ca.client_cert), "key_file": str(ca.client_cert)},
         f"broker.tls.key_file: {ca.client_cert}: no private key in PEM format"),
        ("key without cert", {"ca_file": ca_file, "key_file": str(ca.client_key)},
         "broker.tls.key_file: needs broker.tls.cert_file"),
        ("encrypted key", {"ca_file": ca_file, "cert_file": str(ca.client_cert),
                           "key_file": str(encrypted_key(ca, tmp_path / "enc.key"))},
         "broker.tls.key_file: " + str(tmp_path / "enc.key") + ": the private key is encrypted; set "
         "broker.tls.key_password"),
        ("wrong key password", {"ca_file": ca_file, "cert_file": str(ca.client_cert),
                                "key_file": str(tmp_path / "enc.key"), "key_password": "wrong"},
         f"broker.tls.key_file: {tmp_path / 'enc.key'}: cannot load the private key (wrong key_password"),
    ]


def test_check_and_record_refuse_bad_tls_files_naming_the_key(tmp_path: Path, test_ca: TestCA) -> None:
    """Each bad file: ``check`` exits 78 with the key and the file; ``record`` exits 78 with the
    same message at start, no traceback (before: check said OK, record exited 70)."""
    failures = []
    for i, (case, keys, message) in enumerate(bad_cases(tmp_path, test_ca)):
        d = tmp_path / f"case{i}"
        d.mkdir()
        m = tls_map(d, 1, **keys)  # port 1: it must fail before connecting
        rc, out = shardlog("check", str(m))
        if rc != 78 or message not in out:
            failures.append(f"{case}: check exited {rc}: {out.strip()[-300:]}")
            continue
        rc, out = shardlog("record", str(m), "--shard", "all")
        if rc != 78 or message not in out or "Traceback" in out:
            failures.append(f"{case}: record exited {rc}: {out.strip()[-300:]}")
    assert not failures, "\n".join(failures)


def test_encrypted_key_never_prompts_on_a_terminal(tmp_path: Path, test_ca: TestCA) -> None:
    """With a controlling terminal (a pty), OpenSSL would print ``Enter PEM pass phrase:`` and wait;
    ``check`` must answer 78 at once instead."""
    m = tls_map(tmp_path, 1, ca_file=str(test_ca.ca_file), cert_file=str(test_ca.client_cert),
                key_file=str(encrypted_key(test_ca, tmp_path / "enc.key")))
    master, slave = pty.openpty()

    def controlling_tty() -> None:  # after setsid (start_new_session): the pty becomes /dev/tty
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "shardlog", "check", str(m)], stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:  # read what it prints, polled
            if select.select([master], [], [], 0.1)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:  # the pty closed: it exited
                    proc.wait(5)
        assert proc.poll() is not None, f"check still waits after 20 s (a prompt?): {out!r}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        while select.select([master], [], [], 0)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        os.close(master)
    text = out.decode(errors="replace")
    assert "pass phrase" not in text, text
    assert proc.returncode == 78, (proc.returncode, text)
    assert "key_password" in text, text


def test_encrypted_key_with_its_password_records(tmp_path: Path, mosquitto_tls: MosquittoTLS, test_ca: TestCA,
                                                 recorders: list[RecorderProc]) -> None:
    """key_password decrypts the key: check passes, and the shard connects with the certificate."""
    m = tls_map(tmp_path, mosquitto_tls.mtls_port, ca_file=str(test_ca.ca_file),
                cert_file=str(test_ca.client_cert), key_file=str(encrypted_key(test_ca, tmp_path / "enc.key")),
                key_password=PASSWORD)
    rc, out = shardlog("check", str(m))
    assert rc == 0, out
    rec = RecorderProc(m, "all", tmp_path).start(wait_subscribed=True)
    recorders.append(rec)
    wait_for(lambda: (s := rec.stats()) and s.subscribed, 20, f"a subscription ({rec.stderr_path})")
    assert rec.stop() == 0


def test_a_shards_own_broker_is_named(tmp_path: Path) -> None:
    m = write_map(tmp_path / "shards.yaml", 1, [
        {"name": "a", "prefix": "a"},
        {"name": "b", "prefix": "b", "broker": {"host": "localhost", "port": 1, "tls": {"ca_file": "/dev/zero"}}}])
    rc, out = shardlog("check", str(m))
    assert rc == 78 and "shards[1].broker.tls.ca_file: /dev/zero: not a regular file" in out, out
    rc, out = shardlog("record", str(m), "--shard", "b")
    assert rc == 78 and "shards[1].broker.tls.ca_file: /dev/zero" in out, out


def test_supervise_marks_a_shard_with_a_bad_tls_file_failed_without_restarting_it(
        tmp_path: Path, broker: Mosquitto, supervisors: list[SupervisorProc]) -> None:
    """Its recorder exits 78 at start with the key in its log: a configuration error, which the
    supervisor never restarts (before: exit 70 with a traceback, restarted in a loop)."""
    m = make_map(tmp_path / "shards.yaml", broker.port, [
        {"name": "good", "prefix": "g"},
        {"name": "tls", "prefix": "t", "broker": {"host": "localhost", "port": broker.port,
                                                  "tls": {"ca_file": str(tmp_path)}}}])
    sup = SupervisorProc(m, tmp_path)
    supervisors.append(sup)
    sup.start(wait_ready=False)
    sup.running("good")
    s = sup.wait_shard("tls", lambda s: s["state"] == "failed", 20, "the tls shard failed")
    assert s["reason"] == "configuration error" and s["restarts"] == 0, s
    assert s["last_exit"] is not None and "78" in json.dumps(s["last_exit"]), s
    assert f"shards[1].broker.tls.ca_file: {tmp_path}: a directory" in sup.log() + "".join(
        p.read_text(errors="replace") for p in tmp_path.rglob("*.log")), sup.log()[-2000:]
    assert sup.shard("good")["state"] == "running"  # type: ignore[index]


def test_supervise_with_mqtt_control_and_a_bad_tls_file_exits_78(tmp_path: Path) -> None:
    """The supervisor's own MQTT client (control.mqtt) uses the map's broker.tls: checked at
    start, exit 78 naming the key (before: a traceback from inside the client's set-up)."""
    m = make_map(tmp_path / "shards.yaml", 1, [{"name": "a", "prefix": "a"}])
    doc = yaml.safe_load(m.read_text())
    doc["broker"]["tls"] = {"ca_file": "/dev/zero"}
    doc["control"] = {"mqtt": True}
    m.write_text(yaml.safe_dump(doc))
    rc, out = shardlog("supervise", str(m))
    assert rc == 78 and "broker.tls.ca_file: /dev/zero: not a regular file" in out and "Traceback" not in out, out
