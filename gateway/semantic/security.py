"""End-to-end security of message payloads: sign, optionally encrypt, and the inbound checks.

The broker (MQTT) or any HTTPS proxy only relays bytes; it must see neither the payload nor be
able to alter, redirect or replay a message unnoticed. So every message is

* **signed** by its sender with Ed25519 over the header and the payload, and
* **encrypted** (default) to its recipient: a fresh X25519 key pair per message, ECDH with the
  recipient's X25519 public key, HKDF-SHA256 to a 256-bit key, AES-256-GCM. The associated
  data is the whole cleartext header (id, type, version, sender, recipient, created, expires,
  topic, algorithms, ephemeral key, IV), so changing any of it breaks the tag. The signature
  travels inside the ciphertext (sign, then encrypt), which lets the receiver tell a changed
  byte (``tampered``: the tag fails) from a forged signer (``bad_signature``: the tag holds,
  the signature does not).

Signed-only ("plain") mode, for debugging, keeps the payload readable and adds ``sig_alg`` and
``signature``; there a changed byte shows up as ``bad_signature``.

Inbound pipeline (:class:`Opener`), in this order: size and JSON -> @context and version ->
header schema -> recipient -> known sender -> time window -> decrypt -> verify -> payload schema
-> replay claim. Cheap checks come first; the replay claim comes last so that forged messages
cannot fill the nonce store and lock out the genuine one.

Replay protection: a message is accepted only if ``created`` is within ``replay_window_s`` in
the past (``clock_skew_s`` in the future) and before ``expires``, and its id has not been
claimed before; ids are kept in a :class:`NonceStore` (Redis ``SET NX EX`` in production) for
as long as the message could still pass the time check.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.errors import ConfigError, ConfigIssue, StoreError
from gateway.semantic.envelope import (
    HEADER_FIELDS,
    Envelope,
    Header,
    canonical_json,
    load_json,
    parse_header,
    payload_from,
    to_document,
)
from gateway.semantic.errors import (
    BadSignature,
    Expired,
    Malformed,
    MessageRejected,
    RejectionCounter,
    Replayed,
    Tampered,
    UnknownSender,
    UnsupportedVersion,
    WrongRecipient,
)
from gateway.semantic.messages import Name

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = [
    "ENC_ALG",
    "KEY_FORMAT",
    "SIG_ALG",
    "Keystore",
    "KeystoreSettings",
    "MemoryNonceStore",
    "NonceStore",
    "Opener",
    "PrivateIdentity",
    "PublicIdentity",
    "RedisNonceStore",
    "Sealer",
    "SecurityMode",
    "load_private_identity",
    "load_public_identity",
    "write_key_pair",
]

log = logging.getLogger(__name__)

SIG_ALG = "Ed25519"
ENC_ALG = "X25519-HKDF-SHA256-A256GCM"
KEY_FORMAT: Literal["mgms-key-v1"] = "mgms-key-v1"
_SIG_DOMAIN = b"mgms-heila-v1 signature\n"
_AAD_DOMAIN = b"mgms-heila-v1 aad\n"
_HKDF_INFO = b"mgms-heila-v1 " + ENC_ALG.encode()
_IV_BYTES = 12
_B64 = re.compile(r"^[A-Za-z0-9_-]*$")

_SIGNED_FIELDS = frozenset({"@context", *HEADER_FIELDS, "sig_alg", "payload", "signature"})
_ENCRYPTED_FIELDS = frozenset({"@context", *HEADER_FIELDS, "sig_alg", "enc_alg", "epk", "iv", "ciphertext"})


class SecurityMode(StrEnum):
    """How a message is protected on the way out."""

    ENCRYPTED = "encrypted"  # signed, then encrypted to the recipient (the default)
    SIGNED = "signed"  # signed only: payload readable, for debugging


def b64encode(data: bytes) -> str:
    """URL-safe base64 without padding (JOSE style)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: str, *, length: int | None = None) -> bytes:
    """Strict inverse of :func:`b64encode`: only the canonical encoding is accepted.

    Lenient decoders ignore the spare bits of the last character, so two different strings
    would carry the same bytes; refusing non-canonical input keeps "one changed byte" meaning
    "rejected".
    """
    if not _B64.fullmatch(text):
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error as exc:
        raise ValueError(str(exc)) from exc
    if b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    if length is not None and len(data) != length:
        raise ValueError(f"expected {length} bytes, got {len(data)}")
    return data


