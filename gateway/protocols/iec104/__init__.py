"""IEC 60870-5-104 adapter (c104)."""

from gateway.protocols.iec104.adapter import Iec104Adapter

__all__ = ["Iec104Adapter"]
