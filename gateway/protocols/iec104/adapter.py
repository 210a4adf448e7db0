"""IEC 60870-5-104 client adapter on c104 (lib60870).

No ``from __future__ import annotations`` here: c104 checks callback annotations as real
objects and rejects string annotations.

Threads: c104 calls every callback (values, link state, raw frames) on its own receive
thread with the GIL held. Callbacks here only build an immutable event and hand it to the
event loop through :class:`_ThreadBridge` (one ``call_soon_threadsafe`` per burst, not per
value); blocking c104 calls (``start``/``stop``, ``transmit``, ``interrogation``, ``read``)
run through ``asyncio.to_thread``. The event loop is never blocked by c104.

Reconnect: c104 retries a lost connection every second by itself and ``disconnect()`` does
not stop that (measured). The adapter therefore owns the retry schedule: on loss it stops
the whole c104 client (one per device), waits a capped, jittered backoff and starts it again.

Commands: ``Point.transmit()`` returns True for a negative ACTCON on an unknown address and
False for several unrelated reasons (measured), so the adapter reads the device's own answer
from the raw frames (P/N bit and cause of transmission of the ACTCON, select vs execute from
the S/E bit) and uses ``transmit()``'s result only as a fallback.

Lost wake-ups: c104 2.2.1 waits for a command's confirmation on a condition variable without
first looking whether the confirmation already came (``Connection::awaitCommandSuccess``).
When the device answers before the sending thread starts to wait (a fast device on a loaded
machine: 3 in 1,000 SBO commands here), c104 sleeps until its own command timeout: an SBO
command then never sends its execute, and the next command on the point waits. The adapter
sees every confirmation in the raw frames, so it notices when c104 should have moved on and
did not, and wakes it with a test command (C_TS_TA_1): any answer c104 was waiting for
notifies all its waiters, which then find the confirmation they missed (counted as
``c104_nudges``).

Types: c104 binds a point to one type id and drops, silently, a value of the point's address
that comes in another type. Outstations send one address in two types (a GI answer untagged,
M_ME_NC_1; a spontaneous change time-tagged, M_ME_TF_1: IEC 60870-5-101/104 7.2.3), so the
raw-frame callback decodes every monitor ASDU with the project's codec and delivers what c104
drops: a value in another type of the point's kind (e.g. the untagged GI answer) as the
asyncio engine would, a value of another kind refused and counted (``type_mismatch``). Values
in the configured type still come through c104's point callback, once.

TLS (``tls.enabled``): c104 2.2.1's own TLS client cannot complete a handshake, so c104
connects to a loopback relay in this process that speaks TLS to the device with Python's
``ssl`` (:mod:`gateway.protocols.iec104.tls`); a refused handshake becomes the reason of the
link-down event.
"""

import asyncio
import collections
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import c104

from gateway.config import Device, Direction, Point, iec104_address
from gateway.errors import CommandInvalid, CommandRejected, CommandTimeout, LinkError
from gateway.points import CommandRequest, DoublePoint, PointUpdate, Quality, UpdateCause, now
from gateway.protocols.base import LinkState
from gateway.protocols.iec104.codec import MONITOR_TYPE_IDS, decode_monitor
from gateway.protocols.iec104.common import (
    CAUSE_OF_COT,
    COT_ACTCON,
    COT_ACTTERM,
    Confirmation,
    Event,
    EventBuffer,
    Iec104AdapterBase,
    backoff_delay,
    command_value,
    monitor_asdu_refusal,
    parse_command_reply,
    parse_confirmation,
)
from gateway.protocols.iec104.common import COMMAND_VALUE_LEN as _COMMAND_VALUE_LEN
from gateway.protocols.iec104.kinds import KIND_OF_TYPE, ValueKind, kind_of
from gateway.protocols.iec104.tls import TlsBridge, client_tls_context

log = logging.getLogger(__name__)

__all__ = ["Iec104Adapter", "backoff_delay", "parse_confirmation"]


_C_IC_NA_1 = 100  # interrogation command type id
_WARN_FIRST = 10  # log the first N of a repeated anomaly, then only count it

