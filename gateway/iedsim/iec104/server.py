"""IEC 60870-5-104 outstation standing in for a REF615 behind a COM600.

Why raw asyncio instead of ``c104.Server``: a value handed to ``c104.Server`` from outside a
callback waits for the connection thread's next wake-up (0-100 ms, median ~50 ms), which
would swamp the latency the gateway is meant to measure. Here every value, confirmation and
breaker position is encoded and passed to ``transport.write`` in the same call that caused
it; the periodic task only decides *when the feeder changes*, never when bytes leave.

One :class:`Iec104Outstation` serves one configured device (its monitor and control points,
its common address) to any number of clients. Each connection is a :class:`_Session`
protocol with its own sequence numbers, k/w windows and t1/t2/t3 timers; monitor values go
to every started session. A general interrogation is answered as the field does: with the
untagged type of each point's kind (M_ME_NC_1 for a point configured M_ME_TF_1), while
spontaneous and periodic values use the configured type (``simulator.gi_types: configured``
answers GI with the configured type too). With ``simulator.cyclic_period_s`` the measured
points are also sent periodically (COT 1), as a COM600 configured for cyclic transmission
does. With the device's ``tls.enabled`` the outstation speaks TLS (IEC 62351-3 style) with
the certificate
in ``simulator.tls_cert_file``/``tls_key_file``, and asks for a client certificate signed by
``simulator.tls_ca_file`` when that is set. Fault injection (:meth:`Iec104Outstation.stall`,
``drop``, ``refuse_commands``, ``set_value``) is a plain method call in-process and a line
command on the optional :class:`ControlChannel`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.config import Device, Direction, Iec104Timers, LabConfig, Point, iec104_address
from gateway.errors import ConfigError, ConfigIssue
from gateway.iedsim.control import LineControlServer
from gateway.iedsim.dynamics import FeederModel
from gateway.points import DoublePoint, Quality
from gateway.protocols.iec104.codec import (
    SEQ_MODULO,
    Asdu,
    AsduError,
    BinaryCounterReading,
    ClockSync,
    Cot,
    CounterInterrogation,
    Cp56Time,
    DoubleCommand,
    DoublePointInfo,
    Element,
    FloatInfo,
    FloatSetpoint,
    FrameDecoder,
    FrameError,
    IFrame,
    InfoObject,
    NormalizedInfo,
    NormalizedSetpoint,
    ScaledInfo,
    ScaledSetpoint,
    SFrame,
    SingleCommand,
    SinglePointInfo,
    TypeId,
    UFrame,
    UFunction,
    asdu_size,
    decode_asdu,
    encode_asdu,
    encode_frame,
    mirror,
    object_size,
)
from gateway.protocols.iec104.kinds import untagged_type

__all__ = [
    "ClockSyncRecord",
    "ControlChannel",
    "FrameRecord",
    "Iec104Outstation",
    "MonitorValue",
    "OutstationStats",
    "serve_many",
    "server_tls_context",
]

_log = logging.getLogger(__name__)

_BROADCAST_CA = 0xFFFF
_MAX_OBJECTS = 127
_ASDU_LIMIT = 249
_DEFAULT_QUEUE_MAX = 10_000

CommandElement = SingleCommand | DoubleCommand | NormalizedSetpoint | ScaledSetpoint | FloatSetpoint

_MONITOR_ELEMENT: dict[str, type] = {
    "M_SP_NA_1": SinglePointInfo,
    "M_SP_TB_1": SinglePointInfo,
    "M_DP_NA_1": DoublePointInfo,
    "M_DP_TB_1": DoublePointInfo,
    "M_ME_NA_1": NormalizedInfo,
    "M_ME_TD_1": NormalizedInfo,
    "M_ME_NB_1": ScaledInfo,
    "M_ME_TE_1": ScaledInfo,
    "M_ME_NC_1": FloatInfo,
    "M_ME_TF_1": FloatInfo,
}
_TIMED = frozenset(
    {TypeId.M_SP_TB_1, TypeId.M_DP_TB_1, TypeId.M_ME_TD_1, TypeId.M_ME_TE_1, TypeId.M_ME_TF_1, TypeId.M_IT_TB_1}
)
_TOTALS = frozenset({TypeId.M_IT_NA_1, TypeId.M_IT_TB_1})
_F32_MAX = 3.4028234663852886e38
#: the latest time a client may set the clock to: a day before CP56Time2a's years end (2099)
_LAST_SETTABLE = 4102358400.0  # 2099-12-31T00:00:00Z
_FIRST_SETTABLE = 946684800.0  # 2000-01-01T00:00:00Z


@dataclass(slots=True)
class OutstationStats:
    """Counters since start; a snapshot is returned by :meth:`Iec104Outstation.stats`."""

    connections_accepted: int = 0
    active_connections: int = 0
    frames_in: int = 0
    frames_out: int = 0
    i_frames_in: int = 0
    i_frames_out: int = 0
    #: Command ASDUs received (selects, executes, deactivations), refused ones included.
    commands: int = 0
    #: Of those, selects (S/E = 1): tells SBO from direct operation apart.
    selects: int = 0
    #: Interrogation commands received (activation), answered or not.
    interrogations: int = 0
    negative_confirmations: int = 0
    spontaneous_objects: int = 0
    #: Information objects sent with COT periodic (``simulator.cyclic_period_s``).
    periodic_objects: int = 0
    #: TLS handshakes that failed (e.g. a client certificate the CA did not sign).
    tls_refused: int = 0
    #: Monitor information objects actually written to clients (any cause): the loss reference.
    objects_out: int = 0
    #: ASDUs lost because a session's send queue (k window full) overflowed.
    drops: int = 0
    #: ASDUs not sent because the outstation was stalled on purpose.
    suppressed: int = 0
    protocol_errors: int = 0
    #: Clock synchronisations (C_CS_NA_1 act) taken; refused ones are negative_confirmations.
    clock_syncs: int = 0
    #: Counter interrogations received (activation), answered or not.
    counter_interrogations: int = 0
    #: Test commands (C_TS_TA_1 act) confirmed.
    test_commands: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One frame as it crossed the wire, kept for diagnostics and tests."""

    time: float
    direction: str  # "in" or "out"
    peer: str
    data: bytes


@dataclass(frozen=True, slots=True)
class ClockSyncRecord:
    """One clock synchronisation the outstation took: when (on the host's true clock), the
    time it was set to, and its clock error before and after (device clock - true time)."""

    received_at: float
    commanded: float
    error_before_s: float
    error_after_s: float


@dataclass(frozen=True, slots=True)
class MonitorValue:
    """What the outstation reports for one monitor point right now."""

    point: str
    value: float
    raw: float | int | bool
    quality: Quality
    time: float


