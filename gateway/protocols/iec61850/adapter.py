"""IEC 61850 MMS client adapter on libiec61850 (the library pyiec61850-ng bundles).

Every libiec61850 call goes through ctypes (:mod:`.native`), never the SWIG wrappers: those
keep the GIL during blocking calls while reports arriving on libiec61850's receive thread
need it, which can hang the process (measured). ctypes releases the GIL in every foreign
call, and blocking ones additionally run in ``asyncio.to_thread`` so the loop never waits.

Flow per connection: connect -> browse (one ``GetNameList`` per logical device the points
use; a configured reference the IED lacks is logged, counted and its point written invalid)
-> control objects (reads each control's ctlModel) -> report control blocks: data set
directory read to map entries to points, handler installed, buffered RCBs resumed from the
last EntryID seen, then enabled with dchg/qchg/integrity/GI and a GI -> link UP.
Values then come only by report (no polling); points in no data set are read at connect and
on every :meth:`interrogate`.

Report callbacks run on libiec61850's thread: they only decode into immutable
:class:`PointUpdate`s and hand them to the loop with ``call_soon_threadsafe``, like the 104
adapter. Link loss (connection-closed callback, or a failed request) gives LinkStateChange
DOWN and a reconnect after a capped, jittered backoff.

Commands (DPC/SPC/APC ``Oper``): the control model is the server's (read by
``ControlObjectClient_create``); SBO with enhanced security selects with value first,
enhanced models wait for the CommandTermination. The originator (orCat remote control,
orIdent ``mgms:<requested_by>``) is set on every command. The adapter returns when the
device accepted the operate; the core confirms by the status point. An APC set-point
(e.g. an active power limit) sends ``Oper.ctlVal.f`` in protocol units (the core has undone
scale/offset) and is confirmed like a 104 set-point, by its read-back (``mxVal``) within
``confirm_tolerance``.

TLS (``tls.enabled``): MMS over TLS with the mbedtls libiec61850 bundles (:mod:`.tls`):
the server certificate is verified against ``tls.ca_file``, ``cert_file``/``key_file`` are
presented as the client certificate. libiec61850 cannot skip verification nor check the
host name, so ``verify: false`` and ``check_hostname: true`` are refused at start with a
clear error instead of being silently weakened.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import math
import random
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.config import Device, Direction, Iec61850Address, Point, iec61850_address
from gateway.errors import CommandInvalid, CommandRejected, CommandTimeout, LinkError
from gateway.points import CommandRequest, DoublePoint, PointUpdate, Quality, UpdateCause, now
from gateway.protocols.base import Adapter, LinkState, LinkStateChange
from gateway.protocols.iec61850.native import (
    FC,
    IED_ERRORS,
    CommandTermHandler,
    ConnectionClosedHandler,
    ReportHandler,
    lib,
    linked_strings,
    octets,
)
from gateway.protocols.iec61850.tls import TlsConfig, TlsSetupError

__all__ = ["Iec61850Adapter", "backoff_delay", "decode", "map_quality", "member_key"]

log = logging.getLogger(__name__)

Event = PointUpdate | LinkStateChange

_MMS_STRUCTURE = 1
_MMS_BOOLEAN = 2
_MMS_BIT_STRING = 3
_MMS_INTEGER = 4
_MMS_UNSIGNED = 5
_MMS_FLOAT = 6
_MMS_UTC_TIME = 14
_STATE_CONNECTED = 2
_RCB_RPT_ENA, _RCB_TRG_OPS, _RCB_INTG_PD, _RCB_GI, _RCB_PURGE, _RCB_ENTRY_ID = 2, 256, 512, 1024, 2048, 4096
_TRG = 1 | 2 | 8 | 16  # dchg, qchg, integrity, GI
_ORCAT_REMOTE = 3
_ENHANCED = (3, 4)  # CONTROL_MODEL_DIRECT_ENHANCED, CONTROL_MODEL_SBO_ENHANCED (2 is SBO normal)
_SBO = (3, 4)
_LINK_ERRORS = (1, 3, 20)  # not connected, connection lost, timeout
_REASON_GI = 16
_REASON_INTEGRITY = 8
_ADD_CAUSES = {
    0: "unknown", 2: "blocked by switching hierarchy", 3: "select failed", 4: "invalid position",
    5: "position reached", 6: "parameter change in execution", 7: "step limit", 8: "blocked by mode",
    9: "blocked by process", 10: "blocked by interlocking", 11: "blocked by synchrocheck",
    12: "command already in execution", 13: "blocked by health", 14: "1 of n control",
    15: "abortion by cancel", 16: "time limit over", 17: "abortion by trip", 18: "object not selected",
    19: "object already selected", 20: "no access authority", 21: "ended with overshoot",
    22: "abortion due to deviation", 23: "abortion by communication loss", 24: "blocked by command",
    25: "none", 26: "inconsistent parameters", 27: "locked by other client",
}


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Capped exponential backoff with jitter (the same schedule as the 104 adapter)."""
    cap = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return rng.uniform(min(initial_s, cap) / 2, cap)


