"""IEC 60870-5-104 client adapter on the asyncio event loop (``iec104_engine: asyncio``).

Why a second engine: the c104 adapter gets one Python call per information object from
2-3 native threads per station; with ten stations the GIL handover between those threads
and the event loop caps the gateway near 10k updates/s and c104's deadlock detector can
abort the process (docs/scale.md). Here there are no threads: each connection is an
:class:`asyncio.Protocol`, every TCP read is split into frames and its monitor ASDUs are
decoded in bulk with the project's own codec (:func:`~.codec.decode_monitor`, one
precompiled struct per type), and the resulting :class:`PointUpdate`s enter the event
queue as one batch per read.

Protocol duties done here (IEC 60870-5-104 5.x): STARTDT on connect and a general
interrogation after it; receive sequence check; S-frame after ``w`` unacknowledged I-frames
or ``t2``; TESTFR act after ``t3`` idle and closing on ``t1`` without TESTFR con or without
acknowledgement of our own I-frames; at most ``k`` of our own I-frames unacknowledged (the
rest waits). Garbage on the link (bad framing, a receive sequence gap) is counted, logged
and closes the connection; the supervisor reconnects with the c104 adapter's backoff.

Clock synchronisation (C_CS_NA_1) on connect, before the GI, and periodically when the
device's ``clock_sync`` asks for it; a negative ACTCON is counted and logged.

Integrated totals (M_IT_NA_1/M_IT_TB_1) by counter interrogation (C_CI_NA_1: general
request, no freeze) after the GI on connect, periodically and on demand.

Test command with time tag (C_TS_TA_1) on demand (:meth:`AsyncIec104Adapter.send_test_command`).

STOPDT/STARTDT on demand (``stop_data``/``start_data``) and redundancy: a device with
``redundant_hosts`` is served by one outstation at a time and switched over at once on a
loss (or on request, after STOPDT), GI after the switch, nothing stored twice.

Not done: redundancy groups with standby connections kept open, group interrogations, counter
freeze and group requests, SQ=1 command ASDUs, files.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

from gateway.config import Device, Direction, Point, iec104_address
from gateway.errors import CommandInvalid, CommandRejected, CommandTimeout, DeviceError, LinkError
from gateway.points import CommandRequest, PointUpdate, Quality, UpdateCause, now
from gateway.protocols.base import LinkState
from gateway.protocols.iec104.codec import (
    MONITOR_TYPE_IDS,
    SEQ_MODULO,
    Asdu,
    AsduError,
    BinaryCounterReading,
    ClockSync,
    Cot,
    CounterInterrogation,
    Cp56Time,
    DoubleCommand,
    Element,
    FloatSetpoint,
    FrameDecoder,
    IFrame,
    InfoObject,
    Interrogation,
    NormalizedSetpoint,
    ReadCommand,
    ScaledSetpoint,
    SFrame,
    SingleCommand,
    TestCommand,
    TypeId,
    UFrame,
    UFunction,
    decode_asdu,
    decode_cp56,
    decode_monitor,
    encode_asdu,
    encode_frame,
)
from gateway.protocols.iec104.common import (
    CAUSE_OF_COT,
    COMMAND_VALUE_LEN,
    COT_ACTCON,
    COT_ACTTERM,
    COT_UNKNOWN,
    CommandKind,
    Confirmation,
    Event,
    EventBuffer,
    Iec104AdapterBase,
    backoff_delay,
    command_reply,
    command_value,
    monitor_asdu_refusal,
)
from gateway.protocols.iec104.kinds import KIND_OF_TYPE, ValueKind, kind_of
from gateway.protocols.iec104.tls import TLS_CLOSED_AT_ONCE as _TLS_CLOSED_AT_ONCE
from gateway.protocols.iec104.tls import _tls_failure, client_tls_context

__all__ = ["AsyncIec104Adapter"]

#: the codec's command element for each kind of checked command value
_ELEMENTS: dict[CommandKind, Callable[[Any, bool], Element]] = {
    "double": DoubleCommand,
    "single": SingleCommand,
    "scaled": ScaledSetpoint,
    "normalized": NormalizedSetpoint,
    "float": FloatSetpoint,
}

log = logging.getLogger(__name__)


_SEQ_MASK: Final = SEQ_MODULO - 1
_STARTDT_ACT: Final = encode_frame(UFrame(UFunction.STARTDT_ACT))
_STOPDT_ACT: Final = encode_frame(UFrame(UFunction.STOPDT_ACT))
_TESTFR_ACT: Final = encode_frame(UFrame(UFunction.TESTFR_ACT))
_TESTFR_CON: Final = encode_frame(UFrame(UFunction.TESTFR_CON))
_GI_QOI: Final = 20
_COUNTER_TYPES: Final = frozenset({TypeId.M_IT_NA_1, TypeId.M_IT_TB_1})
_NO_POINTS: Final[dict[int, tuple[str, ValueKind, float, float]]] = {}
_WARN_FIRST: Final = 10  # log the first N of a repeated anomaly, then only count it


class _EventQueue(EventBuffer):
    """The adapter's bounded event stream, loop-only: one extend and one wake-up per read."""

    def put_many(self, items: list[Event]) -> None:
        queued = len(self._items)
        excess = queued + len(items) - self._maxlen
        if excess > 0:
            self._drop(excess)
            if excess > queued:  # more new ones than fit: the oldest of them go too
                items = items[excess - queued :]
        self._items.extend(items)
        self._event.set()

    def put(self, item: Event) -> None:
        self.put_many([item])

    async def get_batch(self, limit: int = 4096) -> list[Event]:
        """Up to ``limit`` events; [] only when woken with nothing to give (close)."""
        items = self._items
        if not items:
            self._event.clear()
            await self._event.wait()
            if not items:
                return []
        if len(items) <= limit:
            batch = list(items)
            items.clear()
            return batch
        return [items.popleft() for _ in range(limit)]


_CLOSED_BY_DEVICE: Final = "connection closed by the device"


