"""The AMS with ``probes`` off: no hop times in its hashes, and ``ams dispatch`` still finds
each asset's newest flexibility (by the creation time the signed envelope carries)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ams.dispatch import portfolio_with_flexibility
from ams.service import AmsService, AmsSettings, MarketSettings
from ams.vpp.portfolio import FlexibleLoad, load_portfolio
from gateway.messaging import Received
from gateway.semantic import Envelope, Flexibility, FlexibilityType
from gateway.services import RedisServer
from gateway.transport.base import topic_for

pytestmark = pytest.mark.timeout(30)
PORTFOLIO = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp" / "portfolio.yaml"
MG = "multipower"


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def svc(redis_server: RedisServer) -> AsyncIterator[AmsService]:
    client = aioredis.Redis.from_url(redis_server.client_url("ams"), decode_responses=True)
    yield AmsService(AmsSettings(market=MarketSettings(auto_clear=False)), client, "ams", probes=False)
    await client.aclose()


def received(flex: Flexibility, created: datetime) -> Received:
    """As the inbox hands it over with probes off: no received or stored time."""
    env = Envelope.create(flex, sender=MG, recipient="ams", topic=topic_for("ams", MG, flex.message_type), now=created)
    return Received("0-1", env, "mqtt", MG, 0, 0)


async def test_flexibility_without_hops_and_newest_created_wins_in_dispatch(svc: AmsService) -> None:
    await svc.register(MG, "north")
    p = load_portfolio(PORTFOLIO)
    t = p.start + timedelta(hours=17)
    old = Flexibility(identifier="hvac1-1", flexibility_type=FlexibilityType.UPWARD, power_kw=3.0, start=t,
                      stop=t + timedelta(hours=1))  # fmt: skip
    new = old.model_copy(update={"identifier": "hvac1-2", "power_kw": 7.5})
    created = datetime.now(UTC)
    # the newer one first: the older one arriving late (a resend) must not win
    await svc.handle(received(new, created))
    await svc.handle(received(old, created - timedelta(seconds=5)))
    h = await svc.redis.hgetall(svc.keys.flex(MG, "hvac1-2"))
    assert h["doc"] and int(h["created_ns"]) == int(created.timestamp() * 1e9)
    assert not {"received_ns", "stored_ns"} & h.keys()
    hvac = (await portfolio_with_flexibility(p, svc.redis, "ams")).asset("hvac1")
    assert isinstance(hvac, FlexibleLoad) and isinstance(hvac.flex_down_kw, tuple)
    assert hvac.flex_down_kw[17] == pytest.approx(7.5)
