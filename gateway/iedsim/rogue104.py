"""A rogue IEC 60870-5-104 outstation: correct until told to misbehave, then misbehaves on demand.

Why: :mod:`gateway.iedsim.iec104` only ever sends what a correct outstation sends, so the
gateway's clients were never shown what a broken device, a bad link or an attacker sends:
c104 2.2.1 crashed the whole process on such input (docs/protocol-notes.md). This server
speaks just enough 104 for a client to get going (STARTDT con, TESTFR con, an S-frame for
every I-frame of the client, a general interrogation answered with ACTCON, one value per
configured monitor point and ACTTERM, reads answered, other commands mirrored as ACTCON)
and then, on :meth:`RogueOutstation.misbehave`, sends one of :data:`SCENARIOS` on the
newest connection.

What each scenario makes a client that follows IEC 60870-5-104 do is stated with it
(:attr:`Scenario.closes`): bad framing, a receive sequence error or acknowledgement of
frames never sent must close the connection (5.1, 5.2); an unknown type id or address is
the application's business and the link stays; a stall is found by t3 and t1 (5.2).

Loopback only, and bounded: every scenario ends in seconds (a stall lasts what the caller
says, a flood is as long as the caller says); the random octets come from a seeded RNG so a
test run is repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.config import Direction, Point, iec104_address
from gateway.protocols.iec104.codec import (
    MAX_ASDU_LENGTH,
    SEQ_MODULO,
    START,
    Asdu,
    Cot,
    Cp56Time,
    DoublePointInfo,
    Element,
    FloatInfo,
    FrameDecoder,
    FrameError,
    InfoObject,
    NormalizedInfo,
    ScaledInfo,
    SFrame,
    SinglePointInfo,
    TypeId,
    UFrame,
    UFunction,
    encode_asdu,
    encode_frame,
    mirror,
)

__all__ = ["SCENARIOS", "RogueOutstation", "RoguePoint", "Scenario", "monitor_points"]

_log = logging.getLogger(__name__)

_SEQ_MASK: Final = SEQ_MODULO - 1
#: unassigned type identification (IEC 60870-5-101 table 8: 22..29 reserved)
UNKNOWN_TYPE_ID: Final = 25
#: first information object address of a flood, far above any configured one
FLOOD_FIRST_IOA: Final = 900_000
_FLOOD_PER_ASDU: Final = 30  # M_ME_NC_1 SQ=0: 6 + 30 * 8 = 246 octets <= 249
#: value the scenarios that keep the link send after their misbehaviour, to show it still works
PROOF_VALUE: Final = 123.25


@dataclass(frozen=True, slots=True)
class Scenario:
    """One kind of misbehaviour and what the standard wants a client to make of it.

    ``counted_as`` names the asyncio client's stats (``AsyncIec104Adapter.stats()``) that
    count the case (any of them; a case may reach the client in more than one way).
    """

    name: str
    what: str
    closes: bool
    counted_as: tuple[str, ...]


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario("garbage", "200 random octets (the first not 0x68)", True, ("garbled_frames",)),
        Scenario(
            "truncated",
            "the first 9 of the 27 octets of a value APDU, then correct answers (swallowed into it)",
            True,
            ("t1_timeouts", "garbled_frames"),
        ),
        Scenario(
            "oversized", "an I-frame with length octet 255 (> 253) and 255 octets after it", True, ("garbled_frames",)
        ),
        Scenario("length1", "an APDU with length octet 1 (APCI needs 4)", True, ("garbled_frames",)),
        Scenario("long_u_frame", "TESTFR con with length octet 5 (a U-frame is 4)", True, ("garbled_frames",)),
        Scenario(
            "unknown_type",
            f"an I-frame with the unassigned type id {UNKNOWN_TYPE_ID}, then a value",
            False,
            ("unknown_types",),
        ),
        Scenario("ns_gap", "an I-frame whose N(S) is 100 ahead of the expected one", True, ("sequence_errors",)),
        Scenario("nr_ahead", "an S-frame whose N(R) acknowledges 50 I-frames never sent", True, ("ack_errors",)),
        Scenario(
            "random_apdu",
            "5 correctly framed I-frames with random 249-octet ASDUs, then a value",
            False,
            ("garbled_asdus", "unknown_types", "unknown_points"),
        ),
        Scenario("trickle", "a valid value APDU (23 octets, M_SP_TB_1) sent one octet per 0.3 s", False, ()),
        Scenario("stall", "silence: no TESTFR con, no S-frame, no STARTDT con, for stall_s", True, ("t1_timeouts",)),
        Scenario(
            "flood",
            f"flood_n values on unconfigured IOAs from {FLOOD_FIRST_IOA}, {_FLOOD_PER_ASDU} per ASDU, then a value",
            False,
            ("unknown_points",),
        ),
    )
}


@dataclass(frozen=True, slots=True)
class RoguePoint:
    """A monitor point the rogue answers a general interrogation with, in its configured type."""

    ioa: int
    type_id: TypeId


def monitor_points(points: Sequence[Point]) -> tuple[RoguePoint, ...]:
    """The monitor points of a lab config's device the codec can encode (others are skipped)."""
    out = []
    for p in points:
        if p.direction is not Direction.MONITOR:
            continue
        addr = iec104_address(p)
        type_id = TypeId.__members__.get(addr.type)
        if type_id is not None and _element(type_id, 0.0) is not None:
            out.append(RoguePoint(addr.ioa, type_id))
    return tuple(out)


