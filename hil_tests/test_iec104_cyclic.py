"""Cyclic (COT periodic) measured values from the simulator end up in Redis as ``periodic``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from hilkit import DEVICE, REAL_CONFIG, eventually, start_lab

from gateway.config import LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.services import RedisServer
from gateway.store import StoredValue

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(bool(REAL_CONFIG), reason="needs the simulator's cyclic transmission setting"),
]


@pytest.fixture
async def cyclic_sim(base_config: LabConfig) -> AsyncIterator[Iec104Outstation]:
    # The feeder stands still (one step an hour), so only the cycle refreshes the values.
    sim = {**base_config.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0, "cyclic_period_s": 0.2}
    cfg = base_config.with_device(DEVICE, simulator=sim)
    o = Iec104Outstation(cfg, DEVICE, host="127.0.0.1", port=0, seed=5)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


async def test_cyclic_values_land_in_redis_as_periodic(
    base_config: LabConfig, cyclic_sim: Iec104Outstation, redis_server: RedisServer
) -> None:
    lab = await start_lab(base_config, redis_server, cyclic_sim, gi_period_s=0)
    try:
        points = lab.config.points_of(DEVICE)
        measured = [p.name for p in points if p.direction.value == "monitor" and p.address.kind == "measured"]

        async def all_periodic() -> dict[str, StoredValue] | None:
            values = await lab.reader.latest_all()
            ok = all(n in values and values[n].cause == "periodic" for n in measured)
            return values if ok else None

        values = await eventually(all_periodic, 5, "every measured point stored with cause periodic")
        for name in measured:
            assert values[name].value == pytest.approx(cyclic_sim.values()[name].value, rel=1e-5), name
        # the cycle keeps refreshing: the store time moves on with no change in value
        first = values["feeder.voltage.l1"].store_ts

        async def refreshed() -> StoredValue | None:
            v = await lab.reader.latest("feeder.voltage.l1")
            return v if v is not None and v.store_ts > first + 0.15 and v.cause == "periodic" else None

        await eventually(refreshed, 3, "a later cycle stored again")
        # status points are not cyclic: the breaker position stays as the interrogation left it
        pos = await lab.reader.latest("feeder.breaker.position")
        assert pos is not None and pos.cause == "interrogated"
    finally:
        await lab.shutdown()
        await lab.reader.aclose()
