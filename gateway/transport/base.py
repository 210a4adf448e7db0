"""The one interface every message transport (MQTT, HTTPS) implements.

A transport moves sealed message bytes between participants (MGMS gateways, AMS workers);
it never looks inside them. Security, validation, de-duplication and durable storage are the
messaging core's job (:mod:`gateway.messaging`), the same for every transport, so a
transport only has to get two things right:

* **send** returns only once the next hop has taken responsibility for the message (MQTT:
  PUBACK from the broker, QoS 1; HTTPS: a 2xx from the receiving participant). Until then the
  message stays in the sender's Redis outbox and is sent again after a failure, so a message
  may arrive twice but is never lost.
* **receive** hands every inbound message to the handler given to :meth:`start` and
  acknowledges it to the peer (MQTT PUBACK, HTTP response) only after the handler returned:
  the handler stores the message durably first. A handler that raises
  :class:`~gateway.errors.TransportError` (e.g. Redis down) means "not taken": MQTT does not
  acknowledge (the broker redelivers on the next session), HTTPS answers 503 so the sender
  keeps it in its outbox. A handler that raises
  :class:`~gateway.semantic.errors.MessageRejected` means "taken and judged bad": MQTT
  acknowledges (a bad message must not come back forever), HTTPS answers 4xx with the reason.

Topic layout (both transports use it; HTTPS puts the topic in the URL path)::

    heila/v1/to/<recipient>/from/<sender>/<MessageType>

The envelope header carries the same topic, bound into signature and AAD, and the core checks
that the topic a message arrived on equals its header topic, so a message cannot be
re-routed. Broker ACLs follow the layout: a participant may write only
``heila/v1/to/+/from/<itself>/#`` and read only ``heila/v1/to/<itself>/#``.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "TOPIC_ROOT",
    "Delivery",
    "MessageHandler",
    "MessageTransport",
    "Outgoing",
    "inbox_filter",
    "outbox_filter",
    "received_clock",
    "topic_for",
]

TOPIC_ROOT = "heila/v1/to"


def topic_for(recipient: str, sender: str, message_type: str) -> str:
    """The topic a message of ``message_type`` from ``sender`` to ``recipient`` travels on."""
    return f"{TOPIC_ROOT}/{recipient}/from/{sender}/{message_type}"


def inbox_filter(participant: str) -> str:
    """The MQTT topic filter that covers every message addressed to ``participant``."""
    return f"{TOPIC_ROOT}/{participant}/#"


def outbox_filter(participant: str) -> str:
    """The topic filter covering every message ``participant`` sends (what its ACL may write)."""
    return f"{TOPIC_ROOT}/+/from/{participant}/#"


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One sealed message to send: the bytes plus what a transport needs to route them."""

    message_id: str
    recipient: str
    topic: str
    data: bytes


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message as a transport received it, before anything has been checked.

    ``peer`` is who the transport authenticated (TLS client certificate CN, bearer token
    owner, MQTT username), or None when the transport cannot tell; the core may compare it
    with the signed sender. ``received_ns`` is ``time.time_ns()`` when the bytes arrived (a
    latency probe hop), 0 from a transport built with probes off.
    """

    data: bytes
    topic: str
    transport: str
    peer: str | None = None
    received_ns: int = field(default_factory=time.time_ns)


def _not_stamped() -> int:
    return 0


def received_clock(probes: bool) -> Callable[[], int]:
    """What a transport stamps ``Delivery.received_ns`` with, chosen once at construction:
    the wall clock with probes on, a constant 0 (no clock read) with them off."""
    return time.time_ns if probes else _not_stamped


MessageHandler = Callable[[Delivery], Awaitable[None]]
"""Stores (or rejects) one inbound message; see the module docstring for what raising means."""


class MessageTransport(abc.ABC):
    """Async transport for one participant.

    Usage::

        transport = MqttTransport(settings)          # or HttpsTransport(settings)
        await transport.start(handler)               # connects / listens; reconnects by itself
        await transport.send(outgoing)               # returns once the next hop acknowledged
        await transport.close()
    """

    name: str
    """Short name used in logs, counters and probe records: ``"mqtt"`` or ``"https"``."""

    @abc.abstractmethod
    async def start(self, handler: MessageHandler) -> None:
        """Begin receiving: every inbound message is passed to ``handler`` (one at a time per
        connection, in arrival order). Returns once ready to send and receive, or raises
        :class:`~gateway.errors.TransportError` after the configured connect timeout."""

    @abc.abstractmethod
    async def send(self, message: Outgoing) -> None:
        """Deliver ``message``; return once the next hop acknowledged it.

        Raises :class:`~gateway.errors.TransportError` (retry later: not connected, no ack in
        time) or :class:`~gateway.errors.TransportRefused` (will not work without the
        operator: not authorised, unknown recipient)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop receiving, finish or abandon sends in flight (they stay in the outbox) and
        release every socket, thread and task."""

    @abc.abstractmethod
    def stats(self) -> Mapping[str, int]:
        """Counters for the device/participant hash: sent, received, errors, reconnects..."""
