"""IEC 60870-5-104: the c104 adapter, the asyncio adapter and the shared pure codec.

The adapters are imported lazily: the simulator imports :mod:`.codec` from here and must not
pull in c104 (its threads and native library) just for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.protocols.iec104.adapter import Iec104Adapter
    from gateway.protocols.iec104.aio import AsyncIec104Adapter

__all__ = ["AsyncIec104Adapter", "Iec104Adapter"]


def __getattr__(name: str) -> Any:
    if name == "Iec104Adapter":
        from gateway.protocols.iec104.adapter import Iec104Adapter

        return Iec104Adapter
    if name == "AsyncIec104Adapter":
        from gateway.protocols.iec104.aio import AsyncIec104Adapter

        return AsyncIec104Adapter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
