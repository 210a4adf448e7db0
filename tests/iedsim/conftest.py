"""Fixtures for the simulator tests: configs, outstations on free ports, two kinds of client.

No ``from __future__ import annotations`` here: c104 checks callback annotations as real
objects and refuses string annotations.

``C104Probe`` is the client the gateway will use (c104 on lib60870), so the simulator is
checked against an independent implementation. ``RawClient`` drives the outstation with our
own codec where the test needs to control every frame (windows, sequence errors, garbage).
"""

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import c104
import pytest

from gateway.config import LabConfig, load_config
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.protocols.iec104.codec import (
    SEQ_MODULO,
    Asdu,
    Frame,
    FrameDecoder,
    IFrame,
    SFrame,
    UFrame,
    UFunction,
    decode_asdu,
    encode_asdu,
    encode_frame,
)
from gateway.protocols.iec104.common import COT_ACTCON, Confirmation, parse_command_reply

SIM_CONFIG = Path(__file__).resolve().parents[2] / "lab_configs" / "multipower-sim.yaml"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests that run a c104 client go in a forked child (pytest-forked): c104 2.2.1 can
    SIGSEGV in its native threads, and a crash must fail that test, not end the suite."""
    here = Path(__file__).parent
    for item in items:
        if not item.path.is_relative_to(here):
            continue
        module = getattr(item, "module", None)
        if {"c104_client", "probes"} & set(getattr(item, "fixturenames", ())) or getattr(module, "c104", None):
            item.add_marker(pytest.mark.forked)


def make_config(*, points: dict[str, dict[str, Any]] | None = None, **simulator: Any) -> LabConfig:
    """The MultiPower sim lab with simulator settings and point fields overridden.

    Defaults keep the feeder still (one step an hour) so values only change when a test
    changes them.
    """
    base = load_config(SIM_CONFIG)
    dev = base.devices["ref615"]
    sim = dev.simulator.model_copy(update={"period_s": 3600.0, "seed": 7, **simulator})
    devices = {**base.devices, "ref615": dev.model_copy(update={"simulator": sim})}
    pts = tuple(p.model_copy(update=(points or {}).get(p.name, {})) for p in base.points)
    return base.model_copy(update={"devices": devices, "points": pts})


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """c104 clients own threads; every test must stop what it started."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 2.0
    while True:
        extra = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        # asyncio.to_thread workers are pooled by the loop and go with it; ignore them
        extra = [t for t in extra if not t.name.startswith(("asyncio_", "ThreadPoolExecutor"))]
        if not extra or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert not extra, f"threads leaked: {extra}"


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    yield
    await asyncio.sleep(0)
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    assert not left, f"tasks leaked: {left}"


@pytest.fixture
def config() -> LabConfig:
    return make_config()


@pytest.fixture
def config_factory() -> Callable[..., LabConfig]:
    """:func:`make_config` for tests that need other settings (test modules cannot import conftest)."""
    return make_config


@pytest.fixture
async def outstation(config: LabConfig, no_leaked_tasks: None) -> AsyncIterator[Iec104Outstation]:
    o = Iec104Outstation(config, "ref615", host="127.0.0.1", port=0)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


# ---------------------------------------------------------------------------------------
# c104 client


@dataclasses.dataclass(frozen=True)
class Received:
    name: str
    value: Any
    quality: int
    recorded_at: Any
    cot: str
    at: float


