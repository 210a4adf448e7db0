"""The asyncio IEC 104 engine against a rogue outstation (``gateway.iedsim.rogue104``).

Rules checked (IEC 60870-5-104 5.1, 5.2): bad framing (start octet, length octet outside
4..253, an S/U frame not 4 long), a receive sequence error and an N(R) that acknowledges
frames never sent close the connection, and the client opens a new one and interrogates
again; an unknown type id or address is counted and the link stays; a frame trickled one
octet at a time is still a frame; a silent outstation is found within t3 + t1 and the link
comes back once it answers again; tens of thousands of unknown addresses cost no memory.
Every case is counted in ``adapter.stats()``. The c104 engine is not run here: it takes
the process down on some of these (test_iec104_rogue_c104.py runs it in a subprocess).
"""

from __future__ import annotations

import asyncio
import gc
import time
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, load_config
from gateway.iedsim.rogue104 import PROOF_VALUE, SCENARIOS, RogueOutstation, monitor_points
from gateway.points import Quality, UpdateCause
from gateway.protocols import create_adapter
from gateway.protocols.base import LinkState
from gateway.protocols.iec104.aio import AsyncIec104Adapter

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
T1, T3 = FAST["t1_s"], FAST["t3_s"]
PROOF_POINT = "feeder.voltage.l1"  # the first measured point: where the rogue sends PROOF_VALUE


@pytest.fixture(scope="module")
def base() -> LabConfig:
    return load_config(SIM_CONFIG)


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


@pytest.fixture
async def rogue(base: LabConfig) -> AsyncIterator[RogueOutstation]:
    dev = base.devices[DEVICE]
    async with RogueOutstation(monitor_points(base.points_of(DEVICE)), common_address=dev.common_address, seed=7) as r:
        yield r


def monitor_names(cfg: LabConfig) -> set[str]:
    return {p.name for p in cfg.points_of(DEVICE) if p.direction.value == "monitor"}


async def client(base: LabConfig, rogue: RogueOutstation, running: Starter, **device: Any) -> Watched:
    cfg = base.with_device(
        DEVICE,
        port=rogue.port,
        timers=FAST,
        reconnect={"initial_s": 0.1, "max_s": 0.3},
        gi_period_s=0,
        iec104_engine="asyncio",
        **device,
    )
    adapter = create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE))
    assert isinstance(adapter, AsyncIec104Adapter)
    w: Watched = await running(adapter)
    await w.adapter.wait_connected(5)
    await until(lambda: interrogated(w, monitor_names(cfg)), 5, "general interrogation answered")
    return w


def interrogated(w: Watched, names: set[str], after: float = 0.0) -> bool:
    got = {v.point for v in w.values if v.cause is UpdateCause.INTERROGATED and v.receive_time >= after}
    return names <= got


def counted(w: Watched, scenario: str) -> dict[str, int]:
    stats = w.adapter.stats()
    return {k: stats[k] for k in SCENARIOS[scenario].counted_as if stats.get(k, 0) > 0}


CLOSING = [name for name, s in SCENARIOS.items() if s.closes and name != "stall"]
KEEPING = ["unknown_type", "random_apdu"]


