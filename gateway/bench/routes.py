"""The measured routes of ``mgms bench``, phase by phase, each next to its floor.

Every function returns ``{series key: [ms, ...]}``; :mod:`gateway.bench.runner` names the
series as routes or floors. Start and end of each route are taken from the probe hops the
system stores anyway (see :mod:`gateway.bench` for the hop list), so the bench measures what
the running system records, not a special instrumented path.

Phases (each one starts and stops what it needs, so routes do not load each other):

* **iec104**: the 104 simulator in its own process (``iedsim iec104``, breaker travel 0);
  a bare c104 client alone first (floors), then a bare raw-socket reader on this event loop
  (the floor of the asyncio engine), then the gateway alone with each engine.
* **iec61850**: the 61850 simulator in this process; the bare adapter with its receive path
  ticked when the socket is readable (floor: :mod:`gateway.protocols.iec61850.bare`), then
  the gateway.
* **dlms**: the meter simulator in this process; a bare gurux session (floor), then the
  gateway's adapter read -> Redis.
* **messages**: a TLS mosquitto with ACLs and HTTPS listeners (:class:`DsoSandbox`), one
  Redis per participant, a Messenger for the MGMS and one for the AMS; bare paho and bare
  aiohttp floors on the same broker and PKI.
* **loop**: the gateway with its FlexAgent and the AMS service, the whole DSO use case.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

import redis.asyncio as aioredis
import yaml

from ams.sandbox import DsoSandbox, feeder_flexibility
from ams.service import AmsKeys
from gateway.bench.clock import Host
from gateway.bench.floors import aiohttp_floor, paho_floor
from gateway.bench.progress import Progress
from gateway.bench.stats import summarise
from gateway.config import LabConfig
from gateway.iedsim.launch import SimProcess
from gateway.messaging import Messenger, Received, build_messenger
from gateway.points import DoublePoint, PointUpdate
from gateway.protocols.iec104.bare import BareC104, ioa_of
from gateway.protocols.iec104.bare_raw import BareRaw104
from gateway.runtime import Gateway
from gateway.semantic import ActivationNotification, Envelope, Flexibility, FlexibilityType
from gateway.semantic.envelope import serialise
from gateway.services import RedisServer, die_with_parent, free_port
from gateway.store import RedisStore
from gateway.transport.base import topic_for

__all__ = [
    "LOOP_HOPS",
    "Series",
    "dlms_phase",
    "iec104_phase",
    "iec61850_floor",
    "iec61850_phase",
    "loop_phase",
    "messages_phase",
    "raw104_floor",
]

#: The DSO loop's hops (``loop_hop_<name>``) and whose clocks stamp each (start, end).
LOOP_HOPS: dict[str, tuple[Host, Host]] = {
    "flex_to_ams_db": ("mgms", "ams"),
    "ams_db_to_activation_sent": ("ams", "ams"),
    "activation_to_mgms_db": ("ams", "mgms"),
    "mgms_db_to_command_sent": ("mgms", "mgms"),
    "command_to_confirmed": ("mgms", "mgms"),
    "verification_to_ams_db": ("mgms", "ams"),
    "ams_db_to_settled": ("ams", "ams"),
}

Series = dict[str, list[float]]
MGMS = "mgms-bench"
AMS = "ams"
LOCATION = "bench/feeder"
DEVICE_104 = "ref615"
DEVICE_MMS = "ref615_mms"
DEVICE_DLMS = "meter1"
VOLTAGE = "feeder.voltage.l1"
BREAKER = "feeder.breaker.command"
POSITION = "feeder.breaker.position"
MMS_VOLTAGE = "mms.feeder.voltage.l1"
DLMS_VOLTAGE = "meter.voltage.l1"


def _run(progress: Progress, label: str, n: int) -> Callable[[int], None]:
    return lambda i: progress.step(label, i, n)


def _finish(progress: Progress, label: str, values: list[float], n: int) -> list[float]:
    progress.done(label, len(values), n, summarise(values).median_ms)
    return values


def _voltage(i: int) -> float:
    return 225.0 + (i % 20) * 1.0 + 0.25  # steps of 1 V: above the 0.5 V deadband


async def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Check ``pred`` every 20 ms (no event exists for these states); TimeoutError naming ``what``."""
    for _ in range(int(timeout_s / 0.02) + 1):
        if pred():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"not within {timeout_s:g} s: {what}")


# ---------------------------------------------------------------------------- IEC 104


