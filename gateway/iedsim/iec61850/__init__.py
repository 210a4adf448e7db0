"""REF615-class IEC 61850 MMS server simulator (libiec61850 through ctypes)."""

from gateway.iedsim.iec61850.server import Iec61850Server

__all__ = ["Iec61850Server"]
