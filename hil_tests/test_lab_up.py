"""``mgms lab up`` ends with all its children, whichever way it ends.

Ctrl-C is the README path (hil_tests/test_readme_path.py). Here the other two: ``lab up``
itself SIGKILLed (no cleanup of its own runs: the kernel's parent-death signal must stop the
gateway, which then stops its Redis, and the simulators), and one of its children dying (the
lab is not up any more: the other child is stopped and the exit code says so).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.services import free_port

pytestmark = pytest.mark.timeout(90)

LAB = Path(__file__).resolve().parents[1] / "lab_configs"
DEVICES = ("ref615", "ref615_mms", "meter1")


def profile(tmp_path: Path) -> tuple[Path, list[int]]:
    ports = [free_port() for _ in DEVICES]
    p = tmp_path / "lab.yaml"
    p.write_text(
        f"extends: {LAB / 'multipower-sim.yaml'}\ndevices:\n"
        + "".join(f"  {dev}:\n    port: {port}\n" for dev, port in zip(DEVICES, ports, strict=True))
    )
    return p, ports


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def port_free(port: int) -> bool:
    """Nobody listens on ``port`` (SO_REUSEADDR: closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def lab_up(tmp_path: Path, *, wait: bool = True) -> tuple[subprocess.Popen[bytes], Path, list[int], Path]:
    """``mgms lab up`` in a session of its own (as a terminal's foreground job: Ctrl-C = SIGINT to the group)."""
    lab, ports = profile(tmp_path)
    log = tmp_path / "lab-up.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "lab", "up", "--config", str(lab),
             "--data-dir", str(tmp_path / "state")],
            stdout=sink, stderr=subprocess.STDOUT, env={**os.environ}, start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 40
    while wait and "lab up: " not in log.read_text(errors="replace"):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
        time.sleep(0.1)
    return proc, log, ports, tmp_path / "state" / "multipower"


def wait_for(probe: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_sigkill_of_lab_up_stops_the_gateway_its_redis_and_the_simulators(tmp_path: Path) -> None:
    proc, _log, ports, state = lab_up(tmp_path)
    kids = children(proc.pid)
    assert len(kids) == 2, kids  # iedsim all, mgms run
    assert (state / "redis.url").exists()
    proc.kill()
    proc.wait(10)
    wait_for(lambda: not any(alive(k) for k in kids), 20, "a child of the killed `lab up` lives on")
    wait_for(lambda: all(port_free(p) for p in ports), 10, "a simulator port is still held")
    assert not (state / "redis.url").exists(), "the gateway did not stop its Redis"


def test_ctrl_c_to_the_whole_group_is_a_clean_stop(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches lab up and both children at once: still exit 0, nothing left."""
    proc, log, ports, state = lab_up(tmp_path)
    kids = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]
    after = log.read_text(errors="replace").split("lab up: ", 1)[1]
    assert "stopping the lab" not in after and "Traceback" not in after, after
    assert not any(alive(k) for k in kids)
    assert all(port_free(p) for p in ports) and not (state / "redis.url").exists()


def test_ctrl_c_during_start_up_leaves_nothing(tmp_path: Path) -> None:
    proc, log, ports, state = lab_up(tmp_path, wait=False)
    deadline = time.monotonic() + 30
    while not children(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    kids = children(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(30) == 130, log.read_text(errors="replace")[-3000:]
    assert kids and not any(alive(k) for k in kids)
    wait_for(lambda: all(port_free(p) for p in ports), 10, "a simulator port is still held")
    assert not (state / "redis.url").exists()


def test_a_child_that_dies_stops_the_lab_with_exit_1(tmp_path: Path) -> None:
    proc, log, _ports, state = lab_up(tmp_path)
    kids = children(proc.pid)
    sims = next(k for k in kids if "gateway.iedsim.cli" in Path(f"/proc/{k}/cmdline").read_text())
    os.kill(sims, signal.SIGKILL)
    assert proc.wait(30) == 1
    assert "the simulators exited" in log.read_text(errors="replace")
    assert not any(alive(k) for k in kids)
    assert not (state / "redis.url").exists()
