"""The outstation frame by frame: APCI state machine, windows, negative answers, SBO rules.

These use our own codec as the client so each test controls exactly what is sent and when.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from gateway.config import Iec104Address, Iec104Timers, LabConfig, Point
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import DoublePoint, Quality
from gateway.protocols.iec104.codec import (
    MAX_ASDU_LENGTH,
    Asdu,
    ClockSync,
    Cot,
    Cp56Time,
    DoubleCommand,
    DoublePointInfo,
    FloatInfo,
    FloatSetpoint,
    IFrame,
    InfoObject,
    Interrogation,
    ReadCommand,
    SFrame,
    SingleCommand,
    TypeId,
    UFrame,
    UFunction,
    decode_asdu,
    encode_asdu,
    encode_frame,
    mirror,
)
from gateway.protocols.iec104.kinds import untagged_type

pytestmark = pytest.mark.timeout(20)

StationFactory = Callable[..., Awaitable[Iec104Outstation]]
RawConnect = Callable[..., Awaitable[Any]]
CA = 1
BREAKER_CMD = 3001
BREAKER_POS = 2001
SETPOINT = 3011
READBACK = 1041


def command(type_id: TypeId, ioa: int, element: Any, *, cot: Cot = Cot.ACTIVATION, ca: int = CA) -> Asdu:
    time = Cp56Time.from_timestamp(1.8e9) if type_id.name.endswith("TA_1") else None
    return Asdu(type_id, cot, ca, (InfoObject(ioa, element, time),))


def gi(ca: int = CA, qoi: int = 20) -> Asdu:
    return command(TypeId.C_IC_NA_1, 0, Interrogation(qoi), ca=ca)


def timers(**over: int) -> Iec104Timers:
    values = {"t0_s": 5, "t1_s": 2, "t2_s": 1, "t3_s": 20, "k": 12, "w": 8}
    values.update(over)
    return Iec104Timers(**values)


# -- APCI ------------------------------------------------------------------------------


async def test_u_frames_are_confirmed(outstation: Iec104Outstation, raw_client: Any) -> None:
    raw_client.send(UFrame(UFunction.TESTFR_ACT))
    assert await raw_client.recv() == UFrame(UFunction.TESTFR_CON)
    raw_client.send(UFrame(UFunction.STOPDT_ACT))
    assert await raw_client.recv() == UFrame(UFunction.STOPDT_CON)
    outstation.set_value("feeder.voltage.l1", 235.0)
    assert await raw_client.silent(0.2)  # stopped: no monitor data
    raw_client.send(UFrame(UFunction.STARTDT_ACT))
    assert await raw_client.recv() == UFrame(UFunction.STARTDT_CON)
    outstation.set_value("feeder.voltage.l1", 236.0)
    asdu = await raw_client.recv_asdu()
    assert asdu.type_id is TypeId.M_ME_TF_1 and asdu.cot is Cot.SPONTANEOUS


@pytest.mark.parametrize("gi_types", ["untagged", "configured"])
async def test_general_interrogation(
    gi_types: str, config_factory: Callable[..., LabConfig], stations: StationFactory, raw_connect: RawConnect
) -> None:
    """GI answers as the field sends them by default: every point in the untagged type of
    its kind (M_ME_NC_1 for M_ME_TF_1, ...), no time tag; ``gi_types: configured`` answers in
    the configured (here time-tagged) types with the time of each value's last change."""
    outstation = await stations(config_factory(gi_types=gi_types))
    raw_client = await raw_connect(outstation)
    try:
        await _check_general_interrogation(outstation, raw_client, untagged=gi_types == "untagged")
    finally:
        await raw_client.close()


