"""A throwaway test CA with a server and a client certificate (the ``cryptography`` package).

Made once per test session (the ``test_ca`` fixture in tests/brokers/conftest.py) and by
bench/throughput.py --tls; every key is an ECDSA P-256 key (fast to make), every certificate is
valid for a day. The server certificate names ``localhost``, ``127.0.0.1`` and ``::1``, so a
client verifies the host name for real (no ``insecure``)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class TestCA:
    __test__ = False  # not a test class (its name starts with Test)
    dir: Path
    ca_file: Path       # the CA certificate (PEM)
    server_cert: Path
    server_key: Path
    client_cert: Path   # signed by the CA, CN "shardlog-test-client"
    client_key: Path
    other_ca_file: Path  # a second, unrelated CA: a client trusting only it must fail


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _ca(cn: str, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(cn: str, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, now: dt.datetime,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
    return key, b.sign(ca_key, hashes.SHA256())


def make_test_ca(directory: Path) -> TestCA:
    """Write a CA, a server and a client certificate with their keys into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key, ca_cert = _ca("shardlog test CA", now)
    _other_key, other_cert = _ca("some other CA", now)
    paths = TestCA(dir=directory, ca_file=directory / "ca.pem", server_cert=directory / "server.pem",
                   server_key=directory / "server.key", client_cert=directory / "client.pem",
                   client_key=directory / "client.key", other_ca_file=directory / "other-ca.pem")
    paths.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.other_ca_file.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    for server, cert_path, key_path, cn in ((True, paths.server_cert, paths.server_key, "localhost"),
                                            (False, paths.client_cert, paths.client_key, "shardlog-test-client")):
        key, cert = _leaf(cn, ca_key, ca_cert, now, server)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    return paths
