"""Pure unit tests of the IEC 104 adapter's pieces: frame reading, backoff, thread bridge."""

from __future__ import annotations

import asyncio
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load_config
from gateway.errors import CommandInvalid
from gateway.points import PointUpdate
from gateway.protocols.iec104.adapter import (
    Iec104Adapter,
    _ThreadBridge,
    _TxWatch,
    backoff_delay,
    parse_confirmation,
)
from gateway.protocols.iec104.common import command_value, parse_command_reply

SIM_CONFIG = Path(__file__).resolve().parents[2] / "lab_configs" / "multipower-sim.yaml"


def apdu(asdu: bytes) -> bytes:
    """An I-frame around ``asdu`` (send/receive sequence numbers 0)."""
    return bytes([0x68, len(asdu) + 4, 0, 0, 0, 0]) + asdu


# C_DC_NA_1 (46), VSQ 1, COT, OA 0, CA 1, IOA 3001 = b9 0b 00, DCO
def dc(cot_byte: int, dco: int) -> bytes:
    return apdu(bytes([46, 1, cot_byte, 0, 1, 0, 0xB9, 0x0B, 0x00, dco]))


def test_positive_actcon_of_execute() -> None:
    frame = dc(0x07, 0x02)
    assert frame.hex(" ") == "68 0e 00 00 00 00 2e 01 07 00 01 00 b9 0b 00 02"
    c = parse_confirmation(frame)
    assert c is not None
    assert (c.type_id, c.ioa, c.common_address, c.cot, c.negative, c.select) == (46, 3001, 1, 7, False, False)


def test_negative_actcon_of_select() -> None:
    c = parse_confirmation(dc(0x47, 0x82))  # P/N bit set, S/E bit set
    assert c is not None and c.negative and c.select
    assert c.reason == "negative confirmation of select (cot 7)"


def test_unknown_address_is_negative_with_reason() -> None:
    c = parse_confirmation(dc(0x2F, 0x02))  # COT 47, even without the P/N bit
    assert c is not None and c.negative
    assert c.reason == "unknown information object address"


def test_setpoint_select_bit_is_after_the_float() -> None:
    # C_SE_NC_1 (50): IOA 3011 = c3 0b 00, float 45000.0, QOS with S/E
    asdu = bytes([50, 1, 0x07, 0, 1, 0, 0xC3, 0x0B, 0x00]) + struct.pack("<f", 45000.0) + bytes([0x80])
    c = parse_confirmation(apdu(asdu))
    assert c is not None and c.ioa == 3011 and c.select and not c.negative


@pytest.mark.parametrize(
    "frame",
    [
        apdu(bytes([13, 1, 0x03, 0, 1, 0, 0xE9, 0x03, 0x00]) + struct.pack("<f", 1.0) + b"\x00"),  # a value
        dc(0x0A, 0x02),  # ACTTERM: not a confirmation
        bytes([0x68, 0x04, 0x01, 0x00, 0x02, 0x00]),  # S-frame
        bytes([0x68, 0x04, 0x07, 0x00, 0x00, 0x00]),  # STARTDT act
        b"\x68\x0e\x00",  # truncated
    ],
)
def test_other_frames_are_not_confirmations(frame: bytes) -> None:
    assert parse_confirmation(frame) is None


def test_backoff_is_jittered_capped_and_grows() -> None:
    rng = random.Random(1)
    for attempt in range(40):
        cap = min(30.0, 0.5 * 2**attempt)
        d = backoff_delay(attempt, 0.5, 30.0, rng)
        assert 0 < d <= cap
    late = [backoff_delay(20, 0.5, 30.0, rng) for _ in range(200)]
    assert max(late) <= 30.0 and min(late) >= 0.25
    assert len({round(x, 3) for x in late}) > 150, "jittered, not a fixed delay"
    assert max(backoff_delay(0, 0.5, 30.0, rng) for _ in range(50)) <= 0.5


