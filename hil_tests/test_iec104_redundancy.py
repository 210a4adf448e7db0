"""A redundant pair of IEC 104 outstations (two simulators, ``redundant_hosts``) behind the
whole gateway and a real redis-server: the active one dies, the values stay good in Redis,
the other one's GI brings what changed, nothing is stored twice, changes keep their time tags.
"""

from __future__ import annotations

import pytest
from hilkit import DEVICE, REAL_CONFIG, eventually, start_lab

from gateway.config import Direction, LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.points import Quality
from gateway.services import RedisServer
from gateway.store import StoredValue

pytestmark = pytest.mark.timeout(60)

STALE = Quality.NOT_TOPICAL | Quality.INVALID


async def test_redundant_pair_through_redis_when_the_active_one_dies(
    base_config: LabConfig, redis_server: RedisServer
) -> None:
    if REAL_CONFIG:
        pytest.skip("kills an outstation (runs on the simulators only)")
    # the feeders step once an hour: only the test's own changes are sent spontaneously
    still = base_config.with_device(
        DEVICE, simulator={**base_config.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0}
    )
    a = Iec104Outstation(still, DEVICE, host="127.0.0.1", port=0, seed=3)
    b = Iec104Outstation(still, DEVICE, host="127.0.0.1", port=0, seed=3)
    await a.start()
    await b.start()
    # the pair agrees on these (points without deadband: the store would write each again)
    shared = {"feeder.p": 42.0, "feeder.pf": 0.97, "feeder.breaker.position": 2.0}
    for sim in (a, b):
        for name, value in shared.items():
            sim.set_value(name, value)
    a.set_value("feeder.voltage.l3", 229.0)
    b.set_value("feeder.voltage.l3", 228.0)  # ... and not on this one
    lab = await start_lab(
        still, redis_server, a, redundant_hosts=[{"host": "127.0.0.1", "port": b.port}], gi_period_s=0
    )
    names = [p.name for p in lab.config.points if p.direction is Direction.MONITOR]
    try:

        async def all_in() -> dict[str, StoredValue] | None:
            got = await lab.reader.latest_all()
            return got if all(n in got and got[n].quality == Quality.GOOD for n in names) else None

        await eventually(all_in, 5, "every GI answer of the first outstation in Redis")
        history_before = {n: len(await lab.reader.history(n)) for n in shared}
        await a.close()

        async def from_b() -> StoredValue | None:
            v = await lab.reader.latest("feeder.voltage.l3")
            return v if v is not None and v.value == 228.0 else None

        await eventually(from_b, 5, "the second outstation's GI in Redis")
        assert b.stats().interrogations == 1
        link = await lab.reader.link(DEVICE)
        assert link is not None and link.state == "up", link
        got = await lab.reader.latest_all()
        assert all(got[n].quality == Quality.GOOD for n in names), {n: got[n].quality for n in names}
        for name in names:  # never flagged stale: the switch-over was no link-down
            assert not any(STALE in e.quality for e in await lab.reader.history(name)), name
        for name in shared:  # the same value from both sides: stored once
            assert len(await lab.reader.history(name)) == history_before[name], name
        # a change on the new side keeps its time tag
        sent = b.set_value("feeder.voltage.l2", 244.4)

        async def changed() -> StoredValue | None:
            v = await lab.reader.latest("feeder.voltage.l2")
            return v if v is not None and v.value == pytest.approx(244.4) else None

        v = await eventually(changed, 3, "a spontaneous change from the second outstation")
        assert v.source_ts_from == "device" and int((v.source_ts or 0) * 1000) == int(sent * 1000)
    finally:
        await lab.shutdown()
        await lab.reader.aclose()
        await b.close()
        await a.close()
