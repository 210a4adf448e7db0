"""MMS over TLS with the libiec61850 (and bundled mbedtls 3) inside pyiec61850-ng.

Measured here: the wheel's ``libiec61850-*.so.1.6.1`` exports ``TLSConfiguration_*``,
``IedConnection_createWithTlsSupport`` and ``IedServer_createWithTlsSupport`` and links
mbedtls statically (TLS 1.3 code present), so TLS needs no relay: a :class:`TlsConfig` is a
libiec61850 ``TLSConfiguration`` built through ctypes like every other call of the adapter.

What libiec61850 does and does not do, and how the gateway maps its config onto it:

* Both sides run mbedtls with ``MBEDTLS_SSL_VERIFY_REQUIRED``: the peer's certificate must
  chain to a configured CA, on the server side too (mutual TLS is mandatory). So the client
  needs ``ca_file`` and, against a libiec61850 server, its own ``cert_file``/``key_file``.
* ``verify: false`` cannot be honoured (the leaf is always checked) and the host name is
  never compared with the certificate (libiec61850 sets no expected host name), so a device
  config must say ``verify: true`` and ``check_hostname: false``; anything else is refused at
  start with a clear error rather than silently weakened.
* TLS 1.2 is the minimum offered (1.0/1.1 refused).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from gateway.protocols.iec61850.native import lib

__all__ = ["TlsConfig", "TlsSetupError", "client_file_problems"]

_TLS_1_2 = 6


class TlsSetupError(ValueError):
    """A TLS configuration libiec61850 cannot use (unreadable PEM, unsupported option)."""


class TlsConfig:
    """A libiec61850 ``TLSConfiguration``; :meth:`close` frees it (after the server/connection)."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    @classmethod
    def _make(cls, own_cert: str | None, own_key: str | None, ca: str | None, client: bool) -> TlsConfig:
        handle = lib.TLSConfiguration_create()
        if not handle:
            raise TlsSetupError("TLSConfiguration_create failed")
        self = cls(int(handle))
        try:
            if client:
                lib.TLSConfiguration_setClientMode(handle)
            lib.TLSConfiguration_setMinTlsVersion(handle, _TLS_1_2)
            lib.TLSConfiguration_setChainValidation(handle, True)
            lib.TLSConfiguration_setAllowOnlyKnownCertificates(handle, False)
            if own_cert is not None:
                if not lib.TLSConfiguration_setOwnCertificateFromFile(handle, _path(own_cert)):
                    raise TlsSetupError(f"cannot load certificate {own_cert} (PEM expected)")
                if own_key is None or not lib.TLSConfiguration_setOwnKeyFromFile(handle, _path(own_key), None):
                    raise TlsSetupError(f"cannot load private key {own_key} (unencrypted PEM expected)")
            if ca is not None and not lib.TLSConfiguration_addCACertificateFromFile(handle, _path(ca)):
                raise TlsSetupError(f"cannot load CA certificate {ca} (PEM expected)")
        except BaseException:
            self.close()
            raise
        return self

    @classmethod
    def client(cls, ca: str | None, cert: str | None, key: str | None) -> TlsConfig:
        """Client side: the device's certificate must chain to ``ca``; ours is ``cert``/``key``."""
        if ca is None:
            raise TlsSetupError("libiec61850 always verifies the server certificate: tls.ca_file is needed")
        return cls._make(cert, key, ca, client=True)

    @classmethod
    def server(cls, cert: str, key: str, ca: str | None) -> TlsConfig:
        """Server side (the simulator): clients must present a certificate chaining to ``ca``."""
        return cls._make(cert, key, ca, client=False)

    def connection(self) -> int:
        """A new ``IedConnection`` using this configuration (the caller destroys it)."""
        return int(lib.IedConnection_createWithTlsSupport(self.handle) or 0)

    def server_for(self, model: int) -> int:
        return int(lib.IedServer_createWithTlsSupport(model, self.handle) or 0)

    def close(self) -> None:
        handle, self.handle = self.handle, 0
        if handle:
            lib.TLSConfiguration_destroy(handle)


def client_file_problems(ca: str, cert: str | None, key: str | None) -> list[tuple[str, str]]:
    """(tls key, reason) for each client TLS file mbedtls cannot load, all of them.

    For ``check-config`` and the start of ``run``: the loader parses the files with OpenSSL,
    which takes some that mbedtls refuses (Ed25519 keys and certificates), and the adapter
    would find out only when it starts, after the embedded Redis.
    """
    problems: list[tuple[str, str]] = []
    pieces: list[tuple[str, str | None, str | None, str | None]] = [("ca_file", None, None, ca)]
    if cert is not None and key is not None:
        pieces.append(("cert_file", cert, key, None))
    for field, own_cert, own_key, own_ca in pieces:
        try:
            with _c_output_silenced():  # libiec61850 prints its mbedtls errors
                TlsConfig._make(own_cert, own_key, own_ca, client=True).close()
        except TlsSetupError as exc:
            problems.append(("key_file" if "private key" in str(exc) else field, f"libiec61850 (mbedtls): {exc}"))
    return problems


@contextlib.contextmanager
def _c_output_silenced() -> Iterator[None]:
    """Point fds 1 and 2 at /dev/null for a library call (C stdio flushed before restoring)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
        yield
    finally:
        ctypes.CDLL(None).fflush(None)
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def _path(p: str) -> bytes:
    path = Path(p)
    if not path.is_file():
        raise TlsSetupError(f"file not found: {p}")
    return str(path).encode()
