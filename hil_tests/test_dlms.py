"""The gateway against the DLMS/COSEM meter simulator and a real redis-server.

Each test runs a meter-only lab (the ``meter1`` device of a small lab file written for the
test, same shape as the MultiPower meter) so the REF615 simulators are not needed here.
"""

from __future__ import annotations

import asyncio
import re
import sys
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hilkit import eventually, reported_up

from gateway.config import LabConfig, load_config
from gateway.iedsim.dlms import DlmsMeter
from gateway.points import Quality
from gateway.protocols.base import LinkState
from gateway.protocols.dlms import DlmsAdapter
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import RedisStore, StoredValue

pytestmark = pytest.mark.timeout(60)

DEVICE = "meter1"
SIM_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"
PASSWORD_ENV = "MGMS_HIL_METER_PASSWORD"

LAB = """\
lab: {name: meterlab}
devices:
  meter1:
    protocol: dlms
    host: 127.0.0.1
    port: 4059
    reconnect: {initial_s: 0.1, max_s: 0.4}
    dlms:
      framing: wrapper
      security: none
      password_env: MGMS_HIL_METER_PASSWORD
      block_cipher_key_env: MGMS_HIL_METER_EK
      authentication_key_env: MGMS_HIL_METER_AK
      poll_period_s: 0.3
      clock_period_s: 0.5
      response_timeout_s: 1
      load_profile: {obis: 1.0.99.1.0.255, capture_period_s: 1, read_period_s: 0.5, backfill_s: 30}
    simulator: {nominal_voltage_v: 230, mean_load_kw: 40, period_s: 0.2, seed: 3}
points:
  - {name: meter.voltage.l1, device: meter1, quantity: voltage, unit: V, phase: L1, address: {obis: 1.0.32.7.0.255}}
  - {name: meter.current.l1, device: meter1, quantity: current, unit: A, phase: L1, address: {obis: 1.0.31.7.0.255}}
  - {name: meter.p, device: meter1, quantity: active_power, unit: kW, phase: total, address: {obis: 1.0.1.7.0.255}}
  - {name: meter.energy, device: meter1, quantity: active_energy, unit: kWh, address: {obis: 1.0.1.8.0.255}}
"""


@pytest.fixture(autouse=True)
def _secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    # secrets reach both sides through the environment, as in a real lab
    monkeypatch.setenv(PASSWORD_ENV, "12345678")
    monkeypatch.setenv("MGMS_HIL_METER_EK", "000102030405060708090A0B0C0D0E0F")
    monkeypatch.setenv("MGMS_HIL_METER_AK", "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")


def lab_config(tmp_path: Path, *, extra_points: str = "", **dlms: Any) -> LabConfig:
    text = LAB + textwrap.indent(extra_points, "")
    path = tmp_path / "meterlab.yaml"
    path.write_text(text, encoding="utf-8")
    cfg = load_config(path)
    if dlms:
        dev = cfg.devices[DEVICE]
        cfg = cfg.with_device(DEVICE, dlms={**dev.dlms.model_dump(), **dlms})
    return cfg


@dataclass
class MeterLab:
    config: LabConfig
    meter: DlmsMeter
    gateway: Gateway
    reader: RedisStore
    task: asyncio.Task[None]
    stop: asyncio.Event

    @property
    def adapter(self) -> DlmsAdapter:
        ad = self.gateway.adapters[DEVICE]
        assert isinstance(ad, DlmsAdapter)
        return ad


@pytest.fixture
async def start(redis_server: RedisServer) -> AsyncIterator[Any]:
    running: list[MeterLab] = []

    async def _start(meter_cfg: LabConfig, gateway_cfg: LabConfig | None = None, *, connect: bool = True) -> MeterLab:
        meter = DlmsMeter(meter_cfg, DEVICE, host="127.0.0.1", port=0, seed=3)
        await meter.start()
        cfg = (gateway_cfg or meter_cfg).with_device(DEVICE, port=meter.port)
        store = RedisStore.from_url(cfg, redis_server.client_url())
        gw = Gateway(cfg, store)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop), name="gateway")
        lab = MeterLab(cfg, meter, gw, RedisStore.from_url(cfg, redis_server.client_url()), task, stop)
        running.append(lab)
        await gw.wait_ready()
        if connect:
            await gw.wait_connected(10)
        return lab

    yield _start
    for lab in running:
        lab.stop.set()
        await asyncio.wait_for(lab.task, 15)
        await lab.reader.aclose()
        await lab.meter.close()


