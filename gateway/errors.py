"""The gateway's exception hierarchy.

::

    GatewayError
    ├── ConfigError                 lab config invalid (file, key, line, reason)
    ├── ProtocolError               a field device or its link misbehaved
    │   ├── LinkError               (retryable) no link, link lost, connect refused
    │   └── DeviceError             (permanent for that request) device refused or garbled
    ├── CommandError                a control request did not end as confirmed
    │   ├── CommandInvalid          (permanent) unknown point, not a control point, bad value
    │   ├── CommandRejected         (permanent) negative confirmation from the device
    │   └── CommandTimeout          (retryable) no confirmation, or status did not follow
    ├── StoreError                  Redis unreachable or refused a write (retryable)
    └── TransportError              (retryable) MQTT/HTTPS peer or broker down, no ack in time
        └── TransportRefused        (permanent) credentials, ACL or route refused

Retryable errors carry ``retryable = True`` so a coordinator can decide "retry later" versus
"needs the operator" without matching on types.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    retryable: bool = False


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One thing wrong in a lab config: where (file, dotted key, line) and why."""

    file: str
    key: str
    reason: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key or '<root>'}: {self.reason}"


class ConfigError(GatewayError):
    """A lab configuration is invalid; every issue found is listed, not just the first."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        if not issues:
            raise ValueError("ConfigError needs at least one issue")
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))

    @property
    def first(self) -> ConfigIssue:
        return self.issues[0]


class ProtocolError(GatewayError):
    """A field-protocol problem, with the device it concerns."""

    def __init__(self, device: str, message: str) -> None:
        self.device = device
        super().__init__(f"{device}: {message}")


class LinkError(ProtocolError):
    """No usable link to the device right now; try again later."""

    retryable = True


class DeviceError(ProtocolError):
    """The device answered, but not usefully (refused, garbled, unknown address)."""


class CommandError(GatewayError):
    """A command request did not end as confirmed."""

    result: str = "failed"

    def __init__(self, point: str, message: str) -> None:
        self.point = point
        self.reason = message
        super().__init__(f"{point}: {message}")


class CommandInvalid(CommandError):
    """The request itself is wrong: unknown point, not a control point, value out of range."""

    result = "invalid"


class CommandRejected(CommandError):
    """The device answered with a negative confirmation (e.g. negative ACTCON)."""

    result = "rejected"


class CommandTimeout(CommandError):
    """No confirmation within the configured time (ACTCON missing or status did not follow)."""

    result = "timeout"
    retryable = True


class StoreError(GatewayError):
    """Redis could not be reached or refused a write."""

    retryable = True


class TransportError(GatewayError):
    """A message transport (MQTT, HTTPS) could not deliver or receive right now: retry later.

    Raised for a broker or peer that is down, a connection lost before the acknowledgement
    (PUBACK, HTTP 2xx) arrived, or a timeout. The message stays in the outbox.
    """

    retryable = True

    def __init__(self, transport: str, message: str) -> None:
        self.transport = transport
        super().__init__(f"{transport}: {message}")


class TransportRefused(TransportError):
    """The peer or broker refused for good: bad credentials, not authorised, no route.

    Retrying the same message will not help; it needs the operator (a key, an ACL, a URL).
    """

    retryable = False
