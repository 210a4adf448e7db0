"""`mgms run` and `ams run` leave nothing running behind them, and one run per data dir.

Issue 17 item 10: a SIGTERM right after the embedded redis-server was up ended `mgms` before
its handler was installed and left that redis-server running (parent 1, holding the data
dir and the port). Item 6: a second run of the same lab shared the first one's AOF dir and
then deleted its redis.url. Each test runs the real CLI as a child process with its own
embedded Redis and looks at the processes in /proc afterwards: by the working directory the
embedded redis-server runs in (the data dir), whoever its parent is by then.

``MGMS_LIFECYCLE_REPEATS`` (default 1) repeats every start-up point that many times, for a
longer hunt of the race than the suite's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hilkit import SIM_CONFIG

from ams.sandbox import DsoSandbox
from gateway.services import DataDirInUse, DataDirLock

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # a few CLI runs per test, ~1-2 s each

REPEATS = int(os.environ.get("MGMS_LIFECYCLE_REPEATS", "1"))


@dataclass(frozen=True)
class Service:
    """One `run` command line and the state dir it will use (``<data-dir>/<lab or participant>``)."""

    argv: list[str]
    state: Path
    #: the port its HTTPS transport listens on, once its Redis is up
    listen_port: int

    @property
    def url_file(self) -> Path:
        return self.state / "redis.url"

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


MakeService = Callable[[Path], Service]


@pytest.fixture(params=["mgms", "ams"])
def make_service(request: pytest.FixtureRequest, tmp_path: Path) -> MakeService:
    """``make_service(data_dir)``: `mgms run` of the simulator lab or `ams run`, both with
    their messaging on HTTPS (a listener that can be made to fail after the Redis is up)."""
    box = DsoSandbox(tmp_path / "dso", mgms=["mgms-x"], start_broker=False)
    if request.param == "mgms":
        lab = tmp_path / "lab.yaml"
        messaging = box.messaging("mgms-x", transport="https").model_dump(mode="json")
        lab.write_text(yaml.safe_dump({"extends": str(SIM_CONFIG), "messaging": messaging}))

        def mgms(data_dir: Path) -> Service:
            argv = [sys.executable, "-m", "gateway.cli", "run", "-c", str(lab), "--data-dir", str(data_dir)]
            return Service(argv, data_dir / "multipower", listen_port=box.https_ports["mgms-x"])

        return mgms
    cfg = tmp_path / "ams.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "messaging": box.messaging("ams", transport="https").model_dump(mode="json"),
                "microgrids": [{"participant": "mgms-x", "location": "L1"}],
            }
        )
    )

    def ams(data_dir: Path) -> Service:
        argv = [sys.executable, "-m", "ams.cli", "run", "-c", str(cfg), "--data-dir", str(data_dir)]
        return Service(argv, data_dir / "ams", listen_port=box.https_ports["ams"])

    return ams


# -- /proc ------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid), None once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = text[text.rindex(")") + 2 :].split()
    return text[text.index("(") + 1 : text.rindex(")")], rest[0], int(rest[1])


def exited(pid: int) -> bool:
    """Gone, or a zombie: it has exited (whether its new parent reaps it is not ours to test)."""
    st = _stat(pid)
    return st is None or st[1] == "Z"


def redis_servers_in(state: Path) -> set[int]:
    """Live redis-servers running in ``state``'s Redis dir (they rename themselves, so by cwd)."""
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        st = _stat(pid)
        if st is None or st[0] != "redis-server" or st[1] == "Z":
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if Path(cwd) == state / "redis":
            found.add(pid)
    return found


def redis_children(parent: int) -> set[int]:
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        st = _stat(int(entry.name))
        if st is not None and st[0] == "redis-server" and st[2] == parent and st[1] != "Z":
            found.add(int(entry.name))
    return found


def configured_port(state: Path) -> int | None:
    try:
        lines = (state / "redis" / "redis.conf").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith("port ")), None)


def lock_free(state: Path) -> bool:
    try:
        with DataDirLock(state, who="probe"):
            return True
    except DataDirInUse:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def until(probe: Callable[[], object], timeout_s: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Poll every 2 ms (start-up points are milliseconds apart); fail if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if probe():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.002)


def assert_nothing_left(svc: Service, *, within_s: float = 0.0) -> None:
    """No redis-server in the data dir, its port free, no url marker, the lock free."""
    if within_s:
        until(lambda: not redis_servers_in(svc.state), within_s, "the redis-server exited")
    assert not redis_servers_in(svc.state), "a redis-server outlived its run"
    port = configured_port(svc.state)
    if port is not None:
        until(lambda: port_free(port), max(within_s, 1.0), f"port {port} free")
    assert not svc.url_file.exists() or within_s, "redis.url left by a clean stop"
    # after a kill the server's last threads may still be exiting after its main one did
    until(lambda: lock_free(svc.state), max(within_s, 0.1), "the data dir's lock free")