async def _next_change(
    reader: RedisStore, last_id: str, point: str, value: float, timeout_s: float = 3.0
) -> tuple[str, float]:
    """Follow the change feed until ``point`` shows ``value``: (stream id, store time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in await reader.changes(last_id, block_ms=int(timeout_s * 1000), count=100):
            last_id = e.id
            if e.point == point and e.value is not None and abs(float(e.value) - value) < 1e-3:
                return last_id, e.store_ts
    raise TimeoutError(f"{point}={value} not in the change feed")


async def iec104_phase(sim_config: Path, base: LabConfig, redis: RedisServer, n: int, progress: Progress) -> Series:
    """Floors (bare c104) then routes (gateway) on one simulator process, travel time 0.

    Routes: simulator change -> stored in Redis (``st`` of the change feed); breaker command
    request written into Redis (``P:cmd:requests``) -> confirmed position stored in Redis.
    """
    port = free_port()
    sim = SimProcess(sim_config, DEVICE_104, port, free_port())
    await sim.start()
    out: Series = {}
    try:
        await sim.control("travel 0")
        cfg = base.only(DEVICE_104).with_device(DEVICE_104, port=port, gi_period_s=0)
        bare = BareC104(port, cfg, DEVICE_104, BREAKER)
        await asyncio.to_thread(bare.start)
        try:
            vpt, ppt = cfg.point(VOLTAGE), cfg.point(POSITION)
            label = "floor c104 value callback"
            vals: list[float] = []
            for i in range(n):
                value = _voltage(i)
                bare.arm(ioa_of(vpt)[0], float(vpt.to_raw(value)))
                sent = float((await sim.control(f"set {VOLTAGE} {value}")).split()[1])
                if await asyncio.to_thread(bare.event.wait, 2.0):
                    vals.append((bare.seen_t - sent) * 1000)
                progress.step(label, i + 1, n)
            await sim.control(f"release {VOLTAGE}")
            out["floor_c104_value"] = _finish(progress, label, vals, n)
            label = "floor c104 SBO command -> position callback"
            cmds: list[float] = []
            for i in range(n):
                close = i % 2 == 1
                bare.arm(ioa_of(ppt)[0], float(DoublePoint.ON if close else DoublePoint.OFF))
                t0 = time.time()
                ok = await asyncio.to_thread(bare.transmit_breaker, close)
                if ok and await asyncio.to_thread(bare.event.wait, 2.0):
                    cmds.append((bare.seen_t - t0) * 1000)
                await asyncio.sleep(0.005)  # c104 clears an SBO selection in a deferred task
                progress.step(label, i + 1, n)
            out["floor_c104_command"] = _finish(progress, label, cmds, n)
        finally:
            await asyncio.to_thread(bare.stop)
        out["floor_raw104_value"] = await raw104_floor(cfg, port, sim, n, progress)
        for engine, suffix in (("c104", ""), ("asyncio", "_aio")):
            # the gateway with each IEC 104 client engine, against the same c104 floor
            ecfg = cfg.with_device(DEVICE_104, iec104_engine=engine)
            out.update(await _iec104_gateway_routes(ecfg, redis, sim, n, progress, engine, suffix))
    finally:
        await sim.stop()
    return out


async def raw104_floor(cfg: LabConfig, port: int, sim: SimProcess, n: int, progress: Progress) -> list[float]:
    """Simulator change -> the M_ME_TF_1 decoded by a bare raw-socket reader on this event loop.

    The floor of the asyncio engine's value route (which beats the bare c104 client): its own
    connection to the simulator, alone on it (the c104 floor has closed), same changes.
    """
    vpt = cfg.point(VOLTAGE)
    timers = cfg.devices[DEVICE_104].timers
    raw = await BareRaw104.open("127.0.0.1", port, w=timers.w, t2_s=timers.t2_s)
    label = "floor raw-socket 104 reader (asyncio, project codec)"
    vals: list[float] = []
    try:
        await asyncio.sleep(0.3)  # whatever the simulator sends on STARTDT is not a sample
        for i in range(n):
            value = _voltage(i)
            raw.arm(ioa_of(vpt)[0], float(vpt.to_raw(value)))
            sent = float((await sim.control(f"set {VOLTAGE} {value}")).split()[1])
            with contextlib.suppress(TimeoutError):  # a lost sample is counted by its absence (n)
                await asyncio.wait_for(raw.event.wait(), 2.0)
                vals.append((raw.seen_t - sent) * 1000)
            progress.step(label, i + 1, n)
        await sim.control(f"release {VOLTAGE}")
    finally:
        raw.close()
    return _finish(progress, label, vals, n)


async def _iec104_gateway_routes(
    cfg: LabConfig, redis: RedisServer, sim: SimProcess, n: int, progress: Progress, engine: str, suffix: str
) -> Series:
    """The value and command routes through a running gateway (``engine``: its 104 client)."""
    out: Series = {}
    async with _gateway(cfg, redis) as (_gw, reader):
        label = f"104 feeder voltage -> MGMS db ({engine})"
        vals: list[float] = []
        last_id = await reader.changes_tail()
        for i in range(n):
            value = _voltage(i)
            sent = float((await sim.control(f"set {VOLTAGE} {value}")).split()[1])
            try:
                last_id, st = await _next_change(reader, last_id, VOLTAGE, value)
                vals.append((st - sent) * 1000)
            except TimeoutError as exc:
                progress.note(f"  sample {i}: {exc}")
                last_id = await reader.changes_tail()
            progress.step(label, i + 1, n)
        await sim.control(f"release {VOLTAGE}")
        out[f"iec104_voltage{suffix}"] = _finish(progress, label, vals, n)
        label = f"104 breaker command MGMS db -> confirmed ({engine})"
        cmds: list[float] = []
        for i in range(n):
            now_pos = await reader.latest(POSITION)
            word, state_v = ("close", 2.0) if now_pos is not None and now_pos.value == 1 else ("open", 1.0)
            t0 = time.time()
            rid = await reader.submit_command(BREAKER, word, by="bench")
            rec = await reader.wait_reply(rid, 10.0)
            try:
                if rec is None or rec.result != "confirmed":
                    raise TimeoutError(f"{word}: {rec.result + ' ' + rec.reason if rec else 'no reply'}")
                last_id, st = await _next_change(reader, last_id, POSITION, state_v)
                cmds.append((st - t0) * 1000)
            except TimeoutError as exc:
                progress.note(f"  command {i}: {exc}")
                last_id = await reader.changes_tail()
            progress.step(label, i + 1, n)
        out[f"iec104_breaker{suffix}"] = _finish(progress, label, cmds, n)
    return out


@contextlib.asynccontextmanager
async def _gateway(cfg: LabConfig, redis: RedisServer) -> AsyncIterator[tuple[Gateway, RedisStore]]:
    """A running gateway on ``cfg`` and a second store client reading as an operator would."""
    store = RedisStore.from_url(cfg, redis.client_url("gateway"))
    reader = RedisStore.from_url(cfg, redis.client_url("operator"))
    gw = Gateway(cfg, store, stats_period_s=1.0)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="bench-gateway")
    try:
        await gw.wait_connected(15)
        await asyncio.sleep(0.3)  # the interrogation's burst is not a sample
        yield gw, reader
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
        await reader.aclose()


# ---------------------------------------------------------------------------- IEC 61850


def _pause_61850(rng: random.Random) -> float:
    """2-12 ms between 61850 samples, drawn at random (s), for the floor and the route alike.

    Why not a fixed pause: libiec61850's client receive thread sleeps 10 ms whenever a tick
    finds nothing to read, and the simulated IED sends from a server loop that waits up to
    ~1 ms per turn; with a fixed 2 ms pause the bench's own rhythm locked onto those cycles,
    differently for the floor and for the route (whose turn-around is longer), and the floor
    (1.11 ms) came out slower than the route (0.64 ms). Updates at random times, as a real
    IED's are, sample every phase of both cycles alike: the route then shows what the
    receive thread's idle sleep costs it (up to 10 ms), and the floor, ticked as soon as its
    socket is readable (:class:`~gateway.protocols.iec61850.bare.ReportTicker`), does not.
    """
    return 0.002 + rng.random() * 0.010


async def iec61850_floor(
    cfg: LabConfig, sim_port: int, sim: Any, n: int, progress: Progress, rng: random.Random, *, tick: bool = True
) -> list[float]:
    """Simulator update -> report callback of a bare adapter on its own connection (ms).

    ``tick`` True (the floor): the connection's receive path is ticked as soon as its socket is
    readable (:class:`~gateway.protocols.iec61850.bare.ReportTicker`), so libiec61850's 10 ms
    idle sleep is not in it. False: libiec61850's receive thread alone, as the gateway's
    adapter runs it (the reference ``ref_iec61850_report_library_thread``). The time is taken
    at the callback's entry (``receive_time``), before any decoding or hand-off.
    """
    from gateway.protocols.iec61850.adapter import Iec61850Adapter
    from gateway.protocols.iec61850.bare import ReportTicker

    adapter = Iec61850Adapter(cfg.devices[DEVICE_MMS], cfg.points)
    seen: asyncio.Queue[PointUpdate] = asyncio.Queue()

    async def pump() -> None:
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate) and ev.point == MMS_VOLTAGE:
                seen.put_nowait(ev)

    task = asyncio.create_task(pump(), name="bench-61850-pump")
    label = (
        "floor libiec61850 report callback (ticked on socket readiness, no idle sleep)"
        if tick
        else "reference: libiec61850 report callback on its own receive thread"
    )
    vals: list[float] = []
    ticker: ReportTicker | None = None
    try:
        await adapter.start()
        await adapter.wait_connected(10)
        await asyncio.sleep(0.3)
        if tick:
            ticker = ReportTicker(adapter._con, "127.0.0.1", sim_port)
            ticker.start()
        while not seen.empty():
            seen.get_nowait()
        for i in range(n):
            value = 230.0 + (i % 50) * 0.25 + 0.125
            t0 = time.time()
            sim.set_value(MMS_VOLTAGE, value)
            with contextlib.suppress(TimeoutError):  # a lost sample is counted by its absence (n)
                async with asyncio.timeout(3):
                    while True:
                        ev = await seen.get()
                        if ev.value is not None and abs(float(ev.value) - value) < 1e-3:
                            vals.append((ev.receive_time - t0) * 1000)
                            break
            await asyncio.sleep(_pause_61850(rng))
            progress.step(label, i + 1, n)
    finally:
        if ticker is not None:
            await asyncio.to_thread(ticker.stop)
        await adapter.close()
        await task
    return _finish(progress, label, vals, n)


async def iec61850_phase(base: LabConfig, redis: RedisServer, n: int, progress: Progress) -> Series:
    """Simulator update -> report callback of a bare adapter, ticked on socket readiness (floor);
    the same on libiec61850's own receive thread (reference); stored in Redis (route)."""
    from gateway.iedsim.iec61850 import Iec61850Server  # lazily: loads libiec61850

    rng = random.Random(61850)
    cfg = base.only(DEVICE_MMS)
    simcfg = cfg.devices[DEVICE_MMS].simulator.model_dump()
    cfg = cfg.with_device(DEVICE_MMS, simulator={**simcfg, "period_s": 3600, "breaker_travel_s": 0.0})
    sim = Iec61850Server(cfg, DEVICE_MMS, host="127.0.0.1", port=0, seed=1)
    await sim.start()
    out: Series = {}
    try:
        cfg = cfg.with_device(DEVICE_MMS, port=sim.port)
        out["floor_iec61850_report"] = await iec61850_floor(cfg, sim.port, sim, n, progress, rng)
        out["ref_iec61850_report_library_thread"] = await iec61850_floor(
            cfg, sim.port, sim, n, progress, rng, tick=False
        )
        label = "61850 feeder voltage report -> MGMS db"
        vals: list[float] = []
        async with _gateway(cfg, redis) as (_gw, reader):
            last_id = await reader.changes_tail()
            for i in range(n):
                value = 240.0 + (i % 50) * 0.25 + 0.125
                t0 = time.time()
                sim.set_value(MMS_VOLTAGE, value)
                try:
                    last_id, st = await _next_change(reader, last_id, MMS_VOLTAGE, value)
                    vals.append((st - t0) * 1000)
                except TimeoutError as exc:
                    progress.note(f"  sample {i}: {exc}")
                    last_id = await reader.changes_tail()
                await asyncio.sleep(_pause_61850(rng))
                progress.step(label, i + 1, n)
        out["iec61850_voltage"] = _finish(progress, label, vals, n)
    finally:
        await sim.close()
    return out


