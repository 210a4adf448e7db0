"""The mgms command line, run as a user runs it (a child process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mgms(*args: str, timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_check_config_ok_prints_a_summary() -> None:
    # the real lab's meter keys come from the environment: check-config asks for them as run does
    meter_keys = {"MGMS_METER1_EK": "00" * 16, "MGMS_METER1_AK": "11" * 16}
    r = mgms("check-config", "lab_configs/multipower.yaml", env=meter_keys)
    assert r.returncode == 0, r.stderr
    assert "OK - lab 'multipower': 3 device(s), 43 point(s)" in r.stdout
    assert "feeder.breaker.command -> confirmed by feeder.breaker.position (SBO)" in r.stdout


def test_check_config_error_names_file_line_key_and_reason(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    text = (ROOT / "lab_configs" / "multipower.yaml").read_text().replace("port: 2404", "port: 99999")
    bad.write_text(text)
    r = mgms("check-config", str(bad))
    assert r.returncode == 2
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "port: 99999" in t)
    assert f"{bad}:{line}: devices.ref615.port: Input should be less than or equal to 65535" in r.stderr


def test_check_config_missing_file() -> None:
    r = mgms("check-config", "lab_configs/nope.yaml")
    assert r.returncode == 2 and "cannot read file" in r.stderr


def test_command_without_a_running_gateway_says_so(tmp_path: Path) -> None:
    r = mgms("command", "feeder.breaker.command", "open", "--config", "lab_configs/multipower-sim.yaml",
             "--data-dir", str(tmp_path))
    assert r.returncode == 3 and "is `mgms run` running?" in r.stderr


def test_command_value_checked_before_anything_is_sent(tmp_path: Path) -> None:
    r = mgms("command", "feeder.breaker.command", "sideways", "--config", "lab_configs/multipower-sim.yaml",
             "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "not a double command" in r.stderr
    r = mgms("command", "feeder.nope", "1", "--config", "lab_configs/multipower-sim.yaml")
    assert r.returncode == 2 and "no point 'feeder.nope'" in r.stderr


def test_iedsim_refuses_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lab: {name: x}\ndevices: {}\npoints: []\nextra: 1\n")
    r = subprocess.run([sys.executable, "-m", "gateway.iedsim.cli", "iec104", "--config", str(bad)],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "extra" in r.stderr
