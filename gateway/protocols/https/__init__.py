"""Moved to :mod:`gateway.transport.https` (message transports are not field protocols); kept
for code written against the old path during the move."""

from gateway.transport.https import *  # noqa: F403
from gateway.transport.https import __all__ as __all__
