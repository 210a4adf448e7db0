"""Activations whose receipt never comes: settled ``undelivered``, not left ``activated``.

Real mosquitto (TLS, ACLs) and a real redis-server, as the dispatch tests use. Two
microgrids: ``multipower`` runs a Messenger (it stores the activation, receipts it, sends a
verification); ``campus`` is down for the whole test, so the broker acknowledges the
activation to the AMS (PUBACK) and nothing more ever happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ams.sandbox import DsoSandbox
from ams.service import ActivationState, AmsService, AmsSettings, MarketSettings, MicrogridEntry
from ams.vpp.offers import OfferLine
from gateway.config import ReceiptSettings
from gateway.messaging import Messenger, Received, build_messenger
from gateway.semantic import ActivationNotification, FlexibilityType, VerificationNotification
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(60)

FAST = ReceiptSettings(resend_initial_s=0.2, resend_max_s=0.5)


async def verifying_mgms(m: Messenger, stop: asyncio.Event) -> None:
    async def handle(item: Received) -> None:
        act = item.envelope.payload
        if isinstance(act, ActivationNotification):
            span = int((act.stop - act.start).total_seconds())
            await m.send(
                VerificationNotification(
                    identifier=f"ver:{act.identifier}", activation_ref=act.identifier, start=act.start,
                    stop=act.stop, time_step_s=span, power_series_kw=(act.power_kw,),
                ),
                "ams",
            )  # fmt: skip

    await m.serve("mgms", "script", handle, stop)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[DsoSandbox, RedisServer]]:
    with DsoSandbox(tmp_path / "dso", mgms=["multipower", "campus"]) as box, RedisServer() as rs:
        yield box, rs


@pytest.fixture
async def world(sandbox: tuple[DsoSandbox, RedisServer]) -> AsyncIterator[AmsService]:
    box, rs = sandbox
    client = aioredis.Redis.from_url(rs.client_url("ams"), decode_responses=True)
    ams = build_messenger(box.messaging("ams", receipts=FAST), client, prefix="ams:ams")
    mp = build_messenger(box.messaging("multipower", receipts=FAST), client, prefix="t:multipower")
    await ams.start()
    await mp.start()
    svc = AmsService(
        AmsSettings(
            market=MarketSettings(activation_receipt_grace_s=0.5),
            microgrids=(MicrogridEntry(participant="multipower", location="A"),
                        MicrogridEntry(participant="campus", location="B")),
        ),
        client, "ams", messenger=ams,
    )  # fmt: skip
    stop = asyncio.Event()
    tasks = [asyncio.create_task(svc.run(stop)), asyncio.create_task(verifying_mgms(mp, stop))]
    try:
        yield svc
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await mp.close()
        await ams.close()
        await client.aclose()


def line(microgrid: str, start: datetime) -> OfferLine:
    return OfferLine(microgrid, f"{microgrid}-bess", 10.0, start, start + timedelta(seconds=1), 50.0,
                     FlexibilityType.UPWARD)  # fmt: skip


async def test_activation_to_a_microgrid_that_is_down_settles_undelivered(world: AmsService) -> None:
    svc = world
    for _ in range(200):  # run() registers the configured microgrids first
        if await svc.redis.hlen(svc.keys.microgrids) == 2:
            break
        await asyncio.sleep(0.02)
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=2)
    acts = await svc.dispatch([line("multipower", start), line("campus", start)], "d1")
    up, down = acts

    async def both_final() -> bool:
        states = [await svc.redis.hget(svc.keys.activation(a), "state") for a in acts]
        return all(s in (ActivationState.SETTLED, ActivationState.UNDELIVERED) for s in states)

    deadline = asyncio.get_running_loop().time() + 15
    while not await both_final():
        assert asyncio.get_running_loop().time() < deadline, "activations not final"
        await asyncio.sleep(0.05)
    assert await svc.redis.hget(svc.keys.activation(up), "state") == "settled"
    act = await svc._hash(svc.keys.activation(down))
    assert act["state"] == "undelivered" and "no receipt from campus: deadline" in act["undelivered_reason"]
    # given up at its start (the deadline), not before: the grace ended earlier
    assert datetime.now(UTC) >= start
    settlement = await svc.settlement(down)
    assert settlement["state"] == "undelivered" and float(settlement["payment_eur"]) == 0.0
    offer = await svc._hash(svc.keys.offer(act["offer"]))
    assert offer["state"] == "undelivered"
    mg = json.loads(await svc.redis.hget(svc.keys.microgrids, "campus") or "{}")
    assert mg["undelivered"] == 1 and mg["reliability"] == 1.0 and mg.get("failed", 0) == 0
    events = [f["event"] for _, f in await svc.redis.xrange(svc.keys.events)]
    assert "undelivered" in events
    # what multipower receipted left the AMS's outbox; campus's reserve (no deadline) still waits
    assert await svc.messenger.outbox_length() == 0
    waiting = await svc.redis.zrange(svc.messenger.keys.since, 0, -1)
    assert [await svc.redis.hget(svc.messenger.keys.awaiting(w), "type") for w in waiting] == ["ReserveNotification"]
    assert svc.messenger.counters["receipted"] >= 2  # the reserve and the activation to multipower
    assert svc.messenger.counters["unreceipted_deadline"] >= 1

    # a verification that still comes (the activation got through, only its receipt was lost)
    # settles it as usual
    verification = VerificationNotification(
        identifier=f"ver:{down}", activation_ref=down, start=start, stop=start + timedelta(seconds=1),
        time_step_s=1, power_series_kw=(10.0,),
    )  # fmt: skip
    from gateway.semantic import Envelope

    env = Envelope.create(verification, sender="campus", recipient="ams", topic="heila/v1/to/ams/from/campus/x")
    await svc.on_verification(
        Received(entry_id="0-1", envelope=env, transport="mqtt", peer="campus", received_ns=0, stored_ns=0),
        verification,
    )
    assert await svc.redis.hget(svc.keys.activation(down), "state") == "settled"
    assert svc.counters["late_verifications"] == 1
