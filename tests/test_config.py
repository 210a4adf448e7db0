"""Lab config loading: every rejected config names the file, the key, the line and the reason."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.config import Direction, load_config
from gateway.errors import ConfigError
from gateway.iedsim.pki import make_lab_pki

ROOT = Path(__file__).resolve().parents[1]

GOOD = """\
lab:
  name: testlab
devices:
  relay:
    protocol: iec104
    host: 127.0.0.1
    port: 2404
points:
  - name: u1
    device: relay
    quantity: voltage
    unit: V
    phase: L1
    address: {ioa: 1001, type: M_ME_TF_1}
  - name: pos
    device: relay
    quantity: breaker_position
    unit: "1"
    address: {ioa: 2001, type: M_DP_TB_1}
  - name: cmd
    device: relay
    quantity: breaker_command
    unit: "1"
    direction: control
    address: {ioa: 3001, type: C_DC_NA_1}
    status_point: pos
"""


def write(tmp_path: Path, text: str, name: str = "lab.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def issues_of(path: Path) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return [(i.key, i.line, i.reason) for i in err.value.issues]


def test_good_config_loads_into_typed_frozen_models(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.lab.name == "testlab"
    assert cfg.devices["relay"].name == "relay"
    cmd = cfg.point("cmd")
    assert cmd.direction is Direction.CONTROL and cmd.status_point == "pos"
    assert cmd.address.kind == "double"
    with pytest.raises(ValidationError, match="frozen"):
        cmd.scale = 2.0  # type: ignore[misc]


def test_shipped_lab_configs_are_valid() -> None:
    real = load_config(ROOT / "lab_configs/multipower.yaml")
    sim = load_config(ROOT / "lab_configs/multipower-sim.yaml")
    assert real.devices["ref615"].host != "127.0.0.1"
    assert sim.devices["ref615"].host == "127.0.0.1"
    assert [p.name for p in real.points] == [p.name for p in sim.points]
    names = {p.name for p in real.points}
    for needed in ("feeder.voltage.l1", "feeder.current.l3", "feeder.p", "feeder.q", "feeder.s", "feeder.pf",
                   "feeder.frequency", "feeder.breaker.position", "feeder.breaker.command",
                   "feeder.p_limit.setpoint"):
        assert needed in names
    # the profile overrode only what it named; timers merged key by key
    assert sim.devices["ref615"].timers.t1_s == 2 and sim.devices["ref615"].timers.k == 12


def test_unknown_protocol(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("protocol: iec104", "protocol: iec105"))
    [(key, line, reason)] = issues_of(p)
    assert key == "devices.relay.protocol" and line == 5
    assert "unknown protocol 'iec105'" in reason and "did you mean 'iec104'" in reason


def test_duplicate_address(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("ioa: 2001", "ioa: 1001"))
    [(key, line, reason)] = issues_of(p)
    assert key == "points[1](pos).address.ioa" and line == 19
    assert "duplicate address" in reason and "'u1'" in reason


def test_control_point_without_status_point(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("    status_point: pos\n", ""))
    [(key, line, reason)] = issues_of(p)
    assert key == "points[2](cmd).status_point"
    assert line == 20  # the point's own line, since the key is missing
    assert "needs the status point" in reason


def test_status_point_of_wrong_kind(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("status_point: pos", "status_point: u1"))
    [(key, _line, reason)] = issues_of(p)
    assert key == "points[2](cmd).status_point" and "measured point" in reason


def test_bad_port(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("port: 2404", "port: 70000"))
    [(key, line, reason)] = issues_of(p)
    assert key == "devices.relay.port" and line == 7
    assert "65535" in reason


def test_unknown_unit(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("unit: V", "unit: Volt"))
    [(key, line, reason)] = issues_of(p)
    assert key == "points[0](u1).unit" and line == 12
    assert "unknown unit 'Volt'" in reason


def test_unit_that_does_not_fit_the_quantity(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("unit: V", "unit: A"))
    [(key, _line, reason)] = issues_of(p)
    assert key == "points[0](u1).unit" and "does not fit quantity 'voltage'" in reason


def test_unknown_device_reference(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("device: relay\n    quantity: voltage", "device: relai\n    quantity: voltage"))
    [(key, line, reason)] = issues_of(p)
    assert key == "points[0](u1).device" and line == 10
    assert "unknown device 'relai'" in reason and "did you mean 'relay'" in reason


def test_unknown_key_is_named_with_suggestion(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("    port: 2404", "    port: 2404\n    comon_address: 3"))
    [(key, line, reason)] = issues_of(p)
    assert key == "devices.relay.comon_address" and line == 8
    assert "did you mean 'common_address'" in reason


def test_type_that_does_not_fit_direction(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("address: {ioa: 1001, type: M_ME_TF_1}", "address: {ioa: 1001, type: C_SE_NC_1}"))
    issues = issues_of(p)
    assert any(k == "points[0](u1).address.type" and "does not fit direction" in r for k, _, r in issues)


def test_all_issues_are_reported_at_once(tmp_path: Path) -> None:
    text = GOOD.replace("port: 2404", "port: 0").replace("unit: V", "unit: volts")
    keys = {k for k, _, _ in issues_of(write(tmp_path, text))}
    assert keys == {"devices.relay.port", "points[0](u1).unit"}


def test_timers_must_be_ordered(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("    port: 2404", "    port: 2404\n    timers: {t1_s: 5, t2_s: 10}"))
    [(key, _line, reason)] = issues_of(p)
    assert key == "devices.relay.timers" and "t2_s" in reason


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    p = write(tmp_path, GOOD.replace("  relay:\n", "  relay:\n   - broken: [\n"))
    [(key, line, reason)] = issues_of(p)
    assert key == "" and line is not None and "not valid YAML" in reason


def test_missing_file(tmp_path: Path) -> None:
    [(_key, _line, reason)] = issues_of(tmp_path / "nope.yaml")
    assert "cannot read file" in reason


def test_profile_errors_name_the_profile_file(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "base.yaml")
    prof = write(tmp_path, "extends: base.yaml\ndevices:\n  relay:\n    port: -1\n", "sim.yaml")
    with pytest.raises(ConfigError) as err:
        load_config(prof)
    [issue] = err.value.issues
    assert issue.file.endswith("sim.yaml") and issue.line == 4 and issue.key == "devices.relay.port"


def test_profile_overrides_a_point_by_name(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "base.yaml")
    prof = write(tmp_path, "extends: base.yaml\npoints:\n  - {name: u1, deadband: 0.5}\n", "sim.yaml")
    cfg = load_config(prof)
    assert cfg.point("u1").deadband == 0.5 and cfg.point("u1").unit == "V"
    assert len(cfg.points) == 3


def test_scale_and_offset_round_trip(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "lab_configs/multipower.yaml")
    sp = cfg.point("feeder.p_limit.setpoint")
    assert sp.to_raw(50.0) == pytest.approx(50_000.0)
    assert sp.to_engineering(sp.to_raw(42.5)) == pytest.approx(42.5)


def test_certificate_paths_are_relative_to_the_lab_file(tmp_path: Path) -> None:
    labdir = tmp_path / "lab"
    pki = make_lab_pki(labdir / "pki")  # real PEM files: the loader parses them
    for src, f in ((pki.ca, "ca.pem"), (pki.client.cert, "gw.pem"), (pki.client.key, "gw.key")):
        (labdir / "pki" / f).write_bytes(Path(src).read_bytes())
    text = GOOD.replace(
        "    port: 2404\n",
        "    port: 2404\n    tls: {enabled: true, ca_file: pki/ca.pem, cert_file: pki/gw.pem, key_file: pki/gw.key}\n",
    )
    cfg = load_config(write(labdir, text))
    tls = cfg.devices["relay"].tls
    assert tls.ca_file == str(labdir / "pki" / "ca.pem")
    assert tls.key_file == str(labdir / "pki" / "gw.key")


def test_missing_certificate_is_named(tmp_path: Path) -> None:
    text = GOOD.replace(
        "    port: 2404\n",
        "    port: 2404\n    tls: {enabled: true, ca_file: nope.pem}\n",
    )
    issues = issues_of(write(tmp_path, text))
    assert any(k == "devices.relay.tls.ca_file" and "file not found" in r for k, _, r in issues), issues