@pytest.mark.parametrize("scenario", CLOSING)
async def test_bad_framing_and_sequence_errors_close_and_reopen_the_link(
    scenario: str, base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    w = await client(base, rogue, running)
    sent_at = time.time()
    await rogue.misbehave(scenario)
    down = await until(lambda: next(iter(w.downs()), None), T3 + T1 + 1, f"link closed after {scenario}")
    assert down.time - sent_at <= T3 + T1 + 0.5, down
    assert counted(w, scenario), (scenario, w.adapter.stats())
    if scenario == "truncated":  # its TESTFR con went into the cut frame: t1 after the TESTFR act at t3
        assert "t1 = 2 s expired: no TESTFR con" in down.reason and "incomplete APDU" in down.reason, down.reason
        assert w.adapter.stats()["incomplete_frames"] == 1
    # reopened: a new connection, STARTDT and a new general interrogation
    await w.adapter.wait_connected(5)
    await until(lambda: interrogated(w, monitor_names(base), after=down.time), 5, "interrogation after reconnect")
    stats = w.adapter.stats()
    assert stats["connects"] == 2 and rogue.connections == 2
    assert stats.get("internal_errors", 0) == 0


@pytest.mark.parametrize("scenario", KEEPING)
async def test_unknown_content_is_counted_and_the_link_stays(
    scenario: str, base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    w = await client(base, rogue, running)
    await rogue.misbehave(scenario)
    await until(lambda: w.latest(PROOF_POINT, lambda u: u.value == PROOF_VALUE), 3, "the value after the rogue ASDUs")
    assert counted(w, scenario), (scenario, w.adapter.stats())
    assert not w.downs() and w.adapter.link_state is LinkState.UP
    assert w.adapter.stats()["connects"] == 1


async def test_a_frame_trickled_one_octet_per_0_3_s_is_used(
    base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    w = await client(base, rogue, running)
    await until(lambda: w.latest("feeder.autoreclose.enabled"), 3, "single point from GI")
    started = time.monotonic()
    await rogue.misbehave("trickle")  # 23 octets: ~6.9 s, longer than t3 and t1 together
    assert time.monotonic() - started >= 6.5
    upd = await until(
        lambda: w.latest("feeder.autoreclose.enabled", lambda u: u.cause is UpdateCause.SPONTANEOUS), 2, "the value"
    )
    assert upd.value is True and upd.quality is Quality.GOOD
    stats = w.adapter.stats()
    assert stats["reads"] >= 23  # one octet per TCP read, put together by the decoder
    assert not w.downs() and stats["connects"] == 1
    assert stats.get("garbled_frames", 0) == 0 and stats.get("t1_timeouts", 0) == 0


async def test_silent_outstation_found_within_t1_plus_t3_and_the_link_recovers(
    base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    w = await client(base, rogue, running)
    stall_s = T3 + T1 + 2.5
    stalled_at = time.time()
    stall = asyncio.ensure_future(rogue.misbehave("stall", stall_s=stall_s))
    try:
        down = await until(lambda: next(iter(w.downs()), None), T3 + T1 + 1, "stall detected")
        assert down.time - stalled_at <= T3 + T1 + 0.3, down
        assert "t1 = 2 s expired: no TESTFR con" in down.reason, down.reason
        # while it stays silent, new connections get no STARTDT con and fail after t1
        await until(lambda: any("no STARTDT con" in d.reason for d in w.downs()), stall_s, "STARTDT refused")
        await stall
        resumed_at = time.time()
        await w.adapter.wait_connected(T1 + 2)
        up = [c for c in w.links if c.state is LinkState.UP][-1]
        assert up.time - resumed_at <= T1 + 0.3 + 0.5  # an attempt in flight waits out its t1, then backoff
        await until(lambda: interrogated(w, monitor_names(base), after=resumed_at), 3, "interrogated after the stall")
        assert w.adapter.stats()["t1_timeouts"] >= 2
    finally:
        stall.cancel()
        rogue.resume()


async def test_flood_of_unknown_addresses_keeps_memory_flat(
    base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    w = await client(base, rogue, running)
    n, rounds = 20_000, 4

    async def flood(round_: int) -> None:
        await rogue.misbehave("flood", flood_n=n, timeout_s=20)
        await until(lambda: w.adapter.stats()["unknown_points"] == n * round_, 5, f"flood {round_} taken in")

    await flood(1)  # warm-up: caches, the first log lines, lazily built structures
    gc.collect()
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for r in range(2, rounds + 2):
            await flood(r)
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    growth = after - before
    # 80,000 unknown objects: what stays is a few counters and the values' update objects
    assert growth < 64 * 1024, f"{growth} bytes kept after {n * rounds} unknown objects"
    assert peak - before < 2 * 1024 * 1024, f"peak {peak - before} bytes"
    assert w.adapter.stats()["unknown_points"] == n * (rounds + 1)
    assert not w.downs() and w.adapter.link_state is LinkState.UP
    assert w.latest(PROOF_POINT, lambda u: u.value == PROOF_VALUE) is not None


async def test_an_idle_link_is_tested_every_t3_not_every_t1(
    base: LabConfig, rogue: RogueOutstation, running: Starter
) -> None:
    # t3 restarts with the TESTFR con: with t1 = 2 s > t3 = 1 s, a timer left at the TESTFR's
    # t1 deadline tested only every 2 s, and found a device that went silent up to 1 s late
    w = await client(base, rogue, running)
    before = w.adapter.stats().get("testfr_sent", 0)
    await asyncio.sleep(3.5)
    assert w.adapter.stats()["testfr_sent"] - before >= 3
    assert not w.downs()
