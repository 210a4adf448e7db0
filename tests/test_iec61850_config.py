"""Iec61850Address and the iec61850 device fields: validation at load, the address face."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import Iec61850Address, iec61850_address, load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

HEAD = """
lab: {name: t}
devices:
  r:
    protocol: iec61850
    host: 127.0.0.1
    port: 102
    ied_name: REF615
points:
"""
POS = (
    "  - {name: pos, device: r, quantity: breaker_position, unit: '1',"
    " address: {ref: LD0/XCBR1.Pos, fc: ST, cdc: DPC}}\n"
)


def _load(tmp_path: Path, body: str, head: str = HEAD) -> object:
    f = tmp_path / "lab.yaml"
    f.write_text(head + body)
    return load_config(f)


def test_address_face() -> None:
    a = Iec61850Address(ref="LD0/MMXU1.PhV.phsA", fc="MX", cdc="WYE")
    assert a.kind == "measured" and not a.is_control and a.ld_inst == "LD0"
    assert a.key == ("LD0/MMXU1.PhV.phsA", "MX")
    assert a.describe() == "LD0/MMXU1.PhV.phsA [MX]"
    c = Iec61850Address(ref="LD0/CSWI1.Pos", fc="CO", cdc="DPC")
    assert c.is_control and c.kind == "double"
    assert Iec61850Address.key_field == "ref" and Iec61850Address.kind_field == "fc"


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"ref": "MMXU1.PhV", "fc": "MX", "cdc": "WYE"}, "should match pattern"),
        ({"ref": "LD0/MMXU1.PhV", "fc": "XX", "cdc": "WYE"}, "unsupported functional constraint"),
        ({"ref": "LD0/MMXU1.PhV", "fc": "MX", "cdc": "WYY"}, "did you mean 'WYE'"),
        ({"ref": "LD0/MMXU1.PhV", "fc": "CO", "cdc": "WYE"}, "has no CO value"),
    ],
)
def test_invalid_addresses(fields: dict[str, str], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Iec61850Address(**fields)


def test_lab_with_61850_points_loads(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        POS
        + "  - {name: cmd, device: r, quantity: breaker_command, unit: '1', direction: control, status_point: pos,"
        " address: {ref: LD0/CSWI1.Pos, fc: CO, cdc: DPC}}\n",
    )
    assert iec61850_address(cfg.point("cmd")).is_control  # type: ignore[attr-defined]


def test_same_ref_in_two_fcs_is_not_a_duplicate_but_same_fc_is(tmp_path: Path) -> None:
    dup = POS.replace("name: pos", "name: pos2")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, POS + dup)
    assert "duplicate address: LD0/XCBR1.Pos [ST]" in str(err.value)


def test_direction_must_fit_fc(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, POS.replace("quantity: breaker_position", "direction: control, quantity: breaker_position"))
    assert "FC CO is control" in str(err.value)


def test_ied_name_required(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, POS, HEAD.replace("    ied_name: REF615\n", ""))
    assert "ied_name" in str(err.value)


def test_rcb_reference_checked(tmp_path: Path) -> None:
    head = HEAD.replace("ied_name: REF615", "ied_name: REF615\n    report_control_blocks: [LLN0.brcb]")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, POS, head)
    assert "report_control_blocks" in str(err.value)


def test_multipower_has_both_views_of_the_relay() -> None:
    cfg = load_config(ROOT / "lab_configs" / "multipower.yaml")
    mms = cfg.points_of("ref615_mms")
    assert cfg.devices["ref615_mms"].ied_name == "REF615"
    assert all(p.name.startswith("mms.") for p in mms) and len(mms) == 16
    only = cfg.only("ref615_mms")
    assert list(only.devices) == ["ref615_mms"] and len(only.points) == 16
