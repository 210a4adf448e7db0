"""The systemd units of deploy/systemd/ (issue 17 item 11): written by scripts/install-systemd.sh
with this checkout's path, clean for ``systemd-analyze verify``, logging to the journal, and
their ExecStart stopping cleanly on the SIGTERM systemd sends (KillMode=mixed: main process only)."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ("mgms@.service", "ams@.service")


def settings(unit: Path) -> dict[str, str]:
    """``Key=value`` of a unit file (last one wins; comments and sections dropped)."""
    out: dict[str, str] = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            k, _, v = line.partition("=")
            out[k.strip()] = v.strip()
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("units")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
    r = subprocess.run(
        ["bash", str(ROOT / "scripts" / "install-systemd.sh"), "--dest", str(dest), "--user", user, "--no-reload"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return dest


@pytest.mark.parametrize("name", UNITS)
def test_committed_unit_runs_the_service_as_documented(name: str) -> None:
    s = settings(ROOT / "deploy" / "systemd" / name)
    prog = name.split("@")[0]
    assert s["ExecStart"] == f"/opt/mgms/.venv/bin/{prog} run --config /etc/{prog}/%i.yaml --data-dir /var/lib/{prog}"
    assert s["StandardOutput"] == s["StandardError"] == "journal"
    assert s["KillMode"] == "mixed" and s["KillSignal"] == "SIGTERM"  # the service stops its own Redis
    assert s["Restart"] == "on-failure" and s["RestartPreventExitStatus"] == "2"
    assert s["WantedBy"] == "multi-user.target"  # enabled: it comes back after a reboot
    assert s["StateDirectory"] == prog and s["EnvironmentFile"] == f"-/etc/{prog}/%i.env"


@pytest.mark.parametrize("name", UNITS)
def test_installed_unit_names_this_checkout(name: str, installed: Path) -> None:
    s = settings(installed / name)
    exe = shlex.split(s["ExecStart"])[0]
    assert exe == str(ROOT / ".venv" / "bin" / name.split("@")[0]) and os.access(exe, os.X_OK)
    assert "/opt/mgms" not in (installed / name).read_text()


@pytest.mark.parametrize("name", UNITS)
def test_systemd_analyze_verify_is_clean(name: str, installed: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze missing in CI: .ci/run installs Debian's systemd package")
        pytest.skip("systemd-analyze not installed here (Debian package systemd); CI runs this check")
    for unit in (installed / name, installed / name.replace("@.", "@lab.")):
        if unit.name != name:
            shutil.copy(installed / name, unit)  # an instance, as `systemctl enable mgms@lab` makes it
        r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
        # verify exits 0 on unknown keys and bad values too: a warning on stderr is a failure here
        assert r.returncode == 0 and r.stderr.strip() == "", f"{unit.name}: {r.stderr}"


def test_exec_start_stops_cleanly_on_the_sigterm_systemd_sends(installed: Path, tmp_path: Path) -> None:
    """The unit's own command line (%i: a simulator lab), stderr as a journal stream: it logs
    journal lines, and SIGTERM to the main process alone ends it with 0 and its Redis gone."""
    argv = shlex.split(settings(installed / "mgms@.service")["ExecStart"])
    config = tmp_path / "lab.yaml"
    shutil.copy(ROOT / "lab_configs" / "multipower-sim.yaml", config)
    shutil.copy(ROOT / "lab_configs" / "multipower.yaml", tmp_path)  # its base (addresses: the sim's, 127.0.0.1)
    argv = [str(config) if a == "/etc/mgms/%i.yaml" else str(tmp_path / "state") if a == "/var/lib/mgms" else a
            for a in argv]  # fmt: skip
    journal = tmp_path / "journal.log"
    with journal.open("wb") as sink:
        st = os.fstat(sink.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(argv, stdout=sink, stderr=sink, env=env, cwd=tmp_path)
    marker = tmp_path / "state" / "multipower" / "redis.url"
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, journal.read_text(errors="replace")
            assert time.monotonic() < deadline, "the embedded Redis did not come up"
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, journal.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert not marker.exists(), "the embedded Redis outlived the service"
    lines = journal.read_text(errors="replace").splitlines()
    assert lines and all(line.startswith("<") and line[2] == ">" for line in lines if line), lines[:5]
    assert any(line.startswith("<6>") for line in lines), "INFO lines with syslog priority 6"


def test_terminal_logging_keeps_timestamps(tmp_path: Path) -> None:
    """Without the journal (JOURNAL_STREAM naming another stream), lines carry their time and level."""
    code = ("import logging; from gateway.cliutil import configure_logging as c; c('INFO'); "
            "logging.getLogger('x').info('hi')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "JOURNAL_STREAM": "1:1"})  # fmt: skip
    assert r.stderr.rstrip().endswith(" INFO x: hi") and r.stderr[:4].isdigit(), r.stderr
