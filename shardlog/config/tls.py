"""The TLS context of a broker connection, built once the same way for ``check`` and ``record``.

:func:`ssl_context` reads a map's ``broker.tls`` and returns the ``ssl.SSLContext`` the client
connects with, or raises :class:`~shardlog.config.schema.ConfigError` naming the key and the
file (``broker.tls.ca_file: /etc/ca.pem: not a regular file``). Every file must be a readable
regular file of at most 1 MiB (a directory, ``/dev/zero`` or a FIFO is refused before OpenSSL
reads it); an encrypted key is decrypted with ``key_password`` or refused, never by a prompt
on the terminal (OpenSSL's ``Enter PEM pass phrase:``); a ``key_file`` needs a ``cert_file``.
``shardlog check`` calls :func:`check_tls` on every broker of a map; the recorder builds its
client's context with :func:`ssl_context`, so a file that fails one fails the other with the
same message, and ``record`` exits 78 (a configuration error, never restarted).
"""

from __future__ import annotations

import os
import ssl
import stat
from typing import TYPE_CHECKING

from shardlog.config.schema import ConfigError

if TYPE_CHECKING:
    from shardlog.config.schema import TLS, Shard, ShardMap

MAX_FILE = 1024 * 1024  # a PEM bundle of every public CA is about 200 KiB


class _NoPassword(Exception):
    """Raised by the password callback: the key is encrypted and no key_password is set."""


def broker_key(smap: ShardMap, shard: Shard) -> str:
    """The key of the broker a shard uses, for error messages: ``broker`` or ``shards[2].broker``."""
    return "broker" if shard.broker is None else f"shards[{smap.shards.index(shard)}].broker"


def _read(key: str, path: str) -> bytes:
    """The bytes of a TLS file, bounded; a ConfigError naming ``key`` and ``path`` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)  # a FIFO must not block
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
            raise ConfigError(f"{key}: {path}: {kind} (expected a PEM file)")
        if st.st_size > MAX_FILE:
            raise ConfigError(f"{key}: {path}: larger than 1 MiB: not a PEM certificate or key")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: {path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _has_certificate(path: str) -> bool:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except (ssl.SSLError, OSError):
        return False
    return True


def ssl_context(tls: TLS, where: str = "broker") -> ssl.SSLContext:
    """The client context of ``where``'s ``tls`` section (``where``: ``broker``, ``shards[1].broker``)."""
    key = f"{where}.tls"
    if tls.key_file is not None and tls.cert_file is None:
        raise ConfigError(f"{key}.key_file: needs {key}.cert_file (a client key without its certificate "
                          "is never sent)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and host name checks
    if tls.ca_file is not None:
        _read(f"{key}.ca_file", tls.ca_file)
        try:
            ctx.load_verify_locations(cafile=tls.ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{key}.ca_file: {tls.ca_file}: no CA certificate in PEM format ({exc})") from None
    else:
        ctx.load_default_certs()
    if tls.cert_file is not None:
        _load_client_cert(ctx, tls, key)
    ctx.check_hostname = not tls.insecure
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, tls: TLS, key: str) -> None:
    cert_file = tls.cert_file
    assert cert_file is not None
    _read(f"{key}.cert_file", cert_file)
    if not _has_certificate(cert_file):
        raise ConfigError(f"{key}.cert_file: {cert_file}: no certificate in PEM format")
    key_key, key_path = (f"{key}.key_file", tls.key_file) if tls.key_file else (f"{key}.cert_file", cert_file)
    data = _read(key_key, key_path)
    if b"PRIVATE KEY-----" not in data:
        raise ConfigError(f"{key_key}: {key_path}: no private key in PEM format")
    password = tls.key_password

    def give_password() -> bytes:  # OpenSSL would prompt on the terminal without it
        if password is None:
            raise _NoPassword
        return password.encode("utf-8")

    try:
        ctx.load_cert_chain(cert_file, tls.key_file, give_password)
    except _NoPassword:
        raise ConfigError(f"{key_key}: {key_path}: the private key is encrypted; set {key}.key_password "
                          "(e.g. key_password: ${TLS_KEY_PASSWORD})") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"{key_key}: {key_path}: the private key does not match the certificate "
                              f"{cert_file}") from None
        why = "wrong key_password, or " if password is not None else ""
        raise ConfigError(f"{key_key}: {key_path}: cannot load the private key ({why}not a PEM key: "
                          f"{exc})") from None
    except OSError as exc:
        raise ConfigError(f"{key_key}: {key_path}: cannot read: {exc.strerror or exc}") from None


def check_tls(smap: ShardMap) -> int:
    """Build the TLS context of every broker of the map that has ``tls`` (as ``record`` will);
    how many. Raises ConfigError naming the key."""
    n = 0
    if smap.broker.tls is not None:
        ssl_context(smap.broker.tls, "broker")
        n += 1
    for shard in smap.shards:
        if shard.broker is not None and shard.broker.tls is not None:
            ssl_context(shard.broker.tls, broker_key(smap, shard))
            n += 1
    return n