def stop(proc: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    return proc.returncode, err


# -- tests ------------------------------------------------------------------------------------


_POINTS: dict[str, Callable[[Service, subprocess.Popen[str]], object]] = {
    "locked": lambda svc, proc: (svc.state / DataDirLock.file_name).exists(),
    "forked": lambda svc, proc: redis_children(proc.pid),
    "url written": lambda svc, proc: svc.url_file.exists(),
}
#: both signals where the race was (redis-server forked, not yet answering), one elsewhere
_SIGNALLED_AT = [
    ("locked", signal.SIGINT),
    ("forked", signal.SIGTERM),
    ("forked", signal.SIGINT),
    ("url written", signal.SIGTERM),
]


def test_a_signal_at_any_point_of_start_up_stops_everything(make_service: MakeService, tmp_path: Path) -> None:
    """Signalled as soon as the data dir is locked, as soon as redis-server is forked, as soon
    as its url is written: exit 0, and nothing of the run is left."""
    for n in range(REPEATS):
        for point, sig in _SIGNALLED_AT:
            svc = make_service(tmp_path / f"{point.replace(' ', '-')}-{sig.name}-{n}")
            with svc.start() as proc:
                try:
                    until(lambda: _POINTS[point](svc, proc), 30, point, proc)  # noqa: B023 (used at once)
                    code, err = stop(proc, sig)
                finally:
                    if proc.poll() is None:
                        proc.kill()
            assert code == 0, f"{sig.name} when {point}: exit {code}\n{err[-3000:]}"
            assert_nothing_left(svc)


def test_sigkill_of_run_stops_its_redis_and_a_new_run_starts(make_service: MakeService, tmp_path: Path) -> None:
    """The kernel stops the redis-server of a killed run (PR_SET_PDEATHSIG) and drops its lock."""
    svc = make_service(tmp_path / "state")
    with svc.start() as proc:
        try:
            until(svc.url_file.exists, 30, "redis.url written", proc)
            (server,) = redis_children(proc.pid)
            proc.kill()
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    until(lambda: exited(server), 5, f"redis-server {server} exited after the SIGKILL of its run")
    assert_nothing_left(svc, within_s=5)
    with svc.start() as again:
        try:
            until(lambda: svc.url_file.exists() and redis_children(again.pid), 30, "the next run up", again)
        finally:
            code, err = stop(again)
    assert code == 0, err
    assert_nothing_left(svc)


def test_a_second_run_on_the_same_data_dir_is_refused(make_service: MakeService, tmp_path: Path) -> None:
    """The second run exits at once with 2, naming the first one's pid and the data dir; the
    first keeps its url and its Redis; once it stopped, a new run starts."""
    import redis

    svc = make_service(tmp_path / "state")
    with svc.start() as first:
        try:
            until(svc.url_file.exists, 30, "redis.url written", first)
            url = svc.url_file.read_text().strip()
            t0 = time.monotonic()
            second = subprocess.run(svc.argv, capture_output=True, text=True, timeout=30)
            assert second.returncode == 2, second.stderr
            assert f"data dir {svc.state} is in use by " in second.stderr
            assert f"(pid {first.pid})" in second.stderr, second.stderr
            assert "Traceback" not in second.stderr
            assert time.monotonic() - t0 < 15
            assert first.poll() is None, "the first run survived the second"
            assert svc.url_file.read_text().strip() == url
            secret = (svc.state / "secrets" / "redis-viewer.secret").read_text().strip()
            with redis.Redis.from_url(url, username="viewer", password=secret) as c:
                assert c.ping()
        finally:
            code, err = stop(first)
    assert code == 0, err
    assert_nothing_left(svc)
    with svc.start() as third:
        try:
            until(svc.url_file.exists, 30, "a new run up once the first stopped", third)
        finally:
            code, err = stop(third)
    assert code == 0, err


def test_a_start_up_error_after_the_redis_stops_it(make_service: MakeService, tmp_path: Path) -> None:
    """The HTTPS listener's port taken: the run fails after its Redis started, and stops it."""
    svc = make_service(tmp_path / "state")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", svc.listen_port))
        squatter.listen()
        run = subprocess.run(svc.argv, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3 and "cannot listen on" in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert "embedded redis-server at" in run.stderr, "the Redis was up before the failure"
    assert_nothing_left(svc)