async def test_thread_bridge_keeps_order_across_threads() -> None:
    bridge = _ThreadBridge(asyncio.get_running_loop(), maxlen=100_000)
    n = 5000

    def produce() -> None:
        for i in range(n):
            bridge.put(PointUpdate("p", i))

    t = threading.Thread(target=produce)
    t.start()
    got: list[int] = []
    while len(got) < n:
        got += [int(e.value) for e in await asyncio.wait_for(bridge.get_batch(), 5) if isinstance(e, PointUpdate)]
    t.join()
    assert got == list(range(n))
    assert bridge.dropped == 0


async def test_thread_bridge_drops_oldest_and_counts() -> None:
    bridge = _ThreadBridge(asyncio.get_running_loop(), maxlen=10)
    for i in range(25):
        bridge.put(PointUpdate("p", i))
    batch = await bridge.get_batch()
    assert [e.value for e in batch if isinstance(e, PointUpdate)] == list(range(15, 25))
    assert bridge.dropped == 15


def test_actterm_is_a_command_reply_but_not_a_confirmation() -> None:
    c = parse_command_reply(dc(0x0A, 0x02))
    assert c is not None and (c.cot, c.negative, c.select) == (10, False, False)
    assert parse_confirmation(dc(0x0A, 0x02)) is None


class _LostWakeupConnection:
    """Stands in for a c104 connection whose transmit() missed its wake-up: the waiting
    thread only returns when another answer notifies it (here: the test command)."""

    def __init__(self) -> None:
        self.notify = threading.Event()
        self.tests: list[int] = []

    def transmit(self, seconds: float) -> bool:
        return self.notify.wait(seconds)

    def test(self, common_address: int, with_time: bool, wait_for_response: bool) -> bool:
        self.tests.append(common_address)
        self.notify.set()
        return True


def _adapter(conn: _LostWakeupConnection) -> Iec104Adapter:
    cfg = load_config(SIM_CONFIG)
    adapter = Iec104Adapter(cfg.devices["ref615"], cfg.points_of("ref615"))
    adapter._conn = conn  # only the pieces the watchdog touches; no c104 here
    adapter._up.set()
    return adapter


async def _watch(adapter: Iec104Adapter, conn: _LostWakeupConnection, watch: _TxWatch, *replies: bytes) -> float:
    """Run a stuck transmit under the watchdog, feed ``replies``; seconds until it returned."""
    t0 = time.monotonic()
    tx = asyncio.ensure_future(asyncio.to_thread(conn.transmit, 5.0))
    adapter._tx_watch[3001] = watch
    for frame in replies:
        conf = parse_command_reply(frame)
        assert conf is not None
        adapter._on_command_reply(conf)
    await asyncio.wait_for(adapter._rescue_lost_wakeup(tx, watch), 3)
    assert await tx, "the transmit was woken, not timed out"
    return time.monotonic() - t0


async def test_select_confirmed_but_execute_never_sent_gets_a_nudge() -> None:
    conn = _LostWakeupConnection()
    adapter = _adapter(conn)
    # c104 got the select's ACTCON before it started waiting: it would sleep 5 s, no execute
    took = await _watch(adapter, conn, _TxWatch(sbo=True, started=time.monotonic()), dc(0x07, 0x81))
    assert conn.tests == [adapter.device.common_address]
    assert adapter.stats()["c104_nudges"] == 1
    assert took < 1.0


async def test_actterm_seen_but_transmit_still_waiting_gets_a_nudge() -> None:
    conn = _LostWakeupConnection()
    adapter = _adapter(conn)
    watch = _TxWatch(sbo=True, started=time.monotonic())
    took = await _watch(adapter, conn, watch, dc(0x07, 0x81), dc(0x07, 0x01), dc(0x0A, 0x01))
    assert watch.executed and watch.final_at is not None
    assert len(conn.tests) == 1 and took < 1.0