def map_quality(q: int) -> Quality:
    """IEC 61850 quality (validity + detail bits) -> the gateway's 104-named bits."""
    out = Quality.GOOD
    validity = q & 0x3
    if validity == 0x2:
        out |= Quality.INVALID
    elif validity == 0x3:
        out |= Quality.QUESTIONABLE
    if q & 0x4:
        out |= Quality.OVERFLOW
    if q & 0x80:  # oldData
        out |= Quality.NOT_TOPICAL
    if q & 0x400:  # source substituted
        out |= Quality.SUBSTITUTED
    if q & 0x1000:  # operatorBlocked
        out |= Quality.BLOCKED
    return out


@dataclass(slots=True)
class _Decoded:
    value: float | int | bool | None
    quality: Quality
    source_time: float | None


def _leaf(value: int, kind: str) -> float | int | bool | None:
    """The process value of a DO-level structure (mag.f, cVal.mag.f, stVal) or of a leaf."""
    t = lib.MmsValue_getType(value)
    if t == _MMS_STRUCTURE:
        return _leaf(lib.MmsValue_getElement(value, 0), kind) if lib.MmsValue_getArraySize(value) else None
    if t == _MMS_FLOAT:
        return float(lib.MmsValue_toDouble(value))
    if t in (_MMS_INTEGER, _MMS_UNSIGNED):
        return int(lib.MmsValue_toInt64(value))
    if t == _MMS_BOOLEAN:
        return bool(lib.MmsValue_getBoolean(value))
    if t == _MMS_BIT_STRING and lib.MmsValue_getBitStringSize(value) == 2:
        return int(lib.Dbpos_fromMmsValue(value))
    return None


def decode(value: int, kind: str) -> _Decoded:
    """Value, quality and time of one FC-qualified data object (or attribute) as read or reported.

    Located by type rather than position (first leaf, the 13-bit quality, the UTC time), so
    every CDC the config allows decodes the same way.
    """
    v = _leaf(value, kind)
    quality = Quality.GOOD
    source: float | None = None
    if lib.MmsValue_getType(value) == _MMS_STRUCTURE:
        for i in range(lib.MmsValue_getArraySize(value)):
            el = lib.MmsValue_getElement(value, i)
            t = lib.MmsValue_getType(el)
            if t == _MMS_BIT_STRING and lib.MmsValue_getBitStringSize(el) == 13:
                quality = map_quality(lib.Quality_fromMmsValue(el))
            elif t == _MMS_UTC_TIME and source is None:
                ms = lib.MmsValue_getUtcTimeInMs(el)
                source = ms / 1000.0 if ms else None
    if kind == "single" and v is not None:
        v = bool(v)
    elif kind == "double" and v is not None:
        v = int(v)
    return _Decoded(v, quality, source)


