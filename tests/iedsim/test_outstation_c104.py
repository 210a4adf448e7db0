"""The outstation against c104 (lib60870), the client library the gateway itself uses.

No ``from __future__ import annotations``: see conftest (c104 callback annotations).
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import c104
import pytest

from gateway.config import LabConfig
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.points import DoublePoint, Quality

pytestmark = pytest.mark.timeout(30)

StationFactory = Callable[..., Awaitable[Iec104Outstation]]
ProbeFactory = Callable[..., Awaitable[Any]]
CLOSED_STATES = ("CLOSED", "CLOSED_AWAIT_OPEN", "CLOSED_AWAIT_RECONNECT")


@pytest.fixture
def config(config_factory: Callable[..., LabConfig]) -> LabConfig:
    """This suite checks the simulator against c104 with points of the configured types.

    c104 binds a point to one type and drops a value of its address in another (pinned by
    :func:`test_c104_drops_an_untagged_gi_answer_for_a_tagged_point`), so here the simulator
    answers GI with the configured types; its default, untagged answers as the field sends
    them, is checked with the project's codec (test_outstation_protocol.py) and through the
    gateway's c104 adapter (tests/test_iec104_kinds.py).
    """
    return config_factory(gi_types="configured")


async def test_c104_drops_an_untagged_gi_answer_for_a_tagged_point(
    config_factory: Callable[..., LabConfig], stations: StationFactory, probes: ProbeFactory
) -> None:
    """The c104 behaviour the gateway's c104 adapter works around (module doc of
    gateway/protocols/iec104/adapter.py): with the simulator's default GI (untagged types),
    a c104 point of the configured time-tagged type gets no GI answer at all, while the same
    point's spontaneous change (tagged) arrives. Should c104 start delivering them, the
    adapter's raw-frame path would deliver them twice: this test says so first."""
    o = await stations(config_factory())
    probe = await probes(o)
    sent = o.set_value("feeder.voltage.l1", 239.5)
    item = await probe.next_value("feeder.voltage.l1", where=lambda r: r.cot == "SPONTANEOUS")
    assert abs(item.recorded_at.timestamp() - sent) < 0.01
    # c104 ran its GI after STARTDT (Init.ALL); the outstation answered it, with M_ME_NC_1
    frames = [r.data for r in o.recent_frames() if r.direction == "out" and len(r.data) > 8 and not r.data[2] & 1]
    assert any(f[6] == 13 and f[8] & 0x3F == 20 for f in frames), "untagged GI answer sent"
    await asyncio.sleep(0.2)
    got = []
    while not probe.values.empty():
        got.append(probe.values.get_nowait())
    assert not [r for r in got if r.cot == "INTERROGATED_BY_STATION" and r.name.startswith("feeder.voltage")]


def plain(value: Any) -> Any:
    """c104 wraps double points (c104.Double); compare plain numbers."""
    return value.value if isinstance(value, c104.Double) else value


def confirmations(outstation: Iec104Outstation, type_id: int) -> list[tuple[int, bool]]:
    """(cause, negative) of every I-frame of ``type_id`` the outstation sent.

    Taken from the outstation's own frame log rather than c104's ``on_receive_raw``: after a
    slow OPEN_MUTED recovery c104 stops calling that callback on the connection (measured).
    """
    frames = [r.data for r in outstation.recent_frames() if r.direction == "out"]
    return [(f[8] & 0x3F, bool(f[8] & 0x40)) for f in frames if len(f) > 8 and f[2] & 1 == 0 and f[6] == type_id]


