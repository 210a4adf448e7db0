"""A throw-away PKI for TLS labs and tests: one CA, server and client certificates, PEM files.

Why generate instead of committing test keys: a committed private key ends up trusted
somewhere it should not be. Tests call :func:`make_lab_pki` on a temporary directory; the
keys live as long as the test. Never use these certificates outside a lab: the keys are
unencrypted and valid for one day.

A lab that runs for longer than a test uses the same code through ``mgms pki init`` and
``mgms pki issue`` (:func:`init_ca`, :func:`issue`): the CA key is then kept (``ca.key``,
0600) so more certificates can be issued later, and the validity is chosen (``days``).

Needs the ``cryptography`` package, imported only when a PKI is made (the simulator and the
gateway do not need it to run).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CA_CERT", "CA_KEY", "CertPair", "LabPki", "PkiError", "init_ca", "issue", "make_lab_pki"]

CA_CERT = "ca.crt"
CA_KEY = "ca.key"


class PkiError(Exception):
    """A PKI directory is not usable as asked (no CA yet, a CA already there, a file exists)."""


@dataclass(frozen=True, slots=True)
class CertPair:
    """A certificate and its private key, as PEM file paths."""

    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class LabPki:
    """The files of one lab PKI.

    ``ca`` signs ``server`` (the simulated device) and ``client`` (the gateway). ``rogue_ca``
    is an unrelated CA and ``rogue_client`` a client certificate it signed: what an attacker
    with a certificate of their own would present. ``clients`` holds one more client
    certificate per name asked for (CN = that name: one per participant of a messaging lab).
    """

    ca: Path
    server: CertPair
    client: CertPair
    rogue_ca: Path
    rogue_client: CertPair
    clients: Mapping[str, CertPair] = field(default_factory=dict)


def _names(common_name: str) -> Any:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MGMS lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(directory: Path, stem: str, cert: Any, key: Any) -> CertPair:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)  # touch keeps the mode of a file being replaced
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return CertPair(cert_path, key_path)


def _ca(common_name: str, now: dt.datetime, days: float = 1.0) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = _names(common_name)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    ca_cert: Any,
    ca_key: Any,
    now: dt.datetime,
    *,
    server: bool,
    hosts: tuple[str, ...],
    client: bool = False,
    days: float = 1.0,
) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    # a participant's certificate may serve both ways (the AMS: HTTPS server and MQTT client)
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client or not server:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_names(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        alt: list[Any] = []
        for h in hosts:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                alt.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_lab_pki(
    directory: str | os.PathLike[str],
    *,
    server_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_names: tuple[str, ...] = (),
) -> LabPki:
    """Write a CA, a server certificate naming ``server_hosts`` and a client certificate.

    EC P-256 keys and SHA-256 signatures: what IEC 62351-3 deployments use today and cheap
    to generate (a whole PKI takes well under 0.1 s).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _ca("MGMS lab CA", now)
    ca_path = directory / CA_CERT
    from cryptography.hazmat.primitives import serialization

    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    server = _write(
        directory, "server", *_leaf("simulated device", ca_cert, ca_key, now, server=True, hosts=server_hosts)
    )
    client = _write(directory, "client", *_leaf("mgms gateway", ca_cert, ca_key, now, server=False, hosts=()))
    rogue_cert, rogue_key = _ca("someone else's CA", now)
    rogue_ca_path = directory / "rogue_ca.crt"
    rogue_ca_path.write_bytes(rogue_cert.public_bytes(serialization.Encoding.PEM))
    rogue_client = _write(
        directory, "rogue_client", *_leaf("intruder", rogue_cert, rogue_key, now, server=False, hosts=())
    )
    clients = {
        name: _write(directory, f"client-{name}", *_leaf(name, ca_cert, ca_key, now, server=False, hosts=()))
        for name in client_names
    }
    return LabPki(ca_path, server, client, rogue_ca_path, rogue_client, clients)


def init_ca(directory: str | os.PathLike[str], *, days: float = 365.0, common_name: str = "MGMS lab CA") -> CertPair:
    """Create a lab CA in ``directory``: ``ca.crt`` and its key ``ca.key`` (0600), kept for :func:`issue`.

    Refuses a directory that already has a CA: replacing it would silently invalidate every
    certificate issued so far (delete the files to start over).
    """
    d = Path(directory)
    if (d / CA_CERT).exists() or (d / CA_KEY).exists():
        raise PkiError(f"{d} already has a CA ({CA_CERT}/{CA_KEY}); remove them to make a new one")
    d.mkdir(parents=True, exist_ok=True)
    cert, key = _ca(common_name, dt.datetime.now(dt.UTC), days)
    return _write(d, "ca", cert, key)


def issue(
    directory: str | os.PathLike[str],
    name: str,
    *,
    hosts: tuple[str, ...] = (),
    common_name: str | None = None,
    days: float = 365.0,
    overwrite: bool = False,
) -> CertPair:
    """Issue ``<name>.crt``/``<name>.key`` from the CA of :func:`init_ca` in ``directory``.

    The subject CN is ``common_name`` (default ``name``: a participant's name, which is who the
    HTTPS transport takes a client to be). With ``hosts`` (IP addresses or DNS names) the
    certificate is also a server certificate for them (serverAuth + clientAuth); without, a
    client certificate only.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = Path(directory)
    if not name or "/" in name or name.startswith("."):
        raise PkiError(f"not a usable file name: {name!r}")
    if name == "ca":
        raise PkiError("'ca' is the CA's own file name")
    try:
        ca_cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise PkiError(f"no CA in {d}: run `mgms pki init --dir {d}` first ({exc.filename} missing)") from exc
    if not overwrite and ((d / f"{name}.crt").exists() or (d / f"{name}.key").exists()):
        raise PkiError(f"{d / (name + '.crt')} exists (use --force to replace it)")
    cert, key = _leaf(
        common_name or name,
        ca_cert,
        ca_key,
        dt.datetime.now(dt.UTC),
        server=bool(hosts),
        client=True,
        hosts=hosts,
        days=days,
    )
    return _write(d, name, cert, key)
