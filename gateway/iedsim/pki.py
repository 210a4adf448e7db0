"""A throw-away PKI for TLS labs and tests: one CA, server and client certificates, PEM files.

Why generate instead of committing test keys: a committed private key ends up trusted
somewhere it should not be. Tests call :func:`make_lab_pki` on a temporary directory; the
keys live as long as the test. Never use these certificates outside a lab: the keys are
unencrypted and valid for one day.

Needs the ``cryptography`` package, imported only when a PKI is made (the simulator and the
gateway do not need it to run).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CertPair", "LabPki", "make_lab_pki"]


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
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return CertPair(cert_path, key_path)


def _ca(common_name: str, now: dt.datetime) -> tuple[Any, Any]:
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
        .not_valid_after(now + dt.timedelta(days=1))
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
    common_name: str, ca_cert: Any, ca_key: Any, now: dt.datetime, *, server: bool, hosts: tuple[str, ...]
) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_names(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
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
    directory: Path,
    *,
    server_hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    client_names: tuple[str, ...] = (),
) -> LabPki:
    """Write a CA, a server certificate naming ``server_hosts`` and a client certificate.

    EC P-256 keys and SHA-256 signatures: what IEC 62351-3 deployments use today and cheap
    to generate (a whole PKI takes well under 0.1 s).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _ca("MGMS lab CA", now)
    ca_path = directory / "ca.crt"
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