async def all_good(lab: MeterLab) -> dict[str, StoredValue] | None:
    values = await lab.reader.latest_all()
    names = [p.name for p in lab.config.points]
    ok = all(n in values and values[n].quality == Quality.GOOD for n in names)
    return values if ok else None


@pytest.mark.parametrize("framing", ["wrapper", "hdlc"])
@pytest.mark.parametrize("security", ["none", "low", "high_gmac"])
async def test_values_reach_redis_scaled_at_every_security_level(
    tmp_path: Path, start: Any, framing: str, security: str
) -> None:
    cfg = lab_config(tmp_path, framing=framing, security=security)
    lab = await start(cfg)
    values = await eventually(lambda: all_good(lab), 5, "every meter point good in Redis")
    u = float(values["meter.voltage.l1"].value or 0)
    assert 200 < u < 260, "volts: scaler -2 applied"
    model = lab.meter.model
    assert u == pytest.approx(model.value("meter.voltage.l1"), rel=0.02)
    p_kw = float(values["meter.p"].value or 0)
    assert p_kw == pytest.approx(model.value("meter.p"), rel=0.15), "W on the meter -> kW point"
    assert 0 <= float(values["meter.energy"].value or 0) < 10, "Wh on the meter -> kWh point"
    await reported_up(lab.reader, DEVICE)
    stats = lab.adapter.stats()
    assert stats.get("unit_mismatch", 0) == 0
    if security == "high_gmac":
        assert lab.meter.stats()["hls_passed"] == 1
        assert lab.meter.stats().get("bad_tags", 0) == 0


async def test_wrong_password_is_a_clear_error_and_the_link_stays_down(tmp_path: Path, start: Any) -> None:
    meter_cfg = lab_config(tmp_path, security="low")
    gateway_cfg = lab_config(tmp_path, security="low", password="wrong-one", password_env=None)
    lab = await start(meter_cfg, gateway_cfg, connect=False)

    async def refused() -> Any:
        link = await lab.reader.link(DEVICE)
        return link if link is not None and link.state == "down" and link.reason else None

    link = await eventually(refused, 5, "link down with a reason in Redis")
    assert "authentication failure" in link.reason
    await eventually(lambda: _true(lab.adapter.stats().get("associations_refused", 0) >= 2), 5, "retried")
    assert lab.adapter.link_state in (LinkState.DOWN, LinkState.CONNECTING)
    assert lab.meter.stats()["wrong_password"] >= 2
    assert not lab.task.done(), "the gateway keeps running"


async def test_wrong_hls_key_is_refused(tmp_path: Path, start: Any) -> None:
    meter_cfg = lab_config(tmp_path, security="high_gmac")
    gateway_cfg = lab_config(tmp_path, security="high_gmac", authentication_key="00" * 16, authentication_key_env=None)
    lab = await start(meter_cfg, gateway_cfg, connect=False)

    async def refused() -> Any:
        link = await lab.reader.link(DEVICE)
        return link if link is not None and link.state == "down" and link.reason else None

    link = await eventually(refused, 5, "link down with a reason in Redis")
    assert "association refused" in link.reason or "HLS" in link.reason
    assert lab.meter.stats().get("bad_key", 0) + lab.meter.stats().get("bad_tags", 0) >= 1


