"""A REF615-class IEC 61850 MMS server on libiec61850, driven by the shared FeederModel.

The data model is the feeder relay's: LD0 with LLN0 (Mod/Beh/Health, data sets and report
control blocks), LPHD1, MMXU1 (PhV, A, W, VAr, VA, PF as WYE; TotW, TotVAr, TotVA, TotPF,
Hz as MV), XCBR1.Pos and CSWI1.Pos as DPC. The lab config's iec61850 points say which of
these nodes carry which quantity, so values come from the same :class:`FeederModel` as the
104 simulator. Control models: a DPC that a configured control point operates with
``select_before_operate`` is SBO with enhanced security, any other direct with normal
security. A breaker operation waits ``breaker_travel_s`` (the control handler answers
"waiting" until then) and then moves both Pos objects.

All libiec61850 calls go through ctypes (:mod:`gateway.protocols.iec61850.native`), so the
GIL is released in them and control callbacks on the server thread never deadlock against
the asyncio thread updating values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.config import Direction, LabConfig, Point, iec61850_address
from gateway.iedsim.dynamics import FeederModel
from gateway.points import DoublePoint
from gateway.protocols.iec61850.native import ControlHandler, PerformCheckHandler, lib

__all__ = ["MEASUREMENT_RCBS", "STATUS_RCBS", "Iec61850Server"]

log = logging.getLogger(__name__)

_WYE = ("PhV", "A", "W", "VAr", "VA", "PF")
_MV = ("TotW", "TotVAr", "TotVA", "TotPF", "Hz")
_POS = ("XCBR1", "CSWI1")
#: Report control blocks the simulator offers (under LD0/LLN0), all on the same two data sets.
MEASUREMENT_RCBS = ("brcbMeas01", "brcbMeas02", "urcbMeas01")
STATUS_RCBS = ("brcbStat01", "brcbStat02", "urcbStat01")

_CONTROL_RESULT_FAILED = 0
_CONTROL_RESULT_OK = 1
_CONTROL_RESULT_WAITING = 2
_CONTROL_ACCEPTED = -1
_CONTROL_OBJECT_ACCESS_DENIED = 3
_ADD_CAUSE_BLOCKED_BY_INTERLOCKING = 10
_CTL_DIRECT_NORMAL = 1
_CTL_SBO_ENHANCED = 4
_TRG = 1 | 2 | 8 | 16  # dchg, qchg, integrity, GI
_OPT = 1 | 2 | 4 | 8 | 64 | 128  # seqNum, timeStamp, reasonCode, dataSet, entryID, confRev
_QUALITY_INVALID = 0x0002


@dataclass(slots=True)
class _Served:
    point: Point
    value_node: int
    q_node: int
    t_node: int
    kind: str


class Iec61850Server:
    """One simulated IED on ``host:port``; :meth:`start`, then :meth:`close`.

    Fault injection for tests: :meth:`stop`/:meth:`start` again (link loss), ``interlocked``
    (operations refused with AddCause blocked-by-interlocking), :meth:`set_value` (one value
    now, sent by report at once), :meth:`set_quality`.
    """

    def __init__(
        self,
        config: LabConfig,
        device: str,
        *,
        host: str | None = None,
        port: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.config = config
        self.name = device
        dev = config.devices[device]
        self.device = dev
        self.host = host or dev.host
        self.port = dev.port if port is None else port
        self.ied_name = dev.ied_name or device.upper()
        self.points = config.points_of(device)
        self.model = FeederModel(dev.simulator, self.points, seed=seed, start_time=time.time())
        self.interlocked = False
        self.operations = 0
        #: breaker travel time; starts at the config's ``breaker_travel_s``
        self.travel_s = dev.simulator.breaker_travel_s
        self._server: int | None = None
        self._ied: int | None = None
        self._served: dict[str, _Served] = {}
        self._pos_nodes: list[tuple[int, int, int]] = []
        self._callbacks: list[object] = []  # ctypes thunks: alive as long as the server
        self._task: asyncio.Task[None] | None = None
        self._moving_until: dict[int, tuple[float, int]] = {}
        self.missing: list[str] = []

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Build the model (first time) and listen; port 0 picks a free port."""
        if self._server is not None:
            return
        if self.port == 0:
            from gateway.services import free_port

            self.port = free_port()
        self._build()
        server = self._server
        assert server is not None
        lib.IedServer_setLocalIpAddress(server, self.host.encode())
        await asyncio.to_thread(lib.IedServer_start, server, self.port)
        if not lib.IedServer_isRunning(server):
            self._destroy()
            raise OSError(f"iec61850 simulator {self.name}: cannot listen on {self.host}:{self.port}")
        self._push_all()
        self._task = asyncio.create_task(self._run(), name=f"iec61850-sim:{self.name}")
        log.info("%s: IEC 61850 server %s on %s:%d", self.name, self.ied_name, self.host, self.port)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def stop(self) -> None:
        """Stop serving (clients see the link drop); :meth:`start` serves again on the same port."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            await asyncio.to_thread(lib.IedServer_stop, self._server)
            self._destroy()

    async def close(self) -> None:
        await self.stop()

    def _destroy(self) -> None:
        if self._server is not None:
            lib.IedServer_destroy(self._server)
            self._server = None
        if self._ied is not None:
            lib.IedModel_destroy(self._ied)
            self._ied = None
        self._served.clear()
        self._pos_nodes.clear()
        self._callbacks.clear()

    # ------------------------------------------------------------------ model

    def _ctl_model(self, ln: str) -> int:
        for p in self.points:
            if p.direction is Direction.CONTROL and iec61850_address(p).ref == f"LD0/{ln}.Pos":
                return _CTL_SBO_ENHANCED if p.select_before_operate else _CTL_DIRECT_NORMAL
        return _CTL_SBO_ENHANCED if ln == "CSWI1" else _CTL_DIRECT_NORMAL

    def _build(self) -> None:
        ied = lib.IedModel_create(self.ied_name.encode())
        ld = lib.LogicalDevice_create(b"LD0", ied)
        lln0 = lib.LogicalNode_create(b"LLN0", ld)
        lib.CDC_ENC_create(b"Mod", lln0, 0, 0)
        lib.CDC_ENS_create(b"Beh", lln0, 0)
        lib.CDC_ENS_create(b"Health", lln0, 0)
        lphd = lib.LogicalNode_create(b"LPHD1", ld)
        lib.CDC_ENS_create(b"PhyHealth", lphd, 0)
        mmxu = lib.LogicalNode_create(b"MMXU1", ld)
        for do in _WYE:
            lib.CDC_WYE_create(do.encode(), mmxu, 0)
        for do in _MV:
            lib.CDC_MV_create(do.encode(), mmxu, 0, False)
        for ln in _POS:
            node = lib.LogicalNode_create(ln.encode(), ld)
            lib.CDC_DPC_create(b"Pos", node, 0, self._ctl_model(ln))
        meas = lib.DataSet_create(b"Measurements", lln0)
        for do in _WYE:
            for phs in ("phsA", "phsB", "phsC"):
                lib.DataSetEntry_create(meas, f"MMXU1$MX${do}${phs}".encode(), -1, None)
        for do in _MV:
            lib.DataSetEntry_create(meas, f"MMXU1$MX${do}".encode(), -1, None)
        stat = lib.DataSet_create(b"Status", lln0)
        for ln in _POS:
            lib.DataSetEntry_create(stat, f"{ln}$ST$Pos".encode(), -1, None)
        for rcbs, ds in ((MEASUREMENT_RCBS, "Measurements"), (STATUS_RCBS, "Status")):
            for rcb in rcbs:
                ds_ref = ds.encode()  # relative to LLN0: libiec61850 adds "IEDLD0/LLN0$"
                lib.ReportControlBlock_create(
                    rcb.encode(), lln0, rcb.encode(), rcb.startswith("b"), ds_ref, 1, _TRG, _OPT, 0, 60_000
                )
        server = lib.IedServer_create(ied)
        self._ied, self._server = ied, server
        self._bind_points()
        for ln in _POS:
            pos = self._node(f"LD0/{ln}.Pos")
            lib.IedServer_updateCtlModel(server, pos, self._ctl_model(ln))
            self._pos_nodes.append((self._node(f"LD0/{ln}.Pos.stVal"), self._node(f"LD0/{ln}.Pos.q"),
                                    self._node(f"LD0/{ln}.Pos.t")))
            check = PerformCheckHandler(self._on_check)
            handler = ControlHandler(self._on_control)
            self._callbacks += [check, handler]
            lib.IedServer_setPerformCheckHandler(server, pos, check, None)
            lib.IedServer_setControlHandler(server, pos, handler, None)

    def _node(self, ref: str) -> int:
        node = lib.IedModel_getModelNodeByObjectReference(self._ied, f"{self.ied_name}{ref}".encode())
        return int(node or 0)

    def _bind_points(self) -> None:
        self.missing = []
        for p in self.points:
            if p.direction is not Direction.MONITOR:
                continue
            addr = iec61850_address(p)
            leaf = {"MX": "mag.f", "ST": "stVal"}[addr.fc]
            if addr.cdc in ("WYE", "CMV", "DEL"):
                leaf = "cVal.mag.f"
            nodes = [self._node(f"{addr.ref}.{leaf}"), self._node(f"{addr.ref}.q"), self._node(f"{addr.ref}.t")]
            if not all(nodes):
                # A point this IED does not have: the gateway must find out by browsing.
                self.missing.append(p.name)
                log.warning("%s: no %s in the model; point %s not served", self.name, addr.ref, p.name)
                continue
            self._served[p.name] = _Served(p, nodes[0], nodes[1], nodes[2], addr.kind)

    # ------------------------------------------------------------------ values

    def _write(self, values: Iterable[tuple[_Served, float]], quality: int | None = None) -> None:
        server = self._server
        if server is None:
            return
        t_ms = int(time.time() * 1000)
        lib.IedServer_lockDataModel(server)
        try:
            for s, engineering in values:
                raw = s.point.to_raw(engineering)
                lib.IedServer_updateUTCTimeAttributeValue(server, s.t_node, t_ms)
                if quality is not None:
                    lib.IedServer_updateQuality(server, s.q_node, quality)
                if s.kind == "double":
                    lib.IedServer_updateDbposValue(server, s.value_node, int(raw))
                elif s.kind == "single":
                    lib.IedServer_updateBooleanAttributeValue(server, s.value_node, bool(raw))
                else:
                    lib.IedServer_updateFloatAttributeValue(server, s.value_node, float(raw))
        finally:
            lib.IedServer_unlockDataModel(server)

    def _push_all(self) -> None:
        self._write((s, self.model.value(name)) for name, s in self._served.items())
        self._write_breaker(int(self.model.breaker))

    def _write_breaker(self, position: int) -> None:
        server = self._server
        if server is None:
            return
        t_ms = int(time.time() * 1000)
        lib.IedServer_lockDataModel(server)
        try:
            for st, _q, t in self._pos_nodes:
                lib.IedServer_updateUTCTimeAttributeValue(server, t, t_ms)
                lib.IedServer_updateDbposValue(server, st, position)
        finally:
            lib.IedServer_unlockDataModel(server)

    def set_value(self, name: str, engineering: float) -> None:
        """Force one point (fault injection/probes); it goes out by report at once."""
        moved = self.model.set_value(name, engineering)
        if moved:
            self._push_all()
        elif name in self._served:
            self._write([(self._served[name], self.model.value(name))])

    def set_quality(self, name: str, invalid: bool) -> None:
        s = self._served[name]
        self._write([(s, self.model.value(name))], _QUALITY_INVALID if invalid else 0)

    async def _run(self) -> None:
        period = self.device.simulator.period_s
        while True:
            await asyncio.sleep(period)
            self.model.step(time.time())
            self._write((s, self.model.value(name)) for name, s in self._served.items())

    # ------------------------------------------------------------------ control (server thread)

    def _on_check(self, action: int | None, _param: int | None, _ctl_val: int | None, _test: bool,
                  _interlock: bool) -> int:
        if self.interlocked:
            lib.ControlAction_setAddCause(action, _ADD_CAUSE_BLOCKED_BY_INTERLOCKING)
            return _CONTROL_OBJECT_ACCESS_DENIED
        return _CONTROL_ACCEPTED

    def _on_control(self, action: int | None, _param: int | None, ctl_val: int | None, _test: bool) -> int:
        key = int(action or 0)
        pending = self._moving_until.get(key)
        if pending is None:
            target = DoublePoint.ON if lib.MmsValue_getBoolean(ctl_val) else DoublePoint.OFF
            travel = self.travel_s
            self._moving_until[key] = (time.monotonic() + travel, int(target))
            if travel > 0:
                return _CONTROL_RESULT_WAITING
            pending = self._moving_until[key]
        if time.monotonic() < pending[0]:
            return _CONTROL_RESULT_WAITING
        del self._moving_until[key]
        self.operations += 1
        self.model.set_breaker(pending[1])
        self._write_breaker(pending[1])
        # the breaker moved: powers and currents follow in the same instant
        self._write((s, self.model.value(n)) for n, s in self._served.items() if s.kind == "measured")
        return _CONTROL_RESULT_OK