def _raw(key: Ed25519PublicKey | X25519PublicKey | Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    if isinstance(key, Ed25519PublicKey | X25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


# --- Keys ----------------------------------------------------------------------------------


class _KeyFile(BaseModel):
    """On-disk form of a participant's keys: small JSON, raw keys in base64url."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["mgms-key-v1"]
    kind: Literal["public", "private"]
    participant: Name
    ed25519: str = Field(description="signing key (raw 32 bytes, base64url)")
    x25519: str = Field(description="encryption key (raw 32 bytes, base64url)")


@dataclass(frozen=True, slots=True)
class PublicIdentity:
    """What others need to know about a participant: who, and its two public keys."""

    participant: str
    verify_key: Ed25519PublicKey
    encrypt_key: X25519PublicKey

    def to_json(self) -> str:
        """The public key file's content."""
        model = _KeyFile(
            format=KEY_FORMAT,
            kind="public",
            participant=self.participant,
            ed25519=b64encode(_raw(self.verify_key)),
            x25519=b64encode(_raw(self.encrypt_key)),
        )
        return model.model_dump_json(indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class PrivateIdentity:
    """A participant's own key pairs: Ed25519 to sign, X25519 to decrypt."""

    participant: str
    sign_key: Ed25519PrivateKey
    decrypt_key: X25519PrivateKey

    @classmethod
    def generate(cls, participant: str) -> PrivateIdentity:
        """Fresh key pairs from the OS random source."""
        return cls(participant, Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.participant, self.sign_key.public_key(), self.decrypt_key.public_key())

    def to_json(self) -> str:
        """The private key file's content (keep it 0600)."""
        model = _KeyFile(
            format=KEY_FORMAT,
            kind="private",
            participant=self.participant,
            ed25519=b64encode(_raw(self.sign_key)),
            x25519=b64encode(_raw(self.decrypt_key)),
        )
        return model.model_dump_json(indent=2) + "\n"


def _read_key_file(path: Path, kind: Literal["public", "private"]) -> tuple[str, bytes, bytes]:
    def bad(reason: str, key: str = "") -> ConfigError:
        return ConfigError([ConfigIssue(str(path), key, reason)])

    try:
        text = path.read_text()
    except OSError as exc:
        raise bad(f"cannot read key file: {exc.strerror or exc}") from exc
    try:
        model = _KeyFile.model_validate_json(text)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise bad(err["msg"], ".".join(str(x) for x in err["loc"])) from exc
    if model.kind != kind:
        raise bad(f"expected a {kind} key file, this one is {model.kind}", "kind")
    try:
        return model.participant, b64decode(model.ed25519, length=32), b64decode(model.x25519, length=32)
    except ValueError as exc:
        raise bad(str(exc)) from exc


def load_public_identity(path: str | os.PathLike[str]) -> PublicIdentity:
    """Read a participant's ``.pub`` file."""
    name, ed, x = _read_key_file(Path(path), "public")
    return PublicIdentity(name, Ed25519PublicKey.from_public_bytes(ed), X25519PublicKey.from_public_bytes(x))


def load_private_identity(path: str | os.PathLike[str]) -> PrivateIdentity:
    """Read our own ``.key`` file; refuse it if others may read it (as ssh does)."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), "", f"cannot read key file: {exc.strerror or exc}")]) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        reason = f"private key file is accessible by others (mode {mode & 0o777:o}); chmod 600 it"
        raise ConfigError([ConfigIssue(str(p), "", reason)])
    name, ed, x = _read_key_file(p, "private")
    return PrivateIdentity(name, Ed25519PrivateKey.from_private_bytes(ed), X25519PrivateKey.from_private_bytes(x))


def write_key_pair(participant: str, directory: str | os.PathLike[str], *, overwrite: bool = False) -> PrivateIdentity:
    """Create ``<participant>.key`` (mode 0600) and ``<participant>.pub`` in ``directory``.

    The private file is created with its final mode in one ``open`` call, so it is never
    readable by others, not even for a moment. Existing files are kept unless ``overwrite``.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", participant):
        raise ValueError(f"participant name {participant!r}: use letters, digits, '.', '_', '-' (max 100)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ident = PrivateIdentity.generate(participant)
    priv, pub = d / f"{participant}.key", d / f"{participant}.pub"
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(priv, flags, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        f.write(ident.to_json())
    pub_fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(pub_fd, "w") as f:
        f.write(ident.public.to_json())
    return ident


class KeystoreSettings(BaseModel):
    """Where a participant's keys live: its own private key file and its peers' public files.

    ``peers_dir`` is read for every ``*.pub`` file; ``peers`` names extra files one by one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    identity: Path
    peers_dir: Path | None = None
    peers: tuple[Path, ...] = ()


class Keystore:
    """Our own identity and the public identities of the participants we talk to."""

    def __init__(self, own: PrivateIdentity, peers: Iterable[PublicIdentity]) -> None:
        self.own = own
        table: dict[str, PublicIdentity] = {own.participant: own.public}
        for peer in peers:
            table[peer.participant] = peer
        self.peers: Mapping[str, PublicIdentity] = MappingProxyType(table)

    @classmethod
    def load(cls, settings: KeystoreSettings) -> Keystore:
        """Read the files named by ``settings``; a bad file is a :class:`ConfigError`."""
        files = list(settings.peers)
        if settings.peers_dir is not None:
            files += sorted(settings.peers_dir.glob("*.pub"))
        return cls(load_private_identity(settings.identity), (load_public_identity(f) for f in files))


# --- Replay protection ---------------------------------------------------------------------


class NonceStore(Protocol):
    """Remembers message ids for a while; the inbound pipeline claims each id once."""

    async def claim(self, message_id: str, ttl_s: float) -> bool:
        """Record ``message_id`` for ``ttl_s`` seconds; False if it was already recorded."""
        ...


class MemoryNonceStore:
    """In-process nonce store, for tests and single-process use.

    Bounded: expired ids are purged when needed; if ``max_entries`` live ids are still held,
    the claim raises :class:`StoreError` (retryable: the message is not judged) rather than
    forgetting an id that could then be replayed.
    """

    def __init__(self, *, max_entries: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._expiry: dict[str, float] = {}
        self._max = max_entries
        self._clock = clock

    async def claim(self, message_id: str, ttl_s: float) -> bool:
        now = self._clock()
        if len(self._expiry) >= self._max or message_id in self._expiry:
            self._expiry = {k: t for k, t in self._expiry.items() if t > now}
        if message_id in self._expiry:
            return False
        if len(self._expiry) >= self._max:
            raise StoreError(f"nonce store full ({self._max} live ids)")
        self._expiry[message_id] = now + ttl_s
        return True

    def __len__(self) -> int:
        return len(self._expiry)


class RedisNonceStore:
    """Nonce store shared by all workers: one Redis key per id, ``SET NX EX``.

    ``SET NX`` is atomic, so two workers that receive the same message at once cannot both
    accept it; ``EX`` lets Redis forget the id once the time window has closed anyway.
    """

    def __init__(self, redis: aioredis.Redis, *, prefix: str = "mgms:msg:nonce:") -> None:
        self._redis = redis
        self._prefix = prefix

    async def claim(self, message_id: str, ttl_s: float) -> bool:
        from redis.exceptions import RedisError

        try:
            ok = await self._redis.set(self._prefix + message_id, b"1", nx=True, ex=max(1, math.ceil(ttl_s)))
        except RedisError as exc:
            raise StoreError(f"nonce store: {exc}") from exc
        return bool(ok)


# --- Outbound pipeline ---------------------------------------------------------------------


def _signing_input(protected: Mapping[str, Any], payload: Any) -> bytes:
    return _SIG_DOMAIN + canonical_json(protected) + b"\n" + canonical_json(payload)


def _derive_key(shared: bytes, epk: bytes, recipient_pub: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=epk + recipient_pub, info=_HKDF_INFO).derive(shared)


class Sealer:
    """Outbound pipeline: validate -> render -> sign -> (encrypt). One per sending participant."""

    def __init__(self, keystore: Keystore, *, mode: SecurityMode = SecurityMode.ENCRYPTED) -> None:
        self.keystore = keystore
        self.mode = mode

    def seal(self, envelope: Envelope) -> bytes:
        """The message as bytes ready for any transport."""
        own = self.keystore.own
        if envelope.sender != own.participant:
            raise ValueError(f"envelope sender {envelope.sender!r} is not this keystore's {own.participant!r}")
        doc = to_document(envelope)  # validates the payload on the way out
        payload = doc.pop("payload")
        if self.mode is SecurityMode.SIGNED:
            protected = {**doc, "sig_alg": SIG_ALG}
            signature = own.sign_key.sign(_signing_input(protected, payload))
            return canonical_json({**protected, "payload": payload, "signature": b64encode(signature)})

        peer = self.keystore.peers.get(envelope.recipient)
        if peer is None:
            raise LookupError(f"no public key for recipient {envelope.recipient!r}")
        protected = {**doc, "sig_alg": SIG_ALG, "enc_alg": ENC_ALG}
        signature = own.sign_key.sign(_signing_input(protected, payload))
        ephemeral = X25519PrivateKey.generate()
        epk = _raw(ephemeral.public_key())
        recipient_pub = _raw(peer.encrypt_key)
        key = _derive_key(ephemeral.exchange(peer.encrypt_key), epk, recipient_pub)
        iv = os.urandom(_IV_BYTES)
        cleartext = {**protected, "epk": b64encode(epk), "iv": b64encode(iv)}
        aad = _AAD_DOMAIN + canonical_json(cleartext)
        ciphertext = AESGCM(key).encrypt(iv, signature + canonical_json(payload), aad)
        return canonical_json({**cleartext, "ciphertext": b64encode(ciphertext)})


# --- Inbound pipeline ----------------------------------------------------------------------


class Opener:
    """Inbound pipeline for one receiving participant; counts every rejection by reason.

    ``accept_signed_only`` lets plain (signed, not encrypted) messages in: for debugging only.
    """

    def __init__(
        self,
        keystore: Keystore,
        nonces: NonceStore,
        *,
        counter: RejectionCounter | None = None,
        replay_window_s: float = 300.0,
        clock_skew_s: float = 30.0,
        accept_signed_only: bool = False,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.keystore = keystore
        self.nonces = nonces
        self.counter = counter if counter is not None else RejectionCounter()
        self.replay_window = timedelta(seconds=replay_window_s)
        self.clock_skew = timedelta(seconds=clock_skew_s)
        self.accept_signed_only = accept_signed_only
        self._clock = clock

    async def open(self, data: bytes) -> Envelope:
        """Bytes from the transport -> authenticated, fresh, validated Envelope.

        Raises :class:`MessageRejected` (already counted) or :class:`StoreError` (nonce store
        unreachable: retry later, the message was not judged).
        """
        try:
            envelope, ttl_s = self._open(data)
            if not await self.nonces.claim(envelope.id, ttl_s):
                raise Replayed("id seen before", message_id=envelope.id)
            return envelope
        except MessageRejected as exc:
            self.counter.record(exc)
            log.info("rejected message: %s", exc)
            raise

    def open_unclaimed(self, data: bytes) -> tuple[Envelope, float]:
        """Every check of :meth:`open` except the replay claim; returns the envelope and how
        long its id must be remembered.

        For a receiver that claims the id in the same atomic step as it stores the message
        (:class:`gateway.messaging.Inbox`): claiming first and storing second would lose a
        message if the process died in between (its redelivery would look like a replay).
        The caller must claim the id, and count a failed claim via ``counter``.
        """
        try:
            return self._open(data)
        except MessageRejected as exc:
            self.counter.record(exc)
            log.info("rejected message: %s", exc)
            raise

    def _open(self, data: bytes) -> tuple[Envelope, float]:
        doc = load_json(data)
        header = parse_header(doc)
        mid = header.id
        encrypted = "ciphertext" in doc
        expected = _ENCRYPTED_FIELDS if encrypted else _SIGNED_FIELDS
        if set(doc) != expected:
            raise Malformed(f"fields {sorted(set(doc) ^ expected)} missing or unexpected", message_id=mid)
        if doc["sig_alg"] != SIG_ALG or (encrypted and doc["enc_alg"] != ENC_ALG):
            raise UnsupportedVersion(f"algorithms {doc['sig_alg']!r}/{doc.get('enc_alg')!r}", message_id=mid)
        if not encrypted and not self.accept_signed_only:
            raise Malformed("signed-only message, but this receiver requires encryption", message_id=mid)

        own = self.keystore.own
        if header.recipient != own.participant:
            raise WrongRecipient(f"addressed to {header.recipient!r}, this is {own.participant!r}", message_id=mid)
        sender = self.keystore.peers.get(header.sender)
        if sender is None:
            raise UnknownSender(f"no public key for {header.sender!r}", message_id=mid)
        ttl_s = self._check_time(header)

        protected = {k: doc[k] for k in ("@context", *HEADER_FIELDS, "sig_alg", "enc_alg") if k in doc}
        if encrypted:
            signature, payload = self._decrypt(doc, mid)
        else:
            signature, payload = self._b64(doc["signature"], "signature", mid, 64), doc["payload"]
        try:
            sender.verify_key.verify(signature, _signing_input(protected, payload))
        except InvalidSignature:
            raise BadSignature(f"signature does not verify as {header.sender!r}", message_id=mid) from None
        return payload_from(header, payload), ttl_s

    def _check_time(self, header: Header) -> float:
        """Refuse stale, expired and future messages; return how long to remember the id."""
        now = self._clock()
        if now >= header.expires:
            raise Expired(f"expired at {header.expires.isoformat()}", message_id=header.id)
        if header.created < now - self.replay_window:
            raise Expired(f"created {header.created.isoformat()}, older than the replay window", message_id=header.id)
        if header.created > now + self.clock_skew:
            raise Expired(f"created {header.created.isoformat()}, in the future", message_id=header.id)
        # The id must be remembered as long as created + window still lies ahead.
        return (header.created + self.replay_window - now + self.clock_skew).total_seconds()

    @staticmethod
    def _b64(value: Any, field: str, mid: str, length: int | None = None) -> bytes:
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            return b64decode(value, length=length)
        except ValueError as exc:
            raise Malformed(f"{field}: {exc}", message_id=mid) from exc

    def _decrypt(self, doc: Mapping[str, Any], mid: str) -> tuple[bytes, Any]:
        own = self.keystore.own
        epk = self._b64(doc["epk"], "epk", mid, 32)
        iv = self._b64(doc["iv"], "iv", mid, _IV_BYTES)
        ciphertext = self._b64(doc["ciphertext"], "ciphertext", mid)
        cleartext = {k: v for k, v in doc.items() if k != "ciphertext"}
        try:
            peer_key = X25519PublicKey.from_public_bytes(epk)
            key = _derive_key(own.decrypt_key.exchange(peer_key), epk, _raw(own.public.encrypt_key))
            plain = AESGCM(key).decrypt(iv, ciphertext, _AAD_DOMAIN + canonical_json(cleartext))
        except (InvalidTag, ValueError):  # ValueError: a low-order epk gives an all-zero secret
            raise Tampered("authentication tag does not verify", message_id=mid) from None
        if len(plain) < 64:
            raise Malformed("plaintext shorter than a signature", message_id=mid)
        try:
            payload = load_json(plain[64:])  # same rules as outside: no NaN, no duplicate keys
        except Malformed as exc:
            raise Malformed(f"payload: {exc.detail}", message_id=mid) from exc
        return plain[:64], payload
