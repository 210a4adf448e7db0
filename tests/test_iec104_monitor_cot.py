"""Monitor values whose ASDU no monitor value may have are refused and counted, on both engines.

Seen (issue 13 item 5): values with COT 0, 63 or 0xFF (T and P/N set), with the P/N bit or
with the test bit were stored as good. IEC 60870-5-101 7.2.3: a test transmission (T = 1) is
the device checking the link, never a measurement; P/N belongs to confirmations; a monitor
value's cause is periodic, background, spontaneous, requested, return information or
(counter) interrogated. The rogue outstation (``gateway.iedsim.rogue104``) sends each such
ASDU on a configured point, then a good one: the good one is stored, the others counted
(``test_values``, ``bad_cot``) and never reach the event stream. c104 runs in a forked child
(tests/forkbox.py).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, load_config
from gateway.iedsim.rogue104 import RogueOutstation, monitor_points
from gateway.protocols import create_adapter
from gateway.protocols.iec104.codec import Asdu, Cot, Cp56Time, FloatInfo, InfoObject, TypeId, encode_asdu

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
POINT = "feeder.voltage.l1"

#: (cot, P/N, T, counter): what a device must not send on a monitor value
BAD = [
    (0, False, False, "bad_cot"),  # "not used"
    (63, False, False, "bad_cot"),
    (63, True, True, "test_values"),  # the COT octet 0xFF
    (Cot.SPONTANEOUS, True, False, "bad_cot"),  # P/N on a value
    (Cot.SPONTANEOUS, False, True, "test_values"),  # a test transmission
    (6, False, False, "bad_cot"),  # activation: a command cause
]


@pytest.fixture(scope="module")
def base() -> LabConfig:
    return load_config(SIM_CONFIG)


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


def _value(base: LabConfig, value: float, cot: int, negative: bool, test: bool) -> bytes:
    p = base.point(POINT)
    ioa = p.address.ioa  # type: ignore[union-attr]
    type_id = TypeId[p.address.type]  # type: ignore[union-attr]
    assert type_id is TypeId.M_ME_TF_1, type_id  # the lab's feeder voltages
    obj = InfoObject(ioa, FloatInfo(value), Cp56Time.from_timestamp(time.time()))
    asdu = Asdu(type_id, Cot(cot) if cot in Cot._value2member_map_ else cot, base.devices[DEVICE].common_address,  # type: ignore[arg-type]
                (obj,), negative=negative, test=test)  # fmt: skip
    return encode_asdu(asdu)


@pytest.mark.parametrize("engine", ["asyncio", pytest.param("c104", marks=pytest.mark.forked)])
async def test_test_bit_p_n_bit_and_non_monitor_causes_are_refused_and_counted(
    engine: str, base: LabConfig, running: Starter
) -> None:
    ca = base.devices[DEVICE].common_address
    async with RogueOutstation(monitor_points(base.points_of(DEVICE)), common_address=ca, seed=3) as rogue:
        cfg = base.with_device(DEVICE, port=rogue.port, timers=FAST, gi_period_s=0, iec104_engine=engine,
                               reconnect={"initial_s": 0.1, "max_s": 0.3})  # fmt: skip
        w: Watched = await running(create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE)))
        await w.adapter.wait_connected(5)
        session = await rogue.session()
        expected: dict[str, int] = {}
        for i, (cot, negative, test, counter) in enumerate(BAD):
            session.send_i(_value(base, 500.0 + i, int(cot), negative, test))
            expected[counter] = expected.get(counter, 0) + 1
        session.send_i(_value(base, 231.25, Cot.SPONTANEOUS, False, False))
        await until(lambda: w.latest(POINT, lambda u: u.value == 231.25), 5, "the good value after the bad ones")
        stored = [u.value for u in w.values if u.point == POINT]
        assert not [v for v in stored if isinstance(v, float) and v >= 500.0], stored
        stats = w.adapter.stats()
        assert {k: stats.get(k, 0) for k in expected} == expected, stats
        assert not w.downs()  # the application's business: the link stays


async def test_an_unsolicited_startdt_con_does_not_undo_our_stopdt(base: LabConfig, running: Starter) -> None:
    # Found by the rogue outstation: a STARTDT con nobody asked for turned data transfer back
    # on after stop_data(), so a standby would deliver values again. Now it is counted as an
    # unexpected U-frame and data transfer stays off until start_data().
    from gateway.errors import LinkError
    from gateway.points import CommandRequest
    from gateway.protocols.iec104.aio import AsyncIec104Adapter
    from gateway.protocols.iec104.codec import UFrame, UFunction, encode_frame

    ca = base.devices[DEVICE].common_address
    async with RogueOutstation(monitor_points(base.points_of(DEVICE)), common_address=ca, seed=3) as rogue:
        cfg = base.with_device(DEVICE, port=rogue.port, timers=FAST, gi_period_s=0, iec104_engine="asyncio")
        w: Watched = await running(create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE)))
        adapter = w.adapter
        assert isinstance(adapter, AsyncIec104Adapter)
        await adapter.wait_connected(5)
        session = await rogue.session()
        await adapter.stop_data()
        before = adapter.stats().get("unexpected_u_frames", 0)
        session.write(encode_frame(UFrame(UFunction.STARTDT_CON)))
        await until(lambda: adapter.stats().get("unexpected_u_frames", 0) > before, 3, "the con counted")
        with pytest.raises(LinkError, match="data transfer stopped"):
            await adapter.command(CommandRequest("feeder.autoreclose.command", True))
        await adapter.start_data()  # ours: confirmed, and on again
        await adapter.command(CommandRequest("feeder.autoreclose.command", True))
