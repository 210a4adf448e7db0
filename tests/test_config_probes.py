"""The ``probes`` setting of the lab config and of the AMS config: on by default, a bool or
``{enabled: bool}``, anything else refused naming the file, the line and the key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ams.config import AmsConfig, load_ams_config
from gateway.config import load_config
from gateway.errors import ConfigError

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
"""
AMS_MESSAGING = "messaging: {participant: ams, identity_file: ams.key, transports: {}}\n"


def lab_with(tmp_path: Path, tail: str) -> Path:
    p = tmp_path / "lab.yaml"
    p.write_text(GOOD + textwrap.dedent(tail), encoding="utf-8")
    return p


def lab_issues(path: Path) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return [(i.key, i.line, i.reason) for i in err.value.issues]


def test_probes_are_on_unless_switched_off(tmp_path: Path) -> None:
    assert load_config(lab_with(tmp_path, "")).probes.enabled is True
    assert load_config(lab_with(tmp_path, "probes: false\n")).probes.enabled is False
    assert load_config(lab_with(tmp_path, "probes: {enabled: false}\n")).probes.enabled is False
    assert load_config(lab_with(tmp_path, "probes: {enabled: true}\n")).probes.enabled is True
    assert load_config(lab_with(tmp_path, "probes: {}\n")).probes.enabled is True


@pytest.mark.parametrize(
    ("tail", "key", "reason"),
    [
        ("probes: 1\n", "probes", "must be true, false or {enabled: true|false}, not 1"),
        ("probes: 'off'\n", "probes", "must be true, false or {enabled: true|false}, not 'off'"),
        ("probes:\n", "probes", "must be true, false or {enabled: true|false}, not None"),
        ("probes: {enabled: 'yes'}\n", "probes.enabled", "Input should be a valid boolean"),
        ("probes: {enable: false}\n", "probes.enable", "unknown key (did you mean 'enabled'?)"),
    ],
)
def test_bad_probes_setting_names_file_line_and_key(tmp_path: Path, tail: str, key: str, reason: str) -> None:
    path = lab_with(tmp_path, tail)
    line = GOOD.count("\n") + 1
    assert lab_issues(path) == [(key, line, reason)]


def test_ams_config_probes_default_on_and_switch_off() -> None:
    base = {"messaging": {"participant": "ams", "identity_file": "ams.key", "transports": {}}}
    assert AmsConfig.model_validate(base).probes.enabled is True
    assert AmsConfig.model_validate({**base, "probes": False}).probes.enabled is False
    assert AmsConfig.model_validate({**base, "probes": {"enabled": False}}).probes.enabled is False


def test_ams_config_bad_probes_is_reported_with_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "ams.yaml"
    bad.write_text(AMS_MESSAGING + "probes: sometimes\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_ams_config(bad)
    issues = [(i.file, i.line, i.key, i.reason) for i in err.value.issues]
    assert (str(bad), 2, "probes", "must be true, false or {enabled: true|false}, not 'sometimes'") in issues
    bad.write_text(AMS_MESSAGING + "probes: {enabled: 2}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_ams_config(bad)
    assert [(i.line, i.key) for i in err.value.issues if i.key.startswith("probes")] == [(2, "probes.enabled")]


def test_check_config_says_when_probes_are_off(tmp_path: Path) -> None:
    def check(tail: str) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check-config", str(lab_with(tmp_path, tail))],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert "probes: off" in check("probes: false\n")
    assert "probes" not in check("")