async def _check_general_interrogation(outstation: Iec104Outstation, raw_client: Any, *, untagged: bool) -> None:
    raw_client.send_asdu(gi())
    con = await raw_client.recv_asdu()
    assert (con.type_id, con.cot, con.negative) == (TypeId.C_IC_NA_1, Cot.ACTIVATION_CON, False)
    objects: dict[int, InfoObject] = {}
    types: dict[int, TypeId] = {}
    sizes: list[int] = []
    while True:
        frame = await raw_client.recv()
        if not isinstance(frame, IFrame):
            continue
        sizes.append(len(frame.asdu))
        asdu = decode_asdu(frame.asdu)
        if asdu.type_id is TypeId.C_IC_NA_1:
            assert asdu.cot is Cot.ACTIVATION_TERMINATION
            break
        assert asdu.cot is Cot.INTERROGATED_BY_STATION
        assert asdu.common_address == CA
        objects.update({o.ioa: o for o in asdu.objects})
        types.update({o.ioa: asdu.type_id for o in asdu.objects})
    values = outstation.values()
    monitors = {p.address.ioa: p for p in outstation.points if p.direction.value == "monitor"}
    assert set(objects) == set(monitors)
    for ioa, obj in objects.items():
        want = values[monitors[ioa].name]
        configured = TypeId[monitors[ioa].address.type]  # type: ignore[union-attr]
        assert configured in (TypeId.M_ME_TF_1, TypeId.M_DP_TB_1, TypeId.M_SP_TB_1)  # the lab: all tagged
        assert types[ioa] == (TypeId(untagged_type(configured)) if untagged else configured)
        assert obj.element.value == pytest.approx(want.raw, rel=1e-6)  # type: ignore[union-attr]
        assert obj.element.quality == want.quality  # type: ignore[union-attr]
        if untagged:
            assert obj.time is None
        else:
            assert obj.time is not None and abs(obj.time.timestamp() - want.time) < 0.001
    assert max(sizes) <= MAX_ASDU_LENGTH
    # one ASDU per type in the GI (12 floats, the double point, the single point), then ACTTERM
    assert len(sizes) == 4


def monitors_of(cfg: LabConfig) -> list[Point]:
    return [p for p in cfg.points_of("ref615") if p.direction.value == "monitor"]


async def test_gi_packs_many_points_within_the_asdu_limit(
    config: LabConfig, stations: StationFactory, raw_connect: RawConnect
) -> None:
    base = config
    extra = tuple(
        Point(
            name=f"extra.{i}",
            device="ref615",
            quantity="temperature",
            unit="degC",
            address=Iec104Address(ioa=5000 + i, type="M_ME_TF_1"),
        )
        for i in range(40)
    )
    o = await stations(base.model_copy(update={"points": base.points + extra}))
    client = await raw_connect(o)
    try:
        client.send_asdu(gi())
        count = 0
        while True:
            asdu = await client.recv_asdu()
            if asdu.type_id is TypeId.C_IC_NA_1 and asdu.cot is Cot.ACTIVATION_TERMINATION:
                break
            if asdu.cot is Cot.INTERROGATED_BY_STATION:
                assert len(encode_asdu(asdu)) <= MAX_ASDU_LENGTH
                count += len(asdu.objects)
        assert count == len(monitors_of(base)) + 40
    finally:
        await client.close()


async def test_group_interrogation_is_empty_and_bad_qoi_negative(outstation: Iec104Outstation, raw_client: Any) -> None:
    raw_client.send_asdu(gi(qoi=21))
    assert (await raw_client.recv_asdu()).cot is Cot.ACTIVATION_CON
    assert (await raw_client.recv_asdu()).cot is Cot.ACTIVATION_TERMINATION
    raw_client.send_asdu(gi(qoi=5))
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative) == (Cot.ACTIVATION_CON, True)
    assert outstation.stats().interrogations == 2


async def test_broadcast_interrogation_answers_with_own_address(raw_client: Any) -> None:
    raw_client.send_asdu(gi(ca=0xFFFF))
    con = await raw_client.recv_asdu()
    assert con.cot is Cot.ACTIVATION_CON and con.common_address == CA


