"""``mgms bench --lab`` against a lab that runs by itself: the IEC 104 simulator and ``mgms run``
as child processes, a real redis-server; the bench attaches, starts nothing, and measures from
the probes the gateway stores."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hilkit import DEVICE, REAL_CONFIG, SIM_CONFIG, eventually

from gateway.config import load_config
from gateway.iedsim.launch import SimProcess
from gateway.services import RedisServer, free_port
from gateway.store import RedisStore

pytestmark = [pytest.mark.timeout(90), pytest.mark.slow]

ROUTE_KEYS = {"name", "protocol", "direction", "n", "mean_ms", "median_ms", "p95_ms", "p99_ms", "max_ms",
              "floor_median_ms", "heila_ms", "cross_host", "offset_applied_ms", "offset_uncertainty_ms"}  # fmt: skip


def lab_file(tmp_path: Path, port: int, redis: RedisServer, *, read_only: bool = False) -> Path:
    """The simulator lab reduced to its IEC 104 relay, on this simulator's port and this Redis."""
    cfg = load_config(SIM_CONFIG).only(DEVICE)
    devices = {n: d.model_dump(mode="json", exclude={"name"}) for n, d in cfg.devices.items()}
    devices[DEVICE].update(port=port, read_only=read_only, timers={"t1_s": 2, "t2_s": 1, "t3_s": 1})
    doc = {
        "lab": cfg.lab.model_dump(),
        "devices": devices,
        "points": [p.model_dump(mode="json", exclude_defaults=True) for p in cfg.points],
        "redis": {
            **cfg.redis.model_dump(mode="json"),
            "url": redis.url,
            "user": "gateway",
            "password_file": str(redis.secret_file("gateway")),
        },
    }
    path = tmp_path / ("lab-ro.yaml" if read_only else "lab.yaml")
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def bench(*args: str, limit_s: float = 60) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "bench", "--lab", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@dataclass
class RunningLab:
    file: Path
    reader: RedisStore


@pytest.fixture
async def running_lab(tmp_path: Path, redis_server: RedisServer) -> AsyncIterator[RunningLab]:
    """iedsim iec104 and `mgms run`, each its own process, until the gateway stores values."""
    if REAL_CONFIG:
        pytest.skip("starts its own simulator and gateway")
    port = free_port()
    sim = SimProcess(SIM_CONFIG, DEVICE, port, free_port())
    await sim.start()
    path = lab_file(tmp_path, port, redis_server)
    reader = RedisStore.from_url(load_config(path), redis_server.client_url())
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run", "--config", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        await eventually(lambda: reader.latest("feeder.voltage.l1"), 20, "mgms run stores values")
        yield RunningLab(path, reader)
    finally:
        if run.returncode is None:
            run.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(run.communicate(), 20)
            except TimeoutError:
                run.kill()
                await run.wait()
        await reader.aclose()
        await sim.stop()


async def test_lab_mode_measures_field_routes_and_sends_no_command(tmp_path: Path, running_lab: RunningLab) -> None:
    out = tmp_path / "out"
    args = ("--config", str(running_lab.file), "--window-s", "6", "--n", "20", "--out", str(out))
    code, stdout, stderr = await bench(*args)
    assert code in (0, 1), stderr[-3000:]
    assert "nothing started" in stderr and "window 6 s" in stderr  # progress lines
    header = next((line.split() for line in stdout.splitlines() if line.startswith("route ")), [])
    assert header[:2] == ["route", "protocol"], stdout  # the terminal table (report.md keeps the markdown one)
    assert "not measured: lab_command" in stdout
    data: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert data["mode"] == "lab" and data["window_s"] == 6.0
    routes = {r["key"]: r for r in data["routes"]}
    assert set(routes) == {f"field_{DEVICE}"}, data["not_measured"]
    field = routes[f"field_{DEVICE}"]
    assert set(field) >= ROUTE_KEYS and field["protocol"] == "IEC 104" and field["direction"] == "monitoring"
    # the simulator sends its spontaneous measurands once a second, time-tagged (CP56Time2a)
    assert field["n"] >= 10, field
    assert 0 < field["median_ms"] < 1000 and field["median_ms"] <= field["max_ms"] < 5000, field
    assert field["cross_host"] is False and field["offset_applied_ms"] == 0.0
    # the command route is refused without --allow-commands; nothing was written to the command stream
    assert data["commands_sent"] == 0 and not data["commands_allowed"]
    assert "--allow-commands" in data["not_measured"]["lab_command"]
    # the IEC 104 floor: a bare c104 client as a second connection, time tag -> callback
    floor = data["floors"]["floor_c104_timetag"]
    assert floor["n"] >= 10 and 0 < floor["median_ms"] < 1000, floor
    assert field["floor_median_ms"] == floor["median_ms"]
    assert data["not_measured"]["floor_mqtt"] == "the lab config has no MQTT transport"
    keys = running_lab.reader.keys
    assert await running_lab.reader.redis.xlen(keys.cmd_requests) == 0
    assert await running_lab.reader.redis.xlen(keys.cmd_log) == 0
    md = (out / "report.md").read_text()
    assert "Mode: **lab**" in md and "## Not measured" in md


async def test_lab_mode_times_commands_only_when_allowed(tmp_path: Path, running_lab: RunningLab) -> None:
    out = tmp_path / "out"
    code, _, stderr = await bench(
        "--config", str(running_lab.file), "--window-s", "1", "--allow-commands", "--command-n", "2",
        "--floors", "", "--out", str(out),
    )  # fmt: skip
    assert code in (0, 1), stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    cmd = {r["key"]: r for r in data["routes"]}["lab_command"]
    assert cmd["n"] == 2 and 0 < cmd["median_ms"] < 5000, cmd
    assert data["commands_sent"] == 2 and set(data["command_hops"]) == {
        "cmd_hop_request_to_sent", "cmd_hop_sent_to_ack", "cmd_hop_ack_to_confirmed"
    }  # fmt: skip
    log = await running_lab.reader.command_log(10)
    assert [(r.requested_by, r.result, r.value) for r in log] == [
        ("mgms-bench", "confirmed", "1"), ("mgms-bench", "confirmed", "2")
    ]  # fmt: skip  # open (DPI 1), then close (2): the breaker ends as it was


async def test_lab_mode_refuses_commands_on_a_read_only_device(tmp_path: Path, redis_server: RedisServer) -> None:
    if REAL_CONFIG:
        pytest.skip("uses the simulator lab file")
    path = lab_file(tmp_path, free_port(), redis_server, read_only=True)
    code, _, stderr = await bench("--config", str(path), "--allow-commands", "--out", str(tmp_path / "o"))
    assert code == 2 and "read-only" in stderr
    reader = RedisStore.from_url(load_config(path), redis_server.client_url())
    try:
        assert await reader.redis.exists(reader.keys.cmd_requests) == 0
    finally:
        await reader.aclose()
