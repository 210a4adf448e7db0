"""The simulator built from an SCL file: lab_configs/ref615.icd served, browsed and operated.

The gateway's adapter (the real libiec61850 client) against ``Iec61850Server(scl=...)`` on
loopback: every configured point of the MultiPower 61850 device resolves against the ICD,
values come by the ICD's report control blocks, the breaker and the APC set-point operate
with the control models the file gives. Broken files give an :class:`SclError` naming the
file, the line and the element.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.config import LabConfig, load_config
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.iedsim.iec61850.scl import SclError, SclIed, load_scl
from gateway.points import CommandRequest, DoublePoint, PointUpdate
from gateway.protocols import create_adapter
from gateway.protocols.iec61850.adapter import Iec61850Adapter
from gateway.services import free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
ICD = ROOT / "lab_configs" / "ref615.icd"
MMS = "ref615_mms"


@pytest.fixture(scope="module")
def icd() -> SclIed:
    return load_scl(ICD)


@pytest.fixture
def cfg() -> LabConfig:
    return load_config(SIM_CONFIG).only(MMS)


@pytest.fixture
async def adapter(cfg: LabConfig, icd: SclIed) -> AsyncIterator[tuple[Iec61850Server, Iec61850Adapter]]:
    sim = Iec61850Server(cfg, MMS, host="127.0.0.1", port=free_port(), seed=5, scl=icd)
    sim.travel_s = 0.0
    await sim.start()
    try:
        dev_cfg = cfg.with_device(MMS, port=sim.port, reconnect={"initial_s": 0.1, "max_s": 0.5})
        a = create_adapter(dev_cfg.devices[MMS], dev_cfg.points)
        assert isinstance(a, Iec61850Adapter)
        await a.start()
        try:
            await a.wait_connected(10)
            yield sim, a
        finally:
            await a.close()
    finally:
        await sim.close()


def test_icd_describes_the_ref615(icd: SclIed) -> None:
    assert icd.name == "REF615"
    [ld] = icd.ldevices
    assert ld.inst == "LD0"
    assert [ln.name for ln in ld.lns] == ["LLN0", "LPHD1", "MMXU1", "XCBR1", "CSWI1", "DWMX1"]
    lln0 = ld.lns[0]
    assert [d.name for d in lln0.datasets] == ["Measurements", "Status"]
    assert "brcbMeas01" in [r.name for r in lln0.reports] and "brcbStat01" in [r.name for r in lln0.reports]
    brcb = next(r for r in lln0.reports if r.name == "brcbMeas01")
    assert brcb.buffered and brcb.trg_ops == 1 | 2 | 8 | 16 and brcb.intg_pd_ms == 60_000
    controls = dict(icd.controls())
    assert set(controls) == {"LD0/XCBR1.Pos", "LD0/CSWI1.Pos", "LD0/DWMX1.WMaxSpt"}
    ctl = controls["LD0/CSWI1.Pos"].child("ctlModel")
    assert ctl is not None and ctl.value == "sbo-with-enhanced-security"
    leaf = ld.lns[2].find("PhV.phsA.cVal.mag.f")
    assert leaf is not None and leaf.fc == "MX" and leaf.trg & 1  # dchg inherited from cVal


async def test_adapter_browses_the_icd_and_every_point_checks_out(
    cfg: LabConfig, adapter: tuple[Iec61850Server, Iec61850Adapter]
) -> None:
    sim, a = adapter
    assert sim.missing == [] and sim.ied_name == "REF615"
    assert sim.controls == {"LD0/XCBR1.Pos": "double", "LD0/CSWI1.Pos": "double", "LD0/DWMX1.WMaxSpt": "analogue"}
    assert a.missing_points == frozenset()
    stats = a.stats()
    assert stats.get("missing_references", 0) == 0 and stats.get("rcb_errors", 0) == 0
    assert stats["reports"] >= 2  # the GI of the ICD's BRCBs
    for p in cfg.points:
        if p.direction.value == "monitor":
            got = await a.read(p.name)
            assert isinstance(got, PointUpdate) and got.value is not None, p.name
    sim.set_value("mms.feeder.frequency", 50.125)
    got = await a.read("mms.feeder.frequency")
    assert got.value == pytest.approx(50.125)
    # breaker: XCBR1 direct-normal and CSWI1 SBO-enhanced, as the ICD says
    await a.command(CommandRequest("mms.feeder.breaker.command", DoublePoint.OFF))
    await a.command(CommandRequest("mms.feeder.breaker.command_sbo", DoublePoint.ON))
    assert sim.operations == 2
    assert (await a.read("mms.feeder.breaker.position")).value == int(DoublePoint.ON)
    # APC set-point in protocol units (W): read back from mxVal
    await a.command(CommandRequest("mms.feeder.p_limit.setpoint", 75_000.0))
    # the simulator counts in its control handler, on libiec61850's thread: it may lag the
    # positive response the adapter already returned on
    for _ in range(200):
        if sim.setpoints:
            break
        await asyncio.sleep(0.01)
    assert sim.setpoints == 1
    assert (await a.read("mms.feeder.p_limit.actual")).value == pytest.approx(75.0)


def _broken(tmp_path: Path, old: str, new: str) -> Path:
    text = ICD.read_text()
    assert old in text
    path = tmp_path / "broken.icd"
    path.write_text(text.replace(old, new, 1))
    return path


def _line_of(path: Path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if needle in line)


def test_malformed_xml_names_file_and_line(tmp_path: Path) -> None:
    path = _broken(tmp_path, '<LN lnClass="MMXU" inst="1" lnType="MMXU_T"/>', '<LN lnClass="MMXU" inst="1" lnType=>')
    with pytest.raises(SclError, match="malformed XML") as err:
        load_scl(path)
    assert err.value.path == str(path) and err.value.line == _line_of(path, 'lnType=>')


def test_unknown_type_reference_names_line_and_element(tmp_path: Path) -> None:
    path = _broken(tmp_path, '<DO name="Pos" type="DPC_sbo"/>', '<DO name="Pos" type="DPC_nope"/>')
    with pytest.raises(SclError, match="unknown DOType 'DPC_nope'") as err:
        load_scl(path)
    assert err.value.element == "DO" and err.value.line == _line_of(path, "DPC_nope")
    assert f"{path}:{err.value.line}: <DO>" in str(err.value)
    path = _broken(tmp_path, 'lnType="DWMX_T"', 'lnType="DWMX_X"')
    with pytest.raises(SclError, match="unknown LNodeType 'DWMX_X'"):
        load_scl(path)
    path = _broken(tmp_path, 'type="AnalogueValue" fc="MX" dchg="true"/>', 'type="Analog" fc="MX" dchg="true"/>')
    with pytest.raises(SclError, match="unknown DAType 'Analog'"):
        load_scl(path)


def test_incomplete_icd_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SclError, match=r"no IED named 'REF620'.*REF615"):
        load_scl(ICD, "REF620")
    path = _broken(tmp_path, 'doName="Hz" fc="MX"', 'doName="Hertz" fc="MX"')
    with pytest.raises(SclError, match=r"data set Measurements: no LD0/MMXU1.Hertz \[MX\]") as err:
        load_scl(path)
    assert err.value.element == "FCDA"
    path = _broken(tmp_path, 'datSet="Status"', 'datSet="Statuss"')
    with pytest.raises(SclError, match="unknown data set 'Statuss'"):
        load_scl(path)
    path = tmp_path / "empty.icd"
    path.write_text('<SCL xmlns="http://www.iec.ch/61850/2003/SCL"><Header id="x"/></SCL>')
    with pytest.raises(SclError, match="no <IED> in the file"):
        load_scl(path)
    with pytest.raises(SclError, match="cannot read"):
        load_scl(tmp_path / "missing.icd")


async def test_iedsim_scl_option(tmp_path: Path) -> None:
    """``iedsim iec61850 --scl``: serves the ICD; a broken file exits 2 with the file:line reason."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", "iec61850", "--config", str(SIM_CONFIG),
        "--scl", str(ICD), "--ied", "REF615", "--port", str(port), "--duration-s", "20",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert f"listening on 127.0.0.1:{port}" in line and "ref615.icd" in line
        cfg = load_config(SIM_CONFIG).only(MMS).with_device(MMS, port=port)
        a = create_adapter(cfg.devices[MMS], cfg.points)
        await a.start()
        try:
            await a.wait_connected(10)
            assert isinstance(a, Iec61850Adapter) and a.missing_points == frozenset()
        finally:
            await a.close()
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    bad = _broken(tmp_path, '<DO name="Pos" type="DPC_sbo"/>', '<DO name="Pos" type="DPC_nope"/>')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "iec61850", "--config", str(SIM_CONFIG), "--scl", str(bad),
        "--port", str(free_port()), stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 2
    assert f"invalid SCL: {bad}:{_line_of(bad, 'DPC_nope')}: <DO>" in err.decode()
