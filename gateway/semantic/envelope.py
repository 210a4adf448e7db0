"""The envelope around every payload, and plain (unsecured) serialise / parse.

On the wire a message is one JSON-LD object: the ``@context`` reference, the header fields
(``id``, ``type``, ``version``, ``sender``, ``recipient``, ``created``, ``expires``,
``topic``) and the ``payload``. The security pipeline (:mod:`gateway.semantic.security`)
adds signature fields, or replaces ``payload`` by ciphertext, but keeps the same header, so
routing and replay checks never need the plaintext.

Both directions validate: :func:`serialise` re-checks the payload (a model built with
``model_construct`` cannot slip through) and :func:`parse` checks size, duplicate keys,
context, version, type, header and payload, raising a :class:`~gateway.semantic.errors.MessageRejected`
with a reason code.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, model_validator
from pydantic_core import PydanticSerializationError

from gateway.semantic.errors import Malformed, UnsupportedVersion
from gateway.semantic.jsonld import CONTEXT_IRI, SCHEMA_VERSION
from gateway.semantic.messages import MESSAGE_TYPES, MessageRef, Name, Payload, UtcDatetime

__all__ = [
    "HEADER_FIELDS",
    "MAX_MESSAGE_BYTES",
    "Envelope",
    "Header",
    "canonical_json",
    "load_json",
    "parse",
    "parse_header",
    "payload_from",
    "serialise",
    "to_document",
]

MAX_MESSAGE_BYTES = 1 << 20
"""Largest message accepted (1 MiB): bounded before any JSON parsing happens."""

HEADER_FIELDS = ("id", "type", "version", "sender", "recipient", "created", "expires", "topic")

MessageId = MessageRef
Topic = Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[^\s#+]+$")]


def _new_id() -> str:
    return uuid.uuid4().urn


class Header(BaseModel):
    """Who sends what to whom, when, on which topic: everything but the payload."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: MessageId = Field(default_factory=_new_id)
    type: str
    version: str = SCHEMA_VERSION
    sender: Name
    recipient: Name
    created: UtcDatetime
    expires: UtcDatetime
    topic: Topic

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.type not in MESSAGE_TYPES:
            raise ValueError(f"unknown message type {self.type!r}")
        if self.expires <= self.created:
            raise ValueError("expires must be after created")
        return self

    def to_json_obj(self) -> dict[str, Any]:
        """Header fields as JSON values, plus the @context reference."""
        return {"@context": CONTEXT_IRI, **self.model_dump(mode="json")}


class Envelope(Header):
    """A complete message: header plus a typed payload whose type matches ``type``."""

    payload: SerializeAsAny[Payload]

    @model_validator(mode="after")
    def _type_matches_payload(self) -> Self:
        if self.payload.message_type != self.type:
            raise ValueError(f"type {self.type!r} does not match payload {self.payload.message_type!r}")
        return self

    @classmethod
    def create(
        cls,
        payload: Payload,
        *,
        sender: str,
        recipient: str,
        topic: str,
        ttl_s: float = 300.0,
        now: datetime | None = None,
    ) -> Envelope:
        """A new message with a fresh id, created now and valid for ``ttl_s`` seconds."""
        created = now or datetime.now(UTC)
        return cls(
            type=payload.message_type,
            sender=sender,
            recipient=recipient,
            created=created,
            expires=created + timedelta(seconds=ttl_s),
            topic=topic,
            payload=payload,
        )

    @property
    def header(self) -> Header:
        """The header alone (what the security pipeline binds into signature and AAD)."""
        return Header.model_validate(self.model_dump(include=set(HEADER_FIELDS)))


def canonical_json(obj: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no blanks, UTF-8): what gets signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_json(data: bytes) -> dict[str, Any]:
    """Bytes -> JSON object, refusing oversize input, duplicate keys and NaN/Infinity."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise Malformed(f"message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        obj = json.loads(data, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise Malformed(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise Malformed("a message is a JSON object")
    return obj


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()[:5]]
    more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return "; ".join(parts) + more


def parse_header(doc: dict[str, Any]) -> Header:
    """Check context and version, then validate the header fields of a message object."""
    raw_id = doc.get("id")
    message_id = raw_id if isinstance(raw_id, str) else None
    if "@context" not in doc:
        raise Malformed("no @context", message_id=message_id)
    if doc["@context"] != CONTEXT_IRI:
        raise UnsupportedVersion(f"unknown @context {doc['@context']!r}", message_id=message_id)
    if doc.get("version") != SCHEMA_VERSION:
        raise UnsupportedVersion(f"unsupported version {doc.get('version')!r}", message_id=message_id)
    try:
        return Header.model_validate({k: doc.get(k) for k in HEADER_FIELDS})
    except ValidationError as exc:
        raise Malformed(f"header: {_summary(exc)}", message_id=message_id) from exc


def payload_from(header: Header, raw: Any) -> Envelope:
    """Validate a raw payload against the model its header's type names."""
    try:
        payload = MESSAGE_TYPES[header.type].model_validate(raw)
        return Envelope.model_validate({**header.model_dump(), "payload": payload})
    except ValidationError as exc:
        raise Malformed(f"{header.type}: {_summary(exc)}", message_id=header.id) from exc


def to_document(envelope: Envelope) -> dict[str, Any]:
    """The message as a compact JSON-LD object; re-validates the payload on the way out."""
    try:
        # warnings=False: a model built with model_construct may hold raw values; the
        # validation just below is what judges them.
        payload = envelope.payload.model_dump(mode="json", exclude_none=True, warnings=False)
        type(envelope.payload).model_validate(payload)
    except ValidationError as exc:
        raise Malformed(f"outbound {envelope.type}: {_summary(exc)}", message_id=envelope.id) from exc
    except PydanticSerializationError as exc:
        raise Malformed(f"outbound {envelope.type}: {exc}", message_id=envelope.id) from exc
    return {**envelope.header.to_json_obj(), "payload": payload}


def serialise(envelope: Envelope) -> bytes:
    """Envelope -> canonical JSON-LD bytes (plain: no signature, no encryption)."""
    return canonical_json(to_document(envelope))


def parse(data: bytes) -> Envelope:
    """Bytes -> validated Envelope (plain messages); raises MessageRejected with a reason."""
    doc = load_json(data)
    header = parse_header(doc)
    extra = set(doc) - {"@context", "payload", *HEADER_FIELDS}
    if extra:
        raise Malformed(f"unexpected fields {sorted(extra)}", message_id=header.id)
    if "payload" not in doc:
        raise Malformed("no payload", message_id=header.id)
    return payload_from(header, doc["payload"])
