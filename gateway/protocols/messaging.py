"""Moved to :mod:`gateway.transport.base`; kept for code written against the old path."""

from gateway.transport.base import *  # noqa: F403
from gateway.transport.base import __all__ as __all__