class _Link(asyncio.Protocol):
    """One TCP (or TLS) connection to the device: framing, sequence numbers, windows, timers.

    Bytes in are split and checked here; monitor and confirmation ASDUs go to the adapter in
    one call per read. Timers are one loop timer armed at the nearest deadline (t1 of our
    oldest unacknowledged I-frame or TESTFR, t2 of the oldest unacknowledged received
    I-frame, t3 idle), not a polling task.
    """

    def __init__(self, adapter: AsyncIec104Adapter) -> None:
        dev = adapter.device
        self._adapter = adapter
        self._name = dev.name
        self._loop = asyncio.get_running_loop()
        self._t1 = float(dev.timers.t1_s)
        self._t2 = float(dev.timers.t2_s)
        self._t3 = float(dev.timers.t3_s)
        self._k = dev.timers.k
        self._w = dev.timers.w
        self._counters = adapter._counters
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.started: asyncio.Future[None] = self._loop.create_future()
        self.closed: asyncio.Future[str] = self._loop.create_future()
        #: data transfer on (STARTDT confirmed, no STOPDT since): I-frames may go both ways
        self.data_on = False
        self._u_waiters: dict[UFunction, asyncio.Future[None]] = {}  # confirmation awaited -> waiter
        self._reason = ""
        self._got_bytes = False  # any octet from the device on this connection
        self._vs = 0  # our next send sequence number
        self._vr = 0  # the device's next expected send sequence number
        self._acked = 0  # our oldest I-frame the device has not acknowledged
        self._sent: collections.deque[tuple[int, float]] = collections.deque()  # (seq, sent at)
        self._waiting: collections.deque[bytes] = collections.deque()  # ASDUs held back by k
        self._unacked_in = 0
        self._first_unacked_at = 0.0
        self._last_rx = self._loop.time()
        self._testfr_at: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._last_rx = self._loop.time()
        self._arm(self._last_rx + self._t3)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        reason = self._reason or (f"connection lost: {exc}" if exc else _CLOSED_BY_DEVICE)
        if not self._got_bytes and self._adapter._tls is not None and self._reason in ("", _CLOSED_BY_DEVICE):
            # TLS 1.3: our handshake ends before the device has checked our certificate; a
            # device that refuses it closes at once, often without an alert (as the TLS
            # bridge of the c104 engine reports it)
            reason = _tls_failure(exc) if exc is not None else _TLS_CLOSED_AT_ONCE
        elif not self._reason:  # closed by the device or the network, in the middle of a frame?
            reason += self._incomplete()
        if not self.started.done():
            self.started.set_exception(LinkError(self._name, reason))
        for waiter in self._u_waiters.values():
            if not waiter.done():
                waiter.set_exception(LinkError(self._name, reason))
        if not self.closed.done():
            self.closed.set_result(reason)

    def eof_received(self) -> bool | None:
        self._reason = self._reason or _CLOSED_BY_DEVICE
        return None  # close our side too

    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:  # a bug here must cost the link, never the gateway
            self._counters["internal_errors"] += 1
            log.exception("%s: error handling received data", self._name)
            self._fail(f"internal error: {exc!r}")

    def _receive(self, data: bytes) -> None:
        self._got_bytes = True
        frames, error = self._decoder.feed_batch(data)
        counters = self._counters
        counters["reads"] += 1
        self._last_rx = self._loop.time()
        asdus: list[bytes] = []
        problem = ""
        vr = self._vr
        for f in frames:
            if type(f) is IFrame:
                if f.send_seq != vr:
                    counters["sequence_errors"] += 1
                    problem = f"I-frame N(S) {f.send_seq}, expected {vr}"
                    break
                vr = (vr + 1) & _SEQ_MASK
                if f.recv_seq != self._acked:  # rare: the device acknowledges our I-frames
                    self._vr = vr  # an I-frame released by the ack carries the current N(R)
                    if not self._ack_ours(f.recv_seq):
                        counters["ack_errors"] += 1
                        problem = f"N(R) {f.recv_seq} acknowledges frames never sent"
                        break
                asdus.append(f.asdu)
            elif type(f) is SFrame:
                counters["s_frames_in"] += 1
                if not self._ack_ours(f.recv_seq):
                    counters["ack_errors"] += 1
                    problem = f"S-frame N(R) {f.recv_seq} acknowledges frames never sent"
                    break
            else:
                assert isinstance(f, UFrame)
                self._on_u(f.function)
        self._vr = vr
        if asdus:
            n = len(asdus)
            counters["frames_in"] += n
            if not self._unacked_in:
                self._first_unacked_at = self._last_rx
                self._arm(self._last_rx + self._t2)
            self._unacked_in += n
            if self._unacked_in >= self._w or UFunction.STOPDT_CON in self._u_waiters:
                self._send_s()  # (a device confirms STOPDT only once its I-frames are acknowledged)
            if self.data_on:
                self._adapter._on_asdus(asdus)
            else:  # after STOPDT con: nothing may come, and a standby must not deliver values
                self._adapter._anomaly("frames_while_stopped", "%d I-frame(s) after STOPDT ignored", n)
        if error is not None:
            counters["garbled_frames"] += 1
            self._fail(f"garbled frame: {error}", warn=True)
        elif problem:
            self._fail(f"protocol error: {problem}", warn=True)

    # -- frames ----------------------------------------------------------------------------

    def _on_u(self, fn: UFunction) -> None:
        self._counters["u_frames_in"] += 1
        # a con counts only when we asked for it: an unsolicited STARTDT con must not turn data
        # transfer back on after our STOPDT (the device would then deliver as a standby)
        awaited = fn in self._u_waiters or (fn is UFunction.STARTDT_CON and not self.started.done())
        if fn in (UFunction.STARTDT_CON, UFunction.STOPDT_CON) and awaited:
            self.data_on = fn is UFunction.STARTDT_CON
            if not self.started.done():
                self.started.set_result(None)
            waiter = self._u_waiters.pop(fn, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif fn is UFunction.TESTFR_ACT:
            self._write(_TESTFR_CON)
        elif fn is UFunction.TESTFR_CON:
            self._testfr_at = None
            self._arm(self._last_rx + self._t3)  # t3 again from now: the timer was left at the TESTFR's t1
        else:  # counted: a device repeating them must not fill the log
            self._adapter._anomaly("unexpected_u_frames", "unexpected %s from the device ignored", fn.name)

    def _ack_ours(self, nr: int) -> bool:
        """Take the device's N(R); False when it acknowledges more than we sent."""
        outstanding = (self._vs - self._acked) & _SEQ_MASK
        if (nr - self._acked) & _SEQ_MASK > outstanding:
            return False
        self._acked = nr
        sent = self._sent
        while sent and sent[0][0] != nr:
            sent.popleft()
        while self._waiting and self._window_open():
            self._write_i(self._waiting.popleft())
        return True

    def _window_open(self) -> bool:
        return (self._vs - self._acked) & _SEQ_MASK < self._k

    def send_asdu(self, asdu: bytes) -> None:
        """Send now, or as soon as the device's acknowledgements open the k window."""
        if self.transport is None or self.transport.is_closing():
            raise LinkError(self._name, "link is down")
        if not self.data_on:
            raise LinkError(self._name, "data transfer stopped (STOPDT)")
        if self._waiting or not self._window_open():
            self._counters["k_window_waits"] += 1
            self._waiting.append(asdu)
        else:
            self._write_i(asdu)

    def _write_i(self, asdu: bytes) -> None:
        at = self._loop.time()
        if not self._sent:
            self._arm(at + self._t1)
        self._sent.append((self._vs, at))
        self._write(encode_frame(IFrame(self._vs, self._vr, asdu)))
        self._vs = (self._vs + 1) & _SEQ_MASK
        self._unacked_in = 0  # N(R) in the I-frame acknowledges what we received
        self._counters["frames_out"] += 1

    def _send_s(self) -> None:
        self._unacked_in = 0
        self._counters["s_frames_out"] += 1
        self._write(encode_frame(SFrame(self._vr)))

    def send_u(self, frame: bytes) -> None:
        self._write(frame)

    async def request_u(self, function: UFunction) -> None:
        """STARTDT or STOPDT act, confirmed within t1; otherwise the link is closed (as any
        unanswered U-frame) and :class:`LinkError` raised."""
        con = UFunction.STARTDT_CON if function is UFunction.STARTDT_ACT else UFunction.STOPDT_CON
        if self.transport is None or self.transport.is_closing():
            raise LinkError(self._name, "link is down")
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._u_waiters[con] = waiter
        if con is UFunction.STOPDT_CON and self._unacked_in:
            self._send_s()  # acknowledge what came, so the device can confirm at once
        self._write(encode_frame(UFrame(function)))
        try:
            async with asyncio.timeout(self._t1):
                await waiter
        except TimeoutError:
            self._counters["t1_timeouts"] += 1
            self._fail(f"t1 = {self._t1:g} s expired: no {con.name}", warn=True)
            raise LinkError(self._name, f"no {con.name} within t1 = {self._t1:g} s") from None
        finally:
            if self._u_waiters.get(con) is waiter:
                del self._u_waiters[con]

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, reason: str, *, warn: bool = False) -> None:
        """Close the link for ``reason`` (what the supervisor reports as link-down reason)."""
        if self.transport is None:
            return
        if warn:
            log.warning("%s: %s; closing the link", self._name, reason)
        self._reason = self._reason or reason
        self.transport.abort()

    def close(self) -> None:
        self._fail("closed")

    def close_for(self, reason: str) -> None:
        """Close on purpose; ``reason`` is what :attr:`closed` then says."""
        self._fail(reason)

    def _incomplete(self) -> str:
        """The part of a close reason that says a frame was cut short.

        Why: a truncated APDU cannot be told from a slow one until more octets come; the
        device's next frames are then swallowed into it (a TESTFR con among them), so what
        closes the link is t1 or the device. Saying that octets of an unfinished APDU were
        pending when it closed, and counting it (``incomplete_frames``), names the real cause.
        """
        n = self._decoder.buffered
        if not n:
            return ""
        self._counters["incomplete_frames"] += 1
        return f" ({n} octets of an incomplete APDU pending)"

    # -- timers ----------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than ``when`` (loop time)."""
        if self._timer is not None:
            if self._timer.when() <= when:
                return
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None:
            return
        t = self._loop.time()
        if self._sent and t - self._sent[0][1] >= self._t1:
            self._counters["t1_timeouts"] += 1
            why = f"t1 = {self._t1:g} s expired: I-frame {self._sent[0][0]} not acknowledged{self._incomplete()}"
            self._fail(why, warn=True)
            return
        if self._testfr_at is not None and t - self._testfr_at >= self._t1:
            self._counters["t1_timeouts"] += 1
            self._fail(f"t1 = {self._t1:g} s expired: no TESTFR con{self._incomplete()}", warn=True)
            return
        if self._unacked_in and t - self._first_unacked_at >= self._t2:
            self._send_s()
        if self._testfr_at is None and t - self._last_rx >= self._t3:
            self._counters["testfr_sent"] += 1
            self._testfr_at = t
            self._write(_TESTFR_ACT)
        deadlines = []
        if self._sent:
            deadlines.append(self._sent[0][1] + self._t1)
        if self._testfr_at is not None:
            deadlines.append(self._testfr_at + self._t1)
        else:
            deadlines.append(self._last_rx + self._t3)
        if self._unacked_in:
            deadlines.append(self._first_unacked_at + self._t2)
        self._arm(max(min(deadlines), t + 0.001))