def _element(type_id: TypeId, value: float) -> Element | None:
    name = type_id.name
    if name.startswith("M_SP_"):
        return SinglePointInfo(bool(value))
    if name.startswith("M_DP_"):
        return DoublePointInfo(int(value) & 3)
    if name in ("M_ME_NA_1", "M_ME_TD_1"):
        return NormalizedInfo(max(-1.0, min(value / 1000.0, 0.99)))
    if name in ("M_ME_NB_1", "M_ME_TE_1"):
        return ScaledInfo(int(value) & 0x7FFF)
    if name in ("M_ME_NC_1", "M_ME_TF_1"):
        return FloatInfo(value)
    return None


#: what a general interrogation reports: breakers ON, single points off, measurands 230 + n
_DEFAULTS: Final = {"M_DP": 2.0, "M_SP": 0.0}


def _timed(type_id: TypeId) -> bool:
    return type_id.name.endswith(("TB_1", "TD_1", "TE_1", "TF_1"))


def _seq(n: int) -> bytes:
    return ((n & _SEQ_MASK) << 1).to_bytes(2, "little")


class _Session(asyncio.Protocol):
    """One client connection: the correct part of the outstation, plus raw writes for scenarios."""

    def __init__(self, rogue: RogueOutstation) -> None:
        self._rogue = rogue
        self._decoder = FrameDecoder()
        self.transport: asyncio.Transport | None = None
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.vs = 0  # our next N(S)
        self.vr = 0  # I-frames received from the client (its V(S) as we know it)
        self.acked = 0  # our oldest I-frame the client has not acknowledged
        self.ack_moved = asyncio.Event()
        self.holding = False  # a trickle is under way: other output waits, or it would land mid-frame
        self._held: list[bytes] = []

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._rogue._sessions.append(self)
        self._rogue.connections += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.closed.set()
        self.ack_moved.set()
        with contextlib.suppress(ValueError):
            self._rogue._sessions.remove(self)

    def data_received(self, data: bytes) -> None:
        try:
            frames = list(self._decoder.feed(data))
        except FrameError as exc:
            _log.warning("rogue: client sent bad framing (%s); closing", exc)
            self.abort()
            return
        for f in frames:
            if isinstance(f, UFrame):
                self._on_u(f.function)
            elif isinstance(f, SFrame):
                self._on_ack(f.recv_seq)
            else:
                self.vr = (self.vr + 1) & _SEQ_MASK
                self._on_ack(f.recv_seq)
                if not self._rogue.stalled:
                    self.write(encode_frame(SFrame(self.vr)))
                    self._on_asdu(f.asdu)

    # -- the correct part --------------------------------------------------------------

    def _on_u(self, fn: UFunction) -> None:
        if self._rogue.stalled:
            return
        if fn is UFunction.STARTDT_ACT:
            self.write(encode_frame(UFrame(UFunction.STARTDT_CON)))
            self.started.set()
        elif fn is UFunction.STOPDT_ACT:
            self.write(encode_frame(UFrame(UFunction.STOPDT_CON)))
        elif fn is UFunction.TESTFR_ACT:
            self.write(encode_frame(UFrame(UFunction.TESTFR_CON)))

    def _on_ack(self, nr: int) -> None:
        self.acked = nr
        self.ack_moved.set()

    def _on_asdu(self, raw: bytes) -> None:
        if len(raw) < 6:
            return
        type_id, cot = raw[0], raw[2] & 0x3F
        if type_id == TypeId.C_IC_NA_1 and cot == Cot.ACTIVATION:
            self.send_i(mirror(raw, Cot.ACTIVATION_CON))
            for asdu in self._rogue.values(Cot.INTERROGATED_BY_STATION):
                self.send_i(asdu)
            self.send_i(mirror(raw, Cot.ACTIVATION_TERMINATION))
        elif type_id == TypeId.C_RD_NA_1 and len(raw) >= 9:
            ioa = raw[6] | raw[7] << 8 | raw[8] << 16
            asdus = self._rogue.values(Cot.REQUEST, only=ioa)
            if asdus:
                for asdu in asdus:
                    self.send_i(asdu)
            else:
                self.send_i(mirror(raw, Cot.UNKNOWN_IOA, negative=True))
        elif 45 <= type_id <= 107:  # commands, clock sync, test command: confirmed, nothing done
            self.send_i(mirror(raw, Cot.ACTIVATION_CON))

    # -- output ------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.holding:
            self._held.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def write_now(self, data: bytes) -> None:
        """Past the hold: the scenario's own octets."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def release(self) -> None:
        self.holding = False
        held, self._held = self._held, []
        for data in held:
            self.write(data)

    def send_i(self, asdu: bytes) -> None:
        self.write(self.i_frame(asdu))

    def i_frame(self, asdu: bytes, *, ns: int | None = None) -> bytes:
        """A complete I-frame with our next N(S) (or ``ns``), taking the sequence number."""
        frame = bytes((START, 4 + len(asdu))) + _seq(self.vs if ns is None else ns) + _seq(self.vr) + asdu
        self.vs = (self.vs + 1) & _SEQ_MASK
        return frame

    def window_open(self, k: int) -> bool:
        return (self.vs - self.acked) & _SEQ_MASK < k

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class RogueOutstation:
    """An outstation on loopback that a test can make misbehave; see the module docstring.

    ``points`` are what a general interrogation is answered with (:func:`monitor_points`
    makes them from a lab config); ``k`` is the window the flood respects.
    """

    def __init__(
        self,
        points: Sequence[RoguePoint],
        *,
        common_address: int = 1,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
        k: int = 12,
    ) -> None:
        self.points = tuple(points)
        self.common_address = common_address
        self._host, self._port_wanted = host, port
        self._rng = random.Random(seed)
        self.k = k
        self.stalled = False
        self.connections = 0
        self.scenarios_run: list[str] = []
        self._sessions: list[_Session] = []
        self._server: asyncio.Server | None = None
        self._port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Session(self), self._host, self._port_wanted)
        self._port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for s in list(self._sessions):
            s.abort()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)

    async def __aenter__(self) -> RogueOutstation:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def port(self) -> int:
        return self._port

    # -- behaviour ---------------------------------------------------------------------

    def stall(self) -> None:
        """Go silent on every connection, and answer no STARTDT on new ones, until :meth:`resume`."""
        self.stalled = True

    def resume(self) -> None:
        self.stalled = False

    def values(self, cot: Cot, *, only: int | None = None, value: float | None = None) -> list[bytes]:
        """One ASDU per configured point (or only the one at ``only``), values made up."""
        out = []
        stamp = time.time()
        for i, p in enumerate(self.points):
            if only is not None and p.ioa != only:
                continue
            v = value if value is not None else _DEFAULTS.get(p.type_id.name[:4], 230.0 + i)
            element = _element(p.type_id, v)
            assert element is not None  # monitor_points() keeps only encodable types
            obj = InfoObject(p.ioa, element, Cp56Time.from_timestamp(stamp) if _timed(p.type_id) else None)
            out.append(encode_asdu(Asdu(p.type_id, cot, self.common_address, (obj,))))
        return out

    async def send_value(self, timeout_s: float = 2.0) -> bool:
        """Send :data:`PROOF_VALUE` on the newest started connection, correctly numbered:
        whether a client that did not close after a scenario still takes values."""
        try:
            s = await self.session(timeout_s)
        except TimeoutError:
            return False
        s.send_i(self._proof())
        return True

    def _proof(self) -> bytes:
        """A spontaneous value of the first measured point (:data:`PROOF_VALUE`)."""
        for p in self.points:
            if p.type_id.name.startswith("M_ME_N") or p.type_id.name in ("M_ME_TF_1", "M_ME_TD_1", "M_ME_TE_1"):
                return self.values(Cot.SPONTANEOUS, only=p.ioa, value=PROOF_VALUE)[0]
        raise ValueError("the rogue has no measured point to send a value on")

    async def session(self, timeout_s: float = 10.0) -> _Session:
        """The newest connection whose STARTDT was confirmed (waiting for it up to ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                for s in reversed(self._sessions):
                    if s.started.is_set() and s.is_open:
                        return s
                await asyncio.sleep(0.01)

    async def misbehave(
        self,
        name: str,
        *,
        stall_s: float = 5.0,
        flood_n: int = 30_000,
        trickle_s: float = 0.3,
        timeout_s: float = 10.0,
    ) -> None:
        """Run scenario ``name`` on the newest started connection; returns when it is sent
        (a stall: when it is over, a flood: when all of it went or the link closed)."""
        if name not in SCENARIOS:
            raise ValueError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        s = await self.session(timeout_s)
        self.scenarios_run.append(name)
        runs: dict[str, Callable[[_Session], Awaitable[None]]] = {
            "stall": lambda s: self._stall_for(stall_s),
            "flood": lambda s: self._flood(s, flood_n, timeout_s),
            "trickle": lambda s: self._trickle(s, trickle_s),
        }
        run = runs.get(name)
        if run is not None:
            await run(s)
        else:
            s.write_now(self._octets(name, s))

    def _octets(self, name: str, s: _Session) -> bytes:
        rng = self._rng
        if name == "garbage":
            junk = bytearray(rng.randbytes(200))
            if junk[0] == START:
                junk[0] = 0
            return bytes(junk)
        if name == "truncated":
            frame = s.i_frame(self._proof())
            return frame[:9]
        if name == "oversized":
            return bytes((START, 255)) + _seq(s.vs) + _seq(s.vr) + rng.randbytes(251)
        if name == "length1":
            return bytes((START, 1, 0x07))
        if name == "long_u_frame":
            return bytes((START, 5, int(UFunction.TESTFR_CON), 0, 0, 0, 0))
        if name == "unknown_type":
            unknown = bytes((UNKNOWN_TYPE_ID, 1, int(Cot.SPONTANEOUS), 0)) + self.common_address.to_bytes(2, "little")
            return s.i_frame(unknown + bytes((0xE9, 0x03, 0x00, 0x01, 0x02, 0x03, 0x04))) + s.i_frame(self._proof())
        if name == "ns_gap":
            return s.i_frame(self._proof(), ns=(s.vs + 100) & _SEQ_MASK)
        if name == "nr_ahead":
            return bytes((START, 4, 0x01, 0x00)) + _seq(s.vr + 50)
        if name == "random_apdu":
            return b"".join(s.i_frame(rng.randbytes(MAX_ASDU_LENGTH)) for _ in range(5)) + s.i_frame(self._proof())
        raise AssertionError(name)

    async def _stall_for(self, stall_s: float) -> None:
        self.stall()
        try:
            await asyncio.sleep(stall_s)
        finally:
            self.resume()

    async def _trickle(self, s: _Session, trickle_s: float) -> None:
        single = next((p for p in self.points if p.type_id.name.startswith("M_SP")), None)
        if single is None:
            raise ValueError("the rogue has no single point to trickle a value on")
        # in its configured type (c104 drops a value of another type: docs/protocol-notes.md)
        frame = s.i_frame(self.values(Cot.SPONTANEOUS, only=single.ioa, value=1.0)[0])
        s.holding = True
        try:
            for octet in frame:
                if not s.is_open:
                    return
                s.write_now(bytes((octet,)))
                await asyncio.sleep(trickle_s)
        finally:
            s.release()

    async def _flood(self, s: _Session, n: int, timeout_s: float) -> None:
        """``n`` values on unconfigured addresses, at most ``k`` frames unacknowledged."""
        ioa = FLOOD_FIRST_IOA
        end = FLOOD_FIRST_IOA + n
        deadline = asyncio.get_running_loop().time() + timeout_s
        while ioa < end and s.is_open:
            if not s.window_open(self.k):
                s.ack_moved.clear()
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise TimeoutError(f"flood: the client stopped acknowledging at ioa {ioa}")
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await s.ack_moved.wait()
                continue
            count = min(_FLOOD_PER_ASDU, end - ioa)
            objs = tuple(InfoObject(ioa + i, FloatInfo(float(i))) for i in range(count))
            s.send_i(encode_asdu(Asdu(TypeId.M_ME_NC_1, Cot.SPONTANEOUS, self.common_address, objs)))
            ioa += count
        if s.is_open:
            s.send_i(self._proof())