async def test_gi_returns_every_monitor_point_with_value_and_quality(
    outstation: Iec104Outstation, c104_client: Any
) -> None:
    # c104 runs a general interrogation by itself after STARTDT (Init.ALL)
    expected = outstation.values()
    seen: dict[str, Any] = {}
    while len(seen) < len(expected):
        item = await c104_client.values.get()
        if item.cot == "INTERROGATED_BY_STATION":
            seen[item.name] = item
    assert set(seen) == set(expected) == {p.name for p in outstation.points if p.direction.value == "monitor"}
    for name, want in expected.items():
        got = seen[name]
        assert plain(got.value) == pytest.approx(want.raw, rel=1e-6), name
        assert got.quality == int(want.quality), name
        assert abs(got.recorded_at.timestamp() - want.time) < 0.0011, name  # naive local time in c104
    # engineering view: kW on the wire as W (scale 0.001)
    assert seen["feeder.p"].value == pytest.approx(expected["feeder.p"].value * 1000, rel=1e-6)
    assert plain(seen["feeder.breaker.position"].value) == DoublePoint.ON


async def test_gi_carries_forced_quality(outstation: Iec104Outstation, probes: ProbeFactory) -> None:
    outstation.set_value("feeder.frequency", 49.5, Quality.INVALID | Quality.NOT_TOPICAL)  # nobody connected yet
    probe = await probes(outstation)
    item = await probe.next_value("feeder.frequency", where=lambda r: r.cot == "INTERROGATED_BY_STATION")
    assert item.value == pytest.approx(49.5)
    assert item.quality == 0xC0


async def test_spontaneous_value_arrives_with_its_time_tag(outstation: Iec104Outstation, c104_client: Any) -> None:
    t_sent = outstation.set_value("feeder.voltage.l1", 241.5)
    item = await c104_client.next_value("feeder.voltage.l1", where=lambda r: r.cot == "SPONTANEOUS")
    assert item.value == pytest.approx(241.5)
    assert item.quality == 0
    assert abs(item.recorded_at.timestamp() - t_sent) < 0.01
    assert item.at - t_sent < 0.5


async def test_feeder_changes_are_sent_spontaneously(
    config_factory: Callable[..., LabConfig], stations: StationFactory, probes: ProbeFactory
) -> None:
    probe = await probes(await stations(config_factory(period_s=0.05)))
    names: set[str] = set()
    async with asyncio.timeout(5):
        while not {"feeder.voltage.l1", "feeder.current.l2", "feeder.frequency"} <= names:
            item = await probe.values.get()
            if item.cot == "SPONTANEOUS":
                names.add(item.name)


async def test_direct_double_command_moves_breaker_through_intermediate(
    config_factory: Callable[..., LabConfig], stations: StationFactory, probes: ProbeFactory
) -> None:
    cfg = config_factory(breaker_travel_s=0.3, points={"feeder.breaker.command": {"select_before_operate": False}})
    o = await stations(cfg)
    probe = await probes(o)
    ok, blocked_s = await probe.transmit("feeder.breaker.command", c104.Double.OFF, select=False)
    assert ok
    spont = "SPONTANEOUS"
    first = await probe.next_value("feeder.breaker.position", where=lambda r: r.cot == spont)
    final = await probe.next_value("feeder.breaker.position", where=lambda r: r.cot == spont)
    assert plain(first.value) == DoublePoint.INTERMEDIATE
    assert plain(final.value) == DoublePoint.OFF
    assert 0.25 < final.at - first.at < 0.6
    # c104's transmit() returns on ACTCON, not on ACTTERM
    assert blocked_s < 0.25
    await asyncio.sleep(0.05)
    assert confirmations(o, 46) == [(7, False), (10, False)]  # ACTCON, ACTTERM
    assert o.values()["feeder.current.l1"].value == 0.0


async def test_sbo_double_command_moves_breaker(outstation: Iec104Outstation, c104_client: Any) -> None:
    ok, _ = await c104_client.transmit("feeder.breaker.command", c104.Double.OFF, select=True)
    assert ok
    states = [
        plain((await c104_client.next_value("feeder.breaker.position", where=lambda r: r.cot == "SPONTANEOUS")).value)
        for _ in range(2)
    ]
    assert states == [DoublePoint.INTERMEDIATE, DoublePoint.OFF]
    ok, _ = await c104_client.transmit("feeder.breaker.command", c104.Double.ON, select=True)
    assert ok
    item = await c104_client.next_value(
        "feeder.breaker.position", where=lambda r: r.cot == "SPONTANEOUS" and plain(r.value) == DoublePoint.ON
    )
    assert plain(item.value) == DoublePoint.ON
    await asyncio.sleep(0.05)
    # select ACTCON, execute ACTCON, ACTTERM - twice
    assert confirmations(outstation, 46) == [(7, False), (7, False), (10, False)] * 2