# ---------------------------------------------------------------------------- DLMS


async def dlms_phase(base: LabConfig, redis: RedisServer, n: int, progress: Progress) -> Series:
    """One register GET: bare gurux session (floor) / adapter read -> stored in Redis (route)."""
    from gateway.iedsim.dlms import DlmsMeter  # lazily: loads gurux
    from gateway.protocols.dlms import DlmsAdapter

    cfg = base.only(DEVICE_DLMS)
    dev = cfg.devices[DEVICE_DLMS]
    assert dev.dlms is not None
    dl = dev.dlms.model_dump()
    # Polls out of the way: the requested reads are the only traffic.
    dl.update(
        poll_period_s=3600,
        clock_period_s=3600,
        load_profile={**dl["load_profile"], "read_period_s": 86400, "backfill_s": 0},
    )
    cfg = cfg.with_device(DEVICE_DLMS, dlms=dl)
    meter = DlmsMeter(cfg, DEVICE_DLMS, host="127.0.0.1", port=0, seed=1)
    await meter.start()
    out: Series = {}
    try:
        cfg = cfg.with_device(DEVICE_DLMS, port=meter.port)
        bare = DlmsAdapter(cfg.devices[DEVICE_DLMS], cfg.points_of(DEVICE_DLMS))
        session = await bare._connect()
        label = "floor gurux register read"
        vals: list[float] = []
        try:
            reg = bare._registers[DLMS_VOLTAGE]
            for i in range(n):
                t0 = time.perf_counter()
                await session.read(reg.obj, 2, "voltage")
                vals.append((time.perf_counter() - t0) * 1000)
                progress.step(label, i + 1, n)
        finally:
            session.close()
        out["floor_gurux_read"] = _finish(progress, label, vals, n)
        # A fresh meter for the gateway: the floor's reads advanced the HLS invocation counter
        # faster than the adapter's clock-based start value grows (the meter would refuse it).
        await meter.close()
        meter = DlmsMeter(cfg, DEVICE_DLMS, host="127.0.0.1", port=0, seed=1)
        await meter.start()
        cfg = cfg.with_device(DEVICE_DLMS, port=meter.port)
        label = "DLMS register read -> MGMS db"
        vals = []
        async with _gateway(cfg, redis) as (gw, reader):
            adapter = gw.adapters[DEVICE_DLMS]
            for i in range(n):
                t0 = time.time()
                upd = await adapter.read(DLMS_VOLTAGE)
                async with asyncio.timeout(3):
                    while True:
                        stored = await reader.latest(DLMS_VOLTAGE)
                        if stored is not None and stored.recv_ts >= upd.receive_time - 1e-6:
                            vals.append((stored.store_ts - t0) * 1000)
                            break
                        await asyncio.sleep(0.0002)
                progress.step(label, i + 1, n)
        out["dlms_read"] = _finish(progress, label, vals, n)
    finally:
        await meter.close()
    return out


