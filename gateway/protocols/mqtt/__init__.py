"""Moved to :mod:`gateway.transport.mqtt` (message transports are not field protocols); kept
for code written against the old path during the move."""

from gateway.transport.mqtt import *  # noqa: F403
from gateway.transport.mqtt import __all__ as __all__
