"""What the asyncio IEC 104 engine does beyond values and commands, against the real simulator:
clock synchronisation (C_CS_NA_1).

Same event loop for simulator and adapter, no mocks; each test reads what the outstation
recorded (its clock error, the frames it received) as well as what the adapter reports.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, load_config
from gateway.errors import ConfigError, DeviceError
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import UpdateCause
from gateway.protocols import create_adapter
from gateway.protocols.base import LinkState
from gateway.protocols.iec104.aio import AsyncIec104Adapter
from gateway.protocols.iec104.codec import IFrame, TypeId, decode_apdu

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


@pytest.fixture(scope="module")
def base() -> LabConfig:
    lab = load_config(SIM_CONFIG)
    sim = {**lab.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0, "seed": 5}
    return lab.with_device(DEVICE, simulator=sim)


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


def gateway_config(cfg: LabConfig, port: int, **device: Any) -> LabConfig:
    changes: dict[str, Any] = {
        "port": port,
        "timers": FAST,
        "reconnect": {"initial_s": 0.1, "max_s": 0.3},
        "gi_period_s": 0,
        "iec104_engine": "asyncio",
        **device,
    }
    return cfg.with_device(DEVICE, **changes)


def adapter_for(cfg: LabConfig) -> AsyncIec104Adapter:
    adapter = create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE))
    assert isinstance(adapter, AsyncIec104Adapter)
    return adapter


async def connected(
    base: LabConfig, running: Starter, sim: Iec104Outstation | None = None, **device: Any
) -> tuple[Iec104Outstation, Watched]:
    if sim is None:
        sim = await running(base)
    assert sim is not None
    w: Watched = await running(adapter_for(gateway_config(base, sim.port, **device)))
    await w.adapter.wait_connected(5)
    return sim, w


def asdu_types_in(sim: Iec104Outstation) -> list[int]:
    """Type ids of the I-frames the outstation received, in order."""
    out = []
    for rec in sim.recent_frames():
        frame = decode_apdu(rec.data)
        if rec.direction == "in" and isinstance(frame, IFrame):
            out.append(frame.asdu[0])
    return out


# ---------------------------------------------------------------------------------------
# clock synchronisation


async def test_clock_sync_on_connect_sets_the_device_clock_before_the_gi(base: LabConfig, running: Starter) -> None:
    sim: Iec104Outstation = await running(base)
    sim.set_clock_error(120.0)  # the device's clock is two minutes fast
    _, w = await connected(base, running, sim, clock_sync={"on_connect": True})
    await until(lambda: sim.stats().clock_syncs == 1, 5, "clock synchronisation after connect")
    [record] = sim.clock_syncs
    assert record.error_before_s == pytest.approx(120.0, abs=0.01)
    assert abs(sim.clock_error_s) < 0.05  # set to our clock, within the loopback delay
    types = asdu_types_in(sim)
    assert types.index(TypeId.C_CS_NA_1) < types.index(TypeId.C_IC_NA_1)  # clock first, then GI
    await until(lambda: w.adapter.stats().get("clock_syncs") == 1, 5, "ACTCON taken")
    assert abs(w.adapter.stats()["clock_offset_ms"]) < 50
    # the GI's time-tagged values carry the corrected clock, not one two minutes ahead
    breaker = await until(
        lambda: w.latest("feeder.breaker.position", lambda u: u.cause is UpdateCause.INTERROGATED), 5, "GI"
    )
    if breaker.source_time is not None:
        assert abs(breaker.source_time - breaker.receive_time) < 1.0


async def test_no_clock_sync_unless_configured(base: LabConfig, running: Starter) -> None:
    sim, w = await connected(base, running)
    await until(lambda: TypeId.C_IC_NA_1 in asdu_types_in(sim), 5, "GI after connect")
    assert sim.stats().clock_syncs == 0 and TypeId.C_CS_NA_1 not in asdu_types_in(sim)
    assert "clock_syncs_sent" not in w.adapter.stats()


async def test_periodic_clock_sync_and_a_refusal_counted_and_logged(
    base: LabConfig, running: Starter, caplog: pytest.LogCaptureFixture
) -> None:
    sim, w = await connected(base, running, clock_sync={"on_connect": False, "period_s": 0.2})
    await until(lambda: sim.stats().clock_syncs >= 3, 5, "three periodic synchronisations")
    sim.set_clock_error(-30.0)
    device_time = await w.adapter.synchronize_clock()
    assert abs(sim.clock_error_s) < 0.05 and sim.clock_syncs[-1].error_before_s == pytest.approx(-30.0, abs=0.01)
    assert abs(device_time - sim.clock_syncs[-1].received_at) < 0.05
    sim.refuse_clock_sync(True)
    with caplog.at_level(logging.WARNING, logger="gateway.protocols.iec104.aio"):
        with pytest.raises(DeviceError, match="clock synchronisation refused"):
            await w.adapter.synchronize_clock()
        await until(lambda: w.adapter.stats().get("clock_sync_refused", 0) >= 2, 5, "a periodic one refused too")
    assert "clock synchronisation refused by the device" in caplog.text
    assert w.adapter.link_state is LinkState.UP and not w.downs()


def test_clock_sync_config_is_refused_where_it_would_be_ignored(base: LabConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="clock_sync needs iec104_engine: asyncio"):
        base.with_device(DEVICE, iec104_engine="c104", clock_sync={"on_connect": True})
    with pytest.raises(ValueError, match="clock_sync is for protocol iec104 devices, not iec61850"):
        base.with_device("ref615_mms", clock_sync={"period_s": 60})
    off = base.with_device(DEVICE, iec104_engine="c104", clock_sync={"on_connect": False})
    assert not off.devices[DEVICE].clock_sync.enabled  # switched off is fine on any engine
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        f"extends: {SIM_CONFIG}\ndevices:\n  ref615:\n    iec104_engine: c104\n    clock_sync: {{period_s: -1}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(lab)
    [issue] = err.value.issues
    assert (issue.line, issue.key) == (5, "devices.ref615.clock_sync.period_s")
