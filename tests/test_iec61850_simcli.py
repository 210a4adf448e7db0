"""``iedsim iec61850`` as a process: it serves the lab's 61850 device and says so on stdout."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import CommandRejected
from gateway.points import CommandRequest, DoublePoint, PointUpdate
from gateway.protocols import create_adapter
from gateway.services import free_port

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


async def test_iedsim_iec61850_serves_the_lab_device() -> None:
    port, control_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", "iec61850", "--config", str(SIM_CONFIG),
        "--port", str(port), "--control-port", str(control_port), "--duration-s", "20",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert f"iec61850 simulator ref615_mms (REF615) listening on 127.0.0.1:{port} (16 points)" in line
        assert f"control channel listening on 127.0.0.1:{control_port}" in (await proc.stdout.readline()).decode()
        ctl_r, ctl_w = await asyncio.open_connection("127.0.0.1", control_port)

        async def ask(line: str) -> str:
            ctl_w.write(line.encode() + b"\n")
            await ctl_w.drain()
            return (await asyncio.wait_for(ctl_r.readline(), 5)).decode().strip()

        cfg = load_config(SIM_CONFIG).only("ref615_mms").with_device("ref615_mms", port=port)
        adapter = create_adapter(cfg.devices["ref615_mms"], cfg.points)
        await adapter.start()
        try:
            await adapter.wait_connected(10)
            got = await adapter.read("mms.feeder.frequency")
            assert isinstance(got, PointUpdate) and 49 < float(got.value) < 51  # type: ignore[arg-type]
            assert (await ask("set mms.feeder.frequency 50.25")).startswith("ok ")
            got = await adapter.read("mms.feeder.frequency")
            assert got.value == pytest.approx(50.25)
            assert await ask("interlock on") == "ok interlock on"
            with pytest.raises(CommandRejected, match="interlocking"):
                await adapter.command(CommandRequest("mms.feeder.breaker.command", DoublePoint.OFF))
            assert await ask("stop") == "ok stopped"
            assert (await ask("start")).startswith("ok listening")
            assert (await ask("drop")).startswith("ok dropped")
            await asyncio.sleep(0.2)
            await adapter.wait_connected(10)  # reconnected by itself after the drop
            assert (await adapter.read("mms.feeder.frequency")).value == pytest.approx(50.25)
            assert (await ask("set nope 1")).startswith("err unknown point")
            assert '"operations": 0' in await ask("stats")
        finally:
            ctl_w.close()
            await adapter.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    assert proc.returncode == 0
