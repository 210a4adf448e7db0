"""One point = one address and a kind of value, on both IEC 104 client engines.

Real outstations (COM600, REF615) answer a general interrogation with untagged types
(M_ME_NC_1, M_DP_NA_1, M_SP_NA_1) and send changes time-tagged (M_ME_TF_1, M_DP_TB_1,
M_SP_TB_1); the simulator does the same by default. With the lab config's points (all
time-tagged) each engine must deliver every GI answer (receive time as source time, flagged)
and every spontaneous value with its exact time tag; a value of another kind on a point's
address is refused and counted, never delivered. The c104 engine stored none of the GI
answers before its raw-frame path (c104 binds a point to one type); the asyncio engine
delivered them with no source time, and delivered a single point sent on a float address as
a good measurand (True * scale).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import IEC104_TYPES, Direction, LabConfig, Point, iec104_address, load_config
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import PointUpdate, Quality, UpdateCause
from gateway.protocols import create_adapter
from gateway.protocols.iec104.codec import MONITOR_TYPE_IDS, decode_asdu
from gateway.protocols.iec104.kinds import (
    KIND_OF_TYPE,
    TYPES_OF_KIND,
    UNTAGGED_TYPE,
    ValueKind,
    is_time_tagged,
    kind_of,
    untagged_type,
)

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
#: c104 can SIGSEGV in its native threads (docs/protocol-notes.md): its runs go in a forked child
ENGINES = pytest.mark.parametrize("engine", [pytest.param("c104", marks=pytest.mark.forked), "asyncio"])


@pytest.fixture(scope="module")
def base() -> LabConfig:
    lab = load_config(SIM_CONFIG)
    sim = {**lab.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0, "seed": 5}
    return lab.with_device(DEVICE, simulator=sim)


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


def monitors(cfg: LabConfig) -> list[Point]:
    return [p for p in cfg.points_of(DEVICE) if p.direction is Direction.MONITOR]


async def connect(base: LabConfig, running: Starter, engine: str, sim_cfg: LabConfig | None = None) -> tuple[
    Iec104Outstation, Watched
]:
    sim: Iec104Outstation = await running(sim_cfg or base)
    cfg = base.with_device(
        DEVICE,
        port=sim.port,
        timers=FAST,
        reconnect={"initial_s": 0.1, "max_s": 0.3},
        gi_period_s=0,
        iec104_engine=engine,
    )
    w: Watched = await running(create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE)))
    await w.adapter.wait_connected(5)
    return sim, w


def gi_objects_sent(sim: Iec104Outstation) -> list[tuple[int, int, bool]]:
    """(type id, ioa, has a time tag) of every object the simulator sent in a GI answer."""
    out: list[tuple[int, int, bool]] = []
    for r in sim.recent_frames():
        if r.direction != "out" or r.data[2] & 1 or len(r.data) < 12 or r.data[6] >= 45:
            continue
        asdu = decode_asdu(r.data[6:])
        if asdu.cot == 20:
            out += [(int(asdu.type_id), o.ioa, o.time is not None) for o in asdu.objects]
    return out


def interrogated(w: Watched, after: float = 0.0) -> dict[str, PointUpdate]:
    return {v.point: v for v in w.values if v.cause is UpdateCause.INTERROGATED and v.receive_time >= after}


# ---------------------------------------------------------------------------------------
# the kind table


def test_every_kind_has_an_untagged_and_a_tagged_type() -> None:
    for kind in ValueKind:
        types = TYPES_OF_KIND[kind]
        assert len(types) == 2 and types[0] == UNTAGGED_TYPE[kind], kind
        assert not is_time_tagged(types[0]) and is_time_tagged(types[1]), kind
    assert kind_of("M_ME_TF_1") is kind_of("M_ME_NC_1") is kind_of(13) is ValueKind.FLOAT
    assert kind_of("M_ME_NB_1") is not kind_of("M_ME_NC_1")  # scaled is not a float: scale differs
    assert untagged_type("M_DP_TB_1") == 3 and untagged_type("M_SP_TB_1") == 1 and untagged_type(36) == 13
    assert kind_of("C_SE_NC_1") is ValueKind.FLOAT and kind_of("C_DC_TA_1") is ValueKind.DOUBLE
    with pytest.raises(KeyError):
        kind_of(100)  # C_IC_NA_1 carries no point value


def test_every_type_the_config_takes_has_a_kind() -> None:
    for name, config_kind in IEC104_TYPES.items():
        kind = kind_of(name)
        assert (config_kind in ("measured", "integrated")) == kind.is_measured, name
        assert (config_kind == "integrated") == (kind is ValueKind.INTEGRATED_TOTAL), name
    assert set(KIND_OF_TYPE) >= MONITOR_TYPE_IDS  # whatever the codec decodes has a kind


# ---------------------------------------------------------------------------------------
# both engines against the simulator, with the lab config's (time-tagged) points


@ENGINES
async def test_gi_answers_untagged_and_spontaneous_tagged_all_delivered(
    engine: str, base: LabConfig, running: Starter
) -> None:
    sim, w = await connect(base, running, engine)
    names = {p.name for p in monitors(base)}
    got = await until(lambda: (g := interrogated(w)) and set(g) >= names and g, 5, f"GI answers on {engine}")
    sent = gi_objects_sent(sim)
    assert len(sent) == len(names) and not any(tagged for _, _, tagged in sent), "the simulator's GI is untagged"
    sim_values = sim.values()
    for p in monitors(base):
        upd = got[p.name]
        assert upd.quality is Quality.GOOD, p.name
        assert upd.value == pytest.approx(sim_values[p.name].value, rel=1e-6), p.name
        assert upd.time_substituted and upd.source_time == upd.receive_time, p.name
    n_gi = len([v for v in w.values if v.cause is UpdateCause.INTERROGATED])
    assert n_gi == len(names), f"each GI answer exactly once, got {n_gi}"

    # spontaneous: every change arrives, in the configured (tagged) type, with its time tag
    floats = [p.name for p in monitors(base) if iec104_address(p).type == "M_ME_TF_1"]
    start = len(w.values)
    changes: list[tuple[str, float, float]] = []
    for i in range(40):
        name = floats[i % len(floats)]
        value = 100.0 + i
        changes.append((name, value, sim.set_value(name, value)))
        if i % 8 == 7:
            await asyncio.sleep(0.01)
    changes.append(("feeder.autoreclose.enabled", 0.0, sim.set_value("feeder.autoreclose.enabled", 0.0)))

    def spontaneous() -> list[PointUpdate]:
        return [v for v in w.values[start:] if v.cause is UpdateCause.SPONTANEOUS]

    await until(lambda: len(spontaneous()) >= len(changes), 5, f"{len(changes)} spontaneous values on {engine}")
    await asyncio.sleep(0.1)
    spont = spontaneous()
    assert len(spont) == len(changes)
    for upd, (name, value, at) in zip(spont, changes, strict=True):
        assert upd.point == name
        p = next(p for p in monitors(base) if p.name == name)
        want = bool(value) if p.address.kind == "single" else pytest.approx(value, abs=1e-9)
        assert upd.value == want, name
        assert not upd.time_substituted, name
        assert upd.source_time is not None and int(upd.source_time * 1000) == int(at * 1000), name  # CP56: ms
    stats = w.adapter.stats()
    assert stats.get("type_mismatch", 0) == 0 and stats.get("unknown_points", 0) == 0


@ENGINES
async def test_gi_in_the_configured_types_still_delivered(engine: str, base: LabConfig, running: Starter) -> None:
    """``simulator.gi_types: configured``: tagged GI answers carry the device's time, no flag."""
    sim_settings = {**base.devices[DEVICE].simulator.model_dump(), "gi_types": "configured"}
    sim_cfg = base.with_device(DEVICE, simulator=sim_settings)
    sim, w = await connect(base, running, engine, sim_cfg)
    names = {p.name for p in monitors(base)}
    got = await until(lambda: (g := interrogated(w)) and set(g) >= names and g, 5, "GI answers")
    assert all(tagged for _, _, tagged in gi_objects_sent(sim))
    for name, upd in got.items():
        assert not upd.time_substituted, name
        assert upd.source_time == pytest.approx(sim.values()[name].time, abs=0.001), name


