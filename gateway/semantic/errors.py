"""Why an inbound (or outbound) message was refused, as a typed exception with a reason code.

::

    GatewayError
    └── MessageRejected                  base: ``reason`` is one of :class:`Reason`
        ├── Malformed                    not JSON, envelope or payload fails the schema
        ├── UnsupportedVersion           unknown @context or message version
        ├── UnknownSender                sender has no public key in the keystore
        ├── BadSignature                 signature does not verify under the sender's key
        ├── Tampered                     AEAD tag does not verify (ciphertext or header changed)
        ├── Replayed                     this message id was already accepted
        ├── Expired                      past ``expires``, older than the replay window, or from the future
        └── WrongRecipient               addressed to another participant

Every rejection is permanent for that message (``retryable = False``): resending the same
bytes cannot succeed. A worker catches :class:`MessageRejected`, counts ``exc.reason`` in a
:class:`RejectionCounter` and carries on; nothing here is allowed to crash it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from enum import StrEnum

from gateway.errors import GatewayError

__all__ = [
    "BadSignature",
    "Expired",
    "Malformed",
    "MessageRejected",
    "Reason",
    "RejectionCounter",
    "Replayed",
    "Tampered",
    "UnknownSender",
    "UnsupportedVersion",
    "WrongRecipient",
]


class Reason(StrEnum):
    """Reason codes: stable strings, used as metric labels and in logs."""

    MALFORMED = "malformed"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    TAMPERED = "tampered"
    REPLAYED = "replayed"
    EXPIRED = "expired"
    WRONG_RECIPIENT = "wrong_recipient"


class MessageRejected(GatewayError):
    """A message was refused; ``reason`` says why in one word, the text says the detail."""

    reason: Reason = Reason.MALFORMED

    def __init__(self, detail: str, *, message_id: str | None = None) -> None:
        self.detail = detail
        self.message_id = message_id
        where = f" (message {message_id})" if message_id else ""
        super().__init__(f"{self.reason.value}: {detail}{where}")


class Malformed(MessageRejected):
    """Not JSON, or the envelope or payload does not match the schema."""

    reason = Reason.MALFORMED


class UnsupportedVersion(MessageRejected):
    """The @context or version names a schema this gateway does not speak."""

    reason = Reason.UNSUPPORTED_VERSION


class UnknownSender(MessageRejected):
    """No public key for the claimed sender: cannot authenticate, so refuse."""

    reason = Reason.UNKNOWN_SENDER


class BadSignature(MessageRejected):
    """The signature does not verify under the claimed sender's key (forged or altered)."""

    reason = Reason.BAD_SIGNATURE


class Tampered(MessageRejected):
    """The AEAD tag does not verify: ciphertext or bound header changed on the way."""

    reason = Reason.TAMPERED


class Replayed(MessageRejected):
    """The message id was accepted before within the replay window."""

    reason = Reason.REPLAYED


class Expired(MessageRejected):
    """Outside its validity: past ``expires``, older than the window, or created in the future."""

    reason = Reason.EXPIRED


class WrongRecipient(MessageRejected):
    """Addressed to somebody else."""

    reason = Reason.WRONG_RECIPIENT


class RejectionCounter:
    """Rejections by reason, owned by whoever runs the inbound pipeline (no global state).

    Every reason is present from the start (at zero) so a metrics exporter sees a stable set
    of labels.
    """

    def __init__(self) -> None:
        self._counts: Counter[Reason] = Counter({r: 0 for r in Reason})

    def record(self, exc: MessageRejected) -> None:
        """Count one rejection under its reason."""
        self._counts[exc.reason] += 1

    def __getitem__(self, reason: Reason | str) -> int:
        return self._counts[Reason(reason)]

    @property
    def total(self) -> int:
        return sum(self._counts.values())

    def snapshot(self) -> Mapping[str, int]:
        """A copy, keyed by reason code, for logs and metrics."""
        return {r.value: n for r, n in self._counts.items()}