# ---------------------------------------------------------------------------- messages

Security = Literal["signed", "encrypted"]


@dataclass
class _Pair:
    mgms: Messenger
    ams: Messenger
    clients: list[aioredis.Redis] = field(default_factory=list)

    async def close(self) -> None:
        await self.mgms.close()
        await self.ams.close()
        for c in self.clients:
            await c.aclose()


async def _pair(
    box: DsoSandbox,
    mgms_redis: RedisServer,
    ams_redis: RedisServer,
    transport: Literal["mqtt", "https"],
    security: Security,
) -> _Pair:
    mc = mgms_redis.client("gateway")
    ac = ams_redis.client("ams")
    tag = secrets.token_hex(3)  # fresh keys per pair: no inbox or consumer group left from the last
    mgms = build_messenger(
        box.messaging(MGMS, transport=transport, security=security, mqtt={"unique_id": True}),
        mc,
        prefix=f"mgms:bench{tag}",
    )
    ams = build_messenger(
        box.messaging(AMS, transport=transport, security=security, mqtt={"unique_id": True}),
        ac,
        prefix=f"ams:bench{tag}",
    )
    await ams.start()
    await mgms.start()
    return _Pair(mgms, ams, [mc, ac])


async def _wait_for(m: Messenger, message_id: str, timeout_s: float = 5.0) -> Received:
    async with asyncio.timeout(timeout_s):
        while True:
            for item in await m.read("bench", "bench", block_ms=1000):
                await m.ack("bench", item.entry_id)
                if item.envelope.id == message_id:
                    return item


