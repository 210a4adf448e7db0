"""The README's lab path after the demo, run as written: every ``<!-- runnable -->`` block.

Why from the README itself: the path a newcomer follows (a simulator lab with one command,
watch, command; then the aggregator with its PKI, broker and keys made by the CLI, and the
settlement in ``ams status``) broke before because the text and the code drifted apart. The
commands are extracted from README.md, so changing either without the other fails here.

How a block runs (docs/lab-setup.md, "Runnable blocks"): in a temporary directory holding a
copy of ``lab_configs/`` (no keys, PKI or broker files: the commands make them), with every
port the configs name replaced by a free loopback port, and the project's ``.venv/bin`` first
on PATH. One command per line; ``. FILE`` takes the variables FILE exports; a command whose
comment says "until Ctrl-C" is a service: started in the background, awaited until its ready
line, and stopped with SIGINT (as Ctrl-C does) at the end of its block - it must then exit 0
within a bound, and leave no simulator port, no Redis marker behind. What a command must show
is in ``EXPECT``; ``ams status`` is asked again until the settlement is there (bounded).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.services import free_port

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- runnable -->"

#: Ready line (regex on stdout+stderr) of each service, by its first two words; mosquitto
#: buffers its log when it is not a terminal: it is ready once its listener accepts.
READY = {
    "mgms lab": r"^lab up: ",
    "ams run": r"AMS \S+ running",
}
#: What a one-shot command must print (regex), and for how long it may be asked again.
EXPECT: dict[str, tuple[str, float]] = {
    "mgms watch": (r"device ref615: link up", 10.0),
    "ams status": (r"^\s+act:\S+\s+settled\b", 45.0),
}
SERVICE_STOP_S = 25.0


def runnable_blocks(text: str) -> list[list[str]]:
    """The ``sh`` blocks that follow a runnable marker, as lists of lines."""
    blocks: list[list[str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        assert lines[i + 1].strip() == "```sh", f"README.md:{i + 2}: the marker must precede a ```sh block"
        end = lines.index("```", i + 2)
        blocks.append(lines[i + 2 : end])
    return blocks


@dataclass
class Step:
    line: str
    argv: list[str]
    comment: str

    @property
    def service(self) -> bool:
        return "until Ctrl-C" in self.comment

    def key(self) -> str:
        return " ".join(self.argv[:2])


def parse(line: str) -> Step | None:
    # the comment is kept: it says which commands are services (no argument here holds a '#')
    command, _, comment = line.partition("#")
    argv = shlex.split(command)
    return Step(line, argv, comment) if argv else None


@dataclass
class Service:
    step: Step
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Clone:
    """The directory the README's commands run in, and what they share (env, services)."""

    root: Path
    env: dict[str, str]
    ports: dict[int, int] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)


def make_clone(tmp: Path) -> Clone:
    root = tmp / "clone"
    root.mkdir()
    shutil.copytree(ROOT / "lab_configs", root / "lab_configs", ignore=shutil.ignore_patterns("keys", "pki", "broker"))
    ports: dict[int, int] = {}

    def swap(m: re.Match[str]) -> str:
        old = int(m.group(2))
        if old not in ports:
            ports[old] = free_port()
        return f"{m.group(1)}{ports[old]}"

    for f in (root / "lab_configs").glob("*.yaml"):
        text = f.read_text()
        text = re.sub(r"(\bport:\s*)(\d+)", swap, text)
        text = re.sub(r"(\blisten_port:\s*)(\d+)", swap, text)
        text = re.sub(r"(https://127\.0\.0\.1:)(\d+)", swap, text)
        assert "0.0.0.0" not in re.sub(r"#.*", "", text), f"{f.name} listens beyond loopback"
        f.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MGMS_", "AMS_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", ""), "/usr/sbin", "/sbin"])
    for script in ("mgms", "ams"):  # the README's console scripts, from this interpreter's environment
        assert (Path(sys.executable).parent / script).exists(), f"no {script} beside {sys.executable}: pip install -e ."
    return Clone(root, env, ports)


def run_once(clone: Clone, step: Step) -> str:
    pattern, patience_s = EXPECT.get(step.key(), (None, 0.0))
    deadline = time.monotonic() + patience_s
    while True:
        r = subprocess.run(step.argv, cwd=clone.root, env=clone.env, capture_output=True, text=True, timeout=40)
        out = r.stdout + r.stderr
        ok = r.returncode == 0 and (pattern is None or re.search(pattern, out, re.M) is not None)
        if ok:
            return out
        if time.monotonic() >= deadline:
            raise AssertionError(f"`{step.line}` exited {r.returncode}, expected /{pattern}/:\n{out}")
        time.sleep(0.5)


