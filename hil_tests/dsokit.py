"""Shared pieces of the DSO flow HIL suites: an AMS next to the lab gateway, wired by a
:class:`~ams.sandbox.DsoSandbox` (keys, PKI, TLS mosquitto with ACLs)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from hilkit import Lab, start_lab

from ams.sandbox import DsoSandbox, feeder_flexibility
from ams.service import AmsService, AmsSettings, MicrogridEntry
from gateway.config import LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.messaging import Messenger, build_messenger
from gateway.services import RedisServer

MGMS = "mgms-multipower"
LOCATION = "FI-Vaasa/feeder-4"


@dataclass
class Ams:
    service: AmsService
    messenger: Messenger
    client: aioredis.Redis
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def shutdown(self) -> None:
        if self.task.done() and self.stop.is_set():
            return
        self.stop.set()
        await asyncio.wait_for(self.task, 10)
        await self.messenger.close()
        await self.client.aclose()


async def start_ams(
    box: DsoSandbox, redis: RedisServer, transport: str, security: str, *, register: bool = True
) -> Ams:
    client = redis.client("ams")
    messenger = build_messenger(box.messaging("ams", transport=transport, security=security), client, prefix="ams:ams")  # type: ignore[arg-type]
    await messenger.start()
    service = AmsService(
        AmsSettings(microgrids=(MicrogridEntry(participant=MGMS, location=LOCATION),) if register else ()),
        client,
        "ams",
        messenger=messenger,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop), name="ams")
    return Ams(service, messenger, client, task, stop)


@contextlib.asynccontextmanager
async def dso_lab(
    box: DsoSandbox,
    base: LabConfig,
    redis: RedisServer,
    ams_redis: RedisServer,
    sim: Iec104Outstation | None,
    transport: Literal["mqtt", "https", "both"],
    security: Literal["encrypted", "signed"],
    *,
    register: bool = True,
) -> AsyncIterator[tuple[Lab, Ams]]:
    cfg = base.model_copy(
        update={
            "messaging": box.messaging(MGMS, transport=transport, security=security),
            "flexibility": feeder_flexibility(window_s=2, step_s=1),
        }
    )
    ams = await start_ams(box, ams_redis, transport, security, register=register)
    lab = await start_lab(cfg, redis, sim)
    try:
        yield lab, ams
    finally:
        await lab.shutdown()
        await lab.reader.aclose()
        await ams.shutdown()