async def test_clock_sync_is_confirmed(outstation: Iec104Outstation, raw_client: Any) -> None:
    t = Cp56Time.from_timestamp(1.8e9)
    raw_client.send_asdu(command(TypeId.C_CS_NA_1, 0, ClockSync(t)))
    con = await raw_client.recv_asdu()
    assert (con.type_id, con.cot, con.negative) == (TypeId.C_CS_NA_1, Cot.ACTIVATION_CON, False)
    assert con.objects[0].element == ClockSync(t)
    [taken] = outstation.clock_syncs
    assert taken.commanded == 1.8e9 and outstation.clock_error_s == pytest.approx(1.8e9 - taken.received_at)
    # a clock set past 2099-12-30 would soon stamp years CP56Time2a cannot carry: refused
    late = Cp56Time.from_timestamp(4102400000.0)  # 2099-12-31 11:33 UTC
    raw_client.send_asdu(command(TypeId.C_CS_NA_1, 0, ClockSync(late)))
    refused = await raw_client.recv_asdu()
    assert (refused.cot, refused.negative) == (Cot.ACTIVATION_CON, True)
    assert len(outstation.clock_syncs) == 1


async def test_read_command(raw_client: Any) -> None:
    raw_client.send_asdu(command(TypeId.C_RD_NA_1, 1001, ReadCommand(), cot=Cot.REQUEST))
    asdu = await raw_client.recv_asdu()
    assert (asdu.type_id, asdu.cot, asdu.objects[0].ioa) == (TypeId.M_ME_TF_1, Cot.REQUEST, 1001)
    raw_client.send_asdu(command(TypeId.C_RD_NA_1, 4242, ReadCommand(), cot=Cot.REQUEST))
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative) == (Cot.UNKNOWN_IOA, True)


# -- negative answers ----------------------------------------------------------------------


async def test_unknown_common_address(raw_client: Any) -> None:
    raw_client.send_asdu(gi(ca=9))
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative, neg.common_address) == (Cot.UNKNOWN_CA, True, 9)


async def test_unknown_type_id_is_mirrored(raw_client: Any) -> None:
    unknown = bytes.fromhex("7F 01 06 00 01 00 00 00 00 00")
    raw_client.send_asdu(unknown)
    frame = await raw_client.recv()
    assert isinstance(frame, IFrame)
    assert frame.asdu == mirror(unknown, Cot.UNKNOWN_TYPE_ID, negative=True)
    # a monitor type in control direction is just as unknown
    raw_client.send_asdu(Asdu(TypeId.M_ME_NC_1, Cot.SPONTANEOUS, CA, (InfoObject(1, FloatInfo(1.0)),)))
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative) == (Cot.UNKNOWN_TYPE_ID, True)


async def test_unknown_cause_of_transmission(raw_client: Any) -> None:
    raw_client.send_asdu(Asdu(TypeId.C_IC_NA_1, Cot.SPONTANEOUS, CA, (InfoObject(0, Interrogation()),)))
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative) == (Cot.UNKNOWN_COT, True)
    raw_client.send_asdu(bytes.fromhex("64 01 32 00 01 00 00 00 00 14"))  # cause 50 is not defined
    neg = await raw_client.recv_asdu()
    assert (neg.cot, neg.negative) == (Cot.UNKNOWN_COT, True)


async def test_command_to_monitor_point_or_nowhere_is_unknown_ioa(
    outstation: Iec104Outstation, raw_client: Any
) -> None:
    for ioa in (BREAKER_POS, 3999):
        raw_client.send_asdu(command(TypeId.C_DC_NA_1, ioa, DoubleCommand(2)))
        neg = await raw_client.recv_asdu()
        assert (neg.type_id, neg.cot, neg.negative, neg.objects[0].ioa) == (
            TypeId.C_DC_NA_1,
            Cot.UNKNOWN_IOA,
            True,
            ioa,
        )
    assert outstation.stats().negative_confirmations == 2


