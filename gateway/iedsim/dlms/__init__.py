"""DLMS/COSEM meter simulator (own server-side APDU handling; see meter.py for why)."""

from gateway.iedsim.dlms.server import DlmsMeter

__all__ = ["DlmsMeter"]
