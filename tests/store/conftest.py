"""Fixtures for the Redis store tests: a real redis-server per test, a small lab, a store.

Every test gets its own server (it starts in a few tens of milliseconds), so tests that stop,
kill or restart Redis cannot disturb each other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis

from gateway.config import Device, Iec104Address, LabConfig, LabInfo, Point, RedisSettings
from gateway.services import RedisServer
from gateway.store import RedisStore


def make_lab(**redis_settings: int | str) -> LabConfig:
    """A lab with one device and one point of each kind the store treats differently."""
    dev = Device(name="relay", protocol="iec104", host="127.0.0.1", port=2404)
    points = (
        Point(name="feeder.voltage.l1", device="relay", quantity="voltage", unit="V",
              phase="L1", address=Iec104Address(ioa=1001, type="M_ME_TF_1"), deadband=0.5),
        Point(name="feeder.p", device="relay", quantity="active_power", unit="kW",
              address=Iec104Address(ioa=1021, type="M_ME_TF_1")),
        Point(name="feeder.breaker.position", device="relay", quantity="breaker_position",
              unit="1", address=Iec104Address(ioa=2001, type="M_DP_TB_1")),
        Point(name="feeder.recloser.blocked", device="relay", quantity="switch_state",
              unit="1", address=Iec104Address(ioa=2002, type="M_SP_TB_1")),
    )  # fmt: skip
    return LabConfig(
        lab=LabInfo(name="testlab"),
        devices={"relay": dev},
        points=points,
        redis=RedisSettings(**redis_settings),  # type: ignore[arg-type]
        source="tests/store/conftest.py",
    )


@pytest.fixture
def lab() -> LabConfig:
    return make_lab()


@pytest.fixture(name="make_lab")
def make_lab_fixture() -> Callable[..., LabConfig]:
    """The lab factory, for tests that need other Redis settings (caps, buffer size)."""
    return make_lab


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain client to look at what the store wrote, independent of the store's own."""
    c = aioredis.Redis.from_url(redis_server.client_url(), decode_responses=True)
    try:
        yield c
    finally:
        await c.aclose()


@pytest.fixture
async def store(lab: LabConfig, redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(lab, url=redis_server.client_url())
    await s.start()
    try:
        yield s
    finally:
        await s.close()
