"""MGMS: the microgrid lab integration gateway.

The core (config, point model, Redis store, runtime, CLI) never imports a field-protocol
library; those live behind :class:`gateway.protocols.base.Adapter` in ``gateway/protocols/``
and in the simulators under ``gateway/iedsim/``.
"""

__version__ = "0.1.0"
