"""SCL (IEC 61850-6) reader for the simulator: one IED of an ICD/CID file as a plain tree.

Why our own reader: the simulator builds its libiec61850 model through the dynamic API
(:mod:`gateway.protocols.iec61850.native`), so it needs the instance tree an SCL file
describes — logical devices, logical nodes, data objects and attributes with their FC and
trigger options, data sets and report control blocks — not libiec61850's generated C code or
``.cfg`` file. The stdlib is enough: the file is parsed by expat into ``xml.etree`` elements
with their line numbers kept, so every error names the file, the line and the element.

Only what a server needs is read: ``IED/AccessPoint/Server/LDevice/LN0|LN`` (with ``DOI/DAI``
initial values and the LN0's ``DataSet`` and ``ReportControl``), and the
``DataTypeTemplates`` (``LNodeType``, ``DOType`` with ``DA``/``SDO``, ``DAType`` with
``BDA``, ``EnumType``). Everything else (Communication, Substation, Services...) is ignored.
"""

from __future__ import annotations

import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn
from xml.parsers import expat

__all__ = [
    "BTYPES",
    "SclDataSet",
    "SclError",
    "SclIed",
    "SclLDevice",
    "SclLNode",
    "SclNode",
    "SclReportControl",
    "load_scl",
]

#: SCL basic types -> libiec61850 ``DataAttributeType`` (iec61850_model.h).
BTYPES: dict[str, int] = {
    "BOOLEAN": 0, "INT8": 1, "INT16": 2, "INT32": 3, "INT64": 4, "INT128": 5, "INT8U": 6, "INT16U": 7,
    "INT24U": 8, "INT32U": 9, "FLOAT32": 10, "FLOAT64": 11, "Enum": 12, "Octet64": 13, "Octet6": 14,
    "Octet8": 15, "VisString32": 16, "VisString64": 17, "VisString65": 18, "VisString129": 19,
    "ObjRef": 19, "VisString255": 20, "Unicode255": 21, "Timestamp": 22, "Quality": 23, "Check": 24,
    "Dbpos": 25, "Tcmd": 25, "Struct": 27, "EntryTime": 28, "PhyComAddr": 29, "Currency": 30,
    "OptFlds": 31, "TrgOps": 32,
}
_FCS = {"ST", "MX", "SP", "SV", "CF", "DC", "SG", "SE", "SR", "OR", "BL", "EX", "CO"}
_TRG_DCHG, _TRG_QCHG, _TRG_DUPD = 1, 2, 4


