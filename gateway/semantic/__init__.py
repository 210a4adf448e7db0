"""Self-describing, validated, end-to-end protected messages between MGMS and AMS.

Why this package exists: the gateway and the aggregator exchange the HEILA information
objects (measurements, control signals, plans, flexibilities, offers, bids, forecasts and
market notifications) over brokers and proxies they do not trust, with partners that may not
share our code. So every message is

* **typed** - a frozen pydantic model per information object (:mod:`.messages`), units in the
  field names, times in UTC, validated when built, when serialised and when parsed;
* **self-describing** - a JSON-LD document whose versioned ``@context``
  (:mod:`.jsonld`, shipped as ``contexts/heila-v1.jsonld``) maps every field to a public
  vocabulary IRI (schema.org, SAREF, QUDT units and quantity kinds, OWL-Time);
* **protected** - signed with Ed25519 and by default encrypted to the recipient
  (X25519 + HKDF-SHA256 + AES-256-GCM), header bound as associated data, replay window and
  nonce store (:mod:`.security`);
* **refused with a reason** - every rejection is a :class:`MessageRejected` with a
  :class:`Reason` code, counted in a :class:`RejectionCounter`, never a crash.

Transports (MQTT, HTTPS) only move the bytes that :class:`Sealer` produces and
:class:`Opener` consumes. See ``docs/messages.md`` for the message reference.
"""

from gateway.semantic.envelope import Envelope, Header, parse, serialise, to_document
from gateway.semantic.errors import (
    BadSignature,
    Expired,
    Malformed,
    MessageRejected,
    Reason,
    RejectionCounter,
    Replayed,
    Tampered,
    UnknownSender,
    UnsupportedVersion,
    WrongRecipient,
)
from gateway.semantic.jsonld import CONTEXT_IRI, SCHEMA_VERSION, context_bytes, context_document, document_loader
from gateway.semantic.messages import (
    MESSAGE_TYPES,
    ActivationNotification,
    Bid,
    BreakerCommand,
    ControlSignal,
    ControlSignals,
    Flexibility,
    FlexibilityMarketPriceForecast,
    FlexibilityType,
    Measurements,
    Offer,
    OfferList,
    OperationPlan,
    Payload,
    Reading,
    Receipt,
    ReserveNotification,
    VerificationNotification,
    WeatherForecast,
)
from gateway.semantic.security import (
    Keystore,
    KeystoreSettings,
    MemoryNonceStore,
    NonceStore,
    Opener,
    PrivateIdentity,
    PublicIdentity,
    RedisNonceStore,
    Sealer,
    SecurityMode,
    write_key_pair,
)

__all__ = [
    "CONTEXT_IRI",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "ActivationNotification",
    "BadSignature",
    "Bid",
    "BreakerCommand",
    "ControlSignal",
    "ControlSignals",
    "Envelope",
    "Expired",
    "Flexibility",
    "FlexibilityMarketPriceForecast",
    "FlexibilityType",
    "Header",
    "Keystore",
    "KeystoreSettings",
    "Malformed",
    "Measurements",
    "MemoryNonceStore",
    "MessageRejected",
    "NonceStore",
    "Offer",
    "OfferList",
    "Opener",
    "OperationPlan",
    "Payload",
    "PrivateIdentity",
    "PublicIdentity",
    "Reading",
    "Reason",
    "Receipt",
    "RedisNonceStore",
    "RejectionCounter",
    "Replayed",
    "ReserveNotification",
    "Sealer",
    "SecurityMode",
    "Tampered",
    "UnknownSender",
    "UnsupportedVersion",
    "VerificationNotification",
    "WeatherForecast",
    "WrongRecipient",
    "context_bytes",
    "context_document",
    "document_loader",
    "parse",
    "serialise",
    "to_document",
    "write_key_pair",
]