async def test_wrong_command_type_is_negative(outstation: Iec104Outstation, raw_client: Any) -> None:
    # the breaker is configured as C_DC_NA_1: a time-tagged or single command does not fit
    for asdu in (
        command(TypeId.C_DC_TA_1, BREAKER_CMD, DoubleCommand(1, select=True)),
        command(TypeId.C_SC_NA_1, BREAKER_CMD, SingleCommand(True, select=True)),
    ):
        raw_client.send_asdu(asdu)
        neg = await raw_client.recv_asdu()
        assert (neg.type_id, neg.cot, neg.negative) == (asdu.type_id, Cot.ACTIVATION_CON, True)
    assert outstation.values()["feeder.breaker.position"].raw == DoublePoint.ON


async def test_invalid_values_are_negative(raw_client: Any) -> None:
    for asdu in (
        command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(3, select=True)),  # not permitted
        command(TypeId.C_SE_NC_1, SETPOINT, FloatSetpoint(250_000.0)),  # 250 kW > max_value 200
        command(TypeId.C_SE_NC_1, SETPOINT, FloatSetpoint(-1.0)),  # < min_value 0
    ):
        raw_client.send_asdu(asdu)
        neg = await raw_client.recv_asdu()
        assert (neg.cot, neg.negative) == (Cot.ACTIVATION_CON, True)


# -- commands ------------------------------------------------------------------------------


async def _expect(client: Any, type_id: TypeId, cot: Cot, negative: bool = False) -> Asdu:
    asdu: Asdu = await client.recv_asdu()
    assert (asdu.type_id, asdu.cot, asdu.negative) == (type_id, cot, negative), asdu
    return asdu


async def test_sbo_sequence_and_return_information(outstation: Iec104Outstation, raw_client: Any) -> None:
    dc = TypeId.C_DC_NA_1
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1, select=True)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON)
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON)
    inter = await _expect(raw_client, TypeId.M_DP_TB_1, Cot.SPONTANEOUS)
    assert inter.objects[0].element == DoublePointInfo(DoublePoint.INTERMEDIATE)
    # the open breaker takes currents and powers with it (same instant)
    measured = await _expect(raw_client, TypeId.M_ME_TF_1, Cot.SPONTANEOUS)
    assert {o.ioa for o in measured.objects} >= {1011, 1012, 1013, 1021}
    final = await _expect(raw_client, TypeId.M_DP_TB_1, Cot.SPONTANEOUS)
    assert final.objects[0].element == DoublePointInfo(DoublePoint.OFF)
    assert final.objects[0].time is not None and inter.objects[0].time is not None
    travel = final.objects[0].time.timestamp() - inter.objects[0].time.timestamp()
    assert 0.05 <= travel < 0.2  # breaker_travel_s 0.06 in the sim config
    term = await _expect(raw_client, dc, Cot.ACTIVATION_TERMINATION)
    assert term.objects[0].element == DoubleCommand(1)
    # already open: confirmed and terminated without movement
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1, select=True)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON)
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON)
    await _expect(raw_client, dc, Cot.ACTIVATION_TERMINATION)
    stats = outstation.stats()
    assert (stats.commands, stats.selects, stats.negative_confirmations) == (4, 2, 0)


async def test_execute_without_select_is_refused(raw_client: Any) -> None:
    raw_client.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1)))
    await _expect(raw_client, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON, negative=True)
    assert await raw_client.silent(0.15)  # nothing moved


async def test_selection_is_per_connection_and_consumed(
    outstation: Iec104Outstation, raw_client: Any, raw_connect: RawConnect
) -> None:
    other = await raw_connect(outstation)
    try:
        raw_client.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1, select=True)))
        await _expect(raw_client, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON)
        other.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1)))
        await _expect(other, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON, negative=True)
    finally:
        await other.close()
    # the foreign execute consumed the selection, as a failed execute does on a real IED
    raw_client.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1)))
    await _expect(raw_client, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON, negative=True)