async def test_unknown_obis_is_reported_and_the_rest_keeps_flowing(tmp_path: Path, start: Any) -> None:
    meter_cfg = lab_config(tmp_path)
    extra = (
        "  - {name: meter.frequency, device: meter1, quantity: frequency, unit: Hz, address: {obis: 1.0.14.7.0.255}}\n"
    )
    gateway_cfg = lab_config(tmp_path, extra_points=extra)
    lab = await start(meter_cfg, gateway_cfg)

    async def reported() -> Any:
        v = await lab.reader.latest("meter.frequency")
        return v if v is not None and v.quality & Quality.INVALID else None

    await eventually(reported, 5, "the unknown object in Redis flagged invalid")
    values = await eventually(lambda: _good_except(lab, "meter.frequency"), 5, "other points good")
    assert 200 < float(values["meter.voltage.l1"].value or 0) < 260
    assert lab.adapter.stats()["unknown_objects"] >= 1
    assert lab.adapter.link_state is LinkState.UP
    assert lab.meter.stats()["dar_4"] >= 1  # object-undefined on the wire
    with pytest.raises(Exception, match="object undefined"):
        await lab.adapter.read("meter.frequency")


async def test_profile_is_read_by_range_only_new_rows(tmp_path: Path, start: Any) -> None:
    lab = await start(lab_config(tmp_path))
    meter = lab.meter
    await eventually(lambda: _true(meter.stats().get("rows_captured", 0) >= 3), 6, "three profile rows captured")
    await eventually(lambda: _true(lab.adapter.stats().get("profile_rows", 0) >= 3), 4, "three rows read")
    stats = lab.adapter.stats()
    assert stats["profile_reads"] > stats["profile_rows"] / 2, "several reads"
    # every row crossed the wire once: by range from the last row seen, never the whole buffer
    assert meter.stats()["rows_served"] == stats["profile_rows"]
    assert stats.get("profile_rows_repeated", 0) == 0
    history = await lab.reader.history("meter.energy", count=200)
    row_times = {h.source_ts for h in history if h.source_ts is not None}
    assert len(row_times) >= 3 and all(t == int(t) for t in row_times), "rows carry their capture time"
    energies = [float(h.value or 0) for h in sorted(history, key=lambda h: h.source_ts or 0) if h.source_ts]
    assert energies == sorted(energies), "the energy register only grows"


async def test_meter_restart_link_down_then_resync(tmp_path: Path, start: Any) -> None:
    lab = await start(lab_config(tmp_path, framing="hdlc", security="high_gmac"))
    await eventually(lambda: all_good(lab), 5, "values before the restart")
    connects = lab.adapter.stats()["connects"]
    lab.meter.restart()

    async def down_seen() -> Any:
        hist = await lab.reader.history("meter.voltage.l1", count=100)
        return any(h.quality & Quality.NOT_TOPICAL for h in hist)

    await eventually(down_seen, 5, "points flagged not topical while the meter restarts")
    await eventually(lambda: _true(lab.adapter.stats()["connects"] > connects), 5, "reassociated")
    await eventually(lambda: all_good(lab), 5, "values good again after the restart")
    assert lab.meter.stats().get("replays_refused", 0) == 0, "the client invocation counter kept growing"


async def test_garbled_frame_is_counted_and_the_session_resyncs(tmp_path: Path, start: Any) -> None:
    lab = await start(lab_config(tmp_path, framing="hdlc"))
    await eventually(lambda: all_good(lab), 5, "values first")
    lab.meter.garble_next(1)
    await eventually(lambda: _true(lab.adapter.stats().get("garbled_frames", 0) >= 1), 5, "garbled frame counted")
    await eventually(lambda: _true(lab.adapter.link_state is LinkState.UP), 5, "link up again")
    await eventually(lambda: all_good(lab), 5, "values good again")


async def _good_except(lab: MeterLab, skip: str) -> dict[str, StoredValue] | None:
    values = await lab.reader.latest_all()
    names = [p.name for p in lab.config.points if p.name != skip]
    return values if all(n in values and values[n].quality == Quality.GOOD for n in names) else None


async def _true(flag: bool) -> bool:
    return flag


