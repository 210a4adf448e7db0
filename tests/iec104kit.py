"""What the IEC 104 adapter suites share (both client engines, plain and TLS): an adapter
whose event stream is collected, outstations and adapters started and all closed at the end
with no task left behind, and polling for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gateway.config import LabConfig
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import PointUpdate
from gateway.protocols.base import Adapter, LinkState, LinkStateChange

DEVICE = "ref615"
#: short link supervision so link-loss tests finish in seconds
FAST = {"t0_s": 2, "t1_s": 2, "t2_s": 1, "t3_s": 1, "k": 12, "w": 8}

Starter = Callable[..., Awaitable[Any]]


class Watched:
    """An adapter whose event stream is collected by a task."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self.values: list[PointUpdate] = []
        self.links: list[LinkStateChange] = []
        self.task: asyncio.Task[None] | None = None

    async def _consume(self) -> None:
        async for ev in self.adapter.events():
            if isinstance(ev, PointUpdate):
                self.values.append(ev)
            else:
                self.links.append(ev)

    async def start(self) -> Watched:
        await self.adapter.start()
        self.task = asyncio.create_task(self._consume())
        return self

    async def close(self) -> None:
        await self.adapter.close()
        if self.task is not None:
            async with asyncio.timeout(5):
                await self.task

    def latest(self, point: str, where: Callable[[PointUpdate], bool] = lambda u: True) -> PointUpdate | None:
        return next((v for v in reversed(self.values) if v.point == point and where(v)), None)

    def downs(self) -> list[LinkStateChange]:
        return [c for c in self.links if c.state is LinkState.DOWN]


@contextlib.asynccontextmanager
async def outstations_and_adapters() -> AsyncIterator[Starter]:
    """``start(config, port=0)`` runs an outstation, ``start(adapter)`` a :class:`Watched`;
    at the end adapters close first, then outstations, and no task may be left."""
    sims: list[Iec104Outstation] = []
    adapters: list[Watched] = []

    async def start(obj: LabConfig | Adapter, port: int = 0) -> Any:
        if isinstance(obj, Adapter):
            w = await Watched(obj).start()
            adapters.append(w)
            return w
        o = Iec104Outstation(obj, DEVICE, host="127.0.0.1", port=port)
        await o.start()
        sims.append(o)
        return o

    try:
        yield start
    finally:
        for w in adapters:
            await w.close()
        for o in sims:
            await o.close()
        await asyncio.sleep(0)
        me = asyncio.current_task()
        left = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        assert not left, f"tasks left behind: {left}"


async def until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.02)
    return got