async def test_selection_expires(
    config_factory: Callable[..., LabConfig], stations: StationFactory, raw_connect: RawConnect
) -> None:
    o = await stations(config_factory(select_timeout_s=0.1))
    client = await raw_connect(o)
    try:
        client.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1, select=True)))
        await _expect(client, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON)
        await asyncio.sleep(0.2)
        client.send_asdu(command(TypeId.C_DC_NA_1, BREAKER_CMD, DoubleCommand(1)))
        await _expect(client, TypeId.C_DC_NA_1, Cot.ACTIVATION_CON, negative=True)
    finally:
        await client.close()


async def test_deactivation_cancels_selection(raw_client: Any) -> None:
    dc = TypeId.C_DC_NA_1
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1, select=True)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON)
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1, select=True), cot=Cot.DEACTIVATION))
    await _expect(raw_client, dc, Cot.DEACTIVATION_CON)
    raw_client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1)))
    await _expect(raw_client, dc, Cot.ACTIVATION_CON, negative=True)


async def test_setpoint_direct_and_select_on_direct_point(outstation: Iec104Outstation, raw_client: Any) -> None:
    se = TypeId.C_SE_NC_1
    raw_client.send_asdu(command(se, SETPOINT, FloatSetpoint(40_000.0, select=True)))  # accepted though direct
    await _expect(raw_client, se, Cot.ACTIVATION_CON)
    raw_client.send_asdu(command(se, SETPOINT, FloatSetpoint(40_000.0)))
    await _expect(raw_client, se, Cot.ACTIVATION_CON)
    readback = await _expect(raw_client, TypeId.M_ME_TF_1, Cot.SPONTANEOUS)
    assert readback.objects[0].ioa == READBACK
    assert readback.objects[0].element == FloatInfo(40_000.0)
    await _expect(raw_client, se, Cot.ACTIVATION_TERMINATION)
    assert outstation.model.p_limit_w == pytest.approx(40_000.0)


async def test_busy_breaker_refuses_a_second_command(
    config_factory: Callable[..., LabConfig], stations: StationFactory, raw_connect: RawConnect
) -> None:
    cfg = config_factory(breaker_travel_s=0.5, points={"feeder.breaker.command": {"select_before_operate": False}})
    o = await stations(cfg)
    client = await raw_connect(o)
    try:
        dc = TypeId.C_DC_NA_1
        client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(1)))
        await _expect(client, dc, Cot.ACTIVATION_CON)
        client.send_asdu(command(dc, BREAKER_CMD, DoubleCommand(2)))
        while (asdu := await client.recv_asdu()).type_id is not dc:
            pass
        assert (asdu.cot, asdu.negative) == (Cot.ACTIVATION_CON, True)
    finally:
        await client.close()


# -- flow control, supervision, faults -----------------------------------------------------


async def test_k_window_holds_frames_until_acknowledged(
    stations: StationFactory, config: LabConfig, raw_connect: RawConnect
) -> None:
    o = await stations(config, timers=timers(k=3, w=2))
    client = await raw_connect(o)
    try:
        for i in range(10):
            o.set_value("feeder.voltage.l1", 200.0 + i)
        got: list[Asdu] = []
        while len(got) < 3:
            got.append(await client.recv_asdu())
        assert await client.silent(0.2)
        client.ack()
        while len(got) < 10:
            got.append(await client.recv_asdu())
            if len(got) % 3 == 0:
                client.ack()
        assert [a.objects[0].element for a in got] == [FloatInfo(200.0 + i) for i in range(10)]
        assert o.stats().drops == 0
    finally:
        await client.close()


async def test_queue_overflow_is_counted(stations: StationFactory, config: LabConfig, raw_connect: RawConnect) -> None:
    o = await stations(config, timers=timers(k=1, w=1), queue_max=2)
    client = await raw_connect(o)
    try:
        for i in range(10):
            o.set_value("feeder.voltage.l1", 200.0 + i)
        assert o.stats().drops == 7  # 1 in flight, 2 queued
    finally:
        await client.close()


