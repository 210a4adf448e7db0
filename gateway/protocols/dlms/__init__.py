"""DLMS/COSEM client adapter on gurux-dlms (sans-I/O) and asyncio streams."""

from gateway.protocols.dlms.adapter import AssociationRefused, DlmsAdapter, FrameError, ObjectUnavailable

__all__ = ["AssociationRefused", "DlmsAdapter", "FrameError", "ObjectUnavailable"]