class C104Probe:
    """A c104 client on one station whose callbacks land in asyncio queues."""

    def __init__(
        self,
        outstation: Iec104Outstation,
        *,
        t1_s: int | None = None,
        t3_s: int | None = None,
        init: c104.Init = c104.Init.ALL,
        command_timeout_ms: int = 1000,
        extra_points: dict[str, tuple[int, str]] | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = c104.Client(tick_rate_ms=50, command_timeout_ms=command_timeout_ms)
        connection = self.client.add_connection(ip="127.0.0.1", port=outstation.port, init=init)
        assert connection is not None
        self.connection: c104.Connection = connection
        # Use the device's timers as the gateway does; c104's default t2 (10 s) would outlast
        # the simulator's t1 (2 s) and the outstation would rightly close the link.
        timers = outstation.timers
        params = self.connection.protocol_parameters
        params.message_timeout = t1_s if t1_s is not None else timers.t1_s
        params.confirm_interval = min(timers.t2_s, params.message_timeout)
        params.keep_alive_interval = t3_s if t3_s is not None else timers.t3_s
        params.send_window_size = timers.k
        params.receive_window_size = timers.w
        station = self.connection.add_station(common_address=outstation.common_address)
        assert station is not None
        self.station: c104.Station = station
        self.values: asyncio.Queue[Received] = asyncio.Queue()
        self.states: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self.points: dict[str, c104.Point] = {}
        self._names: dict[int, str] = {}
        wanted = {p.name: (p.address.ioa, p.address.type) for p in outstation.points}
        wanted.update(extra_points or {})
        for name, (ioa, type_name) in wanted.items():
            point = self.station.add_point(io_address=ioa, type=getattr(c104.Type, type_name))
            assert point is not None
            self.points[name] = point
            self._names[ioa] = name
            if type_name.startswith("M_"):
                point.on_receive(callable=self._on_receive)
        self.connection.on_state_change(callable=self._on_state)
        self.connection.on_receive_raw(callable=self._on_raw)
        self._ca = outstation.common_address
        self._last_reply: Confirmation | None = None
        self._last_reply_at = 0.0

    # c104 threads ------------------------------------------------------------------------

    def _on_receive(
        self, point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        q = point.quality
        item = Received(
            self._names[point.io_address],
            point.value,
            q.value if q is not None else 0,
            point.recorded_at,
            message.cot.name,
            time.time(),
        )
        self.loop.call_soon_threadsafe(self.values.put_nowait, item)
        return c104.ResponseState.NONE

    def _on_state(self, connection: c104.Connection, state: c104.ConnectionState) -> None:
        self.loop.call_soon_threadsafe(self.states.put_nowait, (state.name, time.time()))

    def _on_raw(self, connection: c104.Connection, data: bytes) -> None:
        reply = parse_command_reply(data)
        if reply is not None:
            self._last_reply, self._last_reply_at = reply, time.monotonic()

    # asyncio side ------------------------------------------------------------------------

    async def start(self, timeout_s: float = 5.0) -> None:
        self.client.start()
        await self.wait_open(timeout_s)

    async def wait_open(self, timeout_s: float = 5.0) -> None:
        """Wait for OPEN; c104 sometimes never sends STARTDT (OPEN_MUTED), unmute fixes it."""
        deadline = time.monotonic() + timeout_s
        muted_since: float | None = None
        while self.connection.state != c104.ConnectionState.OPEN:
            now = time.monotonic()
            assert now < deadline, f"no OPEN connection, state {self.connection.state}"
            if self.connection.state == c104.ConnectionState.OPEN_MUTED:
                muted_since = muted_since or now
                if now - muted_since > 0.1:
                    self.connection.unmute()
                    muted_since = None
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await asyncio.to_thread(self.client.stop)

    async def transmit(self, name: str, value: Any, *, select: bool | None = None) -> tuple[bool, float]:
        """Send a command through c104; returns transmit()'s result and how long it blocked."""
        point = self.points[name]
        if select is not None:
            point.command_mode = c104.CommandMode.SELECT_AND_EXECUTE if select else c104.CommandMode.DIRECT
        point.value = value
        sbo = point.command_mode == c104.CommandMode.SELECT_AND_EXECUTE
        self._last_reply = None
        t0 = time.monotonic()
        call = asyncio.ensure_future(asyncio.to_thread(point.transmit, cause=c104.Cot.ACTIVATION))
        nudges: list[asyncio.Future[bool]] = []
        while not call.done():
            await asyncio.wait({call}, timeout=0.05)
            if not call.done() and self._stuck(sbo) and not any(not n.done() for n in nudges):
                # c104 2.2.1 can miss the wake-up of an answer that came before it started
                # waiting (docs/protocol-notes.md, "Lost wake-up"); the answer to a test
                # command wakes every c104 wait, as the gateway's c104 adapter does it.
                nudges.append(asyncio.ensure_future(asyncio.to_thread(
                    self.connection.test, common_address=self._ca, with_time=True, wait_for_response=True
                )))  # fmt: skip
        ok = call.result()
        blocked = time.monotonic() - t0
        if nudges:
            await asyncio.wait(nudges, timeout=5)
        return ok, blocked

    def _stuck(self, sbo: bool) -> bool:
        """The device said what ends or advances c104's wait over 0.1 s ago: a select ACTCON
        (the execute is due), a direct command's ACTCON, an ACTTERM or a refusal."""
        reply = self._last_reply
        if reply is None or time.monotonic() - self._last_reply_at < 0.1:
            return False
        waits_for_actterm = sbo and reply.cot == COT_ACTCON and not reply.select and not reply.negative
        return not waits_for_actterm

    async def next_value(
        self, name: str, timeout_s: float = 3.0, where: Callable[[Received], bool] | None = None
    ) -> Received:
        async with asyncio.timeout(timeout_s):
            while True:
                item = await self.values.get()
                if item.name == name and (where is None or where(item)):
                    return item

    async def wait_state(self, names: tuple[str, ...], timeout_s: float) -> tuple[str, float]:
        async with asyncio.timeout(timeout_s):
            while True:
                state, at = await self.states.get()
                if state in names:
                    return state, at


@pytest.fixture
async def c104_client(outstation: Iec104Outstation) -> AsyncIterator[C104Probe]:
    probe = C104Probe(outstation)
    await probe.start()
    try:
        yield probe
    finally:
        await probe.stop()


StationFactory = Callable[..., Awaitable[Iec104Outstation]]
ProbeFactory = Callable[..., Awaitable[C104Probe]]


@pytest.fixture
async def stations(no_leaked_tasks: None) -> AsyncIterator[StationFactory]:
    """Start outstations of ``ref615`` with any config on free ports; closed afterwards."""
    started: list[Iec104Outstation] = []

    async def start(config: LabConfig, **kwargs: Any) -> Iec104Outstation:
        o = Iec104Outstation(config, "ref615", host="127.0.0.1", port=0, **kwargs)
        await o.start()
        started.append(o)
        return o

    try:
        yield start
    finally:
        for o in started:
            await o.close()


@pytest.fixture
async def probes(stations: StationFactory) -> AsyncIterator[ProbeFactory]:
    """Start c104 probes on an outstation; stopped (before the stations close) afterwards."""
    started: list[C104Probe] = []

    async def start(outstation: Iec104Outstation, *, wait_open: bool = True, **kwargs: Any) -> C104Probe:
        probe = C104Probe(outstation, **kwargs)
        started.append(probe)
        if wait_open:
            await probe.start()
        return probe

    try:
        yield start
    finally:
        for p in started:
            await p.stop()


# ---------------------------------------------------------------------------------------
# raw client on our own codec


class RawClient:
    """A controlling station written frame by frame, for protocol-level checks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.frames: list[Frame] = []
        self.vs = 0
        self.vr = 0

    @classmethod
    async def connect(cls, port: int, *, start: bool = True) -> "RawClient":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if start:
            client.send(UFrame(UFunction.STARTDT_ACT))
            assert await client.recv() == UFrame(UFunction.STARTDT_CON)
        return client

    def send(self, frame: Frame) -> None:
        self.writer.write(encode_frame(frame))

    def send_asdu(self, asdu: Asdu | bytes) -> None:
        raw = asdu if isinstance(asdu, bytes) else encode_asdu(asdu)
        self.send(IFrame(self.vs, self.vr, raw))
        self.vs = (self.vs + 1) % SEQ_MODULO

    def ack(self) -> None:
        self.send(SFrame(self.vr))

    async def recv(self, timeout_s: float = 2.0) -> Frame:
        async with asyncio.timeout(timeout_s):
            while not self.frames:
                data = await self.reader.read(4096)
                if not data:
                    raise ConnectionResetError("closed by outstation")
                self.frames.extend(self.decoder.feed(data))
        frame = self.frames.pop(0)
        if isinstance(frame, IFrame):
            self.vr = (self.vr + 1) % SEQ_MODULO
        return frame

    async def recv_asdu(self, timeout_s: float = 2.0) -> Asdu:
        while True:
            frame = await self.recv(timeout_s)
            if isinstance(frame, IFrame):
                return decode_asdu(frame.asdu)

    async def silent(self, for_s: float) -> bool:
        """True when nothing arrives for ``for_s`` seconds."""
        try:
            frame = await self.recv(for_s)
        except TimeoutError:
            return True
        self.frames.insert(0, frame)
        return False

    async def closed_by_peer(self, timeout_s: float = 2.0) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                while await self.reader.read(4096):
                    pass
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@pytest.fixture
async def raw_client(outstation: Iec104Outstation) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(outstation.port)
    try:
        yield client
    finally:
        await client.close()


RawConnect = Callable[..., Awaitable[RawClient]]


@pytest.fixture
async def raw_connect() -> AsyncIterator[RawConnect]:
    """Open more raw clients to any outstation; all closed afterwards."""
    clients: list[RawClient] = []

    async def connect(outstation: Iec104Outstation, *, start: bool = True) -> RawClient:
        client = await RawClient.connect(outstation.port, start=start)
        clients.append(client)
        return client

    try:
        yield connect
    finally:
        for c in clients:
            await c.close()