def _flex(i: int) -> Flexibility:
    start = datetime.now(UTC) + timedelta(minutes=5)
    return Flexibility(
        identifier=f"bench-{i}-{time.time_ns()}",
        flexibility_type=FlexibilityType.UPWARD,
        power_kw=50.0 + i % 10,
        start=start,
        stop=start + timedelta(minutes=15),
    )


def _activation(i: int) -> ActivationNotification:
    start = datetime.now(UTC) + timedelta(minutes=5)
    return ActivationNotification(
        identifier=f"act-bench-{i}-{time.time_ns()}",
        flexibility_type=FlexibilityType.UPWARD,
        power_kw=50.0,
        start=start,
        stop=start + timedelta(minutes=15),
    )


def _sealed_size(m: Messenger) -> int:
    """Bytes of one sealed flexibility: the floors move payloads of the same size."""
    env = Envelope.create(_flex(0), sender=MGMS, recipient=AMS, topic=topic_for(AMS, MGMS, "Flexibility"), ttl_s=60)
    return len(m.sealer.seal(env))


async def _message_route(
    send: Messenger,
    recv: Messenger,
    recipient: str,
    make: Callable[[int], Any],
    n: int,
    label: str,
    progress: Progress,
    hops: Series,
    key: str,
) -> list[float]:
    """Created at the sender (sealed into its db) -> stored in the receiver's inbox (Redis TIME).

    The two hops go into ``hops``: ``hop_{key}_created_to_received`` (seal, outbox, transport)
    and ``hop_{key}_received_to_stored`` (open: verify, decrypt; the accepting Lua script).
    """
    vals: list[float] = []
    sent_hop = hops.setdefault(f"hop_{key}_created_to_received", [])
    store_hop = hops.setdefault(f"hop_{key}_received_to_stored", [])
    for i in range(n + 5):
        env = await send.send(make(i), recipient)
        item = await _wait_for(recv, env.id)
        if i >= 5:  # warm-up: TLS sessions, Lua script load
            vals.append((item.stored_ns - item.created_ns) / 1e6)
            sent_hop.append((item.received_ns - item.created_ns) / 1e6)
            store_hop.append((item.stored_ns - item.received_ns) / 1e6)
            progress.step(label, i - 4, n)
    return _finish(progress, label, vals, n)


