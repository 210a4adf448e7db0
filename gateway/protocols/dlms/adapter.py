"""DLMS/COSEM client adapter: gurux-dlms builds and parses the APDUs, asyncio streams carry them.

gurux-dlms is used sans-I/O: it turns requests into frames (WRAPPER or HDLC) and parses
replies (``getData``); this module owns the socket (asyncio streams, no threads), the
association (SNRM/UA for HDLC, AARQ/AARE, HLS passes 3/4), the polling schedule and error
mapping. Suite-0 AES-GCM goes through ``cryptography`` (:mod:`.fastgcm`), not gurux's
pure-Python cipher.

One session (TCP connection + association) per meter; every request goes through the one
session task in order (DLMS is request/response, one outstanding request). The schedule:
registers every ``poll_period_s``, the clock every ``clock_period_s`` (its drift from this
host is the ``clock_drift_ms`` stat), the load profile every ``read_period_s`` by range from
the last row already seen, so each read only fetches new rows.

Errors: a refused association (wrong password, wrong key) is :class:`AssociationRefused`; an
object the meter does not know is :class:`ObjectUnavailable` (the point is reported invalid,
polling goes on); a frame gurux cannot parse, a timeout or a dropped connection (e.g. the meter
restarted) ends the session: the link goes DOWN with the reason, the points are flagged not
topical, and the adapter reconnects with capped, jittered backoff. Each is counted in stats().
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import io
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gurux_dlms import GXByteBuffer, GXDLMSException, GXReplyData
from gurux_dlms.enums import Authentication, InterfaceType, Security
from gurux_dlms.objects import GXDLMSClock, GXDLMSData, GXDLMSExtendedRegister, GXDLMSProfileGeneric, GXDLMSRegister
from gurux_dlms.secure import GXDLMSSecureClient

from gateway.config import UNIT_SI_FACTORS, Device, DlmsAddress, Point
from gateway.errors import CommandInvalid, CommandTimeout, DeviceError, LinkError
from gateway.points import CommandRequest, PointUpdate, Quality, UpdateCause, now
from gateway.protocols.base import Adapter, LinkState, LinkStateChange
from gateway.protocols.dlms import fastgcm

log = logging.getLogger(__name__)

__all__ = ["AssociationRefused", "DlmsAdapter", "FrameError", "ObjectUnavailable", "unit_factor"]

fastgcm.install()

Event = PointUpdate | LinkStateChange

_AUTH = {"none": Authentication.NONE, "low": Authentication.LOW, "high_gmac": Authentication.HIGH_GMAC}

#: DLMS unit code -> (unit name, SI factor); a value is converted into its point's unit
_DLMS_UNITS: dict[int, tuple[str, float]] = {
    35: ("V", 1.0),
    33: ("A", 1.0),
    27: ("W", 1.0),
    29: ("var", 1.0),
    28: ("VA", 1.0),
    30: ("Wh", 1.0),
    32: ("varh", 1.0),
    44: ("Hz", 1.0),
    255: ("1", 1.0),
}
_POINT_UNIT_SI = UNIT_SI_FACTORS
_DAR_NAMES = {
    1: "hardware fault",
    2: "temporary failure",
    3: "read-write denied",
    4: "object undefined",
    9: "object class inconsistent",
    11: "object unavailable",
    12: "type unmatched",
    13: "scope of access violated",
    250: "other reason",
}
_DIAGNOSTICS = {
    1: "no reason given",
    2: "application context name not supported",
    11: "authentication mechanism name not recognised",
    12: "authentication mechanism name required",
    13: "authentication failure",
    14: "authentication required",
}


class AssociationRefused(DeviceError):
    """The meter refused the association (wrong password or key, wrong mechanism)."""


class ObjectUnavailable(DeviceError):
    """The meter answered a GET with a data-access-result error (e.g. object undefined)."""

    def __init__(self, device: str, what: str, code: int) -> None:
        self.code = code
        super().__init__(device, f"{what}: {_DAR_NAMES.get(code, f'data access result {code}')}")


class FrameError(LinkError):
    """A reply frame gurux could not parse (garbled, wrong check sequence): the session resyncs."""


def unit_factor(dlms_unit: int, point_unit: str) -> float | None:
    """Factor from the meter's unit to the point's unit; None when they do not match."""
    meter = _DLMS_UNITS.get(dlms_unit)
    if meter is None or point_unit not in _POINT_UNIT_SI:
        return None
    name, si = meter
    if name == "1" or point_unit == "1":
        return 1.0 if name == point_unit else None
    # the same family: the unit names share their last letters (Wh, kWh; var, kvar; ...)
    if not point_unit.endswith(name) or (name == "W" and point_unit.endswith("Wh")):
        return None
    return si / _POINT_UNIT_SI[point_unit]


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    cap = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return rng.uniform(min(initial_s, cap) / 2, cap)


@dataclass
class _Register:
    point: Point
    address: DlmsAddress
    obj: Any
    scaler: int | None = None  # None: not read yet in this session
    factor: float = 1.0


class _Session:
    """One TCP connection and association; request/response with timeouts."""

    def __init__(
        self,
        device: Device,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        client: GXDLMSSecureClient,
        counters: collections.Counter[str],
    ) -> None:
        self.device = device
        self.reader = reader
        self.writer = writer
        self.client = client
        self.counters = counters
        self.timeout_s = device.dlms.response_timeout_s
        self.hdlc = device.dlms.framing == "hdlc"

    async def _read_frame(self) -> bytes:
        if self.hdlc:
            await self.reader.readuntil(b"\x7e")
            head = await self.reader.readexactly(2)
            if head[0] == 0x7E:  # closing flag of a previous frame doubling as opening flag
                head = head[1:] + await self.reader.readexactly(1)
            length = ((head[0] & 0x07) << 8) | head[1]
            rest = await self.reader.readexactly(length - 2 + 1)
            return b"\x7e" + head + rest
        head = await self.reader.readexactly(8)
        return head + await self.reader.readexactly(int.from_bytes(head[6:8], "big"))

    async def exchange(self, frames: Any, what: str) -> GXReplyData:
        """Send the request frame(s) and collect the whole reply (HDLC segments, blocks)."""
        if isinstance(frames, bytes | bytearray):
            frames = [frames]
        reply = GXReplyData()
        for frame in frames:
            reply.clear()
            await self._send(bytes(frame))
            await self._receive(reply, what)
            while reply.isMoreData():
                more = self.client.receiverReady(reply)
                await self._send(bytes(more))
                await self._receive(reply, what)
        return reply

    async def _send(self, frame: bytes) -> None:
        self.writer.write(frame)
        self.counters["frames_out"] += 1
        await self.writer.drain()

    async def _receive(self, reply: GXReplyData, what: str) -> None:
        buf = GXByteBuffer()
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    buf.set(await self._read_frame())
                    self.counters["frames_in"] += 1
                    try:
                        # gurux prints "Authentication is applied." for every ciphered reply
                        with contextlib.redirect_stdout(_DISCARD):
                            done = self.client.getData(buf, reply, None)
                    except GXDLMSException:
                        raise
                    except Exception as exc:  # gurux raises ValueError/IndexError/... on garbage
                        self.counters["garbled_frames"] += 1
                        raise FrameError(self.device.name, f"garbled reply to {what}: {exc}") from exc
                    if done:
                        return
        except TimeoutError:
            self.counters["timeouts"] += 1
            raise LinkError(self.device.name, f"no reply to {what} within {self.timeout_s:g} s") from None
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError) as exc:
            raise LinkError(self.device.name, f"connection lost during {what}: {exc!r}") from None

    async def read(self, obj: Any, attribute: int, what: str) -> Any:
        try:
            reply = await self.exchange(self.client.read(obj, attribute), what)
        except GXDLMSException as exc:
            self.counters["object_errors"] += 1
            raise ObjectUnavailable(self.device.name, what, int(exc.errorCode)) from None
        if reply.error:
            self.counters["object_errors"] += 1
            raise ObjectUnavailable(self.device.name, what, int(reply.error))
        self.counters["reads"] += 1
        return reply.value

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True, slots=True)
class _ReadRequest:
    point: str
    future: asyncio.Future[PointUpdate]


class DlmsAdapter(Adapter):
    """A DLMS/COSEM meter over TCP (WRAPPER or HDLC), LN referencing, polled on a schedule."""

    def __init__(self, device: Device, points: tuple[Point, ...], *, queue_max: int = 100_000) -> None:
        super().__init__(device, points)
        self._queue: asyncio.Queue[Event] = asyncio.Queue(queue_max)
        self._requests: asyncio.Queue[_ReadRequest] = asyncio.Queue(1000)
        self._registers: dict[str, _Register] = {}
        for p in points:
            addr = p.address
            if not isinstance(addr, DlmsAddress):
                raise TypeError(f"point {p.name} has no DLMS address")
            cls = {1: GXDLMSData, 3: GXDLMSRegister, 4: GXDLMSExtendedRegister}[addr.class_id]
            self._registers[p.name] = _Register(p, addr, cls(addr.obis))
        self._state = LinkState.CLOSED
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._counters: collections.Counter[str] = collections.Counter()
        self._rng = random.Random()
        self._dropped = 0
        self._unknown_reported: set[str] = set()
        # HLS: the client invocation counter must only grow, across sessions and restarts of
        # the gateway: it starts from the clock (10 per second since 2024) and counts on.
        self._invocation_counter = max(1, int((time.time() - 1.7e9) * 10))
        self._profile: Any = None
        self._profile_columns: list[tuple[int, _Register]] | None = None
        self._profile_last: float | None = None
        self.clock_drift_s: float | None = None
        self._stale_flagged = False
        self.last_error: str = ""

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        dlms = self.device.dlms
        # `mgms run` refuses an unset variable before it starts anything (gateway.preflight);
        # this catches an adapter built by other code (tests, tools) the same way
        try:
            for key in dlms.needed_secrets:
                dlms.secret(key)
        except (LookupError, ValueError) as exc:  # unset, or not 16 octets of hex
            raise DeviceError(self.device.name, str(exc)) from None
        self._task = asyncio.create_task(self._supervise(), name=f"dlms:{self.device.name}")

    def _why_down(self) -> str:
        return f" ({self.last_error})" if self.last_error else ""

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._set_state(LinkState.CLOSED, "closed")
        self._emit_end()

    @property
    def link_state(self) -> LinkState:
        return self._state

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        out["events_dropped"] = self._dropped
        if self.clock_drift_s is not None:
            out["clock_drift_ms"] = round(self.clock_drift_s * 1000)
        return out

    async def events(self) -> AsyncIterator[Event]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            yield item

    def _emit(self, item: Event) -> None:
        if self._queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self._queue.get_nowait()
            self._dropped += 1
            if self._dropped in (1, 10, 100, 1000) or self._dropped % 10000 == 0:
                log.warning("%s: event queue full: %d events dropped so far", self.device.name, self._dropped)
        self._queue.put_nowait(item)

    def _emit_end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)

    def _set_state(self, state: LinkState, reason: str = "") -> None:
        if state is self._state:
            return
        self._state = state
        log.info("%s: link %s%s", self.device.name, state.value, f" ({reason})" if reason else "")
        self._emit(LinkStateChange(self.device.name, state, reason))

    # ----------------------------------------------------------------- requests

    async def read(self, point: str) -> PointUpdate:
        if point not in self._registers:
            raise CommandInvalid(point, f"not a point of device {self.device.name}")
        if not self._up.is_set():
            raise LinkError(self.device.name, f"link is {self._state.value}")
        fut: asyncio.Future[PointUpdate] = asyncio.get_running_loop().create_future()
        self._requests.put_nowait(_ReadRequest(point, fut))
        try:
            async with asyncio.timeout(self.device.dlms.response_timeout_s * 2):
                return await fut
        except TimeoutError:
            raise CommandTimeout(point, "no answer to read") from None

    async def interrogate(self) -> None:
        """Read every register now (the DLMS counterpart of a general interrogation)."""
        if not self._up.is_set():
            raise LinkError(self.device.name, f"link is {self._state.value}")
        await asyncio.gather(*(self.read(name) for name in self._registers))

    async def command(self, request: CommandRequest) -> float:
        raise CommandInvalid(request.point, "DLMS points are monitor-only")

    # ----------------------------------------------------------------- session

    def _new_client(self) -> GXDLMSSecureClient:
        dlms = self.device.dlms
        framing = InterfaceType.HDLC if dlms.framing == "hdlc" else InterfaceType.WRAPPER
        password = dlms.secret("password") if dlms.security == "low" else None
        client = GXDLMSSecureClient(True, dlms.client_sap, dlms.server_address, _AUTH[dlms.security], password, framing)
        if dlms.security == "high_gmac":
            client.ciphering.security = Security.AUTHENTICATION
            client.ciphering.systemTitle = bytes.fromhex(dlms.system_title)
            client.ciphering.blockCipherKey = bytes.fromhex(dlms.secret("block_cipher_key") or "")
            client.ciphering.authenticationKey = bytes.fromhex(dlms.secret("authentication_key") or "")
            client.ciphering.invocationCounter = self._invocation_counter
        return client

    async def _connect(self) -> _Session:
        dev = self.device
        timeout = dev.dlms.response_timeout_s
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(dev.host, dev.port)
        except TimeoutError:
            raise LinkError(dev.name, f"connect to {dev.host}:{dev.port} timed out") from None
        except OSError as exc:
            raise LinkError(dev.name, f"connect to {dev.host}:{dev.port} failed: {exc.strerror or exc}") from None
        client = self._new_client()
        session = _Session(dev, reader, writer, client, self._counters)
        try:
            started = time.perf_counter()
            if session.hdlc:
                reply = await session.exchange(client.snrmRequest(), "SNRM")
                client.parseUAResponse(reply.data)
            reply = await session.exchange(client.aarqRequest(), "AARQ")
            try:
                with contextlib.redirect_stdout(_DISCARD):  # gurux prints on ciphered AAREs
                    client.parseAareResponse(reply.data)
            except GXDLMSException as exc:
                diag = getattr(exc, "diagnostic", None)
                why = _DIAGNOSTICS.get(int(diag), str(exc).replace("\r\n", ", ")) if diag is not None else str(exc)
                self._counters["associations_refused"] += 1
                raise AssociationRefused(dev.name, f"association refused: {why}") from None
            except ValueError as exc:
                self._counters["associations_refused"] += 1
                raise AssociationRefused(dev.name, f"association refused: {exc}") from None
            if dev.dlms.security == "high_gmac":
                try:
                    reply = await session.exchange(client.getApplicationAssociationRequest(), "HLS pass 3")
                    with contextlib.redirect_stdout(_DISCARD):
                        client.parseApplicationAssociationResponse(reply.data)
                except (GXDLMSException, ValueError) as exc:
                    self._counters["associations_refused"] += 1
                    raise AssociationRefused(dev.name, f"HLS-GMAC authentication failed: {exc}") from None
            self._counters["association_us"] = round((time.perf_counter() - started) * 1e6)
        except BaseException:
            self._save_counter(client)
            session.close()
            raise
        return session

    def _save_counter(self, client: GXDLMSSecureClient) -> None:
        if self.device.dlms.security == "high_gmac":
            self._invocation_counter = max(self._invocation_counter, int(client.ciphering.invocationCounter) + 1)

    async def _supervise(self) -> None:
        dev = self.device
        attempt = 0
        while not self._closing:
            self._set_state(LinkState.CONNECTING, f"attempt {attempt + 1} to {dev.host}:{dev.port}")
            reason = ""
            session: _Session | None = None
            try:
                session = await self._connect()
                self._counters["connects"] += 1
                self.last_error = ""
                self._set_state(LinkState.UP, f"{dev.host}:{dev.port} ({dev.dlms.framing}, {dev.dlms.security})")
                self._stale_flagged = False
                self._up.set()
                up_at = time.monotonic()
                await self._run_session(session)
            except AssociationRefused as exc:
                reason = str(exc).removeprefix(f"{dev.name}: ")
            except LinkError as exc:
                reason = str(exc).removeprefix(f"{dev.name}: ")
                if self._up.is_set() and time.monotonic() - up_at > max(5.0, dev.reconnect.initial_s * 4):
                    attempt = 0
            finally:
                if session is not None:
                    self._save_counter(session.client)
                    session.close()
            self._up.clear()
            self.last_error = reason
            self._fail_requests(reason)
            self._flag_stale()
            self._set_state(LinkState.DOWN, reason)
            delay = backoff_delay(attempt, dev.reconnect.initial_s, dev.reconnect.max_s, self._rng)
            attempt += 1
            self._counters["reconnect_attempts"] += 1
            await asyncio.sleep(delay)

    def _fail_requests(self, reason: str) -> None:
        while not self._requests.empty():
            req = self._requests.get_nowait()
            if not req.future.done():
                req.future.set_exception(LinkError(self.device.name, reason))

    def _flag_stale(self) -> None:
        """Points go ``not_topical,invalid`` once per outage, not on every failed retry."""
        if self._stale_flagged:
            return
        self._stale_flagged = True
        t = now()
        for name in self._registers:
            self._emit(PointUpdate(name, None, Quality.NOT_TOPICAL | Quality.INVALID, None, t, UpdateCause.LINK_LOST))

    async def _run_session(self, session: _Session) -> None:
        """Serve the schedule and on-demand reads on one session until it fails."""
        dlms = self.device.dlms
        for reg in self._registers.values():
            reg.scaler = None
        self._profile_columns = None
        loop = asyncio.get_running_loop()
        due = {
            "poll": loop.time(),
            "clock": loop.time() if dlms.clock_obis else float("inf"),
            "profile": loop.time() if dlms.load_profile is not None else float("inf"),
        }
        periods = {
            "poll": dlms.poll_period_s,
            "clock": dlms.clock_period_s,
            "profile": dlms.load_profile.read_period_s if dlms.load_profile is not None else 0.0,
        }
        while True:
            job = min(due, key=due.__getitem__)
            wait = due[job] - loop.time()
            if wait > 0:
                try:
                    async with asyncio.timeout(wait):
                        req = await self._requests.get()
                except TimeoutError:
                    pass
                else:
                    await self._serve_read(session, req)
                    continue
            due[job] = max(due[job] + periods[job], loop.time())
            if job == "poll":
                await self._poll(session, UpdateCause.PERIODIC)
            elif job == "clock":
                await self._read_clock(session)
            else:
                await self._read_profile(session)

    async def _serve_read(self, session: _Session, req: _ReadRequest) -> None:
        try:
            upd = await self._read_register(session, self._registers[req.point], UpdateCause.REQUESTED)
        except ObjectUnavailable as exc:
            if not req.future.done():
                req.future.set_exception(exc)
            return
        except BaseException as exc:
            if not req.future.done():
                req.future.set_exception(exc if isinstance(exc, Exception) else LinkError(self.device.name, "closed"))
            raise
        if not req.future.done():
            req.future.set_result(upd)

    async def _poll(self, session: _Session, cause: UpdateCause) -> None:
        for reg in self._registers.values():
            with contextlib.suppress(ObjectUnavailable):  # reported as an invalid value, polling goes on
                await self._read_register(session, reg, cause)

    async def _read_register(self, session: _Session, reg: _Register, cause: UpdateCause) -> PointUpdate:
        pt = reg.point
        what = f"{pt.name} ({reg.address.describe()})"
        try:
            if reg.scaler is None:
                if reg.address.class_id in (3, 4):
                    scaler_unit = await session.read(reg.obj, 3, f"{what} scaler/unit")
                    scaler, unit = int(scaler_unit[0]), int(scaler_unit[1])
                    factor = unit_factor(unit, pt.unit)
                    if factor is None:
                        self._counters["unit_mismatch"] += 1
                        log.warning(
                            "%s: meter unit %d does not fit %s's unit %s; value taken as is",
                            self.device.name,
                            unit,
                            pt.name,
                            pt.unit,
                        )
                        factor = 1.0
                    reg.scaler, reg.factor = scaler, factor
                else:
                    reg.scaler, reg.factor = 0, 1.0
            raw = await session.read(reg.obj, reg.address.attribute, what)
        except ObjectUnavailable as exc:
            self._counters["unknown_objects" if exc.code in (4, 9, 11) else "read_errors"] += 1
            if pt.name not in self._unknown_reported:
                self._unknown_reported.add(pt.name)
                log.warning("%s", exc)
            self._emit(PointUpdate(pt.name, None, Quality.INVALID, None, now(), cause))
            raise
        value = pt.to_engineering(float(raw) * (10.0**reg.scaler) * reg.factor)
        upd = PointUpdate(pt.name, value, Quality.GOOD, None, now(), cause)
        self._emit(upd)
        return upd

    async def _read_clock(self, session: _Session) -> None:
        clock = GXDLMSClock(self.device.dlms.clock_obis)
        sent = time.time()
        try:
            raw = await session.read(clock, 2, "clock")
        except ObjectUnavailable as exc:
            log.warning("%s", exc)
            return
        received = time.time()
        meter_time = _cosem_time(raw)
        if meter_time is None:
            self._counters["clock_unreadable"] += 1
            return
        self.clock_drift_s = meter_time - (sent + received) / 2
        self._counters["clock_reads"] += 1

    async def _read_profile(self, session: _Session) -> None:
        lp = self.device.dlms.load_profile
        assert lp is not None
        if self._profile_columns is None:
            profile = GXDLMSProfileGeneric(lp.obis)
            try:
                value = await session.read(profile, 3, "load profile capture objects")
            except ObjectUnavailable as exc:
                log.warning("%s", exc)
                return
            session.client.updateValue(profile, 3, value)
            columns: list[tuple[int, _Register]] = []
            by_key = {(r.address.obis, r.address.attribute): r for r in self._registers.values()}
            for index, (obj, capture) in enumerate(profile.captureObjects):
                reg = by_key.get((obj.logicalName, capture.attributeIndex))
                if reg is not None:
                    columns.append((index, reg))
            self._profile, self._profile_columns = profile, columns
            for _, reg in columns:  # the scaler of each captured register
                if reg.scaler is None:
                    with contextlib.suppress(ObjectUnavailable):
                        await self._read_register(session, reg, UpdateCause.PERIODIC)
        profile = self._profile
        start = self._profile_last + 1.0 if self._profile_last is not None else time.time() - lp.backfill_s
        end = time.time() + 3600.0
        frames = session.client.readRowsByRange(
            profile, dt.datetime.fromtimestamp(start, dt.UTC), dt.datetime.fromtimestamp(end, dt.UTC)
        )
        try:
            reply = await session.exchange(frames, "load profile rows")
        except GXDLMSException as exc:
            raise ObjectUnavailable(self.device.name, "load profile rows", int(exc.errorCode)) from None
        if reply.error:
            self._counters["object_errors"] += 1
            log.warning("%s: load profile read refused (%s)", self.device.name, reply.error)
            return
        rows = reply.value or []
        self._counters["profile_reads"] += 1
        fresh = 0
        for row in rows:
            t = _cosem_time(row[0])
            if t is None or (self._profile_last is not None and t <= self._profile_last):
                self._counters["profile_rows_repeated"] += 1
                continue
            fresh += 1
            self._profile_last = t
            for index, reg in self._profile_columns or []:
                if reg.scaler is None or index >= len(row):
                    continue
                value = reg.point.to_engineering(float(row[index]) * (10.0**reg.scaler) * reg.factor)
                self._emit(PointUpdate(reg.point.name, value, Quality.GOOD, t, now(), UpdateCause.PERIODIC))
        self._counters["profile_rows"] += fresh


def _cosem_time(raw: Any) -> float | None:
    """A COSEM date-time (octet string or gurux GXDateTime) -> Unix time; None if unspecified."""
    value = getattr(raw, "value", None)
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(raw, bytes | bytearray) and len(raw) == 12:
        year = int.from_bytes(raw[0:2], "big")
        if year == 0xFFFF or not 1 <= raw[2] <= 12 or not 1 <= raw[3] <= 31 or raw[5] > 23 or raw[6] > 59:
            return None
        t = dt.datetime(year, raw[2], raw[3], raw[5], raw[6], min(raw[7], 59), tzinfo=dt.UTC).timestamp()
        if raw[8] != 0xFF:
            t += raw[8] / 100
        deviation = int.from_bytes(raw[9:11], "big", signed=True)
        if deviation != -0x8000:
            t += deviation * 60
        return t
    return None


_END: Any = object()


class _Discard(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


_DISCARD = _Discard()
