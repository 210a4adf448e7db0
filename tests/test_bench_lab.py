"""``mgms bench --lab`` message routes and DSO loop from hashes with known stamps, on real
redis-servers, the AMS's clock 25 ms ahead and the offset found by a real exchange: the
corrected routes come out at the true latencies within the exchange's bound."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from ams.sandbox import DsoSandbox
from gateway.bench.args import BenchError
from gateway.bench.clock import MqttClockResponder, clock_app, mqtt_settings_of
from gateway.bench.runner import bench_broker, run_bench
from gateway.cli import build_parser
from gateway.config import load_config
from gateway.services import RedisServer, free_port

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[1]
MGMS, AMS = "mgms-bench", "ams"
MS = 1_000_000
SHIFT_NS = 25 * MS  # the AMS host's clock runs 25 ms ahead


def ams_clock() -> int:
    return time.time_ns() + SHIFT_NS


@dataclass
class Setup:
    lab: Path
    mgms_url: str
    ams_url: str
    clock_url: str


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    box = DsoSandbox(tmp_path / "dso", mgms=[MGMS], start_broker=False)
    cfg = load_config(ROOT / "lab_configs" / "multipower-sim.yaml").only("ref615")
    with RedisServer(data_dir=tmp_path / "mgms-redis") as mr, RedisServer(data_dir=tmp_path / "ams-redis") as ar:
        doc = {
            "lab": cfg.lab.model_dump(),
            "devices": {n: d.model_dump(mode="json", exclude={"name"}) for n, d in cfg.devices.items()},
            "points": [p.model_dump(mode="json", exclude_defaults=True) for p in cfg.points],
            # the lab's own Redis, as a lab file names one: url, user, secret file (docs/security.md)
            "redis": {"url": mr.url, "user": "gateway", "password_file": str(mr.secret_file("gateway"))},
            "messaging": box.messaging(MGMS, transport="https").model_dump(mode="json"),
        }
        lab = tmp_path / "lab.yaml"
        lab.write_text(yaml.safe_dump(doc, sort_keys=False))
        runner = web.AppRunner(clock_app(clock=ams_clock), access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            yield Setup(lab, mr.client_url(), ar.client_url("ams"), f"http://127.0.0.1:{port}/clock")
        finally:
            await runner.cleanup()


async def store_a_loop(s: Setup) -> dict[str, float]:
    """One DSO loop as the MGMS and the AMS store it: MGMS stamps on the true clock, AMS stamps
    (and its Redis) 25 ms ahead. Returns the true latencies (ms)."""
    t = time.time_ns() - 2_000 * MS  # two seconds ago, on the true clock
    a = SHIFT_NS
    mg = aioredis.Redis.from_url(s.mgms_url, decode_responses=True)
    am = aioredis.Redis.from_url(s.ams_url, decode_responses=True)
    try:
        # flexibility: created at t (MGMS), received +3, stored +4 (AMS clock)
        await am.hset(f"ams:{AMS}:flex:{MGMS}:f1", mapping={
            "created_ns": t, "received_ns": t + 3 * MS + a, "stored_ns": t + 4 * MS + a, "offer": "offer:x:f1",
        })  # fmt: skip
        # activation sent by the AMS at +10, created there at +10; MGMS received +14, stored +16
        act = "act:offer:x:f1"
        await am.hset(f"ams:{AMS}:activation:{act}", mapping={"offer": "offer:x:f1", "sent_ns": t + 10 * MS + a})
        cmd = [{"result": "confirmed", "sent_ts": (t + 20 * MS) / 1e9, "confirm_ts": (t + 27 * MS) / 1e9}]
        await mg.hset(f"mgms:multipower:flex:act:{act}", mapping={
            "created_ns": t + 10 * MS + a, "received_ns": t + 14 * MS, "stored_ns": t + 16 * MS,
            "commands": json.dumps(cmd),
        })  # fmt: skip
        # verification created at +1000 (MGMS), stored at the AMS +1005
        await am.hset(f"ams:{AMS}:settlement:{act}", mapping={
            "created_ns": t + 1000 * MS, "received_ns": t + 1004 * MS + a, "stored_ns": t + 1005 * MS + a,
        })  # fmt: skip
    finally:
        await mg.aclose()
        await am.aclose()
    return {"flex": 4.0, "activation": 6.0, "loop": 27.0 + 5.0}


def args_for(s: Setup, out: Path, *extra: str) -> Any:
    return build_parser().parse_args([
        "bench", "--lab", "--config", str(s.lab), "--ams-redis", s.ams_url, "--ams-participant", AMS,
        "--window-s", "0.3", "--lookback-s", "30", "--floors", "", "--quiet", "--out", str(out), *extra,
    ])  # fmt: skip


async def test_remote_ams_routes_are_corrected_by_the_measured_offset(setup: Setup, tmp_path: Path) -> None:
    true = await store_a_loop(setup)
    report = await run_bench(args_for(setup, tmp_path / "o", "--ams-remote", "--clock-url", setup.clock_url))
    clock = report["clock"]
    bound = clock["uncertainty_ms"]
    assert clock["method"] == "https" and clock["applied"] is True
    assert abs(clock["offset_ms"] - 25.0) <= bound
    routes = {r["key"]: r for r in report["routes"]}
    assert set(routes) == {"lab_flexibility", "lab_activation", "lab_dso_loop"}, report["not_measured"]
    for key, want in (("lab_flexibility", true["flex"]), ("lab_activation", true["activation"]),
                      ("lab_dso_loop", true["loop"])):  # fmt: skip
        r = routes[key]
        assert r["n"] == 1 and r["cross_host"] is True, r
        assert abs(r["median_ms"] - want) <= bound + 1e-6, (key, r["median_ms"], want, bound)
        assert r["offset_uncertainty_ms"] == bound
    assert routes["lab_flexibility"]["offset_applied_ms"] == clock["offset_ms"]
    assert routes["lab_activation"]["offset_applied_ms"] == -clock["offset_ms"]  # AMS -> MGMS: + offset
    assert routes["lab_flexibility"]["protocol"] == "HTTPS" and routes["lab_flexibility"]["heila_ms"] == 47.0
    hops = report["loop_hops"]
    assert abs(hops["loop_hop_flex_to_ams_db"]["median_ms"] - 4.0) <= bound + 1e-6
    assert abs(hops["loop_hop_activation_to_mgms_db"]["median_ms"] - 6.0) <= bound + 1e-6
    assert hops["loop_hop_command_to_confirmed"]["median_ms"] == pytest.approx(7.0, abs=1e-3)
    assert report["hop_clock_corrections"]["loop_hop_verification_to_ams_db"]["cross_host"] is True
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| mgms->ams | yes |" in md and "Clock offset (AMS clock - MGMS clock" in md


async def test_same_host_ams_is_reported_not_corrected(setup: Setup, tmp_path: Path) -> None:
    await store_a_loop(setup)
    report = await run_bench(args_for(setup, tmp_path / "o", "--clock-url", setup.clock_url))
    assert report["clock"]["applied"] is False
    routes = {r["key"]: r for r in report["routes"]}
    assert routes["lab_flexibility"]["median_ms"] == pytest.approx(29.0, abs=1e-3)  # raw: 4 + 25
    assert routes["lab_activation"]["median_ms"] == pytest.approx(-19.0, abs=1e-3)  # raw: 6 - 25
    assert routes["lab_flexibility"]["cross_host"] is False and routes["lab_flexibility"]["offset_applied_ms"] == 0


async def test_remote_ams_without_an_exchange_is_refused(setup: Setup, tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="--clock-url or --clock-mqtt"):
        await run_bench(args_for(setup, tmp_path / "o", "--ams-remote"))


# ---------------------------------------------------------------------------- over the lab's broker


@dataclass
class MqttLab:
    box: DsoSandbox
    lab: Path
    ams_config: Path
    mgms_url: str
    ams_url: str


@pytest.fixture
def mqtt_lab(tmp_path: Path) -> Iterator[MqttLab]:
    """A lab config whose messaging goes over a real TLS mosquitto (layout + clock ACLs)."""
    box = DsoSandbox(tmp_path / "dso", mgms=[MGMS], start_broker=False)
    box.broker = bench_broker(box)
    cfg = load_config(ROOT / "lab_configs" / "multipower-sim.yaml").only("ref615")
    with box.broker, RedisServer(data_dir=tmp_path / "m") as mr, RedisServer(data_dir=tmp_path / "a") as ar:
        doc = {
            "lab": cfg.lab.model_dump(),
            "devices": {n: d.model_dump(mode="json", exclude={"name"}) for n, d in cfg.devices.items()},
            "points": [p.model_dump(mode="json", exclude_defaults=True) for p in cfg.points],
            # the lab's own Redis, as a lab file names one: url, user, secret file (docs/security.md)
            "redis": {"url": mr.url, "user": "gateway", "password_file": str(mr.secret_file("gateway"))},
            "messaging": box.messaging(MGMS, transport="mqtt").model_dump(mode="json"),
        }
        lab = tmp_path / "lab.yaml"
        lab.write_text(yaml.safe_dump(doc, sort_keys=False))
        ams_config = tmp_path / "ams.yaml"
        ams_config.write_text(
            yaml.safe_dump({"messaging": box.messaging(AMS, transport="mqtt").model_dump(mode="json")})
        )
        yield MqttLab(box, lab, ams_config, mr.client_url(), ar.client_url("ams"))


async def test_clock_over_the_lab_broker_and_the_mqtt_floor(mqtt_lab: MqttLab, tmp_path: Path) -> None:
    settings = mqtt_settings_of(str(mqtt_lab.ams_config), "ams")
    responder = MqttClockResponder(settings, clock=ams_clock)
    await responder.start()
    try:
        s = Setup(mqtt_lab.lab, mqtt_lab.mgms_url, mqtt_lab.ams_url, "")
        true = await store_a_loop(s)
        args = build_parser().parse_args([
            "bench", "--lab", "--config", str(mqtt_lab.lab), "--ams-redis", mqtt_lab.ams_url, "--window-s", "0.3",
            "--lookback-s", "30", "--floors", "mqtt", "--n", "10", "--clock-mqtt", "--ams-remote", "--quiet",
            "--out", str(tmp_path / "o"),
        ])  # fmt: skip
        report = await run_bench(args)
    finally:
        await responder.close()
    clock = report["clock"]
    assert clock["method"] == "mqtt" and abs(clock["offset_ms"] - 25.0) <= clock["uncertainty_ms"]
    assert report["floors"]["floor_mqtt"]["n"] == 10 and report["floors"]["floor_mqtt"]["median_ms"] > 0
    flex = {r["key"]: r for r in report["routes"]}["lab_flexibility"]
    assert flex["protocol"] == "MQTT" and flex["floor_median_ms"] == report["floors"]["floor_mqtt"]["median_ms"]
    assert abs(flex["median_ms"] - true["flex"]) <= clock["uncertainty_ms"] + 1e-6


async def test_clock_cli_serves_and_probes_over_mqtt(mqtt_lab: MqttLab) -> None:
    """The documented commands: the responder on the AMS side, the probe on the MGMS side."""
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.bench.clock", "serve", "--mqtt", "--config", str(mqtt_lab.ams_config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert serve.stdout is not None
        async with asyncio.timeout(15):
            line = (await serve.stdout.readline()).decode()
        assert line.startswith("clock responder ams on mqtt://"), line
        probe = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.bench.clock", "probe", "--mqtt", "--config", str(mqtt_lab.lab),
            "--peer", AMS, "-n", "10", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(probe.communicate(), 20)
        assert probe.returncode == 0, err.decode()[-2000:]
        text = out.decode()
        assert "over mqtt" in text and "10 exchanges" in text
        offset = float(text.split()[1])
        bound = float(text.split()[4])
        assert abs(offset) <= bound + 0.05  # one host: ~0
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(serve.communicate(), 10)
        except TimeoutError:
            serve.kill()
            await serve.wait()
    assert serve.returncode == 0


async def test_a_lab_with_probes_off_is_refused(setup: Setup, tmp_path: Path) -> None:
    """No hop timestamps are stored then: say so instead of a report with no data."""
    off = tmp_path / "probes-off.yaml"
    off.write_text(setup.lab.read_text() + "\nprobes: false\n")
    args = args_for(setup, tmp_path / "o")
    args.config = str(off)
    with pytest.raises(BenchError, match="probes: false"):
        await run_bench(args)