_CAUSES: dict[str, UpdateCause] = {
    "SPONTANEOUS": UpdateCause.SPONTANEOUS,
    "PERIODIC": UpdateCause.PERIODIC,
    "BACKGROUND_SCAN": UpdateCause.PERIODIC,
    "REQUEST": UpdateCause.REQUESTED,
    "RETURN_INFO_REMOTE": UpdateCause.RETURN,
    "RETURN_INFO_LOCAL": UpdateCause.RETURN,
}


def _cause_of(cot: str) -> UpdateCause:
    """The update cause for a c104 cause-of-transmission name."""
    return UpdateCause.INTERROGATED if cot.startswith("INTERROGATED") else _CAUSES.get(cot, UpdateCause.OTHER)


class _ThreadBridge(EventBuffer):
    """Carries events from c104's threads into the loop with one wake-up per burst.

    A deque append is atomic under the GIL; the loop is only woken when it is not already
    due to drain. Bounded as every adapter's event stream (:class:`EventBuffer`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, maxlen: int) -> None:
        super().__init__(maxlen)
        self._loop = loop
        self._wake_due = False

    def put(self, item: Event) -> None:
        """Called from any thread."""
        if len(self._items) >= self._maxlen:
            self._drop(1)
        self._items.append(item)
        if not self._wake_due:
            self._wake_due = True
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                self._loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        self._wake_due = False
        self._event.set()

    async def get_batch(self, limit: int = 4096) -> list[Event]:
        """Up to ``limit`` events; [] only when woken with nothing to give (close)."""
        items = self._items
        while not items:
            self._event.clear()
            if items:
                break
            await self._event.wait()
            if not items:
                return []
        # popleft one by one: the producer thread may append while we take.
        return [items.popleft() for _ in range(min(limit, len(items)))]


@dataclass
class _TxWatch:
    """What the device has answered so far to one blocking c104 call (``transmit()``,
    ``read()``, ``interrogation()``; loop thread only), so that a c104 wait that missed its
    wake-up can be told from one still due."""

    sbo: bool
    started: float
    selected_at: float | None = None  # positive ACTCON of the select: c104 must now execute
    executed: bool = False  # ACTCON of the execute
    final_at: float | None = None  # the answer that ends c104's wait (ACTTERM, negative, ...)

    def stuck_since(self) -> tuple[float, float] | None:
        """(since when c104 should have moved on, how long it may take to) or None."""
        if self.final_at is not None:
            return self.final_at, 0.1  # only c104's own thread has to wake up
        if self.selected_at is not None and not self.executed:
            # c104 must send the execute and the device answer it: allow a few select round trips
            return self.selected_at, max(0.1, 4 * (self.selected_at - self.started))
        return None


class Iec104Adapter(Iec104AdapterBase):
    """One IEC 104 connection (one c104 client) to one device/station."""

    def __init__(self, device: Device, points: tuple[Point, ...], *, queue_max: int = 200_000) -> None:
        super().__init__(device, points)
        self._queue_max = queue_max
        self._monitor = {iec104_address(p).ioa: p for p in points if p.direction is Direction.MONITOR}
        # ioa -> (name, kind, configured type id, scale, offset): for values c104 drops
        # because they came in another type than the point's (module doc, "Types")
        self._raw_monitor: dict[int, tuple[str, ValueKind, int, float, float]] = {}
        for ioa, p in self._monitor.items():
            type_name = iec104_address(p).type
            type_id = int(getattr(c104.Type, type_name))
            self._raw_monitor[ioa] = (p.name, kind_of(type_name), type_id, p.scale, p.offset)
        self._control = {p.name: p for p in points if p.direction is Direction.CONTROL}
        self._by_name = {p.name: p for p in points}
        self._state = LinkState.CLOSED
        self._rng = random.Random()
        self._pending: dict[int, asyncio.Future[Confirmation]] = {}
        self._readers: dict[str, list[asyncio.Future[PointUpdate]]] = {}
        self._counters: collections.Counter[str] = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._buffer: _ThreadBridge | None = None
        self._client: Any = None
        self._conn: Any = None
        self._station: Any = None
        self._c104_cmd: dict[str, Any] = {}
        self._c104_mon: dict[int, Any] = {}
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._gi_task: asyncio.Task[None] | None = None
        self._muted_since: float | None = None
        self._background: set[asyncio.Future[bool]] = set()
        self._tx_by_ioa: dict[int, asyncio.Future[bool]] = {}
        self._tx_watch: dict[int, _TxWatch] = {}
        self._read_by_ioa: dict[int, asyncio.Future[bool]] = {}
        self._watchdogs: set[asyncio.Task[None]] = set()
        self._nudge: asyncio.Future[bool] | None = None
        self._gi_watch: _TxWatch | None = None
        self._tls_bridge: TlsBridge | None = None
        self._cause_cache: dict[Any, UpdateCause] = {}
        self._quality_cache: dict[int, Quality] = {}

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._supervisor is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._buffer = _ThreadBridge(self._loop, self._queue_max)
        self._build_client()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"iec104:{self.device.name}")
        if self.device.gi_period_s > 0:
            self._gi_task = asyncio.create_task(self._periodic_gi(), name=f"iec104-gi:{self.device.name}")

    async def close(self) -> None:
        self._closing = True
        self._lost.set()
        for task in (self._gi_task, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._background:  # c104 transmit() calls still waiting for ACTTERM
            await asyncio.wait(self._background, timeout=self.device.command_timeout_s)
        for dog in list(self._watchdogs):
            dog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dog
        if self._client is not None:
            await asyncio.to_thread(self._client.stop)
            # c104 holds our callbacks and they hold this adapter: a cycle through C++ that
            # the garbage collector cannot see. Dropping our side frees both (measured:
            # ~58 KiB per adapter otherwise).
            self._up.clear()  # nothing may use the c104 objects after this
            self._client = self._conn = self._station = None
            self._c104_cmd.clear()
            self._c104_mon.clear()
            self._tx_by_ioa.clear()
            self._tx_watch.clear()
            self._read_by_ioa.clear()
        if self._tls_bridge is not None:
            await self._tls_bridge.aclose()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._set_state(LinkState.CLOSED, "closed")
        if self._buffer is not None:
            self._buffer.wake()

    # ----------------------------------------------------------------- c104 wiring

    def _build_client(self) -> None:
        dev = self.device
        # TLS first: a bad certificate file is a ConfigError before anything is built.
        tls_ctx = client_tls_context(dev) if dev.tls.enabled else None
        client = c104.Client(tick_rate_ms=50, command_timeout_ms=int(dev.command_timeout_s * 1000))
        client.originator_address = dev.originator_address
        host, port = dev.host, dev.port
        if tls_ctx is not None:
            host, port = self._open_tls_bridge(tls_ctx)
        try:
            conn = self._add_connection(client, host, port)
        except BaseException:
            if self._tls_bridge is not None:
                self._tls_bridge.close()
                self._tls_bridge = None
            raise
        self._client = client
        self._conn = conn

    def _add_connection(self, client: Any, host: str, port: int) -> Any:
        """The c104 connection with the device's timers, station and points; returns it."""
        dev = self.device
        conn = client.add_connection(ip=host, port=port, init=c104.Init.INTERROGATION)
        if conn is None:
            raise LinkError(dev.name, f"c104 refused connection parameters {host}:{port}")
        params = conn.protocol_parameters
        params.connection_timeout = dev.timers.t0_s
        params.message_timeout = dev.timers.t1_s
        params.confirm_interval = dev.timers.t2_s
        params.keep_alive_interval = dev.timers.t3_s
        params.send_window_size = dev.timers.k
        params.receive_window_size = dev.timers.w
        station = conn.add_station(common_address=dev.common_address)
        if station is None:
            raise LinkError(dev.name, f"c104 refused common address {dev.common_address}")
        for ioa, pt in self._monitor.items():
            cp = station.add_point(io_address=ioa, type=getattr(c104.Type, iec104_address(pt).type))
            if cp is None:
                raise LinkError(dev.name, f"c104 refused point {pt.name} (ioa {ioa}, {iec104_address(pt).type})")
            cp.on_receive(callable=self._make_value_callback(pt))
            self._c104_mon[ioa] = cp
        for name, pt in self._control.items():
            mode = c104.CommandMode.SELECT_AND_EXECUTE if pt.select_before_operate else c104.CommandMode.DIRECT
            cp = station.add_point(
                io_address=iec104_address(pt).ioa, type=getattr(c104.Type, iec104_address(pt).type), command_mode=mode
            )
            if cp is None:
                addr = iec104_address(pt)
                raise LinkError(dev.name, f"c104 refused point {name} (ioa {addr.ioa}, {addr.type})")
            self._c104_cmd[name] = cp
        conn.on_state_change(callable=self._make_state_callback())
        conn.on_receive_raw(callable=self._make_raw_callback())
        client.on_new_point(callable=self._make_new_point_callback())
        self._station = station
        return conn

    def _open_tls_bridge(self, ctx: ssl.SSLContext) -> tuple[str, int]:
        """Listen for c104's plain connection and carry it to the device over TLS.

        c104's own ``TransportSecurity`` cannot complete a handshake (see
        :mod:`gateway.protocols.iec104.tls`), so c104 connects to this loopback bridge
        instead of the device. The bridge lives as long as the adapter (one per device).
        """
        assert self._loop is not None
        if self._tls_bridge is None:
            self._tls_bridge = TlsBridge(self.device, ctx, self._loop)
            try:
                return self._tls_bridge.open()
            except OSError as exc:
                self._tls_bridge = None
                raise LinkError(self.device.name, f"cannot open the local TLS bridge: {exc}") from exc
        raise RuntimeError("TLS bridge already open")

    def _make_value_callback(self, pt: Point) -> Callable[..., Any]:
        name, kind, scale, offset = pt.name, pt.address.kind, pt.scale, pt.offset
        none = c104.ResponseState.NONE
        counters = self._counters
        # c104 builds a new Python object for every attribute read, and enum ``.name`` and
        # ``Quality(int)`` cost microseconds each, all on c104's thread with the GIL held:
        # the cause per c104 Cot and the Quality per raw bits are looked up once, then cached.
        causes = self._cause_cache
        qualities = self._quality_cache
        good = Quality.GOOD

        def on_value(
            point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
        ) -> c104.ResponseState:
            rcv = now()
            c = message.cot
            refusal = monitor_asdu_refusal(int(c.value), message.is_negative, message.is_test)
            if refusal is not None:
                self._refuse_asdu(refusal, message.type.value, int(c.value), message.is_negative, message.is_test)
                return none
            raw = point.value
            value: float | int | bool
            if kind == "measured":
                value = float(raw) * scale + offset  # type: ignore[arg-type]
            elif kind == "double":
                value = int(raw.value)  # type: ignore[union-attr]
            else:
                value = bool(raw)
            q = point.quality
            if q is None:
                quality = good
            else:
                bits = q.value
                cached = qualities.get(bits)  # (not `or`: GOOD is 0, falsy)
                quality = cached if cached is not None else qualities.setdefault(bits, Quality(bits))
            rec = point.recorded_at
            cause = causes.get(c)
            if cause is None:
                cause = causes[c] = _cause_of(c.name)
            if rec is not None:
                upd = PointUpdate(name, value, quality, rec.timestamp(), rcv, cause)
            else:  # untagged type: the receive time stands in, flagged
                upd = PointUpdate(name, value, quality, rcv, rcv, cause, time_substituted=True)
            counters["values"] += 1
            self._emit(upd)
            return none

        return on_value

    def _refuse_asdu(self, counter: str, type_id: int, cot: int, negative: bool, test: bool) -> None:
        """A value whose ASDU no monitor value may have (T=1, P/N=1, a non-monitor cause):
        counted and logged (the first few), never stored (c104's thread)."""
        self._counters[counter] += 1
        if self._counters[counter] <= _WARN_FIRST:
            log.warning(
                "%s: ASDU type %d with cot %d%s%s refused", self.device.name, type_id, cot,
                " P/N=1" if negative else "", " T=1" if test else "",
            )  # fmt: skip

    def _make_state_callback(self) -> Callable[..., None]:
        def on_state(connection: c104.Connection, state: c104.ConnectionState) -> None:
            name = state.name
            self._counters[f"state_{name.lower()}"] += 1
            log.debug("%s: c104 state %s", self.device.name, name)
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self._on_c104_state, name)

        return on_state

    def _make_raw_callback(self) -> Callable[..., None]:
        def on_raw(connection: c104.Connection, data: bytes) -> None:
            self._counters["frames_in"] += 1
            if len(data) > 12 and data[6] in MONITOR_TYPE_IDS:
                self._on_raw_monitor(data)
            elif len(data) > 6 and data[6] in _COMMAND_VALUE_LEN:
                conf = parse_command_reply(data)
                if conf is not None and self._loop is not None:
                    with contextlib.suppress(RuntimeError):
                        self._loop.call_soon_threadsafe(self._on_command_reply, conf)
            elif len(data) > 8 and data[6] == _C_IC_NA_1 and self._loop is not None:
                cot = data[8] & 0x3F
                if cot == COT_ACTTERM or data[8] & 0x40:  # the end of c104's interrogation wait
                    with contextlib.suppress(RuntimeError):
                        self._loop.call_soon_threadsafe(self._on_interrogation_end)

        return on_raw

    def _on_raw_monitor(self, apdu: bytes) -> None:
        """On c104's thread: deliver the values of a monitor ASDU that c104 itself drops.

        c104 binds a point to one type id and silently drops a value of the point's address
        in any other type (measured with 2.2.1: a GI answer in M_ME_NC_1 for a point
        configured M_ME_TF_1 reaches no callback, not even ``on_new_point``). Outstations do
        send one address in two types (untagged for GI, time-tagged spontaneously), so such
        values are decoded here from the raw frame with the project's codec and delivered as
        the asyncio engine would. Objects in the configured type are left to c104's point
        callback (one delivery per value); values of another kind than the point's are
        refused and counted (``type_mismatch``); unknown addresses stay c104's
        (``on_new_point``, ``unknown_points``).
        """
        type_id = apdu[6]
        try:
            m = decode_monitor(apdu[6:])
        except ValueError:
            return  # c104 judges the frame itself; nothing here to add to that
        if m.common_address != self.device.common_address:
            return
        refusal = monitor_asdu_refusal(m.cot, m.negative, m.test)
        if refusal is not None:
            # c104's point callback refuses (and counts) values of the configured type; the
            # ones c104 drops as another type are counted here
            if any((info := self._raw_monitor.get(ioa)) is not None and info[2] != type_id for ioa, *_ in m.objects):
                self._refuse_asdu(refusal, type_id, m.cot, m.negative, m.test)
            return
        sent_kind = KIND_OF_TYPE[type_id]
        monitor = self._raw_monitor
        counters = self._counters
        qualities = self._quality_cache
        cause = CAUSE_OF_COT[m.cot]
        rcv = now()
        for ioa, value, bits, ts in m.objects:
            info = monitor.get(ioa)
            if info is None or info[2] == type_id:
                continue  # c104's on_new_point counts it, or c104's point callback delivers it
            name, kind, _, scale, offset = info
            if kind is not sent_kind:
                counters["type_mismatch"] += 1
                if counters["type_mismatch"] <= _WARN_FIRST:
                    log.warning(
                        "%s: device sent type %d (%s) for %s (ioa %d), configured as %s; refused",
                        self.device.name,
                        type_id,
                        sent_kind.name.lower(),
                        name,
                        ioa,
                        kind.name.lower(),
                    )
                continue
            if kind is ValueKind.DOUBLE:
                v: float | int | bool = int(value)
            elif kind is ValueKind.SINGLE:
                v = bool(value)
            else:
                v = value * scale + offset
            quality = qualities.get(bits)
            if quality is None:
                quality = qualities.setdefault(bits, Quality(bits))
            if ts is None:  # untagged: the receive time stands in, flagged
                upd = PointUpdate(name, v, quality, rcv, rcv, cause, time_substituted=True)
            else:
                upd = PointUpdate(name, v, quality, ts, rcv, cause)
            counters["values"] += 1
            counters["values_other_type"] += 1
            self._emit(upd)

    def _make_new_point_callback(self) -> Callable[..., None]:
        def on_new_point(client: c104.Client, station: c104.Station, io_address: int, point_type: c104.Type) -> None:
            # The device sends an address the lab config does not know: count it and say so once.
            self._counters["unknown_points"] += 1
            if self._counters["unknown_points"] <= 10:
                log.warning(
                    "%s: device sent unconfigured ioa %d (%s); ignored", self.device.name, io_address, point_type.name
                )

        return on_new_point

    def _emit(self, item: Event) -> None:
        assert self._buffer is not None
        self._buffer.put(item)
        if isinstance(item, PointUpdate) and item.point in self._readers and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._resolve_readers, item)

    def _resolve_readers(self, upd: PointUpdate) -> None:
        for fut in self._readers.pop(upd.point, []):
            if not fut.done():
                fut.set_result(upd)

    # ----------------------------------------------------------------- link supervision

    def _on_c104_state(self, name: str) -> None:
        if name == "OPEN":
            self._muted_since = None
            self._up.set()
        elif name == "OPEN_MUTED":
            self._muted_since = time.monotonic()
        elif self._up.is_set() or name in ("CLOSED_AWAIT_RECONNECT", "OPEN_AWAIT_CLOSED"):
            self._lost.set()

    async def _supervise(self) -> None:
        dev = self.device
        attempt = 0
        while not self._closing:
            self._up.clear()
            self._lost.clear()
            self._set_state(LinkState.CONNECTING, f"attempt {attempt + 1} to {dev.host}:{dev.port}")
            await asyncio.to_thread(self._client.start)
            connected = await self._await_open(float(dev.timers.t0_s))
            if connected:
                self._counters["connects"] += 1
                self._set_state(LinkState.UP, f"{dev.host}:{dev.port}")
                up_at = time.monotonic()
                reason = await self._watch_link()
                if self._closing:
                    return
                if time.monotonic() - up_at > max(5.0, dev.reconnect.initial_s * 4):
                    attempt = 0
            else:
                reason = f"no link within t0 = {dev.timers.t0_s} s" if not self._lost.is_set() else "connect failed"
                tls_error = self._tls_bridge.take_error() if self._tls_bridge is not None else None
                if tls_error:
                    reason = f"{reason}: {tls_error}"
            self._up.clear()
            await asyncio.to_thread(self._client.stop)
            self._fail_pending(reason)
            self._set_state(LinkState.DOWN, reason)
            delay = backoff_delay(attempt, dev.reconnect.initial_s, dev.reconnect.max_s, self._rng)
            attempt += 1
            self._counters["reconnect_attempts"] += 1
            log.info("%s: reconnect in %.2f s", dev.name, delay)
            await asyncio.sleep(delay)

    async def _watch_link(self, check_s: float = 1.0) -> str:
        """Wait for the link to drop; return why.

        c104 normally reports a drop through ``on_state_change``. In about 1 % of connects
        (measured with c104 2.2.1) it stops calling the connection-level callbacks
        (state and raw frames) while point callbacks go on: the adapter would then miss a
        link loss and could no longer read ACTCON. A cheap check once a second catches both
        and reconnects, which restores the callbacks.
        """
        values = self._counters["values"]
        frames = self._counters["frames_in"]
        while True:
            try:
                async with asyncio.timeout(check_s):
                    await self._lost.wait()
                return "link lost"
            except TimeoutError:
                pass
            if not self._conn.is_connected:
                self._counters["missed_state_callbacks"] += 1
                log.warning("%s: c104 did not report the link loss; treating the link as lost", self.device.name)
                return "link lost (state callback missed)"
            new_values, new_frames = self._counters["values"], self._counters["frames_in"]
            if new_values > values and new_frames == frames:
                self._counters["raw_callbacks_lost"] += 1
                log.warning("%s: c104 stopped passing raw frames; reconnecting to restore them", self.device.name)
                return "c104 raw frame callback lost"
            values, frames = new_values, new_frames

    async def _await_open(self, t0_s: float) -> bool:
        """Wait for STARTDT confirmed; unmute a connection c104 leaves muted (seen 2-10 %)."""
        deadline = time.monotonic() + t0_s
        while time.monotonic() < deadline:
            if self._lost.is_set() and not self._up.is_set():
                return False
            try:
                async with asyncio.timeout(0.25):
                    await self._up.wait()
                return True
            except TimeoutError:
                pass
            if self._muted_since is not None and time.monotonic() - self._muted_since > 0.25:
                self._counters["unmutes"] += 1
                log.info("%s: connection stayed muted, sending STARTDT again", self.device.name)
                self._muted_since = time.monotonic()
                await asyncio.to_thread(self._conn.unmute)
        return self._up.is_set()

    def _fail_pending(self, reason: str) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(LinkError(self.device.name, reason))

    # ----------------------------------------------------------------- requests

    def _require_up(self) -> None:
        if not self._up.is_set():
            raise LinkError(self.device.name, f"link is {self._state.value}")

    async def interrogate(self) -> None:
        self._require_up()
        ca = self.device.common_address
        self._counters["interrogations"] += 1
        watch = _TxWatch(sbo=False, started=time.monotonic())
        self._gi_watch = watch  # its ACTTERM (or a refusal) ends c104's wait
        call = self._c104_call(self._conn.interrogation, watch, common_address=ca, wait_for_response=True)
        try:
            ok = await asyncio.wait_for(asyncio.shield(call), timeout=self.device.command_timeout_s + 1)
        finally:
            if self._gi_watch is watch:
                self._gi_watch = None
        if not ok:
            raise LinkError(self.device.name, "general interrogation not confirmed")

    async def _after_previous(self, calls: dict[int, asyncio.Future[bool]], ioa: int) -> None:
        """Wait (bounded) for the previous call of this kind on the point: c104 refuses a
        second transmit or read of a point while the first one's thread still waits."""
        previous = calls.get(ioa)
        if previous is not None and not previous.done():
            await asyncio.wait({previous}, timeout=self.device.command_timeout_s)

    def _c104_call(self, fn: Callable[..., bool], watch: _TxWatch, **kwargs: Any) -> asyncio.Future[bool]:
        """Run a blocking c104 call that waits for the device's answer, under a watchdog that
        wakes it if it misses that answer (module doc); kept and collected in close()."""
        call = asyncio.ensure_future(asyncio.to_thread(fn, **kwargs))
        self._background.add(call)
        call.add_done_callback(self._background.discard)
        dog = asyncio.create_task(self._rescue_lost_wakeup(call, watch), name=f"iec104-c104-watch:{self.device.name}")
        self._watchdogs.add(dog)
        dog.add_done_callback(self._watchdogs.discard)
        return call

    async def read(self, point: str) -> PointUpdate:
        pt = self._by_name.get(point)
        if pt is None or pt.direction is not Direction.MONITOR:
            raise CommandInvalid(point, "not a monitored point of this device")
        self._require_up()
        assert self._loop is not None
        fut: asyncio.Future[PointUpdate] = self._loop.create_future()
        self._readers.setdefault(point, []).append(fut)
        ioa = iec104_address(pt).ioa
        cp = self._c104_mon[ioa]
        # the first read's c104 thread may still wait to be woken by the answer we took
        await self._after_previous(self._read_by_ioa, ioa)
        watch = _TxWatch(sbo=False, started=time.monotonic())
        call = self._c104_call(cp.read, watch)  # waits for the value c104 matches to it
        self._read_by_ioa[ioa] = call
        try:
            async with asyncio.timeout(self.device.command_timeout_s):
                either: set[asyncio.Future[Any]] = {fut, call}
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if fut.done():
                    watch.final_at = time.monotonic()  # the answer is here: c104 must stop waiting
                    return fut.result()
                if call.exception() is not None:
                    raise LinkError(self.device.name, f"c104 refused the read of {point}: {call.exception()}")
                if not call.result():
                    raise LinkError(self.device.name, f"read of {point} not accepted")
                return await fut
        except TimeoutError:
            raise CommandTimeout(point, f"no answer to read within {self.device.command_timeout_s:g} s") from None
        finally:
            waiting = self._readers.get(point, [])
            if fut in waiting:
                waiting.remove(fut)

    def _on_interrogation_end(self) -> None:
        if self._gi_watch is not None and self._gi_watch.final_at is None:
            self._gi_watch.final_at = time.monotonic()

    def _on_command_reply(self, conf: Confirmation) -> None:
        watch = self._tx_watch.get(conf.ioa)
        if watch is not None:
            t = time.monotonic()
            if conf.negative:
                watch.final_at = watch.final_at or t
            elif conf.cot == COT_ACTCON and conf.select:
                watch.selected_at = t
            elif conf.cot == COT_ACTCON:
                watch.executed = True
                if not watch.sbo:  # a direct command's transmit() ends at its ACTCON
                    watch.final_at = t
            elif conf.cot == COT_ACTTERM:
                watch.final_at = t
        if conf.cot == COT_ACTCON or conf.negative:
            self._on_confirmation(conf)

    async def _rescue_lost_wakeup(self, tx: asyncio.Future[bool], watch: _TxWatch) -> None:
        """Wake c104 while ``tx`` waits for a confirmation that already came (module doc)."""
        last_nudge = 0.0
        while not tx.done():
            await asyncio.wait({tx}, timeout=0.05)
            stuck = watch.stuck_since()
            if tx.done() or stuck is None:
                continue
            since, grace = stuck
            t = time.monotonic()
            if t - since > grace and t - last_nudge > 0.5:
                last_nudge = t
                self._nudge_c104()

    def _nudge_c104(self) -> None:
        if self._nudge is not None and not self._nudge.done():
            return  # one test command at a time: c104 refuses a second one while it waits
        if self._conn is None or not self._up.is_set():
            return
        self._counters["c104_nudges"] += 1
        log.info("%s: c104 missed a confirmation it waits for; waking it with a test command", self.device.name)
        nudge = asyncio.ensure_future(
            asyncio.to_thread(
                self._conn.test, common_address=self.device.common_address, with_time=True, wait_for_response=True
            )
        )
        self._nudge = nudge
        self._background.add(nudge)
        nudge.add_done_callback(self._background.discard)

    def _on_confirmation(self, conf: Confirmation) -> None:
        fut = self._pending.get(conf.ioa)
        if fut is None or fut.done():
            return
        if conf.negative:
            self._counters["negative_confirmations"] += 1
            fut.set_result(conf)
        elif conf.cot == COT_ACTCON and not conf.select:
            fut.set_result(conf)

    def _c104_value(self, pt: Point, value: float | int | bool) -> Any:
        kind, checked = command_value(pt, value)
        if kind == "double":
            return c104.Double.ON if checked == DoublePoint.ON else c104.Double.OFF
        if kind == "scaled":
            return c104.Int16(int(checked))
        if kind == "normalized":
            return c104.NormalizedFloat(float(checked))
        return checked

    async def command(self, request: CommandRequest) -> float:
        pt = self._control.get(request.point)
        if pt is None:
            raise CommandInvalid(request.point, f"not a control point of device {self.device.name}")
        c104_value = self._c104_value(pt, request.value)
        self._require_up()
        ioa = iec104_address(pt).ioa
        if ioa in self._pending:
            raise CommandRejected(pt.name, "another command on this point is still in progress")
        assert self._loop is not None
        # an SBO transmit() blocks through the whole breaker travel, until its ACTTERM
        await self._after_previous(self._tx_by_ioa, ioa)
        cp = self._c104_cmd[pt.name]
        sbo = pt.select_before_operate or request.select_before_operate
        cp.command_mode = c104.CommandMode.SELECT_AND_EXECUTE if sbo else c104.CommandMode.DIRECT
        cp.value = c104_value
        fut: asyncio.Future[Confirmation] = self._loop.create_future()
        self._pending[ioa] = fut
        self._counters["commands"] += 1
        timeout_s = self.device.command_timeout_s
        watch = _TxWatch(sbo=sbo, started=time.monotonic())
        self._tx_watch[ioa] = watch
        # c104's transmit() may block until ACTTERM (or its own timeout): it is not awaited
        # past the device's answer.
        tx = self._c104_call(cp.transmit, watch, cause=c104.Cot.ACTIVATION)
        self._tx_by_ioa[ioa] = tx
        tx.add_done_callback(lambda _: self._tx_watch.pop(ioa) if self._tx_watch.get(ioa) is watch else None)
        try:
            try:
                async with asyncio.timeout(timeout_s):
                    either: set[asyncio.Future[Any]] = {fut, tx}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                    if not fut.done():
                        # transmit() finished first: the raw ACTCON may still be on its way.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.2):
                                await asyncio.shield(fut)
            except TimeoutError:
                raise CommandTimeout(pt.name, f"no ACTCON within {timeout_s:g} s") from None
            if fut.done():
                conf = fut.result()  # LinkError raised here when the link dropped
                if conf.negative:
                    raise CommandRejected(pt.name, conf.reason)
                return conf.received_at
            if tx.exception() is not None:
                raise CommandRejected(pt.name, f"c104 refused to send: {tx.exception()}")
            if tx.result():
                return now()  # c104 saw a positive confirmation we could not attribute
            raise CommandRejected(pt.name, "device did not confirm the command (c104 transmit failed)")
        finally:
            self._pending.pop(ioa, None)
            if not fut.done():
                fut.cancel()