@ENGINES
async def test_value_of_another_kind_is_refused_and_counted(engine: str, base: LabConfig, running: Starter) -> None:
    """A device that has feeder.p (a float, ioa 1021) and the auto-reclose switch (a single
    point, ioa 2011) the other way round: the gateway gets M_SP_NA_1 on a float address and
    M_ME_NC_1 on a single point's address, both refused and counted; the rest delivered."""
    swapped = []
    for p in base.points:
        if p.name == "feeder.p":
            p = p.model_copy(update={"address": iec104_address(p).model_copy(update={"ioa": 2011})})
        elif p.name == "feeder.autoreclose.enabled":
            p = p.model_copy(update={"address": iec104_address(p).model_copy(update={"ioa": 1021})})
        swapped.append(p)
    sim_cfg = base.model_copy(update={"points": tuple(swapped)})
    sim, w = await connect(base, running, engine, sim_cfg)
    names = {p.name for p in monitors(base)} - {"feeder.p", "feeder.autoreclose.enabled"}
    await until(lambda: set(interrogated(w)) >= names, 5, "GI answers of the other points")
    await until(lambda: w.adapter.stats().get("type_mismatch", 0) >= 2, 3, "both refusals counted")
    sim.set_value("feeder.autoreclose.enabled", 0.0)  # M_SP_TB_1 on ioa 1021 (feeder.p's)
    sim.set_value("feeder.voltage.l1", 231.25)  # a good value after it, to know it got through
    await until(lambda: w.latest("feeder.voltage.l1", lambda u: u.value == 231.25), 3, "value after the refusal")
    await until(lambda: w.adapter.stats().get("type_mismatch", 0) >= 3, 3, "the tagged one refused too")
    assert w.latest("feeder.p") is None, "a single point on feeder.p's address must not become a measurand"
    assert w.latest("feeder.autoreclose.enabled") is None
    stats = w.adapter.stats()
    assert stats["type_mismatch"] == 3 and stats.get("unknown_points", 0) == 0


@ENGINES
async def test_outstation_restarted_all_points_back_within_one_gi(
    engine: str, base: LabConfig, running: Starter
) -> None:
    sim, w = await connect(base, running, engine)
    names = {p.name for p in monitors(base)}
    await until(lambda: set(interrogated(w)) >= names, 5, "first GI")
    port = sim.port
    await sim.close()
    await until(lambda: w.downs(), 5, "link down")
    back = time.time()
    sim2: Iec104Outstation = await running(base, port)
    await w.adapter.wait_connected(10)
    got = await until(lambda: (g := interrogated(w, back)) and set(g) >= names and g, 5, "GI after reconnect")
    assert all(u.quality is Quality.GOOD for u in got.values())
    assert sim2.stats().interrogations == 1  # one GI was enough
    assert all(not t for _, _, t in gi_objects_sent(sim2))