async def _durable_reference(
    box: DsoSandbox,
    mgms_redis: RedisServer,
    ams_redis: RedisServer,
    security: Security,
    n: int,
    progress: Progress,
    label: str,
) -> list[float]:
    """What a message route must do whatever the code around it: seal, one fsync'd write at
    the sender, open, one fsync'd write at the receiver - with no transport in between.

    Not a floor the targets use (those are the bare transports), but the cost of durability
    and security on this machine, so the report can tell it from the Messenger's own.
    """
    mc = mgms_redis.client("gateway")
    ac = ams_redis.client("ams")
    sender = build_messenger(box.messaging(MGMS, transport="https", security=security), mc, prefix="mgms:durable")
    receiver = build_messenger(box.messaging(AMS, transport="https", security=security), ac, prefix="ams:durable")
    topic = topic_for(AMS, MGMS, "Flexibility")
    vals: list[float] = []
    try:
        for i in range(n + 5):
            t0 = time.perf_counter_ns()
            env = Envelope.create(_flex(i), sender=MGMS, recipient=AMS, topic=topic, ttl_s=300)
            data = sender.sealer.seal(env)
            await mc.xadd("mgms:durable:outbox", {"id": env.id, "data": data.decode()}, maxlen=1000, approximate=True)
            opened, _ttl = receiver.opener.open_unclaimed(data)
            await ac.xadd("ams:durable:inbox", {"id": opened.id, "doc": serialise(opened).decode()}, maxlen=1000,
                          approximate=True)  # fmt: skip
            if i >= 5:
                vals.append((time.perf_counter_ns() - t0) / 1e6)
                progress.step(label, i - 4, n)
    finally:
        await sender.close()
        await receiver.close()
        await mc.aclose()
        await ac.aclose()
    return vals


async def messages_phase(
    box: DsoSandbox, mgms_redis: RedisServer, ams_redis: RedisServer, n: int, progress: Progress
) -> Series:
    """Flexibility over HTTPS and MQTT, activation over MQTT, signed and encrypted; the floors."""
    out: Series = {}
    assert box.broker is not None
    payload_len = 1500
    for security in ("signed", "encrypted"):
        for transport in ("https", "mqtt"):
            pair = await _pair(box, mgms_redis, ams_redis, transport, security)
            try:
                if security == "encrypted":
                    payload_len = _sealed_size(pair.mgms)
                key = f"flex_{transport}_{security}"
                out[key] = await _message_route(
                    pair.mgms,
                    pair.ams,
                    AMS,
                    _flex,
                    n,
                    f"flexibility MGMS db -> AMS db, {transport.upper()}, {security}",
                    progress,
                    out,
                    key,
                )
                if transport == "mqtt":
                    out[f"activation_mqtt_{security}"] = await _message_route(
                        pair.ams,
                        pair.mgms,
                        MGMS,
                        _activation,
                        n,
                        f"activation AMS db -> MGMS db, MQTT, {security}",
                        progress,
                        out,
                        f"activation_mqtt_{security}",
                    )
            finally:
                await pair.close()
    securities: tuple[Security, ...] = ("signed", "encrypted")
    for security in securities:
        label = f"reference: seal + fsync'd XADD -> open + fsync'd XADD, no transport ({security})"
        out[f"ref_durable_{security}"] = _finish(
            progress, label, await _durable_reference(box, mgms_redis, ams_redis, security, n, progress, label), n
        )
    body = secrets.token_bytes(payload_len)
    b = box.broker
    users = ((MGMS, box.passwords[MGMS]), (AMS, box.passwords[AMS]))
    for key, label, threaded in (
        ("floor_mqtt", "floor bare paho publish -> on_message (TLS, QoS 1, one thread)", False),
        ("ref_mqtt_paho_threaded", "bare paho, network threads (loop_start), for reference", True),
    ):
        samples = await asyncio.to_thread(
            paho_floor, "127.0.0.1", b.port, box.pki, users, n, body, _run(progress, label, n), threaded=threaded
        )
        out[key] = _finish(progress, label, samples, n)
    label = "floor bare aiohttp POST -> handler (mutual TLS)"
    cert = box.pki.clients[MGMS]
    out["floor_https"] = _finish(
        progress,
        label,
        await aiohttp_floor(box.pki, (str(cert.cert), str(cert.key)), n, body, _run(progress, label, n)),
        n,
    )
    out.update(await _durable_floors(box, ams_redis, n, body, progress))
    return out


