"""`mgms run`, `mgms command`, `mgms watch` as child processes against the simulator and Redis."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml
from hilkit import DEVICE, SIM_CONFIG, eventually

from gateway.config import LabConfig, load_config
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.points import Quality
from gateway.services import RedisServer
from gateway.store import RedisStore

pytestmark = pytest.mark.timeout(60)


async def mgms(*args: str, limit_s: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def only_104_lab(tmp_path: Path) -> Path:
    """The shipped simulator lab reduced to its IEC 104 relay, written out as a lab file.

    The other devices (61850 view, DLMS meter) have no simulator running in these tests;
    leaving them in would only add reconnect attempts on a loaded machine.
    """
    cfg = load_config(SIM_CONFIG).only(DEVICE)
    doc = {
        "lab": cfg.lab.model_dump(),
        "devices": {n: d.model_dump(mode="json", exclude={"name"}) for n, d in cfg.devices.items()},
        "points": [p.model_dump(mode="json", exclude_defaults=True) for p in cfg.points],
        "redis": cfg.redis.model_dump(mode="json"),
    }
    base = tmp_path / "lab104.yaml"
    base.write_text(yaml.safe_dump(doc, sort_keys=False))
    return base


def profile(tmp_path: Path, port: int, redis: RedisServer | None) -> Path:
    """A profile on top of the 104-only lab: this simulator's port, this Redis (None: embedded),
    named as a lab file names its own Redis: url, the gateway's user and its secret file."""
    p = tmp_path / "lab.yaml"
    p.write_text(
        f"extends: {only_104_lab(tmp_path)}\n"
        f"devices:\n  {DEVICE}:\n    port: {port}\n    timers: {{t1_s: 2, t2_s: 1, t3_s: 1}}\n"
        + (
            f"redis:\n  url: {redis.url}\n  user: gateway\n  password_file: {redis.secret_file('gateway')}\n"
            if redis is not None
            else ""
        )
    )
    return p


async def test_run_command_watch_and_sigterm(tmp_path: Path, redis_server: RedisServer,
                                            sim: Iec104Outstation | None) -> None:
    if sim is None:
        pytest.skip("needs the simulator")
    lab_file = profile(tmp_path, sim.port, redis_server)
    cfg: LabConfig = load_config(lab_file)
    reader = RedisStore.from_url(cfg, redis_server.client_url())
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run", "--config", str(lab_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async def link_up() -> bool:
            link = await reader.link(DEVICE)
            return link is not None and link.state == "up"

        await eventually(link_up, 15, "mgms run connected")
        meta = await reader.redis.hgetall(reader.keys.meta)
        assert meta["config"] == str(lab_file) and int(meta["pid"]) == run.pid

        code, out, err = await mgms("command", "feeder.breaker.command", "open", "--config", str(lab_file), "--by", "t",
                                    "--json")
        assert code == 0, err
        reply = json.loads(out)
        assert reply["result"] == "confirmed" and reply["requested_by"] == "t"

        code, out, err = await mgms("watch", "--once", "--config", str(lab_file))
        assert code == 0, err
        assert "device ref615: link up" in out
        assert "feeder.breaker.position" in out and "off (1)" in out
        assert "feeder.voltage.l1" in out and " V " in out

        sim.refuse_commands(True)
        code, out, _ = await mgms("command", "feeder.breaker.command", "close", "--config", str(lab_file))
        assert code == 1 and out.startswith("feeder.breaker.command close -> rejected"), out  # a line for a person
        sim.refuse_commands(False)

        run.send_signal(signal.SIGTERM)
        _, err_b = await asyncio.wait_for(run.communicate(), 20)
        assert run.returncode == 0, err_b.decode()
        link = await reader.link(DEVICE)
        assert link is not None and link.state == "closed"
        v = await reader.latest("feeder.voltage.l1")
        assert v is not None and Quality.NOT_TOPICAL in v.quality, "points flagged when the gateway stops"
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
        await reader.aclose()


async def test_sigint_stops_run_cleanly(tmp_path: Path, redis_server: RedisServer,
                                        sim: Iec104Outstation | None) -> None:
    if sim is None:
        pytest.skip("needs the simulator")
    lab_file = profile(tmp_path, sim.port, redis_server)
    reader = RedisStore.from_url(load_config(lab_file), redis_server.client_url())
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "run", "--config", str(lab_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        await eventually(lambda: reader.latest("feeder.frequency"), 15, "values stored")
        run.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(run.communicate(), 20)
        assert run.returncode == 0
        assert "gateway multipower stopping" in err.decode()
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
        await reader.aclose()


async def test_run_with_embedded_redis_is_found_by_command(tmp_path: Path, sim: Iec104Outstation | None) -> None:
    """No redis.url: `mgms run` starts its own redis-server; `mgms command` finds it in the data dir."""
    if sim is None:
        pytest.skip("needs the simulator")
    lab_file = profile(tmp_path, sim.port, None)
    data = tmp_path / "state"
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run", "--config", str(lab_file),
        "--data-dir", str(data), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        marker = data / "multipower" / "redis.url"

        async def started() -> bool:
            return marker.exists()

        await eventually(started, 15, "embedded redis url written")
        code, out, err = await mgms("command", "feeder.breaker.command", "open", "--config", str(lab_file),
                                    "--data-dir", str(data), "--timeout-s", "20")
        assert code == 0, (out, err)
        assert re.fullmatch(r"feeder\.breaker\.command open -> confirmed in \d+\.\d ms\n", out), out
        run.send_signal(signal.SIGTERM)
        await asyncio.wait_for(run.communicate(), 20)
        assert run.returncode == 0
        assert not marker.exists(), "url marker removed with the embedded server"
        assert (data / "multipower" / "redis").is_dir(), "AOF kept for the next run"
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()


@pytest.mark.parametrize("data_dir", [None, "state"], ids=["default", "relative"])
async def test_run_from_another_cwd_with_default_or_relative_data_dir(tmp_path: Path, data_dir: str | None) -> None:
    """The README's path: `mgms run --config lab_configs/multipower-sim.yaml` (issue 12 item 3).

    Started from a directory other than the checkout, with the default data dir or a relative
    one, its embedded Redis comes up (its url marker appears) and SIGTERM stops it cleanly.
    """
    run = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run", "--config", str(SIM_CONFIG),
        *(["--data-dir", data_dir] if data_dir else []),
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    marker = tmp_path / (data_dir or ".mgms") / "multipower" / "redis.url"
    try:
        async def started() -> bool:
            assert run.returncode is None, "mgms run exited at start-up"
            return marker.exists()

        await eventually(started, 20, "embedded redis url written")
        url = marker.read_text().strip()
        assert "@" not in url  # the marker holds no credential; the secrets are files of mode 0600
        secret_file = marker.parent / "secrets" / "redis-viewer.secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        client = aioredis.Redis.from_url(url, username="viewer", password=secret_file.read_text().strip())
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        # at once, while start-up may still be under way: the handler is installed before the
        # Redis starts (issue 17 item 10; test_run_lifecycle.py hunts that window)
        run.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(run.communicate(), 20)
        assert run.returncode == 0, err.decode()
        assert not marker.exists()
        assert (marker.parent / "redis" / "appendonlydir").is_dir()
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
