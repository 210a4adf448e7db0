"""End-to-end receipts in the DSO flow, with the real broker killed (issue 13 item 1).

mosquitto sends PUBACK before it writes its store: kill -9 right after a publish lost
acknowledged Activation Notifications, which the AMS then showed ``activated`` forever. With
receipts a message leaves its sender only when the receiver's signed Receipt comes back, so
every flow must end with a final state, and an activation that cannot be delivered in time
must end ``undelivered``. The long drill is ``python bench/broker_kill_drill.py`` (40 flows,
20 kills; figures in docs/flexibility.md); this is its short version.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from dsokit import MGMS, dso_lab
from hilkit import REAL_CONFIG, eventually, start_lab

from ams.sandbox import DsoSandbox
from ams.service import MarketSettings
from ams.vpp.offers import OfferLine
from bench.broker_kill_drill import run_drill
from gateway.config import LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.semantic import FlexibilityType
from gateway.services import RedisServer

pytestmark = [pytest.mark.skipif(bool(REAL_CONFIG), reason="kills the broker and drives the simulated breaker")]


@pytest.mark.timeout(150)
async def test_broker_kill_9_during_dso_flows_loses_no_acknowledged_message(tmp_path: Path) -> None:
    result = await run_drill(tmp_path, flows=8, kills=3, lead_s=3.0, window_s=1.0, seed=13)
    assert result.lost == 0, result.lost_flows
    assert set(result.states) <= {"settled", "undelivered"}, result.states
    assert sum(result.states.values()) == 8
    # nothing left behind: every message receipted (or given up with a reason)
    assert result.left_unsent == 0 and result.left_awaiting == 0
    for side in (result.mgms, result.ams):  # each message the next hop took: receipted or given up
        assert side["receipted"] + side["unreceipted"] == side["sent"], result
    assert result.ams["received"] == 16  # 8 x (flexibility, verification), each stored once
    if result.states == {"settled": 8}:
        assert result.mgms["received"] == 16  # 8 x (reserve, activation)


@pytest.mark.timeout(60)
async def test_activation_whose_microgrid_is_down_past_its_start_is_undelivered_and_never_executed(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        svc = ams.service
        svc.settings = svc.settings.model_copy(update={"market": MarketSettings(activation_receipt_grace_s=1.0)})
        await lab.shutdown()  # the gateway is down; the broker keeps its session and queues for it
        start = datetime.now(UTC) + timedelta(seconds=1.5)
        line = OfferLine(MGMS, "feeder", 20.0, start, start + timedelta(seconds=1), 50.0, FlexibilityType.UPWARD)
        (act_id,) = await svc.dispatch([line], "down")

        async def undelivered() -> dict[str, str] | None:
            s = await svc.settlement(act_id)
            return s if s.get("state") == "undelivered" else None

        settlement = await eventually(undelivered, 15, "the activation settled undelivered")
        assert "no receipt from" in settlement["reason"] and float(settlement["payment_eur"]) == 0.0
        assert datetime.now(UTC) >= start  # not before its start
        assert await svc.redis.hget(svc.keys.activation(act_id), "state") == "undelivered"
        # the gateway comes back: the broker hands over the queued activation, which has
        # expired with its deadline: refused, and the breaker is never operated for it
        again = await start_lab(lab.config, redis_server, sim)
        try:
            messenger = again.gateway.messenger
            assert messenger is not None

            async def refused() -> int | None:
                return messenger.opener.counter.snapshot().get("expired") or None

            await eventually(refused, 15, "the late activation refused as expired")
            await asyncio.sleep(0.5)
            ours = [r for r in await again.reader.command_log(50) if r.requested_by == f"ams:{act_id}"]
            assert ours == []
            assert await svc.redis.hget(svc.keys.activation(act_id), "state") == "undelivered"
        finally:
            await again.shutdown()
            await again.reader.aclose()
