"""The floors added so that a floor bounds its route: each runs on its real simulator and
produces samples (the durable floors run in the bench smoke test, which has the broker)."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from gateway.bench.progress import Progress
from gateway.bench.routes import DEVICE_104, DEVICE_MMS, MMS_VOLTAGE, iec61850_floor, raw104_floor
from gateway.config import load_config
from gateway.iedsim.launch import SimProcess
from gateway.points import PointUpdate
from gateway.services import free_port

SIM_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"


@pytest.mark.timeout(30)
async def test_raw_socket_104_floor_times_every_change() -> None:
    port = free_port()
    sim = SimProcess(SIM_CONFIG, DEVICE_104, port, free_port())
    await sim.start()
    try:
        cfg = load_config(SIM_CONFIG).only(DEVICE_104).with_device(DEVICE_104, port=port, gi_period_s=0)
        vals = await raw104_floor(cfg, port, sim, 5, Progress(quiet=True))
    finally:
        await sim.stop()
    assert len(vals) == 5  # every change decoded by the bare reader
    assert all(0 < v < 100 for v in vals), vals


@pytest.mark.timeout(30)
async def test_61850_floor_ticked_on_socket_readiness_times_every_update() -> None:
    from gateway.iedsim.iec61850 import Iec61850Server

    cfg = load_config(SIM_CONFIG).only(DEVICE_MMS)
    simcfg = cfg.devices[DEVICE_MMS].simulator.model_dump()
    cfg = cfg.with_device(DEVICE_MMS, simulator={**simcfg, "period_s": 3600, "breaker_travel_s": 0.0})
    sim = Iec61850Server(cfg, DEVICE_MMS, host="127.0.0.1", port=0, seed=1)
    await sim.start()
    try:
        cfg = cfg.with_device(DEVICE_MMS, port=sim.port)
        vals = await iec61850_floor(cfg, sim.port, sim, 5, Progress(quiet=True), random.Random(1))
    finally:
        await sim.close()
    assert len(vals) == 5 and all(0 < v < 100 for v in vals), vals


@pytest.mark.timeout(30)
async def test_report_ticker_handles_reports_from_the_socket() -> None:
    """The ticker's thread, not only libiec61850's own, runs the receive path: with reports
    arriving at random moments it wakes on the socket and ticks."""
    from gateway.iedsim.iec61850 import Iec61850Server
    from gateway.protocols.iec61850.adapter import Iec61850Adapter
    from gateway.protocols.iec61850.bare import ReportTicker, connection_socket_fd

    cfg = load_config(SIM_CONFIG).only(DEVICE_MMS)
    simcfg = cfg.devices[DEVICE_MMS].simulator.model_dump()
    cfg = cfg.with_device(DEVICE_MMS, simulator={**simcfg, "period_s": 3600, "breaker_travel_s": 0.0})
    sim = Iec61850Server(cfg, DEVICE_MMS, host="127.0.0.1", port=0, seed=1)
    await sim.start()
    cfg = cfg.with_device(DEVICE_MMS, port=sim.port)
    adapter = Iec61850Adapter(cfg.devices[DEVICE_MMS], cfg.points)
    got: list[float] = []
    all_in = asyncio.Event()

    async def pump() -> None:
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate) and ev.point == MMS_VOLTAGE and ev.value is not None:
                got.append(float(ev.value))
                if float(ev.value) == 231.125 + 9:
                    all_in.set()

    task = asyncio.create_task(pump())
    try:
        await adapter.start()
        await adapter.wait_connected(10)
        assert connection_socket_fd("127.0.0.1", sim.port) >= 0
        ticker = ReportTicker(adapter._con, "127.0.0.1", sim.port)
        ticker.start()
        rng = random.Random(2)
        for i in range(10):
            sim.set_value(MMS_VOLTAGE, 231.125 + i)
            await asyncio.sleep(0.003 + rng.random() * 0.01)
        await asyncio.wait_for(all_in.wait(), 3)
        await asyncio.to_thread(ticker.stop)
        assert ticker.ticks > 0
        assert [round(v, 3) for v in got if v > 231][-10:] == [231.125 + i for i in range(10)]
    finally:
        await adapter.close()
        await task
        await sim.close()
