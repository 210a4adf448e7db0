"""The DSO flexibility use case end to end, on the simulator, over real MQTT and HTTPS.

Flexibility (MGMS) -> Offer -> Reserve -> Activation (AMS) -> breaker opened in the 104
simulator and confirmed by its status in Redis -> measured power -> Verification -> settled
at the AMS; then the breaker is closed again. Each participant has its own Redis (as in
HEILA: "MGMS db" and "AMS db"). Runs encrypted and signed-only, over MQTT, over HTTPS and
mixed, and once with the broker killed and restarted in the middle.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Literal

import pytest
from dsokit import MGMS, Ams, dso_lab
from hilkit import REAL_CONFIG, Lab, eventually

from ams.sandbox import DsoSandbox
from gateway.config import LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.points import DoublePoint
from gateway.services import RedisServer

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(bool(REAL_CONFIG), reason="drives the breaker through the simulated AMS flow"),
]

async def run_flow(lab: Lab, ams: Ams) -> tuple[str, dict[str, str]]:
    """Offer the feeder once; return the activation id and its settlement at the AMS."""
    gw = lab.gateway
    agent = gw.flex_agent
    assert agent is not None
    await eventually(lambda: _value(gw, "feeder.p"), 5, "a feeder power value")
    sent = await agent.publish(window_s=2)
    assert len(sent) == 1
    flex = sent[0]
    act_id = f"act:offer:{MGMS}:{flex.identifier}"

    async def settled() -> dict[str, str] | None:
        s = await ams.service.settlement(act_id)
        return s or None

    settlement = await eventually(settled, 20, "the settlement at the AMS")
    return act_id, settlement


async def _value(gw: object, name: str) -> float | None:
    latest = gw.latest_value(name)  # type: ignore[attr-defined]
    return None if latest is None else latest[0]


async def check_outcome(lab: Lab, ams: Ams, act_id: str, settlement: dict[str, str]) -> None:
    assert settlement["state"] == "settled", settlement
    assert float(settlement["payment_eur"]) > 0
    # exactly one activation, one open and one close, each confirmed by the breaker status
    log = await lab.reader.command_log(50)
    ours = [r for r in log if r.requested_by == f"ams:{act_id}"]
    assert sorted((r.point, str(r.value), r.result) for r in ours) == [
        ("feeder.breaker.command", "1", "confirmed"),
        ("feeder.breaker.command", "2", "confirmed"),
    ], ours
    assert ams.service.counters["activations"] == 1
    assert lab.gateway.flex_agent is not None and lab.gateway.flex_agent.counters["activations"] == 1
    stored = await lab.reader.latest("feeder.breaker.position")
    assert stored is not None and stored.value == DoublePoint.ON  # closed again
    hist = await lab.reader.history("feeder.breaker.position", 20)
    assert DoublePoint.OFF in [h.value for h in hist]  # it was open in between
    mgms_state = await lab.store.redis.hgetall(f"{lab.store.keys.prefix}:flex:act:{act_id}")
    assert mgms_state["state"] == "verified"


@pytest.mark.parametrize(
    ("transport", "security"),
    [("mqtt", "encrypted"), ("mqtt", "signed"), ("https", "encrypted"), ("https", "signed"), ("both", "encrypted")],
)
async def test_dso_flow_end_to_end(
    box: DsoSandbox,
    base_config: LabConfig,
    redis_server: RedisServer,
    ams_redis: RedisServer,
    sim: Iec104Outstation | None,
    transport: Literal["mqtt", "https", "both"],
    security: Literal["encrypted", "signed"],
) -> None:
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, transport, security) as (lab, ams):
        act_id, settlement = await run_flow(lab, ams)
        await check_outcome(lab, ams, act_id, settlement)
        # the AMS saw ciphertext or signatures only from a known sender: nothing rejected
        stats = ams.messenger.stats()
        assert sum(v for k, v in stats.items() if k.startswith("rejected_")) == 0, stats
        assert stats["received"] == 2  # the flexibility and the verification


async def test_dso_flow_survives_a_broker_restart(
    box: DsoSandbox,
    base_config: LabConfig,
    redis_server: RedisServer,
    ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        assert box.broker is not None
        gw = lab.gateway
        assert gw.flex_agent is not None
        await eventually(lambda: _value(gw, "feeder.p"), 5, "a feeder power value")
        box.broker.stop(hard=True)  # kill -9: flexibility is queued in the MGMS outbox
        # The window starts after the outage (0.5 s down, reconnect backoff <= 1 s): an
        # activation that arrives after a step was due counts that step as not delivered
        # (by design, FlexAgent._sample), which a window starting at once would hit.
        start = datetime.now(UTC) + timedelta(seconds=4)
        flex = (await gw.flex_agent.publish(start=start, window_s=2))[0]
        await asyncio.sleep(0.5)
        assert gw.messenger is not None and await gw.messenger.outbox_length() == 1
        await asyncio.to_thread(box.broker.start)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"

        async def settled() -> dict[str, str] | None:
            return (await ams.service.settlement(act_id)) or None

        settlement = await eventually(settled, 30, "the settlement after the broker restart")
        await check_outcome(lab, ams, act_id, settlement)
        assert await gw.messenger.outbox_length() == 0



async def test_operation_plan_from_the_ams_reduces_what_is_offered(
    box: DsoSandbox,
    base_config: LabConfig,
    redis_server: RedisServer,
    ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:
    from datetime import UTC, datetime, timedelta

    from gateway.semantic import OperationPlan

    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        agent = lab.gateway.flex_agent
        assert agent is not None
        await eventually(lambda: _value(lab.gateway, "feeder.p"), 5, "a feeder power value")
        t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        plan = OperationPlan(identifier="plan-1", resource="feeder", start=t0, stop=t0 + timedelta(seconds=120),
                             time_step_s=60, power_series_kw=(20.0, 20.0))  # fmt: skip
        await ams.messenger.send(plan, MGMS)

        async def taken() -> int | None:
            return agent.counters["plans"] or None

        await eventually(taken, 10, "the plan to arrive")
        measured = await _value(lab.gateway, "feeder.p")
        assert measured is not None
        flex = (await agent.publish(window_s=2))[0]
        # the plan keeps 20 kW; the feeder's load moves a little between the two reads
        assert flex.power_kw == pytest.approx(abs(measured) - 20.0, abs=3.0)
        assert await lab.store.redis.hexists(f"{lab.store.keys.prefix}:flex:plan", "feeder")
