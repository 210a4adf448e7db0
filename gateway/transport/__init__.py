"""Message transports between participants (MGMS gateways, AMS workers), behind one interface.

Field protocols live in :mod:`gateway.protocols`; these move the sealed HEILA messages:
:mod:`gateway.transport.mqtt` (paho-mqtt, MQTT v5) and :mod:`gateway.transport.https`
(aiohttp). Both implement :class:`~gateway.transport.base.MessageTransport`; the messaging core
(:mod:`gateway.messaging`) is the only user, and nothing else imports paho or aiohttp.
"""

from __future__ import annotations

from gateway.transport.base import (
    TOPIC_ROOT,
    Delivery,
    MessageHandler,
    MessageTransport,
    Outgoing,
    inbox_filter,
    topic_for,
)

__all__ = [
    "TOPIC_ROOT",
    "Delivery",
    "MessageHandler",
    "MessageTransport",
    "Outgoing",
    "inbox_filter",
    "topic_for",
]
