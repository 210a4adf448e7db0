"""A REF615-class IEC 61850 MMS server on libiec61850, driven by the shared FeederModel.

Two ways to get the data model:

* built in (default): the feeder relay's LD0 with LLN0 (Mod/Beh/Health, data sets and report
  control blocks), LPHD1, MMXU1 (PhV, A, W, VAr, VA, PF as WYE; TotW, TotVAr, TotVA, TotPF,
  Hz as MV), XCBR1.Pos and CSWI1.Pos as DPC and DWMX1.WMaxSpt as APC (active power limit
  set-point). Control models: a control that a configured control point operates with
  ``select_before_operate`` is SBO with enhanced security, any other direct with normal
  security.
* from an SCL file (``scl=`` a :class:`~gateway.iedsim.iec61850.scl.SclIed`, e.g.
  ``lab_configs/ref615.icd``): the IED's logical devices, nodes, data objects and attributes
  with their FCs and trigger options, data sets and RCBs, and the control models the file
  gives. The lab config's points then only say which node carries which quantity.

Either way values come from the same :class:`FeederModel` as the 104 simulator, by the lab
config's iec61850 points. A breaker operation (any controllable DPC) waits
``breaker_travel_s`` (the control handler answers "waiting" until then) and then moves every
DPC position, since the feeder has one breaker. An APC operate (``Oper.ctlVal.f``) applies the
set-point to the feeder model (e.g. the active power limit) and updates its ``mxVal``, so the
gateway confirms it by the read-back like a 104 set-point.

All libiec61850 calls go through ctypes (:mod:`gateway.protocols.iec61850.native`), so the
GIL is released in them and control callbacks on the server thread never deadlock against
the asyncio thread updating values.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.config import Direction, LabConfig, Point, iec61850_address
from gateway.iedsim.dynamics import FeederModel
from gateway.iedsim.iec61850.scl import BTYPES, SclIed, SclNode
from gateway.points import DoublePoint
from gateway.protocols.iec61850.native import FC, ControlHandler, PerformCheckHandler, lib
from gateway.protocols.iec61850.tls import TlsConfig

__all__ = ["MEASUREMENT_RCBS", "STATUS_RCBS", "Iec61850Server"]

log = logging.getLogger(__name__)

_WYE = ("PhV", "A", "W", "VAr", "VA", "PF")
_MV = ("TotW", "TotVAr", "TotVA", "TotPF", "Hz")
_POS = ("XCBR1", "CSWI1")
#: The built-in model's set-point: DWMX1.WMaxSpt (APC), after IEC 61850-7-420's DWMX.
_APC = ("DWMX1", "WMaxSpt")
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
_MMS_STRUCTURE = 1
_INT_BTYPES = {"INT8", "INT16", "INT32", "INT64", "Enum"}
_UINT_BTYPES = {"INT8U", "INT16U", "INT24U", "INT32U"}
_STRING_BTYPES = {"VisString32", "VisString64", "VisString65", "VisString129", "VisString255", "ObjRef"}


@dataclass(slots=True)
class _Served:
    point: Point
    value_node: int
    q_node: int
    t_node: int
    kind: str


@dataclass(slots=True)
class _Control:
    """A controllable data object: ``LD0/XCBR1.Pos`` (double), an SPC (single) or an APC."""

    ref: str
    kind: str  # double | single | analogue
    ctl_model: int
    point: Point | None  # the config's CO point on this object, if any
    value_node: int = 0
    t_node: int = 0


def _leaf(node: SclNode) -> str | None:
    """The process-value leaf of a controllable DO: stVal or mxVal.f."""
    if node.child("stVal") is not None:
        return "stVal"
    mx = node.child("mxVal")
    if mx is not None and mx.child("f") is not None:
        return "mxVal.f"
    return None


class Iec61850Server:
    """One simulated IED on ``host:port``; :meth:`start`, then :meth:`close`.

    Fault injection for tests: :meth:`stop`/:meth:`start` again (link loss), ``interlocked``
    (breaker operations refused with AddCause blocked-by-interlocking), :meth:`set_value` (one
    value now, sent by report at once), :meth:`set_quality`.

    TLS: when the device's ``tls.enabled``, the server speaks MMS over TLS (libiec61850 with
    its bundled mbedtls) with the simulator's ``tls_cert_file``/``tls_key_file``; with
    ``tls_ca_file`` it demands a client certificate chaining to that CA.
    """

    def __init__(
        self,
        config: LabConfig,
        device: str,
        *,
        host: str | None = None,
        port: int | None = None,
        seed: int | None = None,
        scl: SclIed | None = None,
    ) -> None:
        self.config = config
        self.name = device
        dev = config.devices[device]
        self.device = dev
        self.host = host or dev.host
        self.port = dev.port if port is None else port
        self.scl = scl
        self.ied_name = scl.name if scl is not None else (dev.ied_name or device.upper())
        if scl is not None and dev.ied_name is not None and dev.ied_name != scl.name:
            log.warning("%s: the SCL's IED is %s, the config says ied_name %s: the gateway will not find it",
                        device, scl.name, dev.ied_name)
        self.points = config.points_of(device)
        self.model = FeederModel(dev.simulator, self.points, seed=seed, start_time=time.time())
        self.interlocked = False
        #: breaker operations completed
        self.operations = 0
        #: set-points (APC operates) applied
        self.setpoints = 0
        #: breaker travel time; starts at the config's ``breaker_travel_s``
        self.travel_s = dev.simulator.breaker_travel_s
        self._server: int | None = None
        self._ied: int | None = None
        self._tls: TlsConfig | None = None
        self._served: dict[str, _Served] = {}
        self._controls: list[_Control] = []
        self._callbacks: list[object] = []  # ctypes thunks: alive as long as the server
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._serving = False
        self._moving_until: dict[int, tuple[float, int]] = {}
        self.missing: list[str] = []
        #: attribute values written into the model (each can trigger a report): a benchmark
        #: compares it with what the gateway received
        self.values_written = 0

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
        await asyncio.to_thread(lib.IedServer_startThreadless, server, self.port)
        if not lib.IedServer_isRunning(server):
            self._destroy()
            raise OSError(f"iec61850 simulator {self.name}: cannot listen on {self.host}:{self.port}")
        self._serving = True
        self._thread = threading.Thread(target=self._serve, args=(server,), name=f"iec61850-sim-{self.name}")
        self._thread.start()
        self._push_all()
        self._task = asyncio.create_task(self._run(), name=f"iec61850-sim:{self.name}")
        log.info("%s: IEC 61850 server %s on %s:%d%s", self.name, self.ied_name, self.host, self.port,
                 " (TLS)" if self._tls is not None else "")

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def controls(self) -> dict[str, str]:
        """Controllable objects of the running model: reference -> kind."""
        return {c.ref: c.kind for c in self._controls}

    async def freeze(self) -> None:
        """Stop the periodic model steps while serving on: a benchmark's end of the flow, after
        which every value written must still reach the client."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def stop(self) -> None:
        """Stop serving (clients see the link drop); :meth:`start` serves again on the same port."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._thread is not None:
            self._serving = False
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self._server is not None:
            await asyncio.to_thread(lib.IedServer_stopThreadless, self._server)
            self._destroy()

    def _serve(self, server: int) -> None:
        """The server loop ``IedServer_start`` would run, on our thread so :meth:`stop` can end it first.

        Why not ``IedServer_start``/``IedServer_stop``: in this single-threaded libiec61850 build
        ``IedServer_stop`` deactivates every report control block while its server thread may
        still be sending a report, a race that crashed the simulator (SIGSEGV in
        ``sendNextReportEntrySegment``, seen under gdb after 100-900 link drops). Here the loop
        is joined before ``IedServer_stopThreadless``. Each turn waits at most 1 ms for
        socket data (as libiec61850's own thread does), so reports leave as fast as before.
        """
        while self._serving:
            lib.IedServer_processIncomingData(server)
            lib.IedServer_performPeriodicTasks(server)

    async def close(self) -> None:
        await self.stop()

    def _destroy(self) -> None:
        if self._server is not None:
            lib.IedServer_destroy(self._server)
            self._server = None
        if self._ied is not None:
            lib.IedModel_destroy(self._ied)
            self._ied = None
        if self._tls is not None:
            self._tls.close()
            self._tls = None
        self._served.clear()
        self._controls.clear()
        self._callbacks.clear()

    # ------------------------------------------------------------------ model

    def _config_control(self, ref: str) -> Point | None:
        for p in self.points:
            if p.direction is Direction.CONTROL and iec61850_address(p).ref == ref:
                return p
        return None

    def _ctl_model(self, ref: str) -> int:
        p = self._config_control(ref)
        if p is not None:
            return _CTL_SBO_ENHANCED if p.select_before_operate else _CTL_DIRECT_NORMAL
        return _CTL_SBO_ENHANCED if ref.endswith("CSWI1.Pos") else _CTL_DIRECT_NORMAL

    def _build(self) -> None:
        ied = self._build_scl(self.scl) if self.scl is not None else self._build_builtin()
        dev = self.device
        if dev.tls.enabled:
            sim = dev.simulator
            if sim.tls_cert_file is None or sim.tls_key_file is None:
                lib.IedModel_destroy(ied)
                raise ValueError(f"{self.name}: tls.enabled needs simulator.tls_cert_file and tls_key_file")
            self._tls = TlsConfig.server(sim.tls_cert_file, sim.tls_key_file, sim.tls_ca_file)
            server = self._tls.server_for(ied)
        else:
            server = lib.IedServer_create(ied)
        self._ied, self._server = ied, server
        self._bind_points()
        self._install_controls()

    def _build_builtin(self) -> int:
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
            lib.CDC_DPC_create(b"Pos", node, 0, self._ctl_model(f"LD0/{ln}.Pos"))
            self._controls.append(_Control(f"LD0/{ln}.Pos", "double", self._ctl_model(f"LD0/{ln}.Pos"),
                                           self._config_control(f"LD0/{ln}.Pos")))
        apc_ln, apc_do = _APC
        apc_ref = f"LD0/{apc_ln}.{apc_do}"
        lib.CDC_APC_create(apc_do.encode(), lib.LogicalNode_create(apc_ln.encode(), ld), 0,
                           self._ctl_model(apc_ref), False)
        self._controls.append(_Control(apc_ref, "analogue", self._ctl_model(apc_ref), self._config_control(apc_ref)))
        meas = lib.DataSet_create(b"Measurements", lln0)
        for do in _WYE:
            for phs in ("phsA", "phsB", "phsC"):
                lib.DataSetEntry_create(meas, f"MMXU1$MX${do}${phs}".encode(), -1, None)
        for do in _MV:
            lib.DataSetEntry_create(meas, f"MMXU1$MX${do}".encode(), -1, None)
        lib.DataSetEntry_create(meas, f"{apc_ln}$MX${apc_do}".encode(), -1, None)
        stat = lib.DataSet_create(b"Status", lln0)
        for ln in _POS:
            lib.DataSetEntry_create(stat, f"{ln}$ST$Pos".encode(), -1, None)
        for rcbs, ds in ((MEASUREMENT_RCBS, "Measurements"), (STATUS_RCBS, "Status")):
            for rcb in rcbs:
                ds_ref = ds.encode()  # relative to LLN0: libiec61850 adds "IEDLD0/LLN0$"
                lib.ReportControlBlock_create(
                    rcb.encode(), lln0, rcb.encode(), rcb.startswith("b"), ds_ref, 1, _TRG, _OPT, 0, 60_000
                )
        return int(ied)

    def _build_scl(self, scl: SclIed) -> int:
        """The libiec61850 model of an SCL IED, through the dynamic model API."""
        ied = lib.IedModel_create(scl.name.encode())
        for ld_def in scl.ldevices:
            ld = lib.LogicalDevice_create(ld_def.inst.encode(), ied)
            for ln_def in ld_def.lns:
                ln = lib.LogicalNode_create(ln_def.name.encode(), ld)
                for do in ln_def.data:
                    self._create_node(do, ln)
            lln0_def = ld_def.lns[0]
            lln0 = lib.IedModel_getModelNodeByObjectReference(ied, f"{scl.name}{ld_def.inst}/LLN0".encode())
            for ds_def in lln0_def.datasets:
                ds = lib.DataSet_create(ds_def.name.encode(), lln0)
                for member in ds_def.members:
                    lib.DataSetEntry_create(ds, member.encode(), -1, None)
            for rc in lln0_def.reports:
                lib.ReportControlBlock_create(
                    rc.name.encode(), lln0, rc.rpt_id.encode() if rc.rpt_id else None, rc.buffered,
                    rc.dataset.encode(), rc.conf_rev, rc.trg_ops, rc.opt_fields, rc.buf_time_ms, rc.intg_pd_ms,
                )
        for ref, do in scl.controls():
            leaf = _leaf(do)
            st = do.child("stVal")
            kind = ("double" if st is not None and st.btype == "Dbpos" else "single" if st is not None
                    else "analogue" if leaf == "mxVal.f" else "")
            if not kind:
                log.warning("%s: %s has Oper but no stVal or mxVal.f: not simulated", self.name, ref)
                continue
            ctl = do.child("ctlModel")
            model = ctl.enum.get(ctl.value, _CTL_DIRECT_NORMAL) if ctl is not None and ctl.enum and ctl.value else (
                _CTL_DIRECT_NORMAL)
            self._controls.append(_Control(ref, kind, model, self._config_control(ref)))
        return int(ied)

    def _create_node(self, node: SclNode, parent: int) -> None:
        if node.is_do:
            handle = lib.DataObject_create(node.name.encode(), parent, node.count)
        else:
            assert node.btype is not None and node.fc is not None
            handle = lib.DataAttribute_create(node.name.encode(), parent, BTYPES[node.btype], FC[node.fc],
                                              node.trg if not node.children else 0, node.count, 0)
            if node.value is not None:
                self._set_initial(handle, node)
        for child in node.children:
            self._create_node(child, handle)

    @staticmethod
    def _set_initial(handle: int, node: SclNode) -> None:
        """An SCL ``Val`` as the attribute's initial value (ints, enums, floats, booleans, strings)."""
        text = node.value or ""
        bt = node.btype
        value: int | None = None
        try:
            if bt == "Enum" and node.enum is not None:
                value = lib.MmsValue_newIntegerFromInt32(node.enum[text])
            elif bt in _INT_BTYPES:
                value = lib.MmsValue_newIntegerFromInt32(int(text))
            elif bt in _UINT_BTYPES:
                value = lib.MmsValue_newUnsignedFromUint32(int(text))
            elif bt in ("FLOAT32", "FLOAT64"):
                value = lib.MmsValue_newFloat(float(text))
            elif bt == "BOOLEAN":
                value = lib.MmsValue_newBoolean(text.lower() in ("true", "1"))
            elif bt in _STRING_BTYPES:
                value = lib.MmsValue_newVisibleString(text.encode())
        except ValueError:
            log.warning("SCL value %r of %s is not a %s: ignored", text, node.name, bt)
            return
        if value:
            lib.DataAttribute_setValue(handle, value)
            lib.MmsValue_delete(value)

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
            elif addr.cdc == "APC":
                leaf = "mxVal.f"
            nodes = [self._node(f"{addr.ref}.{leaf}"), self._node(f"{addr.ref}.q"), self._node(f"{addr.ref}.t")]
            if not all(nodes):
                # A point this IED does not have: the gateway must find out by browsing.
                self.missing.append(p.name)
                log.warning("%s: no %s in the model; point %s not served", self.name, addr.ref, p.name)
                continue
            self._served[p.name] = _Served(p, nodes[0], nodes[1], nodes[2], addr.kind)

    def _install_controls(self) -> None:
        server = self._server
        kept: list[_Control] = []
        for ctl in self._controls:
            do = self._node(ctl.ref)
            leaf = "mxVal.f" if ctl.kind == "analogue" else "stVal"
            ctl.value_node, ctl.t_node = self._node(f"{ctl.ref}.{leaf}"), self._node(f"{ctl.ref}.t")
            if not do or not ctl.value_node:
                log.warning("%s: control %s not found in the model", self.name, ctl.ref)
                continue
            lib.IedServer_updateCtlModel(server, do, ctl.ctl_model)
            handler = ControlHandler(self._control_callback(ctl))
            self._callbacks.append(handler)
            if ctl.kind == "double":
                check = PerformCheckHandler(self._on_check)
                self._callbacks.append(check)
                lib.IedServer_setPerformCheckHandler(server, do, check, None)
            lib.IedServer_setControlHandler(server, do, handler, None)
            kept.append(ctl)
        self._controls = kept

    def _control_callback(self, ctl: _Control) -> Callable[[int | None, int | None, int | None, bool], int]:
        if ctl.kind == "double":
            return self._on_control
        if ctl.kind == "analogue":
            return lambda action, param, value, test: self._on_setpoint(ctl, value)
        return lambda action, param, value, test: self._on_single(ctl, value)

    # ------------------------------------------------------------------ values

    def _write(self, values: Iterable[tuple[_Served, float]], quality: int | None = None) -> None:
        server = self._server
        if server is None:
            return
        t_ms = int(time.time() * 1000)
        written = 0
        lib.IedServer_lockDataModel(server)
        try:
            for s, engineering in values:
                written += 1
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
            self.values_written += written

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
            for ctl in self._controls:
                if ctl.kind == "double":
                    lib.IedServer_updateUTCTimeAttributeValue(server, ctl.t_node, t_ms)
                    lib.IedServer_updateDbposValue(server, ctl.value_node, position)
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

    def _on_setpoint(self, ctl: _Control, ctl_val: int | None) -> int:
        """APC operate: the set-point reaches the feeder model and the read-back (``mxVal``) at once."""
        try:
            value = ctl_val
            if value and lib.MmsValue_getType(value) == _MMS_STRUCTURE:
                value = lib.MmsValue_getElement(value, 0)
            if not value:
                return _CONTROL_RESULT_FAILED
            raw = float(lib.MmsValue_toFloat(value))
            self.setpoints += 1
            if ctl.point is not None:
                self.model.apply_setpoint(ctl.point, ctl.point.to_engineering(raw))
                # read-back and everything the limit moves, in one consistent update
                self._write((s, self.model.value(n)) for n, s in self._served.items() if s.kind == "measured")
            served = any(iec61850_address(s.point).ref == ctl.ref for s in self._served.values())
            if not served and self._server is not None:
                lib.IedServer_updateFloatAttributeValue(self._server, ctl.value_node, raw)
            return _CONTROL_RESULT_OK
        except Exception:  # never let an exception cross into C
            log.exception("%s: set-point on %s failed", self.name, ctl.ref)
            return _CONTROL_RESULT_FAILED

    def _on_single(self, ctl: _Control, ctl_val: int | None) -> int:
        """SPC operate: the status follows at once."""
        if self._server is None or not ctl_val:
            return _CONTROL_RESULT_FAILED
        lib.IedServer_updateBooleanAttributeValue(self._server, ctl.value_node, bool(lib.MmsValue_getBoolean(ctl_val)))
        return _CONTROL_RESULT_OK
