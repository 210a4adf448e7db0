"""IEC 61850 MMS client adapter (libiec61850 from pyiec61850-ng, called through ctypes)."""

from gateway.protocols.iec61850.adapter import Iec61850Adapter

__all__ = ["Iec61850Adapter"]
