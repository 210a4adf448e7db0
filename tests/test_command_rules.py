"""Command rules that do not need a device: value parsing and status confirmation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.commands import StatusWatcher, build_request, expected_status, parse_command_value
from gateway.config import load_config
from gateway.errors import CommandInvalid
from gateway.points import DoublePoint, PointUpdate, Quality

CFG = load_config(Path(__file__).resolve().parents[1] / "lab_configs" / "multipower.yaml")
BREAKER = CFG.point("feeder.breaker.command")
SETPOINT = CFG.point("feeder.p_limit.setpoint")


@pytest.mark.parametrize(
    ("word", "state"),
    [("open", DoublePoint.OFF), ("OFF", DoublePoint.OFF), ("1", DoublePoint.OFF), ("trip", DoublePoint.OFF),
     ("close", DoublePoint.ON), ("on", DoublePoint.ON), ("2", DoublePoint.ON)],
)
def test_double_command_words(word: str, state: DoublePoint) -> None:
    assert parse_command_value(BREAKER, word) == (int(state), int(state))


@pytest.mark.parametrize("bad", ["sideways", "0", "3", "", "1.5"])
def test_double_command_refuses_other_values(bad: str) -> None:
    with pytest.raises(CommandInvalid, match="not a double command"):
        parse_command_value(BREAKER, bad)


def test_setpoint_is_converted_to_raw_and_range_checked() -> None:
    eng, raw = parse_command_value(SETPOINT, "45.5")
    assert eng == 45.5 and raw == pytest.approx(45_500.0)  # kW -> W (scale 0.001)
    with pytest.raises(CommandInvalid, match="above the maximum 200"):
        parse_command_value(SETPOINT, 200.5)
    with pytest.raises(CommandInvalid, match="below the minimum 0"):
        parse_command_value(SETPOINT, -1)
    for bad in ("nan", "inf", "abc"):
        with pytest.raises(CommandInvalid):
            parse_command_value(SETPOINT, bad)


def test_monitor_point_is_not_a_command() -> None:
    with pytest.raises(CommandInvalid, match="not a control point"):
        parse_command_value(CFG.point("feeder.p"), 1)
    with pytest.raises(CommandInvalid, match="no such point"):
        build_request(CFG, "feeder.nothing", "1", "me")


def test_build_request_carries_sbo_and_raw_value() -> None:
    control, status, req, eng = build_request(CFG, "feeder.breaker.command", "close", "anna", "r1")
    assert status.name == "feeder.breaker.position"
    assert req.select_before_operate and req.value == DoublePoint.ON and req.request_id == "r1"
    assert eng == DoublePoint.ON and control is BREAKER


def test_expected_status_tolerance() -> None:
    assert expected_status(SETPOINT, CFG.point("feeder.p_limit.actual"), 45.0) == (45.0, 0.01)
    assert expected_status(BREAKER, CFG.point("feeder.breaker.position"), 2) == (2, 0.0)


async def test_status_watcher_needs_a_fresh_good_matching_value() -> None:
    w = StatusWatcher()
    fut = w.watch("pos", int(DoublePoint.ON), 0.0, after=100.0)
    w.feed(PointUpdate("pos", int(DoublePoint.ON), receive_time=99.0))  # before the command
    w.feed(PointUpdate("pos", int(DoublePoint.INTERMEDIATE), receive_time=100.5))  # travelling
    w.feed(PointUpdate("pos", int(DoublePoint.ON), Quality.INVALID, receive_time=100.6))  # bad quality
    w.feed(PointUpdate("other", int(DoublePoint.ON), receive_time=100.7))
    assert not fut.done()
    w.feed(PointUpdate("pos", int(DoublePoint.ON), receive_time=100.8))
    upd = await asyncio.wait_for(fut, 1)
    assert upd.receive_time == 100.8
    assert not w._waiters, "waiter removed once resolved"


async def test_status_watcher_tolerance_and_discard() -> None:
    w = StatusWatcher()
    fut = w.watch("sp", 45.0, 0.01, after=0.0)
    w.feed(PointUpdate("sp", 45.02, receive_time=1.0))
    assert not fut.done()
    w.feed(PointUpdate("sp", 44.995, receive_time=2.0))
    assert (await fut).value == 44.995
    fut2 = w.watch("sp", 1.0, 0.0, after=0.0)
    w.discard("sp", fut2)
    w.feed(PointUpdate("sp", 1.0, receive_time=3.0))
    assert not fut2.done()
