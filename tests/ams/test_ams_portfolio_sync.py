"""The portfolio `ams dispatch` solves with: the latest Flexibility each asset's MGMS sent, and
the reliability the AMS measured."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ams.dispatch import portfolio_as_known
from ams.service import AmsKeys
from ams.vpp.portfolio import FlexibleLoad, load_portfolio
from gateway.semantic import Flexibility, FlexibilityType
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(30)
PORTFOLIO = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp" / "portfolio.yaml"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def rc(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.client_url("ams"), decode_responses=True)
    yield c
    await c.aclose()


async def store_flex(rc: aioredis.Redis, mg: str, flex: Flexibility, stored_ns: int) -> None:
    await rc.hset(AmsKeys("ams").flex(mg, flex.identifier), mapping={"doc": flex.model_dump_json(),
                                                                     "stored_ns": str(stored_ns)})  # fmt: skip


async def test_latest_flexibility_and_measured_reliability_enter_the_portfolio(rc: aioredis.Redis) -> None:
    p = load_portfolio(PORTFOLIO)
    t = p.start + timedelta(hours=17)  # 17:00-18:00: period 17 of the day
    old = Flexibility(identifier="hvac1-1", flexibility_type=FlexibilityType.UPWARD, power_kw=3.0, start=t,
                      stop=t + timedelta(hours=1))  # fmt: skip
    new = old.model_copy(update={"identifier": "hvac1-2", "power_kw": 7.5})
    await store_flex(rc, "multipower", old, 100)
    await store_flex(rc, "multipower", new, 200)
    # same resource name under another microgrid: not this asset
    await store_flex(rc, "campus", new.model_copy(update={"identifier": "hvac1-9", "power_kw": 99.0}), 300)
    # a flexibility outside the horizon is skipped, not fatal
    far = old.model_copy(update={"identifier": "bess1-1", "start": t + timedelta(days=30),
                                 "stop": t + timedelta(days=30, hours=1)})  # fmt: skip
    await store_flex(rc, "multipower", far, 400)
    await rc.hset(AmsKeys("ams").asset_reliability, "pv1", "0.6")

    q = await portfolio_as_known(p, rc, "ams")
    hvac = q.asset("hvac1")
    assert isinstance(hvac, FlexibleLoad)
    down = hvac.flex_down_kw
    assert isinstance(down, tuple) and down[17] == pytest.approx(7.5)  # the newer one, its window only
    assert down[16] == pytest.approx(15.0) and down[18] == pytest.approx(15.0)
    assert q.asset("pv1").reliability == pytest.approx(0.6)
    assert q.asset("bess1") == p.asset("bess1")
