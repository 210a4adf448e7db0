"""IEC 60870-5-104 outstation simulator (REF615 behind a COM600) on raw asyncio sockets.

Not built on ``c104.Server``: that queues spontaneous values for up to 100 ms before they
leave, which would hide the gateway's own latency. The pure frame/ASDU codec is
:mod:`gateway.protocols.iec104.codec`, shared with the gateway's asyncio client (one codec
for both ends); :mod:`.server` is the asyncio outstation.
"""

from gateway.iedsim.iec104.server import (
    ControlChannel,
    FrameRecord,
    Iec104Outstation,
    MonitorValue,
    OutstationStats,
    serve_many,
)

__all__ = [
    "ControlChannel",
    "FrameRecord",
    "Iec104Outstation",
    "MonitorValue",
    "OutstationStats",
    "serve_many",
]