@dataclass(slots=True)
class _Monitor:
    point: Point
    type_id: TypeId  # configured: spontaneous, periodic and read answers
    gi_type_id: TypeId  # general interrogation answers (``simulator.gi_types``)
    value: float
    raw: float | int | bool
    quality: Quality
    forced_quality: Quality
    time: float


@dataclass(slots=True)
class _Selection:
    session: _Session
    deadline: float


class Iec104Outstation:
    """An IEC 104 controlled station for one device of a lab config.

    ``host``/``port`` override the device's address (port 0 picks a free port; read
    :attr:`port` after :meth:`start`). ``seed`` overrides ``simulator.seed``; ``timers``
    overrides the device's k/w/t1/t2/t3 as used on the outstation side.
    """

    def __init__(
        self,
        config: LabConfig,
        device: str,
        *,
        host: str | None = None,
        port: int | None = None,
        seed: int | None = None,
        timers: Iec104Timers | None = None,
        queue_max: int = _DEFAULT_QUEUE_MAX,
        frame_log: int = 256,
    ) -> None:
        if device not in config.devices:
            raise KeyError(f"unknown device {device!r}; devices: {', '.join(config.devices)}")
        dev = config.devices[device]
        if dev.protocol != "iec104":
            raise ValueError(f"device {device!r} speaks {dev.protocol}, not iec104")
        self.device = dev
        self.settings = dev.simulator
        self._tls = server_tls_context(dev, config.source)
        self.timers = timers or dev.timers
        self.common_address = dev.common_address
        self._host = host if host is not None else dev.host
        self._port_wanted = port if port is not None else dev.port
        self._queue_max = queue_max
        self._points = config.points_of(device)
        self.model = FeederModel(self.settings, self._points, seed=seed, start_time=time.time())
        now = time.time()
        self._monitors: dict[str, _Monitor] = {}
        self._monitor_by_ioa: dict[int, _Monitor] = {}
        #: integrated totals (M_IT_*): answered to counter interrogations, never in the GI
        self._totals: dict[str, _Monitor] = {}
        self._controls: dict[int, Point] = {}
        for p in self._points:
            if p.direction is Direction.MONITOR:
                type_id = TypeId[iec104_address(p).type]
                gi_type_id = TypeId(untagged_type(type_id)) if self.settings.gi_types == "untagged" else type_id
                m = _Monitor(p, type_id, gi_type_id, 0.0, 0, Quality.GOOD, Quality.GOOD, now)
                self._update(m, self.model.value(p.name), now)
                if m.type_id in _TOTALS:
                    self._totals[p.name] = m
                    continue
                self._monitors[p.name] = m
                self._monitor_by_ioa[iec104_address(p).ioa] = m
            else:
                self._controls[iec104_address(p).ioa] = p
        self._sessions: set[_Session] = set()
        self._selections: dict[str, _Selection] = {}
        self._travelling: dict[str, asyncio.TimerHandle] = {}
        self._breaker_travel_s = self.settings.breaker_travel_s
        self._stats = OutstationStats()
        self._frames: collections.deque[FrameRecord] = collections.deque(maxlen=frame_log)
        self._stalled = False
        self._refuse = False
        self._refuse_clock = False
        #: the device clock's error against the host clock: its time tags are host time + this
        self._clock_error_s = 0.0
        self._clock_syncs: list[ClockSyncRecord] = []
        self._server: asyncio.Server | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._cyclic: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._bound: tuple[str, int] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and start the periodic feeder task; returns once clients can connect."""
        if self._server is not None:
            raise RuntimeError("already started")
        loop = asyncio.get_running_loop()
        factory: Callable[[], asyncio.Protocol] = (
            (lambda: _TlsAccept(self)) if self._tls is not None else (lambda: _Session(self))
        )
        self._server = await loop.create_server(factory, self._host, self._port_wanted, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self._bound = (str(sock[0]), int(sock[1]))
        self._ticker = asyncio.create_task(self._tick_forever(), name=f"iedsim-104-{self.name}-tick")
        if self.settings.cyclic_period_s > 0:
            self._cyclic = asyncio.create_task(
                self._cyclic_forever(self.settings.cyclic_period_s), name=f"iedsim-104-{self.name}-cyclic"
            )
        _log.info(
            "%s: IEC 104 outstation on %s:%d%s, common address %d, %d monitor / %d control points",
            self.name,
            *self._bound,
            " (TLS)" if self._tls is not None else "",
            self.common_address,
            len(self._monitors),
            len(self._controls),
        )

    async def close(self) -> None:
        """Stop listening, close every connection, cancel timers and the feeder task."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for s in list(self._sessions):
            s.abort()
        for t in list(self._handshakes):
            t.cancel()
        if self._handshakes:
            await asyncio.wait(self._handshakes)
        for h in self._travelling.values():
            h.cancel()
        self._travelling.clear()
        for task in (self._ticker, self._cyclic):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._ticker = self._cyclic = None
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost callbacks of aborted transports run

    async def __aenter__(self) -> Iec104Outstation:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def name(self) -> str:
        return self.device.name

    @property
    def host(self) -> str:
        return self._bound[0] if self._bound else self._host

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        return self._bound[1] if self._bound else self._port_wanted

    @property
    def points(self) -> tuple[Point, ...]:
        return self._points

    @property
    def stalled(self) -> bool:
        return self._stalled

    @property
    def tls(self) -> bool:
        """Whether clients must speak TLS to this outstation."""
        return self._tls is not None

    # -- fault injection and inspection ------------------------------------------------

    def stall(self) -> None:
        """Stop reading, answering and sending on every connection; keep them open.

        Like a hung device whose TCP stack is still alive: the client only notices through
        its own t1/t3 supervision.
        """
        if self._stalled:
            return
        self._stalled = True
        _log.info("%s: stalled", self.name)
        for s in self._sessions:
            s.pause()

    def resume(self) -> None:
        """Undo :meth:`stall`; frames the clients sent meanwhile are processed now."""
        if not self._stalled:
            return
        self._stalled = False
        _log.info("%s: resumed", self.name)
        for s in list(self._sessions):
            s.unpause()

    def drop(self) -> None:
        """Close every client connection at once (RST); the listener stays open."""
        _log.info("%s: dropping %d connection(s)", self.name, len(self._sessions))
        for s in list(self._sessions):
            s.abort()

    def refuse_commands(self, refuse: bool) -> None:
        """While on, every command gets a negative ACTCON."""
        self._refuse = refuse
        _log.info("%s: refuse commands %s", self.name, "on" if refuse else "off")

    def refuse_clock_sync(self, refuse: bool) -> None:
        """While on, clock synchronisations get a negative ACTCON (a device on SNTP does that)."""
        self._refuse_clock = refuse

    def set_clock_error(self, seconds: float) -> None:
        """Put the device's clock ``seconds`` off the host's (time tags and ACTCONs follow it)."""
        clock = time.time() + seconds
        if not (math.isfinite(clock) and _FIRST_SETTABLE <= clock <= _LAST_SETTABLE):
            raise ValueError(f"clock error {seconds} s puts the clock outside CP56Time2a's 2000..2099")
        self._clock_error_s = seconds

    @property
    def clock_error_s(self) -> float:
        """How far the device's clock is off the host's now (0 after a perfect synchronisation)."""
        return self._clock_error_s

    @property
    def clock_syncs(self) -> list[ClockSyncRecord]:
        """Every clock synchronisation taken, oldest first."""
        return list(self._clock_syncs)

    def set_breaker_travel(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("travel time must not be negative")
        self._breaker_travel_s = seconds

    def set_value(self, point: str, value: float, quality: Quality | None = None) -> float:
        """Force a monitor point and send it spontaneously now; return ``time.time()`` of the change.

        The value is in engineering units; a breaker position moves the model's breaker and
        a set-point read-back changes the model's limit. Other points stay pinned until
        :meth:`release`. ``quality`` (QDS bits) sticks until given again.
        """
        m = self._monitors.get(point) or self._totals.get(point)
        if m is None:
            raise KeyError(f"{self.name}: no monitor point {point!r}")
        if quality is not None:
            m.forced_quality = Quality(quality)
        return self._force(m, value)

    def release(self, point: str) -> None:
        """Let the feeder model drive a point forced by :meth:`set_value` again."""
        self.model.release(point)
        m = self._monitors.get(point) or self._totals.get(point)
        if m is not None:
            m.forced_quality = Quality.GOOD

    def values(self) -> dict[str, MonitorValue]:
        """The value, raw value, quality and change time the outstation reports per point."""
        return {
            name: MonitorValue(name, m.value, m.raw, m.quality, m.time)
            for name, m in (*self._monitors.items(), *self._totals.items())
        }

    def recent_frames(self) -> list[FrameRecord]:
        """The last ``frame_log`` frames in and out, oldest first (what a capture would show)."""
        return list(self._frames)

    def stats(self) -> OutstationStats:
        snap = dataclasses.replace(self._stats)
        snap.active_connections = len(self._sessions)
        return snap

    # -- sending -------------------------------------------------------------------------

    def _update(self, m: _Monitor, value: float, now: float, *, force: bool = False) -> bool:
        """Take a new engineering value; True when it is a reportable change."""
        raw, overflow = _to_raw(m.point, m.type_id, value)
        quality = (m.forced_quality | Quality.OVERFLOW) if overflow else m.forced_quality
        if m.point.address.kind == "measured":
            moved = abs(value - m.value) > m.point.deadband and raw != m.raw
        else:
            moved = raw != m.raw
        if not (moved or force or quality != m.quality):
            return False
        m.value, m.raw, m.quality, m.time = value, raw, quality, now
        return True

    def _refresh_all(self, now: float, exclude: str | None = None) -> list[_Monitor]:
        values = self.model.values()
        return [m for name, m in self._monitors.items() if name != exclude and self._update(m, values[name], now)]

    def _asdus(self, monitors: Sequence[_Monitor], cot: Cot) -> list[bytes]:
        """Pack monitors into as few ASDUs as the 249-octet limit allows, grouped by type.

        The type is the configured one, except in answers to a general interrogation
        (COT 20), which carry each point's ``gi_type_id``: by default the untagged type of
        the same kind, as a COM600 or REF615 answers (the type/cause table of
        IEC 60870-5-101/104 7.2.3 allows both).
        """
        gi = cot is Cot.INTERROGATED_BY_STATION
        by_type: dict[TypeId, list[_Monitor]] = collections.defaultdict(list)
        for m in monitors:
            by_type[m.gi_type_id if gi else m.type_id].append(m)
        out: list[bytes] = []
        for type_id, ms in by_type.items():
            per = min(_MAX_OBJECTS, (_ASDU_LIMIT - asdu_size(type_id, 0)) // object_size(type_id))
            ms.sort(key=lambda m: iec104_address(m.point).ioa)
            for i in range(0, len(ms), per):
                objects = tuple(_info_object(m, type_id, self._clock_error_s) for m in ms[i : i + per])
                out.append(encode_asdu(Asdu(type_id, cot, self.common_address, objects)))
        return out

    def _send_spontaneous(self, monitors: Sequence[_Monitor]) -> float:
        if monitors:
            self._stats.spontaneous_objects += len(monitors)
            for asdu in self._asdus(monitors, Cot.SPONTANEOUS):
                self._broadcast(asdu)
        return time.time()

    def _send_periodic(self) -> None:
        """Every measured point with COT periodic, packed, whether it changed or not.

        The values are the ones the outstation reports right now (the same a general
        interrogation would give, within each point's deadband); a cyclic cycle never
        changes them, so it does not disturb spontaneous reporting.
        """
        measured = [m for m in self._monitors.values() if m.point.address.kind == "measured"]
        if not measured or not any(s.started for s in self._sessions):
            return
        asdus = self._asdus(measured, Cot.PERIODIC)
        if self._stalled:
            self._stats.suppressed += len(asdus)
            return
        self._stats.periodic_objects += len(measured)
        for asdu in asdus:
            self._broadcast(asdu)

    def _broadcast(self, asdu: bytes) -> None:
        if self._stalled:
            self._stats.suppressed += 1
            return
        for s in self._sessions:
            if s.started:
                s.send_asdu(asdu)

    def _reply(self, session: _Session, asdu: bytes, *, negative: bool = False) -> None:
        if negative:
            self._stats.negative_confirmations += 1
        session.send_asdu(asdu)

    # -- periodic feeder ---------------------------------------------------------------

    async def _tick_forever(self) -> None:
        period = self.settings.period_s
        loop = asyncio.get_running_loop()
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            if next_at < loop.time():  # fell behind (suspended host): do not burst
                next_at = loop.time() + period
            now = time.time()
            try:
                self.model.step(now)
                self._send_spontaneous(self._refresh_all(now))
                if self._totals:  # a counter that moved goes spontaneously, time-tagged
                    values = self.model.values()
                    self._send_spontaneous([m for n, m in self._totals.items() if self._update(m, values[n], now)])
            except Exception:  # a bad step must not end the simulation; it is logged each time
                _log.exception("%s: feeder step failed", self.name)

    async def _cyclic_forever(self, period: float) -> None:
        """Cyclic transmission on its own clock, independent of the feeder's steps."""
        loop = asyncio.get_running_loop()
        next_at = loop.time() + period
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at += period
            if next_at < loop.time():  # fell behind (suspended host): do not burst
                next_at = loop.time() + period
            try:
                self._send_periodic()
            except Exception:  # like the feeder step: log, keep cycling
                _log.exception("%s: cyclic transmission failed", self.name)

    # -- incoming ASDUs ----------------------------------------------------------------

    def handle_asdu(self, session: _Session, raw: bytes) -> None:
        """Dispatch one received ASDU; every answer is written before this returns."""
        try:
            asdu = decode_asdu(raw)
        except AsduError as exc:
            if exc.reply_cot is not None and len(raw) >= 6:
                _log.info("%s: %s -> negative COT %d", self.name, exc, exc.reply_cot)
                self._reply(session, mirror(raw, exc.reply_cot, negative=True), negative=True)
            else:
                self._stats.protocol_errors += 1
                _log.warning("%s: malformed ASDU %s: %s", self.name, raw.hex(" "), exc)
            return
        if asdu.common_address not in (self.common_address, _BROADCAST_CA):
            _log.info("%s: %s for unknown common address %d", self.name, asdu.type_id.name, asdu.common_address)
            self._reply(session, mirror(raw, Cot.UNKNOWN_CA, negative=True), negative=True)
            return
        reply = _own_ca(raw, self.common_address)
        t = asdu.type_id
        if not t.is_command:
            _log.info("%s: %s in control direction from %s refused", self.name, t.name, session.peer)
            self._reply(session, mirror(reply, Cot.UNKNOWN_TYPE_ID, negative=True), negative=True)
        elif t is TypeId.C_IC_NA_1:
            self._interrogation(session, reply, asdu)
        elif t is TypeId.C_RD_NA_1:
            self._read(session, reply, asdu)
        elif t is TypeId.C_CI_NA_1:
            self._counter_interrogation(session, reply, asdu)
        elif t is TypeId.C_CS_NA_1:
            self._clock_sync(session, reply, asdu)
        elif t is TypeId.C_TS_TA_1:
            if asdu.cot is not Cot.ACTIVATION:
                self._reply(session, mirror(reply, Cot.UNKNOWN_COT, negative=True), negative=True)
            else:  # mirrored: the ACTCON carries the client's TSC and time back, as the standard asks
                self._stats.test_commands += 1
                _log.info("%s: %s acknowledged", self.name, t.name)
                self._reply(session, mirror(reply, Cot.ACTIVATION_CON))
        else:
            self._command(session, reply, asdu)

    def _clock_sync(self, session: _Session, raw: bytes, asdu: Asdu) -> None:
        """Set the clock to the commanded time; ACTCON carries the clock as set (at receipt).

        Error before/after are kept (:attr:`clock_syncs`) so a test sees what the client did.
        """
        element = asdu.objects[0].element
        assert isinstance(element, ClockSync)  # the type id decides the element class
        if asdu.cot is not Cot.ACTIVATION:
            self._reply(session, mirror(raw, Cot.UNKNOWN_COT, negative=True), negative=True)
            return
        if self._refuse_clock:
            _log.info("%s: clock synchronisation from %s refused (fault injection)", self.name, session.peer)
            self._reply(session, mirror(raw, Cot.ACTIVATION_CON, negative=True), negative=True)
            return
        received_at = time.time()
        commanded = element.time.timestamp()
        if commanded > _LAST_SETTABLE:  # its time tags would soon leave CP56Time2a's years
            _log.info("%s: clock synchronisation to %s refused (too late for CP56Time2a)", self.name, element.time.time)
            self._reply(session, mirror(raw, Cot.ACTIVATION_CON, negative=True), negative=True)
            return
        before = self._clock_error_s
        self._clock_error_s = commanded - received_at
        self._clock_syncs.append(ClockSyncRecord(received_at, commanded, before, self._clock_error_s))
        self._stats.clock_syncs += 1
        _log.info("%s: clock synchronised by %s (was %+.3f s off)", self.name, session.peer, before)
        obj = InfoObject(asdu.objects[0].ioa, ClockSync(Cp56Time.from_timestamp(received_at + self._clock_error_s)))
        confirm = Asdu(
            TypeId.C_CS_NA_1,
            Cot.ACTIVATION_CON,
            self.common_address,
            (obj,),
            test=asdu.test,
            originator=asdu.originator,
        )
        self._reply(session, encode_asdu(confirm))

    def _interrogation(self, session: _Session, raw: bytes, asdu: Asdu) -> None:
        qoi = getattr(asdu.objects[0].element, "qoi", 0)
        if asdu.cot is Cot.DEACTIVATION:
            self._reply(session, mirror(raw, Cot.DEACTIVATION_CON))
            return
        if asdu.cot is not Cot.ACTIVATION:
            self._reply(session, mirror(raw, Cot.UNKNOWN_COT, negative=True), negative=True)
            return
        self._stats.interrogations += 1
        if not 20 <= qoi <= 36:
            _log.info("%s: interrogation with QOI %d refused", self.name, qoi)
            self._reply(session, mirror(raw, Cot.ACTIVATION_CON, negative=True), negative=True)
            return
        _log.info("%s: general interrogation (QOI %d) from %s", self.name, qoi, session.peer)
        self._reply(session, mirror(raw, Cot.ACTIVATION_CON))
        if qoi == 20:  # no point is in a group, so group interrogations return nothing
            now = time.time()
            values = self.model.values()
            for name, m in self._monitors.items():
                self._update(m, values[name], now)
            for a in self._asdus(list(self._monitors.values()), Cot.INTERROGATED_BY_STATION):
                session.send_asdu(a)
        self._reply(session, mirror(raw, Cot.ACTIVATION_TERMINATION))

    def _counter_interrogation(self, session: _Session, raw: bytes, asdu: Asdu) -> None:
        """C_CI_NA_1: ACTCON, then (general request, no freeze) every integrated total with
        COT 37 in the untagged M_IT_NA_1, as a device answers; then ACTTERM.

        Group requests (RQT 1-4) find no counter in a group and freeze requests (FRZ 1-3) are
        confirmed without changing the counters: what the simulator does not model.
        """
        qcc = asdu.objects[0].element
        assert isinstance(qcc, CounterInterrogation)  # the type id decides the element class
        if asdu.cot is Cot.DEACTIVATION:
            self._reply(session, mirror(raw, Cot.DEACTIVATION_CON))
            return
        if asdu.cot is not Cot.ACTIVATION:
            self._reply(session, mirror(raw, Cot.UNKNOWN_COT, negative=True), negative=True)
            return
        self._stats.counter_interrogations += 1
        if not 1 <= qcc.request <= 5 or self._refuse:
            _log.info("%s: counter interrogation (RQT %d) refused", self.name, qcc.request)
            self._reply(session, mirror(raw, Cot.ACTIVATION_CON, negative=True), negative=True)
            return
        _log.info("%s: counter interrogation (RQT %d FRZ %d) from %s", self.name, qcc.request, qcc.freeze, session.peer)
        self._reply(session, mirror(raw, Cot.ACTIVATION_CON))
        if qcc.request == 5 and qcc.freeze == 0 and self._totals:
            now = time.time()
            values = self.model.values()
            totals = sorted(self._totals.values(), key=lambda m: iec104_address(m.point).ioa)
            for m in totals:
                self._update(m, values[m.point.name], now)
            t = TypeId.M_IT_NA_1
            per = min(_MAX_OBJECTS, (_ASDU_LIMIT - asdu_size(t, 0)) // object_size(t))
            for i in range(0, len(totals), per):
                objects = tuple(
                    InfoObject(iec104_address(m.point).ioa, _counter_reading(m)) for m in totals[i : i + per]
                )
                session.send_asdu(encode_asdu(Asdu(t, Cot.REQUESTED_BY_GENERAL_COUNTER, self.common_address, objects)))
        self._reply(session, mirror(raw, Cot.ACTIVATION_TERMINATION))

    def _read(self, session: _Session, raw: bytes, asdu: Asdu) -> None:
        ioa = asdu.objects[0].ioa
        m = self._monitor_by_ioa.get(ioa)
        if asdu.cot is not Cot.REQUEST:
            self._reply(session, mirror(raw, Cot.UNKNOWN_COT, negative=True), negative=True)
        elif m is None:
            _log.info("%s: read of unknown ioa %d", self.name, ioa)
            self._reply(session, mirror(raw, Cot.UNKNOWN_IOA, negative=True), negative=True)
        else:
            self._update(m, self.model.value(m.point.name), time.time())
            session.send_asdu(self._asdus([m], Cot.REQUEST)[0])

    def _command(self, session: _Session, raw: bytes, asdu: Asdu) -> None:
        self._stats.commands += 1
        obj = asdu.objects[0]
        element = obj.element
        assert isinstance(element, CommandElement)  # the type id decides the element class
        if element.select:
            self._stats.selects += 1
        control = self._controls.get(obj.ioa)
        kind = "select" if element.select else "execute"
        what = f"{asdu.type_id.name} {kind} ioa {obj.ioa} value {element.value!r}"

        def refuse(reason: str, cot: Cot = Cot.ACTIVATION_CON) -> None:
            _log.info("%s: %s from %s refused: %s", self.name, what, session.peer, reason)
            confirm = Cot.DEACTIVATION_CON if asdu.cot is Cot.DEACTIVATION and cot is Cot.ACTIVATION_CON else cot
            self._reply(session, mirror(raw, confirm, negative=True), negative=True)

        if asdu.cot not in (Cot.ACTIVATION, Cot.DEACTIVATION):
            return refuse(f"cause {asdu.cot.name}", Cot.UNKNOWN_COT)
        if control is None:
            where = "a monitor point" if obj.ioa in self._monitor_by_ioa else "no point"
            return refuse(f"ioa {obj.ioa} is {where}", Cot.UNKNOWN_IOA)
        what = f"{what} ({control.name})"
        if asdu.type_id.name != iec104_address(control).type:
            return refuse(f"configured as {iec104_address(control).type}")
        if len(asdu.objects) != 1:
            return refuse("a command carries exactly one object")
        if asdu.cot is Cot.DEACTIVATION:
            sel = self._selections.get(control.name)
            if sel is None or sel.session is not session:
                return refuse("nothing selected")
            del self._selections[control.name]
            _log.info("%s: %s from %s: selection cancelled", self.name, what, session.peer)
            self._reply(session, mirror(raw, Cot.DEACTIVATION_CON))
            return None
        if self._refuse:
            return refuse("commands refused (fault injection)")
        problem = self._check_value(control, element)
        if problem:
            return refuse(problem)
        status = self._monitors.get(control.status_point or "")
        if status is not None and status.point.name in self._travelling:
            return refuse("still travelling")
        mono = time.monotonic()
        if element.select:
            self._selections[control.name] = _Selection(session, mono + self.settings.select_timeout_s)
            _log.info("%s: %s from %s: selected", self.name, what, session.peer)
            self._reply(session, mirror(raw, Cot.ACTIVATION_CON))
            return None
        sel = self._selections.pop(control.name, None)
        selected = sel is not None and sel.session is session and sel.deadline >= mono
        if control.select_before_operate and not selected:
            expired = sel is not None and sel.deadline < mono
            return refuse("select expired" if expired else "execute without select")
        _log.info("%s: %s from %s: executing", self.name, what, session.peer)
        self._reply(session, mirror(raw, Cot.ACTIVATION_CON))
        self._execute(session, raw, control, element, status)
        return None

    def _check_value(self, control: Point, element: CommandElement) -> str | None:
        if isinstance(element, DoubleCommand):
            return None if element.value in (1, 2) else f"double command state {element.value}"
        if isinstance(element, SingleCommand):
            return None
        eng = control.to_engineering(float(element.value))
        if not math.isfinite(eng):
            return "value is not finite"
        if control.min_value is not None and eng < control.min_value:
            return f"{eng:g} below min_value {control.min_value:g}"
        if control.max_value is not None and eng > control.max_value:
            return f"{eng:g} above max_value {control.max_value:g}"
        return None

    def _execute(
        self, session: _Session, raw: bytes, control: Point, element: CommandElement, status: _Monitor | None
    ) -> None:
        term = mirror(raw, Cot.ACTIVATION_TERMINATION)
        if status is None:  # status point on another device: nothing to move here
            session.send_asdu(term)
            return
        if isinstance(element, DoubleCommand) and status.point.address.kind == "double":
            target = DoublePoint(element.value)
            if int(status.value) == target:
                session.send_asdu(term)
                return
            self._force(status, DoublePoint.INTERMEDIATE)
            travel = self._breaker_travel_s

            def arrive() -> None:
                self._travelling.pop(status.point.name, None)
                self._force(status, target)
                _log.info("%s: %s now %s", self.name, status.point.name, target.name)
                if session.started:
                    session.send_asdu(term)

            if travel <= 0:
                arrive()
            else:
                loop = asyncio.get_running_loop()
                self._travelling[status.point.name] = loop.call_later(travel, arrive)
            return
        if isinstance(element, SingleCommand | DoubleCommand):
            on = element.value == 2 if isinstance(element, DoubleCommand) else bool(element.value)
            if status.point.address.kind == "double":
                self._force(status, DoublePoint.ON if on else DoublePoint.OFF)
            else:
                self._force(status, 1.0 if on else 0.0)
        else:
            eng = control.to_engineering(float(element.value))
            self.model.apply_setpoint(control, eng)
            if status.point.quantity == control.quantity:
                now = time.time()
                if self._update(status, self.model.value(status.point.name), now, force=True):
                    self._send_spontaneous([status])
            else:
                self._force(status, eng)
        session.send_asdu(term)

    def _force(self, m: _Monitor, value: float) -> float:
        """Set a point through the model and send it now; return the time of the change.

        The time is taken before the value is encoded and written, so a latency measured
        from it includes the simulator's own share (the issue's "within 1 ms of the
        change"). The point itself leaves first; what it changed in the feeder (an opened
        breaker takes currents and powers with it) follows in further ASDUs, so the latency
        of the forced value does not include refreshing the rest.
        """
        now = time.time()
        moved_feeder = self.model.set_value(m.point.name, value)
        self._update(m, self.model.value(m.point.name), now, force=True)
        self._send_spontaneous([m])
        if moved_feeder:
            self._send_spontaneous(self._refresh_all(now, exclude=m.point.name))
        return now

    # -- sessions ------------------------------------------------------------------------

    def _session_opened(self, s: _Session) -> None:
        self._sessions.add(s)
        self._stats.connections_accepted += 1
        _log.info("%s: connection from %s (%d open)", self.name, s.peer, len(self._sessions))

    def _session_closed(self, s: _Session, reason: str) -> None:
        self._sessions.discard(s)
        for name in [n for n, sel in self._selections.items() if sel.session is s]:
            del self._selections[name]
        _log.info("%s: connection from %s closed: %s (%d open)", self.name, s.peer, reason, len(self._sessions))


def _pem_file(device: Device, key: str, path: str | None, source: str) -> str:
    """``path`` if it names a readable file, else a ConfigError naming the config key and the file.

    Checked here rather than left to ``ssl``: its FileNotFoundError does not say which of the
    certificate, key or CA file is missing.
    """
    where = f"devices.{device.name}.simulator.{key}"
    if path is None:
        reason = "missing: the device has tls.enabled, so the simulator needs its own certificate and key"
        raise ConfigError([ConfigIssue(source or "<lab config>", where, reason)])
    try:
        with Path(path).open("rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError([ConfigIssue(path, where, f"cannot read ({exc.strerror})")]) from exc
    return path


def server_tls_context(device: Device, source: str = "") -> ssl.SSLContext | None:
    """The outstation's TLS context when the device has ``tls.enabled``, else None.

    TLS 1.2 is the floor (IEC 62351-3 rules out anything older). With
    ``simulator.tls_ca_file`` the outstation demands a client certificate chaining to that CA
    (mutual authentication as IEC 62351-3 asks); without it any client may connect, which
    stands in for a device configured without client authentication.
    """
    if not device.tls.enabled:
        return None
    sim = device.simulator
    cert = _pem_file(device, "tls_cert_file", sim.tls_cert_file, source)
    key = _pem_file(device, "tls_key_file", sim.tls_key_file, source)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        where = f"devices.{device.name}.simulator.tls_cert_file"
        reason = f"certificate {cert} and key {key} are not a usable PEM pair ({exc.reason or exc})"
        raise ConfigError([ConfigIssue(cert, where, reason)]) from exc
    if sim.tls_ca_file is not None:
        ca = _pem_file(device, "tls_ca_file", sim.tls_ca_file, source)
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            where = f"devices.{device.name}.simulator.tls_ca_file"
            raise ConfigError([ConfigIssue(ca, where, f"not a PEM CA certificate ({exc.reason or exc})")]) from exc
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _own_ca(raw: bytes, ca: int) -> bytes:
    """Answers to a broadcast (CA 65535) carry the station's own common address."""
    if raw[4:6] == ca.to_bytes(2, "little"):
        return raw
    return raw[:4] + ca.to_bytes(2, "little") + raw[6:]


def _to_raw(point: Point, type_id: TypeId, value: float) -> tuple[float | int | bool, bool]:
    """Engineering -> protocol value for the point's type, and whether it overflowed."""
    kind = point.address.kind
    if kind == "single":
        return bool(round(value)), False
    if kind == "double":
        return int(value) & 0x03, False
    raw = point.to_raw(value)
    if type_id in _TOTALS:  # a 32-bit counter: past its range it wraps, with carry (CY)
        if not math.isfinite(raw):
            return 0, True
        r = round(raw)
        wrapped = (r + 2**31) % 2**32 - 2**31
        return wrapped, wrapped != r
    if type_id in (TypeId.M_ME_NA_1, TypeId.M_ME_TD_1):
        clamped = max(-1.0, min(32767 / 32768, raw))
        return round(clamped * 32768) / 32768, clamped != raw
    if type_id in (TypeId.M_ME_NB_1, TypeId.M_ME_TE_1):
        if not math.isfinite(raw):
            return 0, True
        r = round(raw)
        clamped_i = max(-32768, min(32767, r))
        return clamped_i, clamped_i != r
    return raw, not abs(raw) <= _F32_MAX


def _counter_reading(m: _Monitor) -> BinaryCounterReading:
    """BCR of an integrated total: IV from invalid, CY from overflow (the counter wrapped)."""
    return BinaryCounterReading(int(m.raw), carry=Quality.OVERFLOW in m.quality, invalid=Quality.INVALID in m.quality)


def _info_object(m: _Monitor, type_id: TypeId, clock_error_s: float = 0.0) -> InfoObject:
    """The point's current value as an object of ``type_id`` (its configured or its GI type:
    the same kind, so the raw value fits either)."""
    totals = type_id in _TOTALS
    element: Element = _counter_reading(m) if totals else _MONITOR_ELEMENT[type_id.name](m.raw, m.quality)
    t = Cp56Time.from_timestamp(m.time + clock_error_s) if type_id in _TIMED else None
    return InfoObject(iec104_address(m.point).ioa, element, t)


class _TlsAccept(asyncio.Protocol):
    """Runs the TLS handshake of one accepted connection, then hands it to a :class:`_Session`.

    Not ``create_server(ssl=...)``: asyncio drops a failed server handshake silently, and the
    simulator should say why it refused a client (and count it) as a device's security log
    would. ``loop.start_tls`` raises the handshake error where it can be reported.
    """

    def __init__(self, outstation: Iec104Outstation) -> None:
        self.o = outstation
        # Application data can arrive with the handshake's last flight (TLS 1.3: the client's
        # Finished and its STARTDT together), before start_tls returns: keep it for the session.
        self.early: list[bytes] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()  # the ClientHello is for start_tls, which resumes reading
        task = asyncio.get_running_loop().create_task(self._handshake(transport))
        self.o._handshakes.add(task)
        task.add_done_callback(self.o._handshakes.discard)

    async def _handshake(self, transport: asyncio.Transport) -> None:
        o = self.o
        assert o._tls is not None
        peer = transport.get_extra_info("peername")
        who = f"{peer[0]}:{peer[1]}" if peer else "?"
        try:
            tls = await asyncio.get_running_loop().start_tls(
                transport,
                self,
                o._tls,
                server_side=True,
                # a client that opens TCP but never finishes the handshake goes after t0
                ssl_handshake_timeout=float(o.timers.t0_s),
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            o._stats.tls_refused += 1
            reason = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or repr(exc)
            _log.info("%s: TLS handshake with %s failed: %s", o.name, who, reason)
            transport.abort()
            return
        if tls is None or tls.is_closing() or self.lost:
            return
        session = _Session(o)
        tls.set_protocol(session)
        session.connection_made(tls)
        if self.early:
            session.data_received(b"".join(self.early))
            self.early.clear()

    def data_received(self, data: bytes) -> None:
        self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class _Session(asyncio.Protocol):
    """One client connection: APCI state machine, flow control and link supervision."""

    def __init__(self, outstation: Iec104Outstation) -> None:
        self.o = outstation
        t = outstation.timers
        self.k, self.w = t.k, t.w
        self.t1, self.t2, self.t3 = float(t.t1_s), float(t.t2_s), float(t.t3_s)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.decoder = FrameDecoder()
        self.started = False
        self.vs = 0  # next N(S) to send
        self.vr = 0  # next N(S) expected
        self.acked = 0  # oldest of our I-frames not yet acknowledged
        self.unacked_at: collections.deque[float] = collections.deque()
        self.recv_unacked = 0
        self.pending: collections.deque[bytes] = collections.deque()
        self.last_rx = time.monotonic()
        self.testfr_at: float | None = None
        self._t1: asyncio.TimerHandle | None = None
        self._t2: asyncio.TimerHandle | None = None
        self._t3: asyncio.TimerHandle | None = None
        self._dropped_logged = 0
        self._close_reason = "peer closed"

    # asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:  # asyncio calls connection_made only once the handshake succeeded
            self.peer += f" ({tls.version()})"
        self.o._session_opened(self)
        self._t3 = asyncio.get_running_loop().call_later(self.t3, self._t3_check)
        if self.o.stalled:
            transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        for h in (self._t1, self._t2, self._t3):
            if h is not None:
                h.cancel()
        self.transport = None
        self.started = False
        self.pending.clear()
        reason = self._close_reason if exc is None else f"{self._close_reason} ({exc})"
        self.o._session_closed(self, reason)

    def data_received(self, data: bytes) -> None:
        try:
            for frame in self.decoder.feed(data):
                if self.transport is None or self.transport.is_closing():
                    return
                self._on_frame(frame)
        except FrameError as exc:
            self._protocol_error(f"framing: {exc}")

    def eof_received(self) -> bool | None:
        return None  # close our side too

    # frames ----------------------------------------------------------------------------

    def _on_frame(self, frame: IFrame | SFrame | UFrame) -> None:
        st = self.o._stats
        st.frames_in += 1
        self.last_rx = time.monotonic()
        data = encode_frame(frame)  # the decoder keeps no copy; the frame re-encodes exactly
        self.o._frames.append(FrameRecord(time.time(), "in", self.peer, data))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s <- %s %s", self.o.name, self.peer, data.hex(" "))
        if isinstance(frame, UFrame):
            self._on_u(frame.function)
        elif isinstance(frame, SFrame):
            self._on_ack(frame.recv_seq)
        else:
            st.i_frames_in += 1
            if frame.send_seq != self.vr:
                self._protocol_error(f"N(S) {frame.send_seq}, expected {self.vr}")
                return
            self.vr = (self.vr + 1) % SEQ_MODULO
            if not self._on_ack(frame.recv_seq):
                return
            self.recv_unacked += 1
            if self.started:
                self.o.handle_asdu(self, frame.asdu)
            else:
                _log.info("%s: I-frame from %s before STARTDT ignored", self.o.name, self.peer)
            if self.recv_unacked >= self.w:
                self._send_s()
            elif self.recv_unacked and self._t2 is None:
                self._t2 = asyncio.get_running_loop().call_later(self.t2, self._t2_expired)

    def _on_u(self, fn: UFunction) -> None:
        if fn is UFunction.STARTDT_ACT:
            self.started = True
            self._write(encode_frame(UFrame(UFunction.STARTDT_CON)))
            _log.info("%s: STARTDT from %s", self.o.name, self.peer)
            self._flush()
        elif fn is UFunction.STOPDT_ACT:
            self.started = False
            self.pending.clear()
            if self.recv_unacked:
                self._send_s()
            self._write(encode_frame(UFrame(UFunction.STOPDT_CON)))
            _log.info("%s: STOPDT from %s", self.o.name, self.peer)
        elif fn is UFunction.TESTFR_ACT:
            self._write(encode_frame(UFrame(UFunction.TESTFR_CON)))
        elif fn is UFunction.TESTFR_CON:
            self.testfr_at = None
        # STARTDT_CON / STOPDT_CON are answers to acts we never send: ignore them.

    def _on_ack(self, nr: int) -> bool:
        """Take the peer's N(R); False (and the link closed) when it acknowledges nonsense."""
        outstanding = (self.vs - self.acked) % SEQ_MODULO
        n = (nr - self.acked) % SEQ_MODULO
        if n > outstanding:
            self._protocol_error(f"N(R) {nr} outside {self.acked}..{self.vs}")
            return False
        for _ in range(n):
            self.unacked_at.popleft()
        self.acked = nr
        if n and self.pending:
            self._flush()
        return True

    # sending ---------------------------------------------------------------------------

    def send_asdu(self, asdu: bytes) -> None:
        """Send now if the k window allows, else queue (bounded; overflow is counted)."""
        if self.transport is None or self.transport.is_closing():
            return
        if self.o.stalled:
            self.o._stats.suppressed += 1
            return
        if not self.pending and len(self.unacked_at) < self.k:
            self._write_i(asdu)
        elif len(self.pending) < self.o._queue_max:
            self.pending.append(asdu)
        else:
            self.o._stats.drops += 1
            self._dropped_logged += 1
            if self._dropped_logged == 1 or self._dropped_logged % 1000 == 0:
                _log.warning(
                    "%s: send queue to %s full (%d): %d ASDU(s) dropped so far",
                    self.o.name,
                    self.peer,
                    self.o._queue_max,
                    self._dropped_logged,
                )

    def _flush(self) -> None:
        while self.pending and len(self.unacked_at) < self.k and self.started:
            self._write_i(self.pending.popleft())

    def _write_i(self, asdu: bytes) -> None:
        frame = encode_frame(IFrame(self.vs, self.vr, asdu))
        self.vs = (self.vs + 1) % SEQ_MODULO
        self.unacked_at.append(time.monotonic())
        self._acknowledged()
        self.o._stats.i_frames_out += 1
        if asdu[0] < 45:  # monitor-direction types only: not command or GI confirmations
            self.o._stats.objects_out += asdu[1] & 0x7F  # VSQ: number of information objects
        self._write(frame)
        if self._t1 is None:
            self._t1 = asyncio.get_running_loop().call_later(self.t1, self._t1_check)

    def _send_s(self) -> None:
        self._acknowledged()
        self._write(encode_frame(SFrame(self.vr)))

    def _acknowledged(self) -> None:
        self.recv_unacked = 0
        if self._t2 is not None:
            self._t2.cancel()
            self._t2 = None

    def _write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)
        self.o._stats.frames_out += 1
        self.o._frames.append(FrameRecord(time.time(), "out", self.peer, data))
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s -> %s %s", self.o.name, self.peer, data.hex(" "))

    # supervision -----------------------------------------------------------------------

    def _t1_check(self) -> None:
        self._t1 = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if self.o.stalled:
            self._t1 = loop.call_later(self.t1, self._t1_check)
            return
        oldest = [t for t in (self.unacked_at[0] if self.unacked_at else None, self.testfr_at) if t is not None]
        if not oldest:
            return
        deadline = min(oldest) + self.t1
        now = time.monotonic()
        if now >= deadline:
            self._close_reason = "t1 expired (no acknowledgement)"
            _log.warning("%s: t1 expired on %s, closing", self.o.name, self.peer)
            self.abort()
            return
        self._t1 = loop.call_later(deadline - now, self._t1_check)

    def _t2_expired(self) -> None:
        self._t2 = None
        if self.transport is not None and self.recv_unacked and not self.o.stalled:
            self._send_s()

    def _t3_check(self) -> None:
        self._t3 = None
        if self.transport is None:
            return
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        idle = now - self.last_rx
        if not self.o.stalled and idle >= self.t3 and self.testfr_at is None:
            self.testfr_at = now
            self._write(encode_frame(UFrame(UFunction.TESTFR_ACT)))
            if self._t1 is None:
                self._t1 = loop.call_later(self.t1, self._t1_check)
            idle = 0.0
        self._t3 = loop.call_later(max(0.05, self.t3 - idle), self._t3_check)

    # control -----------------------------------------------------------------------------

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def unpause(self) -> None:
        if self.transport is None:
            return
        now = time.monotonic()
        self.last_rx = now
        self.unacked_at = collections.deque(now for _ in self.unacked_at)
        if self.testfr_at is not None:
            self.testfr_at = now
        self.transport.resume_reading()
        if self.recv_unacked and self._t2 is None:
            self._t2 = asyncio.get_running_loop().call_later(self.t2, self._t2_expired)

    def abort(self) -> None:
        if self.transport is not None:
            if self._close_reason == "peer closed":
                self._close_reason = "closed by outstation"
            self.transport.abort()

    def _protocol_error(self, reason: str) -> None:
        self.o._stats.protocol_errors += 1
        self._close_reason = f"protocol error: {reason}"
        _log.warning("%s: protocol error from %s: %s; closing", self.o.name, self.peer, reason)
        self.abort()


# ---------------------------------------------------------------------------------------
# Many stations, control channel


async def serve_many(
    config: LabConfig,
    device: str,
    base_port: int,
    count: int,
    *,
    host: str | None = None,
    seed: int | None = None,
) -> list[Iec104Outstation]:
    """Start ``count`` outstations of one device on ports base_port, base_port+1, ...

    All run in the calling event loop; base_port 0 gives each a free port. Station i gets
    seed ``seed + i`` so the feeders do not move in lockstep. On failure the ones already
    started are closed again.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    started: list[Iec104Outstation] = []
    try:
        for i in range(count):
            o = Iec104Outstation(
                config,
                device,
                host=host,
                port=0 if base_port == 0 else base_port + i,
                seed=None if seed is None else seed + i,
            )
            await o.start()
            started.append(o)
    except BaseException:
        for o in started:
            await o.close()
        raise
    return started


class ControlChannel(LineControlServer):
    """A line-based remote for fault injection, on loopback TCP.

    Commands (one per line, answers ``ok ...`` or ``err <reason>``): :attr:`COMMANDS`, which
    ``help`` lists. Every command applies to every station given.
    """

    COMMANDS = (
        ("stall", "stop reading, answering and sending; connections stay open (a hung device: only t1/t3 notice)"),
        ("resume", "undo stall; frames sent meanwhile are processed now"),
        ("drop", "close every client connection at once (RST); the listener stays open"),
        ("refuse on|off", "answer every command with a negative confirmation (or stop doing so)"),
        ("set NAME VALUE [QDS]", "force a point to VALUE (and quality QDS); answers ok <time.time() of the write>"),
        ("release NAME", "let the feeder model drive NAME again after set"),
        ("refuse-clock on|off", "answer clock synchronisations with a negative confirmation (or stop doing so)"),
        (
            "clock [SECONDS]",
            "put the device clock SECONDS off; answers ok <error now> of the first station (after a "
            "synchronisation: what the client set)",
        ),
        ("travel SECONDS", "breaker travel time through the intermediate position"),
        ("stats", "the counters, one JSON object per station"),
    )

    def __init__(self, outstations: Sequence[Iec104Outstation], *, host: str = "127.0.0.1", port: int = 0) -> None:
        if not outstations:
            raise ValueError("a control channel needs at least one outstation")
        super().__init__(host=host, port=port)
        self._targets = list(outstations)

    async def handle(self, words: list[str]) -> str:
        return self.execute(words)

    def execute(self, words: Sequence[str]) -> str:
        """Run one command line (already split); returns the answer line without newline."""
        cmd, args = words[0].lower(), list(words[1:])
        try:
            if cmd == "stall" and not args:
                for o in self._targets:
                    o.stall()
            elif cmd == "resume" and not args:
                for o in self._targets:
                    o.resume()
            elif cmd == "drop" and not args:
                for o in self._targets:
                    o.drop()
            elif cmd == "refuse" and args in (["on"], ["off"]):
                for o in self._targets:
                    o.refuse_commands(args[0] == "on")
            elif cmd == "set" and len(args) in (2, 3):
                quality = Quality(int(args[2], 0)) if len(args) == 3 else None
                times = [o.set_value(args[0], float(args[1]), quality) for o in self._targets]
                return f"ok {times[0]:.6f}"
            elif cmd == "release" and len(args) == 1:
                for o in self._targets:
                    o.release(args[0])
            elif cmd == "refuse-clock" and args in (["on"], ["off"]):
                for o in self._targets:
                    o.refuse_clock_sync(args[0] == "on")
            elif cmd == "clock" and len(args) <= 1:
                for o in self._targets:
                    if args:
                        o.set_clock_error(float(args[0]))
                return f"ok {self._targets[0].clock_error_s:.6f}"
            elif cmd == "travel" and len(args) == 1:
                for o in self._targets:
                    o.set_breaker_travel(float(args[0]))
            elif cmd == "stats" and not args:
                rows = [{"station": o.name, "port": o.port, **o.stats().as_dict()} for o in self._targets]
                return "ok " + json.dumps(rows)
            else:
                return f"err unknown command or wrong arguments: {' '.join(words)}"
        except (KeyError, ValueError) as exc:
            return f"err {exc}"
        return "ok"