async def _durable_floors(box: DsoSandbox, redis: RedisServer, n: int, body: bytes, progress: Progress) -> Series:
    """The bare transports with one fsync'd XADD at the receiver before the acknowledgement.

    Into the receiver's (the AMS's) Redis, whose ``appendfsync`` is the run's (``always``
    unless ``--fsync everysec``); a stream of its own, capped."""
    import redis as redis_sync  # the paho floor runs in a worker thread: a blocking client there

    out: Series = {}
    assert box.broker is not None
    key = "ams:bench:floor:durable"  # in the AMS service user's key space (its ACL)
    sync = redis_sync.Redis.from_url(redis.client_url("ams"))
    users = ((MGMS, box.passwords[MGMS]), (AMS, box.passwords[AMS]))
    label = "durable floor: bare paho -> on_message + fsync'd XADD before the PUBACK"
    try:
        samples = await asyncio.to_thread(
            paho_floor, "127.0.0.1", box.broker.port, box.pki, users, n, body, _run(progress, label, n),
            durable=lambda data: sync.xadd(key, {"d": data}, maxlen=1000, approximate=True),
        )  # fmt: skip
    finally:
        sync.close()
    out["floor_mqtt_durable"] = _finish(progress, label, samples, n)
    client = aioredis.Redis.from_url(redis.client_url("ams"))
    label = "durable floor: bare aiohttp POST -> handler + fsync'd XADD before the 200"
    cert = box.pki.clients[MGMS]
    try:
        samples = await aiohttp_floor(
            box.pki, (str(cert.cert), str(cert.key)), n, body, _run(progress, label, n),
            durable=lambda data: client.xadd(key, {"d": data}, maxlen=1000, approximate=True),
        )  # fmt: skip
    finally:
        await client.aclose()
    out["floor_https_durable"] = _finish(progress, label, samples, n)
    return out


# ---------------------------------------------------------------------------- the DSO loop


class AmsProcess:
    """``ams run`` in its own process, as a deployment runs it: the AMS's Python work does not
    share the MGMS's event loop and core (HEILA ran them on separate machines).

    The loop ends when the settlement is visible in the AMS Redis: the bench blocks on the
    AMS's settlement stream and notes the moment the entry arrives.
    """

    def __init__(self, box: DsoSandbox, redis: RedisServer, transport: str, security: Security) -> None:
        self.box = box
        self.redis = redis  # its url and the ams user's secret file go on the command line, not the secret
        self.transport = transport
        self.security = security
        self.log_file = box.directory / f"ams-loop-{security}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, client: aioredis.Redis, timeout_s: float = 30.0) -> None:
        messaging = self.box.messaging(
            AMS, transport=cast(Any, self.transport), security=self.security, mqtt={"unique_id": True}
        )
        cfg = self.box.directory / f"ams-loop-{self.security}.yaml"
        cfg.write_text(
            yaml.safe_dump(
                {
                    "messaging": messaging.model_dump(mode="json"),
                    "microgrids": [{"participant": MGMS, "location": LOCATION}],
                }
            )
        )
        with self.log_file.open("wb") as log_out:
            # a killed bench must not leave its AMS running (the kernel sends it SIGTERM)
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ams.cli", "run", "-c", str(cfg), "--redis-url", self.redis.url,
                "--redis-user", "ams", "--redis-secret-file", str(self.redis.secret_file("ams")),
                "--worker", "bench", stdout=asyncio.subprocess.DEVNULL, stderr=log_out,
                preexec_fn=die_with_parent(),
            )  # fmt: skip
        keys = AmsKeys(AMS)
        async with asyncio.timeout(timeout_s):
            while True:  # up when subscribed (a flexibility sent before would be missed) and registered
                if self.proc.returncode is not None:
                    raise RuntimeError(f"ams run exited ({self.proc.returncode}): {self.log_tail()}")
                subscribed = "subscribed to" in self.log_file.read_text(errors="replace")
                if subscribed and await client.hexists(keys.microgrids, MGMS):
                    return
                await asyncio.sleep(0.05)

    def log_tail(self) -> str:
        return self.log_file.read_text(errors="replace")[-2000:]

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _next_settlement(client: aioredis.Redis, key: str, act_id: str, last: list[str]) -> tuple[int, int]:
    """Block on the AMS settlement stream until ``act_id`` is settled: (verification created
    ns, seen ns). ``last`` holds the stream position between calls."""
    while True:
        resp: Any = await client.xread({key: last[0]}, block=1000)
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                last[0] = entry_id
                if fields.get("activation") == act_id:
                    return int(fields["created_ns"]), time.time_ns()