async def test_no_nudge_while_the_device_has_not_answered_yet() -> None:
    conn = _LostWakeupConnection()
    adapter = _adapter(conn)
    watch = _TxWatch(sbo=True, started=time.monotonic())
    # execute ACTCON came, ACTTERM not yet (the breaker travels): c104 rightly waits
    tx = asyncio.ensure_future(asyncio.to_thread(conn.transmit, 0.6))
    adapter._tx_watch[3001] = watch
    for frame in (dc(0x07, 0x81), dc(0x07, 0x01)):
        conf = parse_command_reply(frame)
        assert conf is not None
        adapter._on_command_reply(conf)
    await asyncio.wait_for(adapter._rescue_lost_wakeup(tx, watch), 3)
    assert await tx is False and conn.tests == []
    assert "c104_nudges" not in adapter.stats()


def test_a_slow_device_gets_a_longer_grace_after_its_select() -> None:
    watch = _TxWatch(sbo=True, started=100.0, selected_at=100.5)
    assert watch.stuck_since() == (100.5, 2.0)
    assert _TxWatch(sbo=True, started=100.0).stuck_since() is None


async def test_interrogation_actterm_in_the_raw_frames_ends_the_gi_wait() -> None:
    adapter = _adapter(_LostWakeupConnection())
    adapter._loop = asyncio.get_running_loop()
    watch = _TxWatch(sbo=False, started=time.monotonic())
    adapter._gi_watch = watch
    on_raw = adapter._make_raw_callback()
    gi = bytes([100, 1, 0x07, 0, 1, 0, 0, 0, 0, 20])  # C_IC_NA_1 ACTCON, QOI 20
    on_raw(None, apdu(gi))
    await asyncio.sleep(0.01)
    assert watch.final_at is None, "ACTCON alone does not end c104's interrogation wait"
    on_raw(None, apdu(bytes([100, 1, 0x0A]) + gi[3:]))  # ACTTERM
    await asyncio.sleep(0.01)
    assert watch.final_at is not None and watch.stuck_since() is not None


def _control(name: str, type_id: str | None = None) -> Any:
    pt = load_config(SIM_CONFIG).point(name)
    if type_id is None:
        return pt
    return pt.model_copy(update={"address": pt.address.model_copy(update={"type": type_id})})


@pytest.mark.parametrize(
    ("point", "type_id", "value", "expected"),
    [
        ("feeder.breaker.command", None, 2, ("double", 2)),
        ("feeder.breaker.command", None, 1, ("double", 1)),
        ("feeder.autoreclose.command", None, 0, ("single", False)),
        ("feeder.p_limit.setpoint", None, 45000, ("float", 45000.0)),
        ("feeder.p_limit.setpoint", "C_SE_NB_1", 12.6, ("scaled", 13)),
        ("feeder.p_limit.setpoint", "C_SE_NA_1", -0.5, ("normalized", -0.5)),
    ],
)
def test_command_value_gives_the_kind_both_engines_build_from(
    point: str, type_id: str | None, value: float, expected: tuple[str, object]
) -> None:
    assert command_value(_control(point, type_id), value) == expected


@pytest.mark.parametrize(
    ("point", "type_id", "value", "reason"),
    [
        ("feeder.breaker.command", None, 3, "1 \\(off\\) or 2 \\(on\\)"),
        ("feeder.breaker.command", None, 7, "not 7"),
        ("feeder.p_limit.setpoint", None, float("nan"), "finite number"),
        ("feeder.p_limit.setpoint", None, True, "finite number"),
        ("feeder.p_limit.setpoint", "C_SE_NB_1", 40000, "outside -32768..32767"),
        ("feeder.p_limit.setpoint", "C_SE_NA_1", 1.0, "outside -1..1"),
    ],
)
def test_command_value_refuses_what_the_type_cannot_carry(
    point: str, type_id: str | None, value: float, reason: str
) -> None:
    with pytest.raises(CommandInvalid, match=reason):
        command_value(_control(point, type_id), value)