class AsyncIec104Adapter(Iec104AdapterBase):
    """One IEC 104 connection to one device/station, driven by the event loop alone."""

    def __init__(self, device: Device, points: tuple[Point, ...], *, queue_max: int = 200_000) -> None:
        super().__init__(device, points)
        self._queue_max = queue_max
        # ca -> ioa -> (name, value kind, scale, offset): everything the hot loop needs per
        # object, looked up per ASDU (ca) and per object (ioa) without building a key tuple.
        # Keyed by address and kind, not type: a value comes in any type of its kind (kinds.py)
        self._monitor: dict[int, dict[int, tuple[str, ValueKind, float, float]]] = {
            device.common_address: {
                iec104_address(p).ioa: (p.name, kind_of(iec104_address(p).type), p.scale, p.offset)
                for p in points
                if p.direction is Direction.MONITOR and iec104_address(p).kind != "integrated"
            }
        }
        # integrated totals: ioa -> (name, scale, offset); they come by counter interrogation
        self._counter_points: dict[int, tuple[str, float, float]] = {
            iec104_address(p).ioa: (p.name, p.scale, p.offset)
            for p in points
            if p.direction is Direction.MONITOR and iec104_address(p).kind == "integrated"
        }
        self._monitor_ioa = {p.name: iec104_address(p).ioa for p in points if p.direction is Direction.MONITOR}
        self._control = {p.name: p for p in points if p.direction is Direction.CONTROL}
        self._state = LinkState.CLOSED
        self._rng = random.Random()
        self._counters: collections.Counter[str] = collections.Counter()
        self._buffer: _EventQueue | None = None
        self._tls: ssl.SSLContext | None = None
        self._link: _Link | None = None
        self._up = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._gi_task: asyncio.Task[None] | None = None
        self._clock_task: asyncio.Task[None] | None = None
        self._ci_task: asyncio.Task[None] | None = None
        # redundancy: the outstations of the station, tried in turn; the active one's index
        self._endpoints: tuple[tuple[str, int], ...] = (
            (device.host, device.port),
            *((e.host, e.port) for e in device.redundant_hosts),
        )
        self._active = 0
        self._redundant = len(self._endpoints) > 1
        self._switch_waiter: asyncio.Future[None] | None = None  # a switch_over() awaiting the new link
        # nothing stored twice across a switch-over (see _once)
        self._last_values: dict[str, tuple[object, Quality]] = {}
        self._switch_window = False
        self._switch_window_until = 0.0
        self._gi_ended = False
        # test commands awaiting ACTCON: TSC -> future of the confirmation's receive time
        self._tests: dict[int, asyncio.Future[float]] = {}
        self._tsc = 0
        # counter interrogations awaiting their end: True at ACTTERM, False when refused
        self._ci_waiters: list[asyncio.Future[bool]] = []
        # commands: ioa -> (future of the device's answer, whether a select is awaited)
        self._pending: dict[int, tuple[asyncio.Future[Confirmation], bool]] = {}
        self._terms: dict[int, asyncio.Future[None]] = {}  # executed commands awaiting ACTTERM
        self._gi_waiters: list[asyncio.Future[bool]] = []
        # clock synchronisations sent and not yet confirmed: (sent at, waiter or None)
        # (bounded: a device that never answers must not grow it; FIFO, as the device answers)
        self._clock_pending: collections.deque[tuple[float, asyncio.Future[float] | None]] = collections.deque(
            maxlen=16
        )
        self._readers: dict[str, list[asyncio.Future[PointUpdate]]] = {}
        self._quality_cache: dict[int, Quality] = {0: Quality.GOOD}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._supervisor is not None:
            return
        # TLS first: a bad certificate file is a ConfigError before anything runs.
        self._tls = client_tls_context(self.device) if self.device.tls.enabled else None
        self._buffer = _EventQueue(self._queue_max)
        self._closing = False
        self._supervisor = asyncio.create_task(self._supervise(), name=f"iec104-aio:{self.device.name}")
        if self.device.gi_period_s > 0:
            self._gi_task = asyncio.create_task(self._periodic_gi(), name=f"iec104-aio-gi:{self.device.name}")
        if self.device.counter_interrogation.period_s > 0 and self._counter_points:
            self._ci_task = asyncio.create_task(
                self._periodic_counter_interrogation(), name=f"iec104-aio-ci:{self.device.name}"
            )
        if self.device.clock_sync.period_s > 0:
            self._clock_task = asyncio.create_task(
                self._periodic_clock_sync(), name=f"iec104-aio-cs:{self.device.name}"
            )

    async def close(self) -> None:
        self._closing = True
        link = self._link
        for task in (self._gi_task, self._clock_task, self._ci_task, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._gi_task = self._clock_task = self._ci_task = None
        self._link = None
        if link is not None:
            link.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await link.closed  # connection_lost has run: the transport is gone
        self._up.clear()
        self._fail_pending("adapter closed")
        self._set_state(LinkState.CLOSED, "closed")
        if self._buffer is not None:
            self._buffer.wake()

    # ----------------------------------------------------------------- receiving

    def _on_asdus(self, asdus: list[bytes]) -> None:
        """Every ASDU of one TCP read: monitor values into the queue as one batch."""
        rcv = now()
        updates: list[Event] = []
        append = updates.append
        monitor = self._monitor
        qualities = self._quality_cache
        causes = CAUSE_OF_COT
        values = 0
        for raw in asdus:
            if raw[0] not in MONITOR_TYPE_IDS:
                self._on_other_asdu(raw)
                continue
            try:
                m = decode_monitor(raw)
            except ValueError as exc:  # AsduError, or a CP56Time2a year the codec refuses
                self._anomaly("garbled_asdus", "garbled ASDU %s: %s", raw[:24].hex(" "), exc)
                continue
            refusal = monitor_asdu_refusal(m.cot, m.negative, m.test)
            if refusal is not None:
                self._anomaly(
                    refusal, "ASDU type %d with cot %d%s%s refused: %s", m.type_id, m.cot,
                    " P/N=1" if m.negative else "", " T=1" if m.test else "", raw[:24].hex(" "),
                )  # fmt: skip
                continue
            cause = causes[m.cot]
            ca = m.common_address
            station = monitor.get(ca, _NO_POINTS)
            sent_kind = KIND_OF_TYPE[m.type_id]
            for ioa, value, bits, ts in m.objects:
                info = station.get(ioa)
                if info is None:
                    if station is not _NO_POINTS and ioa in self._counter_points:
                        self._anomaly("type_mismatch", "type %d for counter point at ioa %d; refused", m.type_id, ioa)
                    else:
                        self._anomaly("unknown_points", "device sent unconfigured ca %d ioa %d; ignored", ca, ioa)
                    continue
                name, kind, scale, offset = info
                if kind is not sent_kind:
                    self._anomaly(
                        "type_mismatch",
                        "device sent type %d (%s) for %s (ioa %d), configured as %s; refused",
                        m.type_id,
                        sent_kind.name.lower(),
                        name,
                        ioa,
                        kind.name.lower(),
                    )
                    continue
                quality = qualities.get(bits)
                if quality is None:
                    quality = qualities[bits] = Quality(bits)
                if kind is ValueKind.DOUBLE:
                    v: float | int | bool = int(value)
                elif kind is ValueKind.SINGLE:
                    v = bool(value)
                else:
                    v = value * scale + offset  # int * float is a float
                if ts is None:  # untagged type (e.g. a GI answer): the receive time stands in
                    append(PointUpdate(name, v, quality, rcv, rcv, cause, time_substituted=True))
                else:
                    append(PointUpdate(name, v, quality, ts, rcv, cause))
                values += 1
        if self._redundant:
            updates = self._once(updates)
            values = len(updates)
            if self._switch_window and (self._gi_ended or time.monotonic() > self._switch_window_until):
                self._switch_window = False  # the read that ended the GI is through: window closed
        if updates:
            self._counters["values"] += values
            assert self._buffer is not None
            self._buffer.put_many(updates)
            if self._readers:
                for upd in updates:
                    assert isinstance(upd, PointUpdate)
                    for fut in self._readers.pop(upd.point, ()):
                        if not fut.done():
                            fut.set_result(upd)

    def _on_other_asdu(self, raw: bytes) -> None:
        """Confirmations of our commands, interrogations and reads; anything else is counted."""
        if len(raw) < 6:
            self._anomaly("garbled_asdus", "ASDU of %d octets: %s", len(raw), raw.hex(" "))
            return
        type_id, cot, negative = raw[0], raw[2] & 0x3F, bool(raw[2] & 0x40)
        if type_id in COMMAND_VALUE_LEN:
            conf = command_reply(raw)
            if conf is None:
                self._anomaly("garbled_asdus", "short command confirmation %s", raw.hex(" "))
            else:
                self._on_confirmation(conf)
        elif type_id == TypeId.C_IC_NA_1:
            if cot == COT_ACTCON or cot in COT_UNKNOWN:
                ok = not negative and cot == COT_ACTCON
                if not ok:
                    self._counters["negative_confirmations"] += 1
                waiters, self._gi_waiters = self._gi_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(ok)
            elif cot == COT_ACTTERM:
                self._counters["interrogations_done"] += 1
                self._gi_ended = True  # ends a switch-over's duplicate window (after this read)
        elif type_id in _COUNTER_TYPES:
            self._on_counters(raw)
        elif type_id == TypeId.C_CI_NA_1:
            if cot == COT_ACTCON and not negative:
                self._counters["counter_interrogations_confirmed"] += 1
            elif cot in (COT_ACTTERM, COT_ACTCON) or cot in COT_UNKNOWN:
                ok = cot == COT_ACTTERM and not negative
                if ok:
                    self._counters["counter_interrogations_done"] += 1
                else:
                    self._counters["negative_confirmations"] += 1
                    log.warning("%s: counter interrogation refused by the device (cot %d)", self.device.name, cot)
                waiters, self._ci_waiters = self._ci_waiters, []
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(ok)
        elif type_id == TypeId.C_TS_TA_1:
            if cot == COT_ACTCON or cot in COT_UNKNOWN:
                tsc = raw[9] | raw[10] << 8 if len(raw) >= 11 else -1
                waiter = self._tests.pop(tsc, None)
                if waiter is None:
                    self._anomaly("unexpected_confirmations", "test command ACTCON never asked for: %s", raw.hex(" "))
                elif negative or cot != COT_ACTCON:
                    self._counters["negative_confirmations"] += 1
                    reason = COT_UNKNOWN.get(cot, "negative confirmation")
                    if not waiter.done():
                        waiter.set_exception(DeviceError(self.device.name, f"test command refused: {reason}"))
                elif not waiter.done():
                    self._counters["test_commands_confirmed"] += 1
                    waiter.set_result(now())
        elif type_id == TypeId.C_CS_NA_1:
            if cot == COT_ACTCON or cot in COT_UNKNOWN:
                self._on_clock_confirmation(raw, cot, negative)
        elif type_id == TypeId.C_RD_NA_1:
            if negative:
                self._counters["negative_confirmations"] += 1
                ioa = raw[6] | raw[7] << 8 | raw[8] << 16 if len(raw) >= 9 else -1
                reason = COT_UNKNOWN.get(cot, f"cot {cot}")
                for name, point_ioa in self._monitor_ioa.items():
                    if point_ioa == ioa:
                        for reader in self._readers.pop(name, ()):
                            if not reader.done():
                                reader.set_exception(DeviceError(self.device.name, f"read of {name} refused: {reason}"))
        elif type_id == TypeId.M_EI_NA_1:
            log.info("%s: device reports end of initialisation", self.device.name)
        else:
            self._anomaly("unknown_types", "ASDU type %d (cot %d) not handled; ignored", type_id, cot)

    def _once(self, updates: list[Event]) -> list[Event]:
        """Redundant devices: nothing stored twice across a switch-over.

        The last value and quality of every point is kept; from a switch-over (the new
        outstation's GI answering with what the old one had already sent) until that GI's
        ACTTERM, an update equal to the last one of its point is dropped (counted
        ``duplicates_dropped``). Answers to a read always go through. The window is only
        opened when the switch went without a link-down (else the core marked every point
        stale, and the GI must restore them all).
        """
        last = self._last_values
        if not self._switch_window:
            for u in updates:
                assert isinstance(u, PointUpdate)
                last[u.point] = (u.value, u.quality)
            return updates
        kept: list[Event] = []
        for u in updates:
            assert isinstance(u, PointUpdate)
            key = (u.value, u.quality)
            if u.cause is not UpdateCause.REQUESTED and last.get(u.point) == key:
                self._counters["duplicates_dropped"] += 1
                continue
            last[u.point] = key
            kept.append(u)
        return kept

    def _on_counters(self, raw: bytes) -> None:
        """Integrated totals (M_IT_NA_1 / M_IT_TB_1): the counter reading as the value, IV as
        invalid and CY (carry: the counter ran over its range) as overflow; CA (adjusted since
        the last reading) leaves the value good and is counted. Rare enough (one ASDU per
        counter interrogation) for the general decoder."""
        try:
            asdu = decode_asdu(raw)
        except AsduError as exc:
            self._anomaly("garbled_asdus", "garbled ASDU %s: %s", raw[:24].hex(" "), exc)
            return
        rcv = now()
        cause = CAUSE_OF_COT[asdu.cot]
        ca = asdu.common_address
        mine = ca == self.device.common_address
        updates: list[Event] = []
        for obj in asdu.objects:
            info = self._counter_points.get(obj.ioa) if mine else None
            if info is None:
                if mine and obj.ioa in self._monitor.get(ca, _NO_POINTS):
                    self._anomaly(
                        "type_mismatch", "integrated total for ca %d ioa %d, not a counter point", ca, obj.ioa
                    )
                else:
                    self._anomaly("unknown_points", "device sent unconfigured ca %d ioa %d; ignored", ca, obj.ioa)
                continue
            bcr = obj.element
            assert isinstance(bcr, BinaryCounterReading)  # the type id decides the element class
            quality = Quality.GOOD
            if bcr.invalid:
                quality |= Quality.INVALID
            if bcr.carry:
                quality |= Quality.OVERFLOW
            if bcr.adjusted:
                self._counters["counters_adjusted"] += 1
            name, scale, offset = info
            value = bcr.value * scale + offset
            if obj.time is None:  # M_IT_NA_1 (the counter interrogation's answer): receive time, flagged
                updates.append(PointUpdate(name, value, quality, rcv, rcv, cause, time_substituted=True))
            else:
                updates.append(PointUpdate(name, value, quality, obj.time.timestamp(), rcv, cause))
        if self._redundant:
            updates = self._once(updates)
        if updates:
            self._counters["values"] += len(updates)
            assert self._buffer is not None
            self._buffer.put_many(updates)

    def _on_clock_confirmation(self, raw: bytes, cot: int, negative: bool) -> None:
        """ACTCON of a clock synchronisation: the offset of the device's clock, or a refusal."""
        if not self._clock_pending:
            self._anomaly("unexpected_confirmations", "clock synchronisation ACTCON never asked for: %s", raw.hex(" "))
            return
        sent_at, waiter = self._clock_pending.popleft()
        received_at = now()
        name = self.device.name
        if negative or cot != COT_ACTCON:
            self._counters["clock_sync_refused"] += 1
            reason = COT_UNKNOWN.get(cot, "negative confirmation")
            log.warning("%s: clock synchronisation refused by the device (%s)", name, reason)
            if waiter is not None and not waiter.done():
                waiter.set_exception(DeviceError(name, f"clock synchronisation refused: {reason}"))
            return
        try:
            device_time = decode_cp56(raw[9:16]).timestamp()
        except ValueError:  # AsduError: the ACTCON carries no readable time
            device_time = received_at
        # the device's clock against the midpoint of our round trip: ~0 when it took our time
        offset_ms = round((device_time - (sent_at + received_at) / 2) * 1000)
        self._counters["clock_syncs"] += 1
        self._counters["clock_offset_ms"] = offset_ms
        log.info("%s: clock synchronised (device clock %+d ms from ours)", name, offset_ms)
        if waiter is not None and not waiter.done():
            waiter.set_result(device_time)

    def _on_confirmation(self, conf: Confirmation) -> None:
        if conf.cot == COT_ACTTERM:
            self._counters["actterm"] += 1
            term = self._terms.pop(conf.ioa, None)
            if term is not None and not term.done():
                term.set_result(None)
            return
        entry = self._pending.get(conf.ioa)
        if entry is None:
            return
        fut, select = entry
        if fut.done():
            return
        if conf.negative:
            self._counters["negative_confirmations"] += 1
            fut.set_result(conf)
        elif conf.cot == COT_ACTCON and conf.select == select:
            fut.set_result(conf)

    def _anomaly(self, counter: str, msg: str, *args: object) -> None:
        """Count something the device should not send; log the first few of each kind."""
        self._counters[counter] += 1
        if self._counters[counter] <= _WARN_FIRST:
            log.warning("%s: " + msg, self.device.name, *args)

    # ----------------------------------------------------------------- link supervision

    @property
    def endpoint(self) -> tuple[str, int]:
        """The outstation (host, port) the adapter talks to, or tries next."""
        return self._endpoints[self._active]

    async def _connect(self, host: str, port: int) -> _Link:
        """TCP (and TLS) within t0, then STARTDT confirmed within t1."""
        dev = self.device
        loop = asyncio.get_running_loop()
        link = _Link(self)
        t0 = float(dev.timers.t0_s)
        try:
            async with asyncio.timeout(t0):
                if self._tls is not None:
                    await loop.create_connection(
                        lambda: link,
                        host,
                        port,
                        ssl=self._tls,
                        server_hostname=host,
                        ssl_handshake_timeout=t0,
                    )
                else:
                    await loop.create_connection(lambda: link, host, port)
        except (OSError, TimeoutError) as exc:
            if self._tls is not None:
                raise LinkError(dev.name, _tls_failure(exc)) from exc
            if isinstance(exc, TimeoutError):
                raise LinkError(dev.name, f"no link within t0 = {dev.timers.t0_s} s") from exc
            raise LinkError(dev.name, f"connect failed: {exc.strerror or exc}") from exc
        link.send_u(_STARTDT_ACT)
        try:
            async with asyncio.timeout(float(dev.timers.t1_s)):
                await link.started
        except TimeoutError:
            self._counters["t1_timeouts"] += 1  # STARTDT act is supervised by t1 like any U-frame
            link.close()
            raise LinkError(dev.name, f"no STARTDT con within t1 = {dev.timers.t1_s} s") from None
        except BaseException:
            link.close()
            raise
        return link

    async def _supervise(self) -> None:
        """Connect, run, and after a loss reconnect with backoff; with redundant outstations
        switch to the next one at once instead (state ``connecting``, not ``down``, so the
        core keeps the values), and only report ``down`` when that switch fails too."""
        dev = self.device
        attempt = 0
        switching = ""  # why the next connect is an immediate switch-over ("" = it is not)
        # a pair that accepts and drops at once must not be switched back and forth without
        # pause: an unplanned switch within this long of the last one goes through the backoff
        flap_s = max(5.0, dev.reconnect.initial_s * 4)
        last_switch = -math.inf
        while not self._closing:
            host, port = self._endpoints[self._active]
            if not switching:
                self._set_state(LinkState.CONNECTING, f"attempt {attempt + 1} to {host}:{port}")
            try:
                link = await self._connect(host, port)
            except LinkError as exc:
                reason = str(exc).removeprefix(f"{dev.name}: ")
                if switching:
                    reason = f"switch-over to {host}:{port} failed: {reason} (after: {switching})"
            else:
                self._link = link
                self._counters["connects"] += 1
                if switching:
                    self._counters["switch_overs"] += 1
                    self._switch_window, self._gi_ended = True, False  # until the GI below has ended
                    self._switch_window_until = time.monotonic() + dev.command_timeout_s + 1
                    log.warning("%s: switched over to %s:%d (%s)", dev.name, host, port, switching)
                self._up.set()
                self._set_state(LinkState.UP, f"{host}:{port}")
                up_at = time.monotonic()
                self._after_startdt()
                if self._switch_waiter is not None and not self._switch_waiter.done():
                    self._switch_waiter.set_result(None)
                try:
                    reason = await asyncio.shield(link.closed)
                finally:
                    self._up.clear()
                    self._link = None
                    if self._closing:  # close() takes it from here
                        link.close()
                if time.monotonic() - up_at > max(5.0, dev.reconnect.initial_s * 4):
                    attempt = 0
                planned = self._switch_waiter is not None
                if self._redundant and not self._closing and (planned or time.monotonic() - last_switch > flap_s):
                    last_switch = time.monotonic()
                    self._fail_pending(reason)
                    self._active = (self._active + 1) % len(self._endpoints)
                    switching = reason
                    nhost, nport = self._endpoints[self._active]
                    self._set_state(LinkState.CONNECTING, f"switching over to {nhost}:{nport} after: {reason}")
                    continue
            switching = ""
            self._fail_pending(reason)
            if self._switch_waiter is not None and not self._switch_waiter.done():
                self._switch_waiter.set_exception(LinkError(dev.name, reason))
            self._set_state(LinkState.DOWN, reason)
            self._last_values.clear()  # the core marks every point stale: the next GI restores all
            self._switch_window = False
            if self._redundant:  # the next attempt goes to the next outstation
                self._active = (self._active + 1) % len(self._endpoints)
            delay = backoff_delay(attempt, dev.reconnect.initial_s, dev.reconnect.max_s, self._rng)
            attempt += 1
            self._counters["reconnect_attempts"] += 1
            log.info("%s: reconnect in %.2f s", dev.name, delay)
            await asyncio.sleep(delay)

    def _after_startdt(self) -> None:
        """What follows data transfer coming on: clock, GI, counters (as configured)."""
        dev = self.device
        with contextlib.suppress(LinkError):  # lost again already: link.closed says why
            if dev.clock_sync.on_connect:  # first, so the GI's values carry the set clock
                self._send_clock_sync(None)
            self._send_interrogation()  # as c104's Init.INTERROGATION: all values after connect
            if self._counter_points and dev.counter_interrogation.on_connect:
                self._send_counter_interrogation()  # totals are not in the GI

    async def stop_data(self) -> None:
        """STOPDT: the device stops sending (values, confirmations) but the connection stays,
        supervised by TESTFR; commands and interrogations are refused until :meth:`start_data`.

        Returns at the device's STOPDT con (it gives it once our acknowledgements caught up);
        none within t1 closes the link (:class:`LinkError`). The link state stays ``up``.
        """
        link = self._require_link()
        await link.request_u(UFunction.STOPDT_ACT)
        self._counters["stopdt"] += 1
        log.info("%s: data transfer stopped (STOPDT con)", self.device.name)

    async def start_data(self) -> None:
        """STARTDT after :meth:`stop_data`; then what follows every STARTDT (GI and, as
        configured, clock synchronisation and counter interrogation). No-op when running."""
        link = self._link
        if link is None or not self._up.is_set():
            raise LinkError(self.device.name, f"link is {self._state.value}")
        if link.data_on:
            return
        await link.request_u(UFunction.STARTDT_ACT)
        self._counters["startdt"] += 1
        log.info("%s: data transfer started again (STARTDT con)", self.device.name)
        self._after_startdt()

    async def switch_over(self) -> None:
        """Planned switch to the next redundant outstation: STOPDT on the active one (so it
        knows it is standby and nothing is lost in flight), close, connect to the next, GI.

        Returns once the new link is up (bounded by t0 + t1 + 1 s) or raises
        :class:`LinkError` (also for a device without ``redundant_hosts``).
        """
        dev = self.device
        if not self._redundant:
            raise LinkError(dev.name, "no redundant outstation configured (redundant_hosts)")
        link = self._require_link()
        with contextlib.suppress(LinkError):  # the old one may refuse or die: we leave it anyway
            await link.request_u(UFunction.STOPDT_ACT)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._switch_waiter = done
        link.close_for("switched over on request")
        bound = float(dev.timers.t0_s + dev.timers.t1_s) + 1.0
        try:
            async with asyncio.timeout(bound):
                await done
        except TimeoutError:
            raise LinkError(dev.name, f"switch-over not done within {bound:g} s") from None
        finally:
            if self._switch_waiter is done:
                self._switch_waiter = None

    def _fail_pending(self, reason: str) -> None:
        err = LinkError(self.device.name, f"link lost: {reason}")
        for fut, _select in self._pending.values():
            if not fut.done():
                fut.set_exception(err)
        for term in self._terms.values():
            if not term.done():
                term.set_result(None)
        self._terms.clear()
        waiters, self._gi_waiters = self._gi_waiters, []
        for gi in waiters:
            if not gi.done():
                gi.set_exception(err)
        tests, self._tests = self._tests, {}
        for ts in tests.values():
            if not ts.done():
                ts.set_exception(err)
        counting, self._ci_waiters = self._ci_waiters, []
        for ci in counting:
            if not ci.done():
                ci.set_exception(err)
        clocks, self._clock_pending = self._clock_pending, collections.deque(maxlen=16)
        for _sent, cs in clocks:
            if cs is not None and not cs.done():
                cs.set_exception(err)
        readers, self._readers = self._readers, {}
        for futs in readers.values():
            for r in futs:
                if not r.done():
                    r.set_exception(err)

    # ----------------------------------------------------------------- requests

    def _require_link(self) -> _Link:
        link = self._link
        if link is None or not self._up.is_set():
            raise LinkError(self.device.name, f"link is {self._state.value}")
        if not link.data_on:
            raise LinkError(self.device.name, "data transfer stopped (STOPDT); start_data() resumes it")
        return link

    def _asdu(self, type_id: TypeId, cot: Cot, ioa: int, element: Element) -> bytes:
        timed = type_id.name.endswith("TA_1")
        obj = InfoObject(ioa, element, Cp56Time.from_timestamp(now()) if timed else None)
        dev = self.device
        return encode_asdu(Asdu(type_id, cot, dev.common_address, (obj,), originator=dev.originator_address))

    def _send_interrogation(self) -> None:
        link = self._require_link()
        self._counters["interrogations"] += 1
        link.send_asdu(self._asdu(TypeId.C_IC_NA_1, Cot.ACTIVATION, 0, Interrogation(_GI_QOI)))

    async def interrogate(self) -> None:
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._send_interrogation()
        self._gi_waiters.append(fut)
        timeout_s = self.device.command_timeout_s + 1
        try:
            async with asyncio.timeout(timeout_s):
                ok = await fut
        except TimeoutError:
            raise LinkError(self.device.name, f"general interrogation not confirmed within {timeout_s:g} s") from None
        finally:
            if fut in self._gi_waiters:
                self._gi_waiters.remove(fut)
        if not ok:
            raise LinkError(self.device.name, "general interrogation not confirmed")

    async def send_test_command(self) -> float:
        """Test command with time tag (C_TS_TA_1 act, the next test sequence counter); returns
        the round trip to the device's ACTCON in seconds.

        The application-layer check that the device itself answers (TESTFR only shows its TCP
        stack does). Raises :class:`DeviceError` on a negative ACTCON, :class:`LinkError`
        without a link or when none comes within ``command_timeout_s``.
        """
        link = self._require_link()
        self._tsc = tsc = (self._tsc + 1) & 0xFFFF
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._tests[tsc] = fut
        sent_at = now()
        timeout_s = self.device.command_timeout_s
        try:
            # the time is part of the element here, not a separate tag as for the *_TA_1 commands
            obj = InfoObject(0, TestCommand(tsc, Cp56Time.from_timestamp(sent_at)))
            dev = self.device
            asdu = Asdu(TypeId.C_TS_TA_1, Cot.ACTIVATION, dev.common_address, (obj,), originator=dev.originator_address)
            link.send_asdu(encode_asdu(asdu))
            self._counters["test_commands"] += 1
            async with asyncio.timeout(timeout_s):
                return await fut - sent_at
        except TimeoutError:
            raise LinkError(self.device.name, f"test command {tsc} not confirmed within {timeout_s:g} s") from None
        finally:
            if self._tests.get(tsc) is fut:
                del self._tests[tsc]

    def _send_counter_interrogation(self) -> None:
        link = self._require_link()
        self._counters["counter_interrogations"] += 1
        link.send_asdu(self._asdu(TypeId.C_CI_NA_1, Cot.ACTIVATION, 0, CounterInterrogation(5, 0)))

    async def interrogate_counters(self) -> None:
        """Counter interrogation (general request, no freeze); returns at the device's ACTTERM,
        when every counter it has has been sent (they are in the event stream by then).

        Raises :class:`DeviceError` when the device refuses it, :class:`LinkError` without a
        link or when it does not end within ``command_timeout_s + 1``.
        """
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._send_counter_interrogation()
        self._ci_waiters.append(fut)
        timeout_s = self.device.command_timeout_s + 1
        try:
            async with asyncio.timeout(timeout_s):
                ok = await fut
        except TimeoutError:
            raise LinkError(self.device.name, f"counter interrogation not ended within {timeout_s:g} s") from None
        finally:
            if fut in self._ci_waiters:
                self._ci_waiters.remove(fut)
        if not ok:
            raise DeviceError(self.device.name, "counter interrogation refused")

    async def _periodic_counter_interrogation(self) -> None:
        period = self.device.counter_interrogation.period_s
        while not self._closing:
            await asyncio.sleep(period)
            if self._state is LinkState.UP:
                try:
                    await self.interrogate_counters()
                except (LinkError, DeviceError) as exc:
                    log.warning("%s: periodic counter interrogation failed: %s", self.device.name, exc)

    def _send_clock_sync(self, waiter: asyncio.Future[float] | None) -> None:
        link = self._require_link()
        sent_at = now()
        asdu = self._asdu(TypeId.C_CS_NA_1, Cot.ACTIVATION, 0, ClockSync(Cp56Time.from_timestamp(sent_at)))
        link.send_asdu(asdu)
        self._counters["clock_syncs_sent"] += 1
        self._clock_pending.append((sent_at, waiter))

    async def synchronize_clock(self) -> float:
        """Set the device's clock to ours (C_CS_NA_1 act) and return the time its ACTCON carries.

        Raises :class:`DeviceError` on a negative ACTCON, :class:`LinkError` without a link or
        when no ACTCON comes within ``command_timeout_s`` (as :meth:`interrogate`).
        """
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._send_clock_sync(fut)
        timeout_s = self.device.command_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            raise LinkError(self.device.name, f"clock synchronisation not confirmed within {timeout_s:g} s") from None
        finally:
            if not fut.done():  # timed out or cancelled: forget it (a late ACTCON is counted)
                fut.cancel()
                self._clock_pending = collections.deque((e for e in self._clock_pending if e[1] is not fut), maxlen=16)

    async def _periodic_clock_sync(self) -> None:
        period = self.device.clock_sync.period_s
        while not self._closing:
            await asyncio.sleep(period)
            if self._state is LinkState.UP:
                try:
                    await self.synchronize_clock()
                except (LinkError, DeviceError) as exc:  # a refusal is counted and logged already
                    log.warning("%s: periodic clock synchronisation failed: %s", self.device.name, exc)

    async def read(self, point: str) -> PointUpdate:
        ioa = self._monitor_ioa.get(point)
        if ioa is None:
            raise CommandInvalid(point, "not a monitored point of this device")
        if ioa in self._counter_points:
            raise CommandInvalid(point, "an integrated total is read by counter interrogation (interrogate_counters)")
        link = self._require_link()
        fut: asyncio.Future[PointUpdate] = asyncio.get_running_loop().create_future()
        self._readers.setdefault(point, []).append(fut)
        try:
            link.send_asdu(self._asdu(TypeId.C_RD_NA_1, Cot.REQUEST, ioa, ReadCommand()))
            async with asyncio.timeout(self.device.command_timeout_s):
                return await fut
        except TimeoutError:
            raise CommandTimeout(point, f"no answer to read within {self.device.command_timeout_s:g} s") from None
        finally:
            waiting = self._readers.get(point, [])
            if fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._readers[point]

    def _element(self, pt: Point, value: float | int | bool) -> Callable[[bool], Element]:
        """The command element for ``value`` as a function of the S/E bit; the value is
        checked by the check the c104 adapter uses too, so both engines refuse the same requests."""
        kind, checked = command_value(pt, value)
        element = _ELEMENTS[kind]
        return lambda select: element(checked, select)

    async def _exchange(self, link: _Link, ioa: int, asdu: bytes, *, select: bool) -> Confirmation:
        """Send one command ASDU and wait for the device's answer to that phase."""
        fut: asyncio.Future[Confirmation] = asyncio.get_running_loop().create_future()
        self._pending[ioa] = (fut, select)
        try:
            link.send_asdu(asdu)
            return await fut
        finally:
            self._pending.pop(ioa, None)
            if not fut.done():
                fut.cancel()

    async def command(self, request: CommandRequest) -> float:
        pt = self._control.get(request.point)
        if pt is None:
            raise CommandInvalid(request.point, f"not a control point of device {self.device.name}")
        if self.device.read_only:
            raise CommandInvalid(pt.name, f"device {self.device.name} is read-only (read_only: true in the lab config)")
        element = self._element(pt, request.value)
        link = self._require_link()
        addr = iec104_address(pt)
        ioa, type_id = addr.ioa, TypeId[addr.type]
        if ioa in self._pending:
            raise CommandRejected(pt.name, "another command on this point is still in progress")
        timeout_s = self.device.command_timeout_s
        previous = self._terms.get(ioa)
        if previous is not None and not previous.done():
            # as with c104: a second command on a point waits for the first one's ACTTERM
            # (the breaker's travel), at most the command timeout
            await asyncio.wait({previous}, timeout=timeout_s)
            self._terms.pop(ioa, None)
            link = self._require_link()
        sbo = pt.select_before_operate or request.select_before_operate
        self._counters["commands"] += 1
        term: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        executing = False
        confirmed = False
        try:
            async with asyncio.timeout(timeout_s):
                if sbo:
                    self._counters["selects"] += 1
                    asdu = self._asdu(type_id, Cot.ACTIVATION, ioa, element(True))
                    conf = await self._exchange(link, ioa, asdu, select=True)
                    if conf.negative:
                        raise CommandRejected(pt.name, conf.reason)
                # ACTTERM may arrive in the same read as ACTCON: wait for it from before sending
                self._terms[ioa] = term
                executing = True
                asdu = self._asdu(type_id, Cot.ACTIVATION, ioa, element(False))
                conf = await self._exchange(link, ioa, asdu, select=False)
                if conf.negative:
                    raise CommandRejected(pt.name, conf.reason)
                confirmed = True
                return conf.received_at
        except TimeoutError:
            what = "execute" if executing else "select"
            raise CommandTimeout(pt.name, f"no ACTCON of {what} within {timeout_s:g} s") from None
        finally:
            if not confirmed and self._terms.get(ioa) is term:
                del self._terms[ioa]