class SclError(ValueError):
    """An SCL file the simulator cannot build: names the file, the line and the element."""

    def __init__(self, path: Path | str, line: int | None, element: str, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.element = element
        self.reason = message
        where = f"{self.path}:{line}" if line else self.path
        super().__init__(f"{where}: <{element}>: {message}")


@dataclass(slots=True)
class SclNode:
    """A data object (``btype`` None) or data attribute of the instance tree."""

    name: str
    btype: str | None = None
    fc: str | None = None
    trg: int = 0
    count: int = 0
    value: str | None = None
    enum: dict[str, int] | None = None
    children: list[SclNode] = field(default_factory=list)

    @property
    def is_do(self) -> bool:
        return self.btype is None

    def child(self, name: str) -> SclNode | None:
        return next((c for c in self.children if c.name == name), None)

    def walk(self, path: str = "") -> Iterator[tuple[str, SclNode]]:
        """(dotted path below the LN, node) for this node and everything under it."""
        here = f"{path}.{self.name}" if path else self.name
        yield here, self
        for c in self.children:
            yield from c.walk(here)

    def has_fc(self, fc: str) -> bool:
        return self.fc == fc or any(c.has_fc(fc) for c in self.children)


@dataclass(slots=True)
class SclDataSet:
    name: str
    #: MMS-style members relative to the LD: ``MMXU1$MX$PhV$phsA``
    members: list[str]


@dataclass(slots=True)
class SclReportControl:
    """One RCB instance (``RptEnabled max`` > 1 gives ``name01``, ``name02``...)."""

    name: str
    rpt_id: str | None
    dataset: str
    buffered: bool
    conf_rev: int
    trg_ops: int
    opt_fields: int
    buf_time_ms: int
    intg_pd_ms: int


@dataclass(slots=True)
class SclLNode:
    name: str
    lnclass: str
    data: list[SclNode]
    datasets: list[SclDataSet] = field(default_factory=list)
    reports: list[SclReportControl] = field(default_factory=list)

    def find(self, path: str) -> SclNode | None:
        """``Pos`` or ``PhV.phsA.cVal.mag.f`` below this LN."""
        first, *rest = path.split(".")
        node = next((d for d in self.data if d.name == first), None)
        for part in rest:
            if node is None:
                return None
            node = node.child(part)
        return node


@dataclass(slots=True)
class SclLDevice:
    inst: str
    lns: list[SclLNode]


@dataclass(slots=True)
class SclIed:
    name: str
    ldevices: list[SclLDevice]
    source: str

    def controls(self) -> Iterator[tuple[str, SclNode]]:
        """(``LD/LN.DO``, DO) of every controllable data object (one with ``Oper``)."""
        for ld in self.ldevices:
            for ln in ld.lns:
                for do in ln.data:
                    if do.child("Oper") is not None:
                        yield f"{ld.inst}/{ln.name}.{do.name}", do


# ------------------------------------------------------------------------------ XML with lines


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


#: Largest SCL file read: an SCD of a whole substation runs to tens of megabytes, an ICD of
#: one relay (what the simulator serves) to a few hundred kilobytes.
MAX_SCL_BYTES = 64 << 20


def _parse(path: Path) -> tuple[ET.Element, dict[int, int]]:
    """Parse with expat into ``xml.etree`` elements; returns the root and id(element) -> line."""
    builder = ET.TreeBuilder()
    lines: dict[int, int] = {}
    parser = expat.ParserCreate(namespace_separator="}")

    def start(name: str, attrs: dict[str, str]) -> None:
        el = builder.start(_local(name), {_local(k): v for k, v in attrs.items()})
        lines[id(el)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda name: builder.end(_local(name))
    parser.CharacterDataHandler = builder.data
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO or /dev/zero never ends
            raise SclError(path, None, "SCL", "cannot read: not a regular file")
        with path.open("rb") as f:
            data = f.read(MAX_SCL_BYTES + 1)
    except OSError as exc:
        raise SclError(path, None, "SCL", f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_SCL_BYTES:
        raise SclError(path, None, "SCL", f"file larger than {MAX_SCL_BYTES} bytes")
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        raise SclError(path, exc.lineno, "document", f"malformed XML: {expat.ErrorString(exc.code)}"
                       f" (column {exc.offset})") from None
    except (LookupError, ValueError) as exc:  # encoding="..." unknown, or multi-byte (expat has none)
        raise SclError(path, parser.CurrentLineNumber, "document", f"cannot decode: {exc}") from None
    root = builder.close()
    return root, lines


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.root, self._lines = _parse(path)
        if self.root.tag != "SCL":
            self.fail(self.root, f"root element is <{self.root.tag}>, not <SCL>")
        templates = self.root.find("DataTypeTemplates")
        self.lntypes: dict[str, ET.Element] = {}
        self.dotypes: dict[str, ET.Element] = {}
        self.datypes: dict[str, ET.Element] = {}
        self.enums: dict[str, dict[str, int]] = {}
        if templates is not None:
            for el in templates:
                ident = self.attr(el, "id")
                if el.tag == "LNodeType":
                    self.lntypes[ident] = el
                elif el.tag == "DOType":
                    self.dotypes[ident] = el
                elif el.tag == "DAType":
                    self.datypes[ident] = el
                elif el.tag == "EnumType":
                    self.enums[ident] = {
                        (v.text or "").strip(): self.required_int(v, "ord") for v in el.findall("EnumVal")
                    }

    def line(self, el: ET.Element) -> int | None:
        return self._lines.get(id(el))

    def fail(self, el: ET.Element, message: str) -> NoReturn:
        raise SclError(self.path, self.line(el), el.tag, message)

    def attr(self, el: ET.Element, name: str) -> str:
        value = el.get(name)
        if value is None or (value == "" and name not in ("inst", "prefix")):
            self.fail(el, f"missing attribute {name!r}")
        return value or ""

    def required_int(self, el: ET.Element, name: str) -> int:
        value = self.attr(el, name)
        try:
            return int(value)
        except ValueError:
            self.fail(el, f"attribute {name}={value!r} is not an integer")

    def int_attr(self, el: ET.Element, name: str, default: int) -> int:
        raw = el.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            self.fail(el, f"attribute {name}={raw!r} is not an integer")

    # -- types -> instance tree

    def _da(self, el: ET.Element, fc: str | None, depth: int, inherited_trg: int = 0) -> SclNode:
        name = self.attr(el, "name")
        btype = self.attr(el, "bType")
        if btype not in BTYPES:
            self.fail(el, f"unknown bType {btype!r} of {name}")
        own_fc = el.get("fc") or fc
        if own_fc is None or own_fc not in _FCS:
            self.fail(el, f"{name}: missing or unknown functional constraint {own_fc!r}")
        # a BDA takes the trigger options of the DA it belongs to (libiec61850 checks the leaf)
        trg = inherited_trg | ((_TRG_DCHG if el.get("dchg") == "true" else 0)
                               | (_TRG_QCHG if el.get("qchg") == "true" else 0)
                               | (_TRG_DUPD if el.get("dupd") == "true" else 0))
        node = SclNode(name, btype, own_fc, trg, self.int_attr(el, "count", 0))
        val = el.find("Val")
        if val is not None:
            node.value = (val.text or "").strip()
        if btype == "Struct":
            ref = self.attr(el, "type")
            datype = self.datypes.get(ref)
            if datype is None:
                self.fail(el, f"{name}: unknown DAType {ref!r}")
            if depth > 8:
                self.fail(el, f"{name}: DAType nesting too deep (a type that contains itself?)")
            node.children = [self._da(b, own_fc, depth + 1, trg) for b in datype.findall("BDA")]
        elif btype == "Enum":
            ref = self.attr(el, "type")
            if ref not in self.enums:
                self.fail(el, f"{name}: unknown EnumType {ref!r}")
            node.enum = self.enums[ref]
            if node.value is not None and node.value not in node.enum:
                self.fail(el, f"{name}: value {node.value!r} is not in EnumType {ref}")
        return node

    def _do(self, name: str, ref: str, where: ET.Element, depth: int) -> SclNode:
        dotype = self.dotypes.get(ref)
        if dotype is None:
            self.fail(where, f"{name}: unknown DOType {ref!r}")
        if depth > 8:
            self.fail(where, f"{name}: DOType nesting too deep (a type that contains itself?)")
        node = SclNode(name)
        for el in dotype:
            if el.tag == "DA":
                node.children.append(self._da(el, None, 0))
            elif el.tag == "SDO":
                node.children.append(self._do(self.attr(el, "name"), self.attr(el, "type"), el, depth + 1))
        return node

    def _instantiate(self, ln_el: ET.Element) -> SclLNode:
        lnclass = self.attr(ln_el, "lnClass")
        name = f"{ln_el.get('prefix', '')}{lnclass}{ln_el.get('inst', '')}"
        ref = self.attr(ln_el, "lnType")
        lntype = self.lntypes.get(ref)
        if lntype is None:
            self.fail(ln_el, f"{name}: unknown LNodeType {ref!r}")
        data = [self._do(self.attr(d, "name"), self.attr(d, "type"), d, 0) for d in lntype.findall("DO")]
        ln = SclLNode(name, lnclass, data)
        for doi in ln_el.findall("DOI"):
            self._apply_doi(ln, doi)
        return ln

    def _apply_doi(self, ln: SclLNode, doi: ET.Element) -> None:
        """Initial values from ``DOI/SDI/DAI/Val`` (e.g. a control's ctlModel)."""

        def visit(el: ET.Element, path: str) -> None:
            for sub in el:
                if sub.tag in ("SDI", "DAI"):
                    here = f"{path}.{self.attr(sub, 'name')}"
                    if sub.tag == "SDI":
                        visit(sub, here)
                        continue
                    node = ln.find(here)
                    if node is None or node.is_do:
                        self.fail(sub, f"{ln.name}.{here}: no such data attribute in the LN's type")
                    val = sub.find("Val")
                    if val is not None:
                        node.value = (val.text or "").strip()
                        if node.enum is not None and node.value not in node.enum:
                            self.fail(val, f"{ln.name}.{here}: value {node.value!r} is not one of the enum's")

        name = self.attr(doi, "name")
        if ln.find(name) is None:
            self.fail(doi, f"{ln.name} has no data object {name!r}")
        visit(doi, name)

    # -- LN0 services

    def _dataset(self, ld: str, lns: dict[str, SclLNode], el: ET.Element) -> SclDataSet:
        ds = SclDataSet(self.attr(el, "name"), [])
        for fcda in el.findall("FCDA"):
            if fcda.get("ldInst", ld) != ld:
                self.fail(fcda, f"data set {ds.name}: members in another logical device ({fcda.get('ldInst')})"
                               " are not supported by the simulator")
            ln_name = f"{fcda.get('prefix', '')}{self.attr(fcda, 'lnClass')}{fcda.get('lnInst', '')}"
            fc = self.attr(fcda, "fc")
            path = self.attr(fcda, "doName") + (f".{fcda.get('daName')}" if fcda.get("daName") else "")
            ln = lns.get(ln_name)
            node = ln.find(path) if ln is not None else None
            if node is None or not node.has_fc(fc):
                self.fail(fcda, f"data set {ds.name}: no {ld}/{ln_name}.{path} [{fc}] in this IED")
            ds.members.append(f"{ln_name}${fc}${path.replace('.', '$')}")
        return ds

    def _reports(self, el: ET.Element, datasets: set[str]) -> list[SclReportControl]:
        name = self.attr(el, "name")
        dataset = self.attr(el, "datSet")
        if dataset not in datasets:
            self.fail(el, f"report control {name}: unknown data set {dataset!r}")
        trg = el.find("TrgOps")
        opt = el.find("OptFields")
        enabled = el.find("RptEnabled")
        flags = trg.attrib if trg is not None else {}
        trg_ops = sum(bit for key, bit in (("dchg", 1), ("qchg", 2), ("dupd", 4), ("period", 8), ("gi", 16))
                      if flags.get(key) == "true")
        opts = opt.attrib if opt is not None else {}
        opt_fields = sum(bit for key, bit in (("seqNum", 1), ("timeStamp", 2), ("reasonCode", 4), ("dataSet", 8),
                                              ("dataRef", 16), ("bufOvfl", 32), ("entryID", 64), ("configRef", 128))
                         if opts.get(key) == "true")
        count = self.int_attr(enabled, "max", 1) if enabled is not None else 1
        if not 1 <= count <= 99:
            self.fail(enabled if enabled is not None else el, f"report control {name}: RptEnabled max must be 1..99")
        names = [name] if count == 1 else [f"{name}{i:02d}" for i in range(1, count + 1)]
        return [
            SclReportControl(
                n, el.get("rptID") or None, dataset, el.get("buffered") == "true", self.int_attr(el, "confRev", 1),
                trg_ops, opt_fields, self.int_attr(el, "bufTime", 0), self.int_attr(el, "intgPd", 0),
            )
            for n in names
        ]

    # -- IED

    def ied(self, wanted: str | None) -> SclIed:
        ieds = self.root.findall("IED")
        if not ieds:
            self.fail(self.root, "no <IED> in the file")
        if wanted is None:
            if len(ieds) > 1:
                names = ", ".join(i.get("name", "?") for i in ieds)
                self.fail(self.root, f"{len(ieds)} IEDs in the file ({names}): choose one with --ied")
            ied_el = ieds[0]
        else:
            found = [i for i in ieds if i.get("name") == wanted]
            if not found:
                names = ", ".join(i.get("name", "?") for i in ieds)
                self.fail(self.root, f"no IED named {wanted!r} (the file has: {names})")
            ied_el = found[0]
        name = self.attr(ied_el, "name")
        lds: list[SclLDevice] = []
        for ap in ied_el.findall("AccessPoint"):
            server = ap.find("Server")
            if server is None:
                continue
            for ld_el in server.findall("LDevice"):
                inst = self.attr(ld_el, "inst")
                ln0 = ld_el.find("LN0")
                if ln0 is None:
                    self.fail(ld_el, f"logical device {inst} has no LN0")
                ln_els = [ln0, *ld_el.findall("LN")]
                lns = [self._instantiate(e) for e in ln_els]
                by_name = {ln.name: ln for ln in lns}
                if len(by_name) != len(lns):
                    self.fail(ld_el, f"logical device {inst}: two logical nodes with the same name")
                lln0 = lns[0]
                lln0.datasets = [self._dataset(inst, by_name, d) for d in ln0.findall("DataSet")]
                ds_names = {d.name for d in lln0.datasets}
                for rc in ln0.findall("ReportControl"):
                    lln0.reports.extend(self._reports(rc, ds_names))
                lds.append(SclLDevice(inst, lns))
        if not lds:
            self.fail(ied_el, f"IED {name} has no AccessPoint/Server/LDevice")
        return SclIed(name, lds, str(self.path))


def load_scl(path: Path | str, ied: str | None = None) -> SclIed:
    """Read one IED (the only one, or the one named ``ied``) of an ICD/CID/SCD file.

    Raises :class:`SclError` (file, line, element, reason) for malformed XML, a missing IED,
    unknown type references, data set members the IED lacks, and RCBs on unknown data sets.
    """
    return _Reader(Path(path)).ied(ied)