async def test_sbo_execute_without_select_is_refused(outstation: Iec104Outstation, c104_client: Any) -> None:
    ok, blocked_s = await c104_client.transmit("feeder.breaker.command", c104.Double.OFF, select=False)
    assert not ok
    assert blocked_s < 0.5  # a negative ACTCON, not c104's 2 s command timeout
    await asyncio.sleep(0.05)
    assert confirmations(outstation, 46) == [(7, True)]
    assert outstation.values()["feeder.breaker.position"].raw == DoublePoint.ON
    assert outstation.stats().negative_confirmations == 1


async def test_unknown_ioa_gets_negative_confirmation(outstation: Iec104Outstation, probes: ProbeFactory) -> None:
    probe = await probes(outstation, extra_points={"bogus": (3999, "C_DC_NA_1")})
    ok, blocked_s = await probe.transmit("bogus", c104.Double.ON)
    assert not ok
    assert blocked_s < 0.5
    await asyncio.sleep(0.05)
    assert confirmations(outstation, 46) == [(47, True)]


async def test_setpoint_updates_read_back_at_once(outstation: Iec104Outstation, c104_client: Any) -> None:
    ok, _ = await c104_client.transmit("feeder.p_limit.setpoint", 50_000.0)  # W on the wire = 50 kW
    assert ok
    item = await c104_client.next_value("feeder.p_limit.actual", where=lambda r: r.cot == "SPONTANEOUS")
    assert item.value == pytest.approx(50_000.0)
    assert outstation.values()["feeder.p_limit.actual"].value == pytest.approx(50.0)
    await asyncio.sleep(0.05)
    assert confirmations(outstation, 50) == [(7, False), (10, False)]


async def test_refused_commands_are_negative(outstation: Iec104Outstation, c104_client: Any) -> None:
    outstation.refuse_commands(True)
    ok, blocked_s = await c104_client.transmit("feeder.p_limit.setpoint", 10_000.0)
    assert not ok and blocked_s < 0.5
    outstation.refuse_commands(False)
    ok, _ = await c104_client.transmit("feeder.p_limit.setpoint", 10_000.0)
    assert ok


async def test_stall_is_detected_by_client_supervision(outstation: Iec104Outstation, probes: ProbeFactory) -> None:
    probe = await probes(outstation, t1_s=1, t3_s=1)
    await asyncio.sleep(0.2)
    t_stall = time.time()
    outstation.stall()
    _, closed_at = await probe.wait_state(CLOSED_STATES, timeout_s=4.0)
    # t3 of silence, then TESTFR act unanswered for t1; plus one c104 tick of slack
    assert closed_at - t_stall < 1 + 1 + 0.3
    assert outstation.stats().active_connections >= 1  # the outstation never closed it
    outstation.resume()
    await probe.wait_open(timeout_s=5.0)  # c104 reconnects by itself


async def test_command_timeout_looks_like_a_negative_to_c104(
    outstation: Iec104Outstation, probes: ProbeFactory
) -> None:
    probe = await probes(outstation, command_timeout_ms=800)
    outstation.stall()
    ok, blocked_s = await probe.transmit("feeder.p_limit.setpoint", 1_000.0)
    assert not ok  # same False as a negative ACTCON; only the time tells them apart
    assert 0.7 < blocked_s < 1.5
    outstation.resume()


async def test_drop_closes_client_connections(outstation: Iec104Outstation, c104_client: Any) -> None:
    await asyncio.sleep(0.1)
    t_drop = time.time()
    outstation.drop()
    _, closed_at = await c104_client.wait_state(CLOSED_STATES, timeout_s=2.0)
    assert closed_at - t_drop < 0.5
