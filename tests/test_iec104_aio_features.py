"""What the asyncio IEC 104 engine does beyond values and commands, against the real simulator:
clock synchronisation (C_CS_NA_1), counter interrogation and integrated totals (C_CI_NA_1,
M_IT_NA_1 / M_IT_TB_1), test command (C_TS_TA_1), STOPDT/STARTDT on demand and a redundant
pair of outstations (two simulators on loopback, the active one killed, hung, or left on request).

Same event loop for simulator and adapter, no mocks; each test reads what the outstation
recorded (its clock error, the frames it received) as well as what the adapter reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, Point, load_config
from gateway.errors import CommandInvalid, ConfigError, DeviceError, LinkError
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import CommandRequest, DoublePoint, PointUpdate, Quality, UpdateCause
from gateway.protocols import create_adapter
from gateway.protocols.base import LinkState
from gateway.protocols.iec104.aio import AsyncIec104Adapter
from gateway.protocols.iec104.codec import (
    Cot,
    IFrame,
    TypeId,
    UFrame,
    UFunction,
    decode_apdu,
    decode_asdu,
    encode_frame,
)
from gateway.protocols.iec104.codec import TestCommand as TsCommand  # not a test class

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


# ---------------------------------------------------------------------------------------
# counter interrogation and integrated totals

ENERGY, REACTIVE = "feeder.energy.import", "feeder.energy.reactive"


def with_counters(cfg: LabConfig) -> LabConfig:
    """Two energy counters on the REF615: active in Wh counts (scaled to kWh), reactive in varh."""
    sim = {**cfg.devices[DEVICE].simulator.model_dump(), "initial_energy_kwh": 184230.5}
    counters = (
        Point.model_validate(
            {
                "name": ENERGY,
                "device": DEVICE,
                "quantity": "active_energy",
                "unit": "kWh",
                "scale": 0.001,
                "address": {"ioa": 4001, "type": "M_IT_TB_1"},
            }
        ),
        Point.model_validate(
            {
                "name": REACTIVE,
                "device": DEVICE,
                "quantity": "reactive_energy",
                "unit": "varh",
                "address": {"ioa": 4002, "type": "M_IT_NA_1"},
            }
        ),
    )
    lab = cfg.with_device(DEVICE, simulator=sim)
    return lab.model_copy(update={"points": (*lab.points, *counters)})


def sent_types(sim: Iec104Outstation) -> list[int]:
    out = []
    for rec in sim.recent_frames():
        frame = decode_apdu(rec.data)
        if rec.direction == "out" and isinstance(frame, IFrame):
            out.append(frame.asdu[0])
    return out


async def test_counters_read_on_connect_on_demand_and_spontaneously(base: LabConfig, running: Starter) -> None:
    lab = with_counters(base)
    sim, w = await connected(lab, running)

    def counted() -> list[PointUpdate] | None:
        got = [w.latest(n, lambda u: u.cause is UpdateCause.INTERROGATED) for n in (ENERGY, REACTIVE)]
        return [u for u in got if u is not None] if all(got) else None

    energy, reactive = await until(counted, 5, "counters after connect")
    assert energy is not None and reactive is not None
    assert energy.value == pytest.approx(sim.values()[ENERGY].value, abs=0.001)  # whole Wh counts, in kWh
    assert energy.value == pytest.approx(184230.5, abs=1.0) and energy.quality is Quality.GOOD
    # answered untagged (M_IT_NA_1, COT 37), as devices do: the receive time stands in, flagged
    assert energy.time_substituted and energy.source_time == energy.receive_time
    assert sim.stats().counter_interrogations == 1
    types = asdu_types_in(sim)
    assert types.index(TypeId.C_IC_NA_1) < types.index(TypeId.C_CI_NA_1)  # the GI first, then the counters
    # the GI answer carries no integrated total: they come by counter interrogation only
    before_gi = len(sent_types(sim))
    await w.adapter.interrogate()
    await until(lambda: TypeId.C_IC_NA_1 in sent_types(sim)[before_gi:], 5, "GI answered")
    assert not {TypeId.M_IT_NA_1, TypeId.M_IT_TB_1} & set(sent_types(sim)[before_gi:])

    # a spontaneous counter change comes time-tagged (the configured M_IT_TB_1)
    at = sim.set_value(ENERGY, 184300.25)
    upd = await until(lambda: w.latest(ENERGY, lambda u: u.value == pytest.approx(184300.25)), 3, "spontaneous")
    assert upd.cause is UpdateCause.SPONTANEOUS and upd.source_time == pytest.approx(at, abs=0.002)
    # IV -> invalid; a counter past 32 bits wraps with CY -> overflow
    sim.set_value(REACTIVE, 1234.0, quality=Quality.INVALID)
    bad = await until(lambda: w.latest(REACTIVE, lambda u: u.value == 1234.0), 3, "invalid counter")
    assert bad.quality is Quality.INVALID
    sim.set_value(REACTIVE, 2.0**31 + 5, quality=Quality.GOOD)
    wrapped = await until(lambda: w.latest(REACTIVE, lambda u: u.value == -(2.0**31) + 5), 3, "wrapped counter")
    assert wrapped.quality is Quality.OVERFLOW

    # on demand: returns at ACTTERM with the counters already in the stream
    asked = time.time()
    await w.adapter.interrogate_counters()
    again = w.latest(ENERGY, lambda u: u.cause is UpdateCause.INTERROGATED and u.receive_time >= asked)
    assert again is not None and again.value == pytest.approx(184300.25)
    stats = w.adapter.stats()
    assert stats["counter_interrogations"] == 2 and stats["counter_interrogations_done"] == 2
    assert stats.get("unknown_points", 0) == 0 and stats.get("type_mismatch", 0) == 0
    with pytest.raises(CommandInvalid, match="counter interrogation"):
        await w.adapter.read(ENERGY)
    sim.refuse_commands(True)
    with pytest.raises(DeviceError, match="counter interrogation refused"):
        await w.adapter.interrogate_counters()
    assert w.adapter.link_state is LinkState.UP


async def test_periodic_counter_interrogation_and_none_without_counter_points(
    base: LabConfig, running: Starter
) -> None:
    sim, _ = await connected(with_counters(base), running, counter_interrogation={"period_s": 0.2})
    await until(lambda: sim.stats().counter_interrogations >= 3, 5, "periodic counter interrogations")
    plain, _ = await connected(base, running, counter_interrogation={"period_s": 0.2})
    await until(lambda: plain.stats().interrogations >= 1, 5, "GI")
    await asyncio.sleep(0.5)
    assert plain.stats().counter_interrogations == 0  # nothing to read: nothing asked


def test_counter_points_and_periods_are_refused_for_the_c104_engine(base: LabConfig, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"counter_interrogation\.period_s needs iec104_engine: asyncio"):
        base.with_device(DEVICE, iec104_engine="c104", counter_interrogation={"period_s": 900})
    lab = tmp_path / "lab.yaml"
    lab.write_text(
        f"extends: {SIM_CONFIG}\n"
        "devices:\n  ref615:\n    iec104_engine: c104\n"
        "points:\n  - name: e\n    device: ref615\n    quantity: active_energy\n    unit: Wh\n"
        "    address: {ioa: 4001, type: M_IT_NA_1}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(lab)
    [issue] = err.value.issues
    assert issue.key.endswith(".address.type"), issue.key
    assert "M_IT_NA_1 (integrated totals) needs iec104_engine: asyncio" in issue.reason
    (tmp_path / "ok.yaml").write_text(lab.read_text().replace("iec104_engine: c104", "iec104_engine: asyncio"))
    assert load_config(tmp_path / "ok.yaml").point("e").address.kind == "integrated"  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------
# test command


async def test_test_command_is_confirmed_with_its_counter(base: LabConfig, running: Starter) -> None:
    sim, w = await connected(base, running, command_timeout_s=0.3)
    adapter = w.adapter
    assert isinstance(adapter, AsyncIec104Adapter)
    rtts = [await adapter.send_test_command() for _ in range(3)]
    assert all(0 < rtt < 0.5 for rtt in rtts), rtts
    assert sim.stats().test_commands == 3
    # what went out: C_TS_TA_1 act with TSC 1, 2, 3 and our time (CP56Time2a)
    sent = [decode_asdu(f.asdu) for f in received_i_frames(sim) if f.asdu[0] == TypeId.C_TS_TA_1]
    elements = [a.objects[0].element for a in sent]
    assert [e.counter for e in elements if isinstance(e, TsCommand)] == [1, 2, 3]
    assert all(a.cot is Cot.ACTIVATION for a in sent)
    stats = w.adapter.stats()
    assert stats["test_commands"] == stats["test_commands_confirmed"] == 3
    sim.stall()  # a hung application: no ACTCON within command_timeout_s
    with pytest.raises(LinkError, match=r"test command 4 not confirmed within 0\.3 s"):
        await adapter.send_test_command()
    sim.resume()


def received_i_frames(sim: Iec104Outstation) -> list[IFrame]:
    frames = (decode_apdu(rec.data) for rec in sim.recent_frames() if rec.direction == "in")
    return [f for f in frames if isinstance(f, IFrame)]


# ---------------------------------------------------------------------------------------
# STOPDT / STARTDT on demand and redundancy


def u_frames_in(sim: Iec104Outstation) -> list[UFunction]:
    frames = (decode_apdu(rec.data) for rec in sim.recent_frames() if rec.direction == "in")
    return [f.function for f in frames if isinstance(f, UFrame)]


async def test_stop_and_start_data_transfer_on_demand(base: LabConfig, running: Starter) -> None:
    sim, w = await connected(base, running)
    adapter = w.adapter
    assert isinstance(adapter, AsyncIec104Adapter)
    await until(lambda: w.latest("feeder.voltage.l1"), 5, "values")
    await adapter.stop_data()
    assert UFunction.STOPDT_ACT in u_frames_in(sim)
    sim.set_value("feeder.voltage.l1", 222.0)  # the device holds it back: data transfer is off
    with pytest.raises(LinkError, match=r"data transfer stopped \(STOPDT\)"):
        await adapter.command(CommandRequest("feeder.autoreclose.command", True))
    with pytest.raises(LinkError, match="data transfer stopped"):
        await adapter.interrogate()
    await asyncio.sleep(0.3)
    assert w.latest("feeder.voltage.l1", lambda u: u.value == 222.0) is None
    assert adapter.link_state is LinkState.UP  # the connection stays, supervised by TESTFR
    gi_before = sim.stats().interrogations
    await adapter.start_data()  # STARTDT, then a GI: the held-back value comes with it
    await until(lambda: w.latest("feeder.voltage.l1", lambda u: u.value == 222.0), 3, "value after STARTDT")
    assert sim.stats().interrogations == gi_before + 1
    await adapter.command(CommandRequest("feeder.autoreclose.command", True))
    stats = adapter.stats()
    assert stats["stopdt"] == 1 and stats["startdt"] == 1 and not w.downs()


def redundant_config(base: LabConfig, a: Iec104Outstation, b: Iec104Outstation, **device: Any) -> LabConfig:
    return gateway_config(base, a.port, redundant_hosts=[{"host": "127.0.0.1", "port": b.port}], **device)


def stored(w: Watched, point: str) -> list[object]:
    return [u.value for u in w.values if u.point == point]


async def test_redundant_pair_fails_over_when_the_active_one_dies(base: LabConfig, running: Starter) -> None:
    a: Iec104Outstation = await running(base)
    b: Iec104Outstation = await running(base)
    for sim, l2 in ((a, 240.0), (b, 241.0)):  # the pair agrees on l1, not on l2
        sim.set_value("feeder.voltage.l1", 231.0)
        sim.set_value("feeder.voltage.l2", l2)
    w: Watched = await running(adapter_for(redundant_config(base, a, b)))
    adapter = w.adapter
    assert isinstance(adapter, AsyncIec104Adapter)
    await adapter.wait_connected(5)
    names = {p.name for p in base.points_of(DEVICE) if p.direction.value == "monitor"}
    await until(lambda: names <= {u.point for u in w.values}, 5, "GI from the first outstation")
    assert adapter.endpoint == ("127.0.0.1", a.port) and b.stats().connections_accepted == 0

    killed_at = time.monotonic()
    await a.close()
    await until(lambda: adapter.link_state is LinkState.UP and adapter.endpoint[1] == b.port, 5, "switched to b")
    switch_s = time.monotonic() - killed_at
    assert switch_s < FAST["t1_s"] + 1.0, switch_s  # within t1 + one reconnect
    await until(lambda: b.stats().interrogations == 1, 5, "GI after the switch-over")
    await until(lambda: w.latest("feeder.voltage.l2", lambda u: u.value == 241.0), 5, "b's own value")
    assert not w.downs()  # connecting, then up: the core never marked the points stale
    assert [c.state for c in w.links] == [LinkState.CONNECTING, LinkState.UP, LinkState.CONNECTING, LinkState.UP]
    assert "switching over to 127.0.0.1" in w.links[2].reason
    assert stored(w, "feeder.voltage.l1") == [231.0]  # the same value from both sides: stored once
    assert stored(w, "feeder.voltage.l2") == [240.0, 241.0]
    stats = adapter.stats()
    assert stats["switch_overs"] == 1 and stats["duplicates_dropped"] >= 1
    latest = {n: w.latest(n) for n in names}
    assert all(u is not None and u.quality is Quality.GOOD for u in latest.values()), latest
    # after the GI's end, values flow as usual, also one equal to the last
    b.set_value("feeder.voltage.l1", 231.0)
    b.set_value("feeder.voltage.l3", 229.0)
    await until(lambda: w.latest("feeder.voltage.l3", lambda u: u.value == 229.0), 3, "spontaneous from b")
    assert stored(w, "feeder.voltage.l1") == [231.0, 231.0]
    await adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    assert b.stats().commands >= 1

    # both gone: down (stale), then back on the first one when it returns (b died within
    # seconds of the switch: no second immediate switch, the backoff decides)
    await b.close()
    down = await until(lambda: next(iter(w.downs()), None), 5, "down when no outstation answers")
    assert "closed by the device" in down.reason or "failed" in down.reason, down.reason
    await running(base, a.port)
    await until(lambda: adapter.link_state is LinkState.UP, 5, "reconnected to a")
    assert adapter.endpoint[1] == a.port


async def test_redundant_pair_switches_when_the_active_one_hangs_and_on_request(
    base: LabConfig, running: Starter
) -> None:
    a: Iec104Outstation = await running(base)
    b: Iec104Outstation = await running(base)
    w: Watched = await running(adapter_for(redundant_config(base, a, b)))
    adapter = w.adapter
    assert isinstance(adapter, AsyncIec104Adapter)
    await adapter.wait_connected(5)
    await until(lambda: a.stats().interrogations == 1, 5, "GI on a")
    hung_at = time.monotonic()
    a.stall()  # alive for TCP, silent for IEC 104: t3 idle, TESTFR, t1
    await until(lambda: adapter.endpoint[1] == b.port and adapter.link_state is LinkState.UP, 8, "switched to b")
    took = time.monotonic() - hung_at
    assert took < FAST["t3_s"] + FAST["t1_s"] + 1.5, took
    assert "t1 = 2 s expired: no TESTFR con" in w.links[2].reason, w.links[2].reason
    a.resume()
    await until(lambda: b.stats().interrogations == 1, 5, "GI on b")
    # planned: STOPDT on b, then over to a
    await adapter.switch_over()
    assert adapter.endpoint[1] == a.port and adapter.link_state is LinkState.UP
    assert UFunction.STOPDT_ACT in u_frames_in(b)
    await until(lambda: a.stats().interrogations == 2, 5, "GI on a after the planned switch")
    assert adapter.stats()["switch_overs"] == 2 and not w.downs()


async def test_switch_over_needs_a_redundant_outstation(base: LabConfig, running: Starter) -> None:
    _, w = await connected(base, running)
    adapter = w.adapter
    assert isinstance(adapter, AsyncIec104Adapter)
    with pytest.raises(LinkError, match="no redundant outstation configured"):
        await adapter.switch_over()


def test_redundant_hosts_config_errors(base: LabConfig, tmp_path: Path) -> None:
    dev = base.devices[DEVICE]
    with pytest.raises(ValueError, match="redundant_hosts needs iec104_engine: asyncio"):
        base.with_device(DEVICE, iec104_engine="c104", redundant_hosts=[{"host": "127.0.0.1", "port": 2405}])
    with pytest.raises(
        ValueError, match=r"redundant_hosts\[0\] \(127\.0\.0\.1:2404\) is the same outstation as host/port"
    ):
        base.with_device(DEVICE, redundant_hosts=[{"host": dev.host, "port": dev.port}])
    with pytest.raises(ValueError, match=r"redundant_hosts\[1\] .* same outstation as redundant_hosts\[0\]"):
        base.with_device(DEVICE, redundant_hosts=[{"host": "127.0.0.1", "port": 2405}] * 2)
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"extends: {SIM_CONFIG}\ndevices:\n  ref615:\n    redundant_hosts:\n      - {{host: 127.0.0.1}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(lab)
    [issue] = err.value.issues
    assert (issue.line, issue.key) == (5, "devices.ref615.redundant_hosts[0].port"), issue
    ok = base.with_device(DEVICE, redundant_hosts=[{"host": "127.0.0.2", "port": 2404}])
    assert ok.devices[DEVICE].redundant_hosts[0].host == "127.0.0.2"


async def test_a_pair_that_drops_every_connection_is_not_switched_without_pause(
    base: LabConfig, running: Starter
) -> None:
    async def accept_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            async with asyncio.timeout(2):
                await reader.readexactly(6)  # STARTDT act
                writer.write(encode_frame(UFrame(UFunction.STARTDT_CON)))
                await writer.drain()
        writer.close()

    servers = [await asyncio.start_server(accept_then_drop, "127.0.0.1", 0) for _ in range(2)]
    try:
        ports = [int(srv.sockets[0].getsockname()[1]) for srv in servers]
        cfg = gateway_config(base, ports[0], redundant_hosts=[{"host": "127.0.0.1", "port": ports[1]}])
        w: Watched = await running(adapter_for(cfg))
        await asyncio.sleep(1.5)
        stats = w.adapter.stats()
        assert stats.get("switch_overs", 0) == 1, stats  # one immediate switch, then the backoff
        # 0.1-0.3 s jittered backoff: a handful (13 seen under load), not the 536 of before
        assert stats["connects"] <= 30, stats
        assert len(w.downs()) >= 1
    finally:
        for srv in servers:
            srv.close()
            await srv.wait_closed()