def _read_with_dlms_cosem(port: int, security: str) -> tuple[int, int, int]:
    """An independent client (dlms-cosem, MIT): voltage register value and scaler/unit."""
    from dlms_cosem import cosem, enumerations
    from dlms_cosem.client import DlmsClient
    from dlms_cosem.io import BlockingTcpIO, TcpTransport
    from dlms_cosem.security import (
        HighLevelSecurityGmacAuthentication,
        LowLevelSecurityAuthentication,
        NoSecurityAuthentication,
    )

    auth: Any
    keys: dict[str, Any] = {}
    if security == "none":
        auth, client_sap = NoSecurityAuthentication(), 16
    elif security == "low":
        auth, client_sap = LowLevelSecurityAuthentication(secret=b"12345678"), 17
    else:
        auth, client_sap = HighLevelSecurityGmacAuthentication(challenge_length=32), 1
        keys = {
            "encryption_key": bytes.fromhex("000102030405060708090A0B0C0D0E0F"),
            "authentication_key": bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"),
            "client_system_title": b"DLMSCOSM",
            "client_initial_invocation_counter": 1,
        }
    transport = TcpTransport(
        client_logical_address=client_sap, server_logical_address=1, io=BlockingTcpIO(host="127.0.0.1", port=port)
    )
    client = DlmsClient(transport=transport, authentication=auth, timeout=5, **keys)
    voltage = cosem.Obis(1, 0, 32, 7, 0, 255)
    with client.session() as session:
        raw = session.get(cosem.CosemAttribute(enumerations.CosemInterface.REGISTER, voltage, 2))
        scaler_unit = session.get(cosem.CosemAttribute(enumerations.CosemInterface.REGISTER, voltage, 3))
    # A-XDR: double-long (05 + 4 octets); structure {integer scaler, enum unit}
    assert raw[0] == 0x05 and scaler_unit[:3] == b"\x02\x02\x0f"
    return (
        int.from_bytes(raw[1:5], "big", signed=True),
        int.from_bytes(scaler_unit[3:4], "big", signed=True),
        scaler_unit[5],
    )


@pytest.mark.parametrize("security", ["none", "low", "high_gmac"])
async def test_independent_client_dlms_cosem_reads_the_simulator(tmp_path: Path, security: str) -> None:
    pytest.importorskip("dlms_cosem")
    meter = DlmsMeter(lab_config(tmp_path, security=security), DEVICE, host="127.0.0.1", port=0, seed=3)
    await meter.start()
    try:
        raw, scaler, unit = await asyncio.wait_for(asyncio.to_thread(_read_with_dlms_cosem, meter.port, security), 20)
    finally:
        await meter.close()
    assert (scaler, unit) == (-2, 35)  # 10^-2 V
    assert raw * 10.0**scaler == pytest.approx(meter.model.value("meter.voltage.l1"), rel=0.02)


async def test_iedsim_dlms_serves_the_multipower_meter(tmp_path: Path) -> None:
    """``iedsim dlms`` as a child process, from the lab's own sim profile; the adapter reads it."""
    sim_config = SIM_CONFIG
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", "dlms", "--config", str(sim_config),
        "--device", "meter1", "--host", "127.0.0.1", "--port", "0", "--duration-s", "30",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        ready = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert re.fullmatch(
            r"dlms simulator meter1 listening on 127\.0\.0\.1:\d+ \(10 points, wrapper, security high_gmac\)\n", ready
        )
        port = int(ready.split(":")[1].split()[0])
        cfg = load_config(sim_config)
        cfg = cfg.with_device("meter1", port=port, reconnect={"initial_s": 0.1, "max_s": 0.5})
        adapter = DlmsAdapter(cfg.devices["meter1"], cfg.points_of("meter1"))
        await adapter.start()
        try:
            await adapter.wait_connected(10)
            upd = await adapter.read("meter.voltage.l2")
            assert 200 < float(upd.value or 0) < 260 and upd.quality == Quality.GOOD
            energy = await adapter.read("meter.energy.import")
            assert float(energy.value or 0) >= 0
        finally:
            await adapter.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_meter_clock_drift_is_reported(tmp_path: Path, start: Any) -> None:
    lab = await start(lab_config(tmp_path, clock_period_s=0.2))
    lab.meter.clock_drift_s = 7.5  # the meter runs 7.5 s ahead

    async def drift() -> int | None:
        ms = lab.adapter.stats().get("clock_drift_ms")
        return ms if ms is not None and abs(ms - 7500) < 100 else None

    await eventually(drift, 5, "clock drift of +7.5 s in the adapter's stats")
