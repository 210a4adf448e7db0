"""A VPP coalition drives the message flow: chosen assets -> offers -> activations to their
owners -> verifications -> settlements and per-asset reliability, fed back to the next plan.

The AMS runs for real (Redis, TLS mosquitto with ACLs, encrypted messages); the two MGMS are
scripted participants that answer each activation with a verification at once (the real
MGMS side, with the breaker, is in hil_tests/test_dso_flow.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ams.dispatch import portfolio_with_reliability
from ams.sandbox import DsoSandbox
from ams.service import AmsService, AmsSettings, MicrogridEntry
from ams.vpp.coalition import solve_milp
from ams.vpp.offers import offers_from_coalition
from ams.vpp.portfolio import load_portfolio, read_mapping
from ams.vpp.services import service_from_mapping
from gateway.messaging import Messenger, Received, build_messenger
from gateway.semantic import ActivationNotification, VerificationNotification
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(60)
VPP = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp"
DELIVERY = {"multipower": 1.0, "campus": 0.5}  # campus delivers half of what it is asked
# "harbour" owns assets in the portfolio but never registered with this AMS: its blocks are refused


async def scripted_mgms(m: Messenger, stop: asyncio.Event, seen: list[ActivationNotification]) -> None:
    async def handle(item: Received) -> None:
        act = item.envelope.payload
        if isinstance(act, ActivationNotification):
            seen.append(act)
            span = int((act.stop - act.start).total_seconds())
            await m.send(
                VerificationNotification(
                    identifier=f"ver:{act.identifier}", activation_ref=act.identifier, start=act.start,
                    stop=act.stop, time_step_s=span, power_series_kw=(act.power_kw * DELIVERY[m.participant],),
                ),
                "ams",
            )  # fmt: skip

    await m.serve("mgms", "script", handle, stop)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[AmsService, dict[str, list[ActivationNotification]]]]:
    with DsoSandbox(tmp_path / "dso", mgms=["multipower", "campus", "harbour"]) as box, RedisServer() as rs:
        client = aioredis.Redis.from_url(rs.url, decode_responses=True)
        messengers = {
            name: build_messenger(box.messaging(name), client, prefix=f"t:{name}")
            for name in ("ams", "multipower", "campus", "harbour")
        }
        for m in messengers.values():
            await m.start()
        svc = AmsService(
            AmsSettings(microgrids=(MicrogridEntry(participant="multipower", location="A"),
                                    MicrogridEntry(participant="campus", location="B"))),
            client, "ams", messenger=messengers["ams"],
        )  # fmt: skip
        stop = asyncio.Event()
        seen: dict[str, list[ActivationNotification]] = {"multipower": [], "campus": [], "harbour": []}
        tasks = [asyncio.create_task(svc.run(stop))] + [
            asyncio.create_task(scripted_mgms(messengers[n], stop, seen[n])) for n in seen
        ]
        try:
            yield svc, seen
        finally:
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            for m in messengers.values():
                await m.close()
            await client.aclose()


async def test_coalition_activates_owners_settles_and_feeds_reliability_back(
    world: tuple[AmsService, dict[str, list[ActivationNotification]]],
) -> None:
    svc, seen = world
    portfolio = load_portfolio(VPP / "portfolio.yaml")
    req = service_from_mapping(read_mapping(VPP / "request-capacity.yaml"))
    result = solve_milp(portfolio, req, 30)
    every = offers_from_coalition(result)
    lines = [x for x in every if x.microgrid != "harbour"]
    assert lines, "the capacity service should choose some assets"
    await svc.submit_dispatch(every, "d1")

    async def all_settled() -> bool:
        n = await svc.redis.xlen(svc.keys.settlements)
        return n >= len(lines)

    deadline = asyncio.get_running_loop().time() + 45
    while not await all_settled():
        assert asyncio.get_running_loop().time() < deadline, "not every block was settled"
        await asyncio.sleep(0.05)

    # each block went to the microgrid owning the asset, once; the unregistered one got none
    assert sum(len(v) for v in seen.values()) == len(lines) and not seen["harbour"]
    assert svc.counters["unregistered"] == len(every) - len(lines)
    for x in lines:
        assert any(a.power_kw == pytest.approx(x.power_kw) and a.start == x.start for a in seen[x.microgrid])
        assert x.stop - x.start >= timedelta(minutes=60)
    # settlements: full delivery settles, half delivery fails
    states = {f["activation"]: f["state"] for _, f in await svc.redis.xrange(svc.keys.settlements)}
    for x in lines:
        act = f"act:offer:{x.microgrid}:d1:{x.asset}:{x.start:%Y%m%dT%H%M%SZ}"
        assert states[act] == ("settled" if DELIVERY[x.microgrid] == 1.0 else "failed")
    # per-asset reliability measured by the AMS goes into the next coalition's portfolio
    again = await portfolio_with_reliability(portfolio, svc.redis, "ams")
    for x in lines:
        r = again.asset(x.asset).reliability
        assert r == pytest.approx(1.0) if DELIVERY[x.microgrid] == 1.0 else r < portfolio.asset(x.asset).reliability
    # a second submission of the same dispatch does not activate anything again
    await svc.dispatch(every, "d1")
    await asyncio.sleep(0.3)
    assert sum(len(v) for v in seen.values()) == len(lines)
