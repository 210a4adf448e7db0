"""Field-protocol adapters, one package per protocol, all behind :class:`Adapter`.

Only this package (and the simulators) import protocol libraries. The core asks
:func:`create_adapter` for an adapter by the device's ``protocol`` and never sees c104,
libiec61850 or gurux types.
"""

from __future__ import annotations

import importlib.util

from gateway.config import Device, Point
from gateway.protocols.base import Adapter, LinkState, LinkStateChange

__all__ = ["Adapter", "LinkState", "LinkStateChange", "create_adapter", "device_problems"]


def create_adapter(device: Device, points: tuple[Point, ...]) -> Adapter:
    """Build the adapter for ``device``; imports are lazy so a lab without 104 (or on the
    asyncio 104 engine) never loads c104."""
    if device.protocol == "iec104":
        if device.iec104_engine == "asyncio":
            from gateway.protocols.iec104.aio import AsyncIec104Adapter

            return AsyncIec104Adapter(device, points)
        from gateway.protocols.iec104.adapter import Iec104Adapter

        return Iec104Adapter(device, points)
    if device.protocol == "iec61850":
        from gateway.protocols.iec61850 import Iec61850Adapter

        return Iec61850Adapter(device, points)
    if device.protocol == "dlms":
        from gateway.protocols.dlms import DlmsAdapter

        return DlmsAdapter(device, points)
    raise ValueError(f"{device.name}: no adapter for protocol {device.protocol!r}")


def device_problems(device: Device) -> list[tuple[tuple[str, ...], str]]:
    """What only the protocol library can tell about a device config its adapter would refuse
    at start: (key below ``devices.<name>``, reason). For ``check-config`` and ``run``
    (``gateway.preflight``); the library is loaded only for a device that needs the look."""
    if device.protocol == "dlms" and importlib.util.find_spec("gurux_dlms") is None:
        # an optional extra (GPL-2.0-only, docs/dlms.md): the adapter's import failed in run
        return [(("protocol",), "dlms needs the optional gurux-dlms package: pip install 'mgms-gateway[dlms]'")]
    tls = device.tls
    if device.protocol == "iec61850" and tls.enabled and tls.ca_file is not None:
        from gateway.protocols.iec61850.tls import client_file_problems

        problems = client_file_problems(tls.ca_file, tls.cert_file, tls.key_file)
        return [(("tls", key), reason) for key, reason in problems]
    return []
