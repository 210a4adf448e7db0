"""Shared pieces of the HIL suites (fixtures are in conftest.py).

Against a real lab instead of the simulator: set ``MGMS_HIL_CONFIG`` to the lab file. Then
no simulator is started, tests that need fault injection are skipped, and tests that
operate the field are skipped unless ``MGMS_HIL_ALLOW_COMMANDS=1`` (read-only by default).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from gateway.config import Iec104Timers, LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import DeviceLink, RedisStore

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
REAL_CONFIG = os.environ.get("MGMS_HIL_CONFIG")
ALLOW_COMMANDS = os.environ.get("MGMS_HIL_ALLOW_COMMANDS") == "1"
DEVICE = "ref615"
# Short link supervision so link-loss tests finish in seconds: detection within t1 + t3 = 3 s.
FAST_TIMERS = Iec104Timers(t0_s=2, t1_s=2, t2_s=1, t3_s=1, k=12, w=8)

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout_s: float = 5.0, what: str = "") -> T:
    """Await ``probe`` until it returns something truthy; fail with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await probe()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.02)


async def reported_up(reader: RedisStore, device: str, *, reconnects: int = 0, timeout_s: float = 5.0) -> DeviceLink:
    """The device's link as the core stored it, once it says up (after at least ``reconnects``
    reconnects): values can reach Redis a moment before the link-up does (c104 starts its own
    interrogation on connect)."""

    async def up() -> DeviceLink | None:
        link = await reader.link(device)
        return link if link is not None and link.state == "up" and link.reconnects >= reconnects else None

    return await eventually(up, timeout_s, f"{device}'s link reported up in Redis")


def need_sim(sim: Iec104Outstation | None) -> Iec104Outstation:
    if sim is None:
        pytest.skip("needs the simulator's fault injection (MGMS_HIL_CONFIG names a real lab)")
    return sim


def need_commands() -> None:
    if REAL_CONFIG and not ALLOW_COMMANDS:
        pytest.skip("operates the field: set MGMS_HIL_ALLOW_COMMANDS=1 to allow it on a real lab")


@dataclass
class Lab:
    """A running gateway wired to the simulator and Redis, for one test."""

    config: LabConfig
    gateway: Gateway
    store: RedisStore
    reader: RedisStore  # a second client, as an operator would have (Redis user operator)
    redis: RedisServer
    sim: Iec104Outstation | None
    task: asyncio.Task[None]
    stop: asyncio.Event

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 15)


async def start_lab(
    base: LabConfig, redis: RedisServer, sim: Iec104Outstation | None, **device_changes: object
) -> Lab:
    # Only the 104 device: the 61850 view of the relay has its own suite (test_iec61850.py).
    cfg = base.only(DEVICE)
    if sim is not None:
        cfg = cfg.with_device(DEVICE, port=sim.port, timers=FAST_TIMERS, reconnect={"initial_s": 0.1, "max_s": 0.5},
                               **device_changes)
    elif device_changes:
        cfg = cfg.with_device(DEVICE, **device_changes)
    store = RedisStore.from_url(cfg, redis.client_url())
    gw = Gateway(cfg, store, stats_period_s=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    await gw.wait_connected(10)
    reader = RedisStore.from_url(cfg, redis.client_url("operator"))  # what `mgms command` is on Redis
    return Lab(cfg, gw, store, reader, redis, sim, task, stop)