async def test_acknowledges_after_w_frames_and_after_t2(
    stations: StationFactory, config: LabConfig, raw_connect: RawConnect
) -> None:
    o = await stations(config, timers=timers(w=2))
    client = await raw_connect(o, start=False)  # not started: I-frames are acknowledged, not answered
    try:
        client.send_asdu(gi())
        client.send_asdu(gi())
        assert await client.recv(0.5) == SFrame(2)
        client.send_asdu(gi())
        assert await client.silent(0.5)
        assert await client.recv(1.0) == SFrame(3)  # t2 = 1 s
    finally:
        await client.close()


async def test_outstation_closes_when_its_frames_are_not_acknowledged(
    stations: StationFactory, config: LabConfig, raw_connect: RawConnect
) -> None:
    o = await stations(config, timers=timers(t1_s=2))
    client = await raw_connect(o)
    try:
        o.set_value("feeder.voltage.l1", 231.0)
        await client.recv_asdu()  # and never acknowledge it
        assert await client.closed_by_peer(3.0)
    finally:
        await client.close()


async def test_idle_link_is_tested(stations: StationFactory, config: LabConfig, raw_connect: RawConnect) -> None:
    o = await stations(config, timers=timers(t3_s=1))
    client = await raw_connect(o)
    try:
        assert await client.recv(2.0) == UFrame(UFunction.TESTFR_ACT)
        client.send(UFrame(UFunction.TESTFR_CON))
        assert await client.silent(0.5)
    finally:
        await client.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x04\x07\x00\x00\x00",  # wrong start octet
        b"\x68\x02\x07\x00",  # length below 4
        encode_frame(IFrame(5, 0, encode_asdu(gi()))),  # N(S) out of order
        encode_frame(SFrame(9)),  # acknowledges frames never sent
    ],
    ids=["start-octet", "length", "send-sequence", "receive-sequence"],
)
async def test_protocol_errors_close_the_link(outstation: Iec104Outstation, raw_client: Any, garbage: bytes) -> None:
    raw_client.writer.write(garbage)
    assert await raw_client.closed_by_peer()
    assert outstation.stats().protocol_errors == 1


async def test_stall_keeps_connection_silent_and_resume_answers(outstation: Iec104Outstation, raw_client: Any) -> None:
    outstation.stall()
    raw_client.send(UFrame(UFunction.TESTFR_ACT))
    outstation.set_value("feeder.voltage.l1", 239.0)
    assert await raw_client.silent(0.3)
    assert outstation.stats().suppressed == 1
    outstation.resume()
    assert await raw_client.recv() == UFrame(UFunction.TESTFR_CON)


async def test_drop_closes_every_connection(
    outstation: Iec104Outstation, raw_client: Any, raw_connect: RawConnect
) -> None:
    other = await raw_connect(outstation)
    try:
        outstation.drop()
        assert await raw_client.closed_by_peer(1.0)
        assert await other.closed_by_peer(1.0)
        again = await raw_connect(outstation)  # still listening
        await again.close()
    finally:
        await other.close()


async def test_every_started_connection_gets_spontaneous_values(
    outstation: Iec104Outstation, raw_client: Any, raw_connect: RawConnect
) -> None:
    other = await raw_connect(outstation)
    try:
        outstation.set_value("feeder.breaker.position", DoublePoint.OFF, Quality.SUBSTITUTED)
        for client in (raw_client, other):
            asdu = await _expect(client, TypeId.M_DP_TB_1, Cot.SPONTANEOUS)
            assert asdu.objects[0].element == DoublePointInfo(DoublePoint.OFF, Quality.SUBSTITUTED)
    finally:
        await other.close()


async def test_latency_of_set_value_is_sub_millisecond(outstation: Iec104Outstation, raw_client: Any) -> None:
    gaps = []
    for i in range(200):
        t_sent = outstation.set_value("feeder.voltage.l2", 220.0 + i % 10 + 0.5)
        await raw_client.recv_asdu()
        gaps.append(time.time() - t_sent)
        raw_client.ack()
    gaps.sort()
    assert gaps[len(gaps) // 2] < 0.005  # generous: the median on an idle box is ~0.1 ms