async def loop_phase(
    sim_config: Path,
    base: LabConfig,
    box: DsoSandbox,
    mgms_redis: RedisServer,
    ams_redis: RedisServer,
    n: int,
    progress: Progress,
    transport: Literal["mqtt", "https", "both"] = "mqtt",
    security: Security = "encrypted",
) -> Series:
    """Flexibility -> offer -> reserve -> activation -> breaker open confirmed ... verification
    -> settled, ``n`` times, with the scheduled waits (activation window) left out.

    loop = (breaker open confirmed - flexibility created) + (settled - verification created);
    the hops of both parts are returned too (``loop_hop_*``). Encrypted is the judged loop
    (``dso_loop``); signed only gives ``dso_loop_signed`` and hops ending ``_signed``.
    """
    suffix = "" if security == "encrypted" else f"_{security}"
    port = free_port()
    sim = SimProcess(sim_config, DEVICE_104, port, free_port())
    await sim.start()
    loop_key = f"dso_loop{suffix}"
    hop = {h: f"loop_hop_{h}{suffix}" for h in LOOP_HOPS}
    out: Series = {k: [] for k in (loop_key, *hop.values())}
    ac = ams_redis.client("ams")
    keys = AmsKeys(AMS)
    ams = AmsProcess(box, ams_redis, transport, security)
    label = f"DSO loop ({transport.upper()}, {security}, travel 0, window excluded)"
    try:
        await ams.start(ac)
        newest = await ac.xrevrange(keys.settlements, count=1)
        position = [str(newest[0][0]) if newest else "0-0"]
        await sim.control("travel 0")
        cfg = base.only(DEVICE_104).with_device(DEVICE_104, port=port, gi_period_s=0)
        cfg = cfg.model_copy(
            update={
                "messaging": box.messaging(MGMS, transport=transport, security=security, mqtt={"unique_id": True}),
                "flexibility": feeder_flexibility(AMS, window_s=1, step_s=1),
            }
        )
        async with _gateway(cfg, mgms_redis) as (gw, reader):
            agent = gw.flex_agent
            assert agent is not None
            await _until(lambda: gw.latest_value("feeder.p") is not None, 10, "a feeder power value")
            prefix = reader.keys.prefix
            for i in range(n):
                sent: list[Flexibility] = []
                async with asyncio.timeout(10):
                    while not sent:  # the previous activation may still hold the resource
                        sent = await agent.publish(start=datetime.now(UTC), window_s=1)
                        if not sent:
                            await asyncio.sleep(0.05)
                flex = sent[0]
                act_id = f"act:offer:{MGMS}:{flex.identifier}"
                try:
                    async with asyncio.timeout(15):
                        ver_created, settled_ns = await _next_settlement(ac, keys.settlements, act_id, position)
                except TimeoutError:
                    progress.note(f"  loop {i}: {act_id} not settled within 15 s")
                    continue
                fh = await ac.hgetall(keys.flex(MGMS, flex.identifier))
                ah = await ac.hgetall(keys.activation(act_id))
                mh = await reader.redis.hgetall(f"{prefix}:flex:act:{act_id}")
                commands = json.loads(mh.get("commands", "[]"))
                if not commands or commands[0].get("result") != "confirmed":
                    progress.note(f"  loop {i}: breaker not confirmed: {commands}")
                    continue
                c0 = commands[0]
                created = int(fh["created_ns"])
                confirm_ns = int(float(c0["confirm_ts"]) * 1e9)
                sent_ns = int(float(c0["sent_ts"]) * 1e9)
                part1 = confirm_ns - created
                part2 = settled_ns - ver_created
                ms = 1e-6
                out[loop_key].append((part1 + part2) * ms)
                out[hop["flex_to_ams_db"]].append((int(fh["stored_ns"]) - created) * ms)
                out[hop["ams_db_to_activation_sent"]].append((int(ah["sent_ns"]) - int(fh["stored_ns"])) * ms)
                out[hop["activation_to_mgms_db"]].append((int(mh["stored_ns"]) - int(ah["sent_ns"])) * ms)
                out[hop["mgms_db_to_command_sent"]].append((sent_ns - int(mh["stored_ns"])) * ms)
                out[hop["command_to_confirmed"]].append((confirm_ns - sent_ns) * ms)
                settle = await ac.hgetall(keys.settlement(act_id))
                out[hop["verification_to_ams_db"]].append((int(settle["stored_ns"]) - ver_created) * ms)
                out[hop["ams_db_to_settled"]].append((settled_ns - int(settle["stored_ns"])) * ms)
                progress.step(label, i + 1, n)
            # let the last restore (breaker close) finish before the gateway stops
            await _until(lambda: not agent._busy_resources(), 10, "the last restore")
    finally:
        await ams.stop()
        await ac.aclose()
        await sim.stop()
    _finish(progress, label, out[loop_key], n)
    return out