def member_key(member: str, ied_name: str) -> tuple[str, str]:
    """A data set member as libiec61850 lists it -> (ref without IED name, FC), the point key.

    libiec61850 gives ``REF615LD0/MMXU1.PhV.phsA[MX]``; plain MMS names
    (``REF615LD0/MMXU1$MX$PhV$phsA``) are accepted too.
    """
    dom, _, var = member.partition("/")
    ld = dom.removeprefix(ied_name)
    if "[" in var:
        name, _, fc = var.partition("[")
        return f"{ld}/{name}", fc.rstrip("]")
    ln, fc, *rest = var.split("$")
    return f"{ld}/{'.'.join([ln, *rest])}", fc


@dataclass(slots=True)
class _Rcb:
    ref: str
    buffered: bool = False
    handle: int = 0
    entries: list[Point | None] = field(default_factory=list)
    entry_id: bytes = b""


class Iec61850Adapter(Adapter):
    """One MMS association to one IED."""

    def __init__(self, device: Device, points: tuple[Point, ...], *, queue_max: int = 200_000) -> None:
        super().__init__(device, points)
        if device.ied_name is None:
            raise ValueError(f"{device.name}: an iec61850 device needs ied_name")
        self._ied = device.ied_name
        self._by_name = {p.name: p for p in points}
        self._monitor = [p for p in points if p.direction is Direction.MONITOR]
        self._control = {p.name: p for p in points if p.direction is Direction.CONTROL}
        self._queue: collections.deque[Event] = collections.deque()
        self._queue_max = queue_max
        self._wake = asyncio.Event()
        self._state = LinkState.CLOSED
        self._counters: collections.Counter[str] = collections.Counter()
        self._rng = random.Random()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._con: int = 0
        self._up = asyncio.Event()
        self._lost = asyncio.Event()
        self._closing = False
        self._supervisor: asyncio.Task[None] | None = None
        self._gi_task: asyncio.Task[None] | None = None
        self._rcbs: dict[str, _Rcb] = {ref: _Rcb(ref) for ref in device.report_control_blocks}
        self._controls: dict[str, tuple[int, int]] = {}  # point -> (ControlObjectClient, ctlModel)
        self._terminations: dict[int, asyncio.Future[str]] = {}
        self._missing: set[str] = set()
        self._unreported: list[Point] = []
        self._cmd_locks: dict[str, asyncio.Lock] = {}
        self._tls: TlsConfig | None = None
        self._setup_lock = threading.Lock()  # connect vs teardown, both in worker threads
        # ctypes thunks must live as long as C may call them.
        self._on_report_c = ReportHandler(self._on_report)
        self._on_closed_c = ConnectionClosedHandler(self._on_closed)
        self._on_term_c = CommandTermHandler(self._on_termination)

    # ------------------------------------------------------------------ references

    def mms_ref(self, addr: Iec61850Address) -> str:
        """``LD0/MMXU1.PhV.phsA`` -> ``REF615LD0/MMXU1.PhV.phsA`` (MMS domain = IED + LD)."""
        return f"{self._ied}{addr.ref}"

    def _mms_variable(self, addr: Iec61850Address) -> str:
        """The MMS variable name within the domain: ``MMXU1$MX$PhV$phsA``."""
        ln, _, rest = addr.ref.split("/", 1)[1].partition(".")
        return f"{ln}${addr.fc}${rest.replace('.', '$')}"

    def _rcb_mms(self, ref: str) -> str:
        return f"{self._ied}{ref}"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._supervisor is not None:
            return
        if self.device.tls.enabled:
            self._tls = self._tls_config()
        self._loop = asyncio.get_running_loop()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"iec61850:{self.device.name}")
        if self.device.gi_period_s > 0:
            self._gi_task = asyncio.create_task(self._periodic_gi(), name=f"iec61850-gi:{self.device.name}")

    def _tls_config(self) -> TlsConfig:
        """libiec61850's TLS for this device, or LinkError naming what the library cannot do."""
        tls = self.device.tls
        if not tls.verify:
            raise LinkError(self.device.name, "tls.verify: false is not possible with libiec61850 (it always verifies"
                            " the server certificate against tls.ca_file)")
        if tls.check_hostname:
            raise LinkError(self.device.name, "libiec61850 does not compare the server certificate with the host name;"
                            " set tls.check_hostname: false to accept chain verification against tls.ca_file only")
        try:
            return TlsConfig.client(tls.ca_file, tls.cert_file, tls.key_file)
        except TlsSetupError as exc:
            raise LinkError(self.device.name, f"TLS: {exc}") from None

    async def close(self) -> None:
        self._closing = True
        self._lost.set()
        for task in (self._gi_task, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self._teardown)
        if self._tls is not None:
            self._tls.close()
            self._tls = None
        self._set_state(LinkState.CLOSED, "closed")
        self._wake.set()

    @property
    def link_state(self) -> LinkState:
        return self._state

    def stats(self) -> dict[str, int]:
        return dict(self._counters)

    @property
    def missing_points(self) -> frozenset[str]:
        """Points whose reference the IED lacked at the last browse."""
        return frozenset(self._missing)

    async def events(self) -> AsyncIterator[Event]:
        while True:
            while self._queue:
                yield self._queue.popleft()
            if self._closing:
                return
            self._wake.clear()
            if not self._queue:
                await self._wake.wait()

    # ------------------------------------------------------------------ thread bridge

    def _emit(self, item: Event) -> None:
        """Any thread: queue an event (oldest dropped and counted when full) and wake the loop."""
        if len(self._queue) >= self._queue_max:
            with contextlib.suppress(IndexError):
                self._queue.popleft()
            self._counters["events_dropped"] += 1
        self._queue.append(item)
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._wake.set)

    def _set_state(self, state: LinkState, reason: str = "") -> None:
        if state is self._state:
            return
        self._state = state
        log.info("%s: link %s%s", self.device.name, state.value, f" ({reason})" if reason else "")
        self._emit(LinkStateChange(self.device.name, state, reason))

    # ------------------------------------------------------------------ callbacks (C threads)

    def _on_closed(self, _param: int | None, _con: int | None) -> None:
        self._counters["connection_closed"] += 1
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._lost.set)

    def _on_report(self, _param: int | None, report: int | None) -> None:
        rcv = now()
        try:
            ref = (lib.ClientReport_getRcbReference(report) or b"").decode()
            rcb = self._rcbs.get(ref.removeprefix(self._ied))
            if rcb is None:
                return
            self._counters["reports"] += 1
            eid = octets(lib.ClientReport_getEntryId(report))
            if eid:
                rcb.entry_id = eid
            values = lib.ClientReport_getDataSetValues(report)
            if not values:
                return
            n = min(lib.MmsValue_getArraySize(values), len(rcb.entries))
            for i in range(n):
                pt = rcb.entries[i]
                reason = lib.ClientReport_getReasonForInclusion(report, i)
                if pt is None or reason == 0:
                    continue  # not included: the element is stale or NULL
                d = decode(lib.MmsValue_getElement(values, i), iec61850_address(pt).kind)
                if d.value is None:
                    continue
                value = pt.to_engineering(d.value) if iec61850_address(pt).kind == "measured" else d.value
                cause = (
                    UpdateCause.INTERROGATED if reason & _REASON_GI
                    else UpdateCause.PERIODIC if reason & _REASON_INTEGRITY
                    else UpdateCause.SPONTANEOUS
                )
                self._counters["values"] += 1
                self._emit(PointUpdate(pt.name, value, d.quality, d.source_time, rcv, cause))
        except Exception:  # never let an exception cross into C
            log.exception("%s: report could not be decoded", self.device.name)

    def _on_termination(self, _param: int | None, ctl: int | None) -> None:
        err = lib.ControlObjectClient_getLastApplError(ctl)
        outcome = "" if err.error == 0 and err.addCause in (0, 25) else _ADD_CAUSES.get(err.addCause, str(err.addCause))
        if err.error != 0 and not outcome:
            outcome = f"negative command termination (error {err.error})"
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._terminated, int(ctl or 0), outcome)

    def _terminated(self, ctl: int, outcome: str) -> None:
        fut = self._terminations.get(ctl)
        if fut is not None and not fut.done():
            fut.set_result(outcome)

    # ------------------------------------------------------------------ connection (worker thread)

    def _connect(self) -> str | None:
        """Blocking: connect, browse, prepare controls and reports. Returns an error or None.

        Holds ``_setup_lock`` so a teardown (from :meth:`close` while a connect is still
        running in its worker thread: cancelling the awaiting task does not stop the thread)
        waits for it instead of destroying the connection under libiec61850's feet, which
        hung the process (seen with slow TLS handshakes).
        """
        with self._setup_lock:
            return self._connect_locked()

    def _connect_locked(self) -> str | None:
        dev = self.device
        con = self._tls.connection() if self._tls is not None else lib.IedConnection_create()
        self._con = con
        timeout_ms = int(dev.command_timeout_s * 1000)
        lib.IedConnection_setConnectTimeout(con, timeout_ms)
        lib.IedConnection_setRequestTimeout(con, timeout_ms)
        lib.IedConnection_installConnectionClosedHandler(con, self._on_closed_c, None)
        err = ctypes.c_int(0)
        lib.IedConnection_connect(con, ctypes.byref(err), dev.host.encode(), dev.port)
        if err.value != 0:
            return f"connect to {dev.host}:{dev.port} failed: {IED_ERRORS.get(err.value, err.value)}"
        error = self._browse()
        if error is not None:
            return error
        self._prepare_controls()
        return self._enable_reports()

    def _browse(self) -> str | None:
        """Find every configured reference in the server's name list; report the missing ones.

        A name list that failed because the link went (connection lost, timeout) is a link
        error, not an IED without those references: returned, so setup stops and retries
        instead of writing every point invalid (seen when an IED restarts during setup).
        """
        err = ctypes.c_int(0)
        names: dict[str, set[str]] = {}
        for ld in sorted({iec61850_address(p).ld_inst for p in self.points}):
            got = linked_strings(
                lib.IedConnection_getLogicalDeviceVariables(self._con, ctypes.byref(err), f"{self._ied}{ld}".encode())
            )
            if err.value in _LINK_ERRORS:
                return f"browse of {self._ied}{ld} failed: {IED_ERRORS[err.value]}"
            names[ld] = set(got)
        self._missing = set()
        for p in self.points:
            addr = iec61850_address(p)
            if self._mms_variable(addr) not in names.get(addr.ld_inst, set()):
                self._missing.add(p.name)
        for name in sorted(self._missing):
            addr = iec61850_address(self._by_name[name])
            self._counters["missing_references"] += 1
            log.error(
                "%s: IED %s has no %s [%s] (point %s): check the reference in the lab config",
                self.device.name, self._ied, addr.ref, addr.fc, name,
            )
            if self._by_name[name].direction is Direction.MONITOR:
                self._emit(PointUpdate(name, None, Quality.INVALID, None, now(), UpdateCause.OTHER))
        return None

    def _prepare_controls(self) -> None:
        for name, pt in self._control.items():
            if name in self._controls or name in self._missing:
                continue
            addr = iec61850_address(pt)
            ctl = lib.ControlObjectClient_create(self.mms_ref(addr).encode(), self._con)
            if not ctl:
                log.error("%s: cannot create control object for %s", self.device.name, addr.ref)
                continue
            model = lib.ControlObjectClient_getControlModel(ctl)
            if (model in _SBO) != pt.select_before_operate:
                log.warning("%s: %s uses control model %d on the IED; the config says select_before_operate=%s",
                            self.device.name, addr.ref, model, pt.select_before_operate)
            lib.ControlObjectClient_setCommandTerminationHandler(ctl, self._on_term_c, None)
            self._controls[name] = (int(ctl), model)

    def _enable_reports(self) -> str | None:
        err = ctypes.c_int(0)
        covered: set[str] = set()
        wanted = {iec61850_address(p).key: p for p in self._monitor if p.name not in self._missing}
        for ref, rcb in self._rcbs.items():
            mms = self._rcb_mms(ref).encode()
            handle = lib.IedConnection_getRCBValues(self._con, ctypes.byref(err), mms, None)
            if err.value != 0 or not handle:
                log.error("%s: report control block %s: %s", self.device.name, ref, IED_ERRORS.get(err.value))
                self._counters["rcb_errors"] += 1
                continue
            rcb.handle = int(handle)
            rcb.buffered = bool(lib.ClientReportControlBlock_isBuffered(handle))
            ds_ref = lib.ClientReportControlBlock_getDataSetReference(handle) or b""
            members = linked_strings(
                lib.IedConnection_getDataSetDirectory(self._con, ctypes.byref(err), ds_ref.replace(b"$", b".", 1), None)
            )
            rcb.entries = []
            log.debug("%s: %s data set members %s", self.device.name, ref, members)
            for m in members:
                pt = wanted.get(member_key(m, self._ied))
                rcb.entries.append(pt)
                if pt is not None:
                    covered.add(pt.name)
            rpt_id = lib.ClientReportControlBlock_getRptId(handle)
            lib.IedConnection_installReportHandler(self._con, mms, rpt_id, self._on_report_c, None)
            if rcb.buffered and rcb.entry_id:
                # Resume: the IED sends what it buffered after this entry while we were away.
                mv = lib.MmsValue_newOctetString(len(rcb.entry_id), len(rcb.entry_id))
                lib.MmsValue_setOctetString(mv, rcb.entry_id, len(rcb.entry_id))
                lib.ClientReportControlBlock_setEntryId(handle, mv)
                lib.IedConnection_setRCBValues(self._con, ctypes.byref(err), handle, _RCB_ENTRY_ID, True)
                lib.MmsValue_delete(mv)
                if err.value != 0:
                    self._counters["resume_refused"] += 1
                    log.info("%s: %s did not take EntryID %s (%s): enabling without resume",
                             self.device.name, ref, rcb.entry_id.hex(), IED_ERRORS.get(err.value))
                else:
                    self._counters["resumed"] += 1
            lib.ClientReportControlBlock_setTrgOps(handle, _TRG)
            lib.ClientReportControlBlock_setRptEna(handle, True)
            lib.IedConnection_setRCBValues(self._con, ctypes.byref(err), handle, _RCB_RPT_ENA | _RCB_TRG_OPS, True)
            if err.value != 0:
                log.error("%s: cannot enable %s: %s", self.device.name, ref, IED_ERRORS.get(err.value))
                self._counters["rcb_errors"] += 1
                continue
            self._gi(rcb)
        self._unreported = [p for p in self._monitor if p.name not in covered and p.name not in self._missing]
        if self._unreported:
            log.info("%s: %d points in no report data set: read at connect and GI", self.device.name,
                     len(self._unreported))
        for p in self._unreported:
            self._read_now(p, UpdateCause.INTERROGATED)
        state = lib.IedConnection_getState(self._con)
        return None if state == _STATE_CONNECTED else "connection closed during setup"

    def _gi(self, rcb: _Rcb) -> bool:
        err = ctypes.c_int(0)
        lib.ClientReportControlBlock_setGI(rcb.handle, True)
        lib.IedConnection_setRCBValues(self._con, ctypes.byref(err), rcb.handle, _RCB_GI, True)
        return err.value == 0

    def _read_now(self, pt: Point, cause: UpdateCause) -> PointUpdate:
        addr = iec61850_address(pt)
        err = ctypes.c_int(0)
        value = lib.IedConnection_readObject(self._con, ctypes.byref(err), self.mms_ref(addr).encode(), FC[addr.fc])
        if err.value != 0 or not value:
            raise LinkError(self.device.name, f"read {addr.ref} [{addr.fc}]: {IED_ERRORS.get(err.value, err.value)}")
        rcv = now()
        try:
            d = decode(value, addr.kind)
        finally:
            lib.MmsValue_delete(value)
        v = pt.to_engineering(d.value) if addr.kind == "measured" and d.value is not None else d.value
        upd = PointUpdate(pt.name, v, d.quality, d.source_time, rcv, cause)
        self._emit(upd)
        return upd

    def _teardown(self) -> None:
        """Blocking: drop the association and free everything libiec61850 gave us."""
        with self._setup_lock:
            self._teardown_locked()

    def _teardown_locked(self) -> None:
        con, self._con = self._con, 0
        if not con:
            return
        for rcb in self._rcbs.values():
            if rcb.handle:
                lib.IedConnection_uninstallReportHandler(con, self._rcb_mms(rcb.ref).encode())
                lib.ClientReportControlBlock_destroy(rcb.handle)
                rcb.handle = 0
        for ctl, _model in self._controls.values():
            lib.ControlObjectClient_destroy(ctl)
        self._controls.clear()
        lib.IedConnection_close(con)
        lib.IedConnection_destroy(con)

    # ------------------------------------------------------------------ supervision

    async def _supervise(self) -> None:
        dev = self.device
        attempt = 0
        while not self._closing:
            self._up.clear()
            self._lost.clear()
            self._set_state(LinkState.CONNECTING, f"attempt {attempt + 1} to {dev.host}:{dev.port}")
            try:
                error = await asyncio.to_thread(self._connect)
            except Exception as exc:
                error = f"setup failed: {exc}"
            if error is None and not self._lost.is_set():
                self._counters["connects"] += 1
                self._up.set()
                self._set_state(LinkState.UP, f"{dev.host}:{dev.port}")
                up_at = time.monotonic()
                await self._lost.wait()
                reason = "link lost"
                if time.monotonic() - up_at > max(5.0, dev.reconnect.initial_s * 4):
                    attempt = 0
            else:
                reason = error or "link lost during setup"
            self._up.clear()
            if self._closing:
                return
            await asyncio.to_thread(self._teardown)
            self._fail_terminations(reason)
            self._set_state(LinkState.DOWN, reason)
            delay = backoff_delay(attempt, dev.reconnect.initial_s, dev.reconnect.max_s, self._rng)
            attempt += 1
            self._counters["reconnect_attempts"] += 1
            log.info("%s: reconnect in %.2f s", dev.name, delay)
            await asyncio.sleep(delay)

    async def _periodic_gi(self) -> None:
        """A GI every ``gi_period_s`` on top of the RCBs' integrity period, as for 104."""
        while not self._closing:
            await asyncio.sleep(self.device.gi_period_s)
            if self._state is LinkState.UP:
                try:
                    await self.interrogate()
                except (LinkError, TimeoutError) as exc:
                    log.warning("%s: periodic interrogation failed: %s", self.device.name, exc)

    def _fail_terminations(self, reason: str) -> None:
        for fut in self._terminations.values():
            if not fut.done():
                fut.set_exception(LinkError(self.device.name, reason))

    def _require_up(self) -> None:
        if not self._up.is_set() or not self._con:
            raise LinkError(self.device.name, f"link is {self._state.value}")

    # ------------------------------------------------------------------ requests

    async def interrogate(self) -> None:
        """GI on every report control block; points outside data sets are read."""
        self._require_up()
        self._counters["interrogations"] += 1

        def run() -> bool:
            ok = all(self._gi(r) for r in self._rcbs.values() if r.handle)
            for p in self._unreported:
                self._read_now(p, UpdateCause.INTERROGATED)
            return ok

        ok = await asyncio.wait_for(asyncio.to_thread(run), timeout=self.device.command_timeout_s + 1)
        if not ok:
            raise LinkError(self.device.name, "general interrogation not accepted")

    async def read(self, point: str) -> PointUpdate:
        pt = self._by_name.get(point)
        if pt is None or pt.direction is not Direction.MONITOR:
            raise CommandInvalid(point, "not a monitored point of this device")
        if point in self._missing:
            raise CommandInvalid(point, f"the IED has no {iec61850_address(pt).ref}")
        self._require_up()
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(self._read_now, pt, UpdateCause.REQUESTED), self.device.command_timeout_s + 1
            )
        except TimeoutError:
            raise CommandTimeout(point, "no answer to read") from None

    def _operate(self, ctl: int, model: int, value: bool | float, origin: bytes) -> tuple[bool, str, float]:
        """Blocking: (select with value and) operate; (accepted, reason if not, ack time).

        ``value`` is the ctlVal: a bool for DPC/SPC, a float for an APC (libiec61850 wraps a
        plain float into the AnalogueValue structure ``ctlVal.f`` itself).
        """
        val = lib.MmsValue_newBoolean(value) if isinstance(value, bool) else lib.MmsValue_newFloat(value)
        try:
            lib.ControlObjectClient_setOrigin(ctl, origin, _ORCAT_REMOTE)
            if model in _SBO and not lib.ControlObjectClient_selectWithValue(ctl, val):
                return False, "select refused: " + self._appl_error(ctl), 0.0
            if not lib.ControlObjectClient_operate(ctl, val, 0):
                return False, "operate refused: " + self._appl_error(ctl), 0.0
            return True, "", now()
        finally:
            lib.MmsValue_delete(val)

    @staticmethod
    def _appl_error(ctl: int) -> str:
        err = lib.ControlObjectClient_getLastApplError(ctl)
        if err.addCause not in (0, 25):
            return _ADD_CAUSES.get(err.addCause, f"add cause {err.addCause}")
        client_err = lib.ControlObjectClient_getLastError(ctl)
        return IED_ERRORS.get(client_err, f"error {client_err}") if client_err else "no reason given"

    async def command(self, request: CommandRequest) -> float:
        pt = self._control.get(request.point)
        if pt is None:
            raise CommandInvalid(request.point, f"not a control point of device {self.device.name}")
        addr = iec61850_address(pt)
        on = False
        setpoint: float | None = None
        if addr.kind == "double":
            try:
                state = DoublePoint(int(request.value))
            except ValueError:
                raise CommandInvalid(pt.name, "double command takes 1 (off) or 2 (on)") from None
            if state not in (DoublePoint.ON, DoublePoint.OFF):
                raise CommandInvalid(pt.name, "double command takes 1 (off) or 2 (on)")
            on = state is DoublePoint.ON
        elif addr.kind == "single":
            on = bool(request.value)
        elif addr.cdc == "APC":
            try:
                setpoint = float(request.value)
            except (TypeError, ValueError):
                raise CommandInvalid(pt.name, f"APC set-point needs a number, not {request.value!r}") from None
            if not math.isfinite(setpoint):
                raise CommandInvalid(pt.name, "APC set-point must be finite")
        else:
            raise CommandInvalid(pt.name, f"CDC {addr.cdc} commands are not supported by this adapter")
        if pt.name in self._missing:
            raise CommandRejected(pt.name, f"the IED has no {addr.ref}")
        self._require_up()
        if pt.name not in self._controls:
            raise CommandRejected(pt.name, f"no control object for {addr.ref} on the IED")
        ctl, model = self._controls[pt.name]
        lock = self._cmd_locks.setdefault(pt.name, asyncio.Lock())
        timeout_s = self.device.command_timeout_s
        assert self._loop is not None
        async with lock:
            fut: asyncio.Future[str] = self._loop.create_future()
            self._terminations[ctl] = fut
            self._counters["commands"] += 1
            origin = f"mgms:{request.requested_by}"[:64].encode()
            try:
                try:
                    ok, reason, acked = await asyncio.wait_for(
                        asyncio.to_thread(self._operate, ctl, model, on if setpoint is None else setpoint, origin),
                        timeout_s,
                    )
                except TimeoutError:
                    raise CommandTimeout(pt.name, f"no operate response within {timeout_s:g} s") from None
                if not ok:
                    self._counters["commands_rejected"] += 1
                    raise CommandRejected(pt.name, reason)
                if model in _ENHANCED:
                    try:
                        outcome = await asyncio.wait_for(fut, timeout_s)
                    except TimeoutError:
                        raise CommandTimeout(pt.name, f"no CommandTermination within {timeout_s:g} s") from None
                    if outcome:
                        self._counters["commands_rejected"] += 1
                        raise CommandRejected(pt.name, f"negative command termination: {outcome}")
                return acked
            finally:
                self._terminations.pop(ctl, None)
                if not fut.done():
                    fut.cancel()