def source(clone: Clone, file: str) -> None:
    for raw in (clone.root / file).read_text().splitlines():
        m = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$", raw)
        if m:
            clone.env[m.group(1)] = shlex.split(m.group(2))[0] if m.group(2) else ""


def listener_up(clone: Clone, conf: str) -> bool:
    m = re.search(r"^listener (\d+) (\S+)", (clone.root / conf).read_text(), re.M)
    assert m, f"{conf} has no listener line"
    try:
        socket.create_connection((m.group(2), int(m.group(1))), timeout=0.5).close()
    except OSError:
        return False
    return True


def start_service(clone: Clone, step: Step, n: int) -> None:
    ready = READY.get(step.key())
    broker = step.key() == "mosquitto -c"
    assert ready is not None or broker, f"no ready line known for the service `{step.line}` (add it to READY)"
    log = clone.root / f"service-{n}.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(step.argv, cwd=clone.root, env=clone.env, stdout=sink, stderr=subprocess.STDOUT)
    svc = Service(step, proc, log)
    clone.services.append(svc)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if listener_up(clone, step.argv[2]) if broker else re.search(str(ready), log.read_text(errors="replace"), re.M):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"`{step.line}` not ready (exit {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


def stop_services(clone: Clone) -> list[str]:
    """SIGINT each service, newest first; the problems (slow, non-zero exit) as text."""
    problems: list[str] = []
    while clone.services:
        svc = clone.services.pop()
        if svc.proc.poll() is None:
            svc.proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        try:
            code = svc.proc.wait(SERVICE_STOP_S)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait(10)
            problems.append(f"`{svc.step.line}` still running {SERVICE_STOP_S:g} s after Ctrl-C")
            continue
        if code != 0:
            problems.append(f"`{svc.step.line}` exited {code} after Ctrl-C ({time.monotonic() - t0:.1f} s)")
    return problems


def port_free(port: int) -> bool:
    """Nobody listens on ``port`` (SO_REUSEADDR: closed connections in TIME_WAIT do not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_readme_lab_path_runs_as_written(tmp_path: Path) -> None:
    if shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])) is None:
        pytest.skip("needs mosquitto")
    blocks = runnable_blocks(README.read_text())
    assert len(blocks) >= 2, "README.md should mark the simulator lab and the aggregator blocks runnable"
    clone = make_clone(tmp_path)
    t0 = time.monotonic()
    outputs: dict[str, str] = {}
    try:
        for block in blocks:
            for n, line in enumerate(block):
                step = parse(line)
                if step is None:
                    continue
                if step.argv[0] in (".", "source"):
                    source(clone, step.argv[1])
                elif step.service:
                    start_service(clone, step, n)
                else:
                    outputs[step.line] = run_once(clone, step)
            problems = stop_services(clone)
            assert not problems, problems
            # Ctrl-C stopped every child: the simulators' ports and the Redis marker are free again
            lab_dir = clone.root / ".mgms" / "multipower"
            assert not (lab_dir / "redis.url").exists(), "the lab's Redis outlived `mgms lab up`"
            taken = [old for old, new in clone.ports.items() if not port_free(new)]
            assert not taken, f"ports still held after Ctrl-C (configured as {taken})"
    finally:
        for svc in clone.services:
            svc.proc.kill()
            svc.proc.wait(10)
    elapsed = time.monotonic() - t0
    commands = [o for line, o in outputs.items() if line.startswith("mgms command")]
    assert commands and all("confirmed" in o for o in commands), commands
    status = next(o for line, o in outputs.items() if line.startswith("ams status"))
    assert re.search(r"mgms-multipower\s+FI-Vaasa/feeder-4", status), status
    assert elapsed < 90, f"the README path took {elapsed:.1f} s"


def test_demo_keep_running_leaves_the_lab_up_until_ctrl_c(tmp_path: Path) -> None:
    """``mgms demo --keep-running``: after its steps the lab answers `mgms watch`; Ctrl-C ends it cleanly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MGMS_", "AMS_"))}
    log = tmp_path / "demo.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "demo", "--operations", "1", "--keep-running"],
            cwd=tmp_path, env=env, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        url = None
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"(mgms watch --config \S+ --redis-url .+)$", log.read_text(errors="replace"), re.M)
            url = m.group(1) if m else None
            time.sleep(0.2)
        assert url is not None, log.read_text(errors="replace")[-3000:]
        # the command as the demo prints it: a credential-free url and the viewer's secret file
        assert "@" not in url and "--redis-secret-file" in url, url
        watch = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "watch", "--once", *url.split()[2:]],
            capture_output=True, text=True, timeout=30, env=env,
        )  # fmt: skip
        assert watch.returncode == 0 and "device ref615: link up" in watch.stdout, watch.stdout + watch.stderr
        time.sleep(1.0)
        assert proc.poll() is None, "the demo ended by itself"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert "demo OK" in log.read_text(errors="replace")
