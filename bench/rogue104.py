"""Both IEC 104 client engines against the rogue outstation, each run in a child process.

Run:  python bench/rogue104.py --repeat 5                      # every scenario, both engines
      python bench/rogue104.py --engines c104 --scenarios garbage,stall --repeat 3 --json out.json

Why a child process per run: c104 2.2.1 (lib60870 in native threads) can take the whole
process down with SIGSEGV on garbage from the device (docs/protocol-notes.md). Here the
rogue outstation (``gateway.iedsim.rogue104``) and the judging run in this process; the
client engine runs in ``python bench/rogue104.py client ...``, which prints one JSON line
per event (link state, value) and its stats on request. A crash is then an exit status
(-11 for SIGSEGV) recorded with the run, and this process goes on with the next run.

Per run: wait for the link and the general interrogation, send the scenario, then watch
what the standard wants (IEC 60870-5-104 5.1/5.2, ``Scenario.closes``): a closing case must
bring the link down within t3 + t1 (a stall: of its start) and up again; any other case must
leave the link up and deliver the value sent after it (a closing case the client did not
close is followed by a correctly numbered value too: does the link still work?). The
scenario goes ``--delay-s`` (1 s) after the link is up, as in the drill that found the
crashes. Timers: t1 = 2 s, t2 = 1 s, t3 = 1 s (as the tests). Prints one line per run and a
table per engine x scenario; with ``--json`` writes every run (link states, stats, and
faulthandler's report of a crash).
"""

import argparse
import asyncio
import contextlib
import faulthandler
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gateway.config import LabConfig, load_config  # noqa: E402
from gateway.iedsim.rogue104 import PROOF_VALUE, SCENARIOS, RogueOutstation, monitor_points  # noqa: E402

SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
SELF = Path(__file__).resolve()
DEVICE = "ref615"
TIMERS = {"t0_s": 2, "t1_s": 2, "t2_s": 1, "t3_s": 1, "k": 12, "w": 8}
T1, T3 = TIMERS["t1_s"], TIMERS["t3_s"]
PROOF_POINT = "feeder.voltage.l1"
TRICKLE_POINT = "feeder.autoreclose.enabled"
ENGINES = ("c104", "asyncio")


def client_config(engine: str, port: int) -> LabConfig:
    return load_config(SIM_CONFIG).with_device(
        DEVICE,
        port=port,
        timers=TIMERS,
        reconnect={"initial_s": 0.1, "max_s": 0.3},
        gi_period_s=0,
        iec104_engine=engine,
    )


# ---------------------------------------------------------------------------------------
# the child: one engine, events as JSON lines


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _client(engine: str, port: int) -> None:
    from gateway.points import PointUpdate
    from gateway.protocols import create_adapter
    from gateway.protocols.base import LinkStateChange

    cfg = client_config(engine, port)
    adapter = create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE))
    await adapter.start()

    async def pump() -> None:
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate):
                _emit({"ev": "value", "point": ev.point, "value": ev.value, "cause": ev.cause.value, "t": time.time()})
            elif isinstance(ev, LinkStateChange):
                _emit({"ev": "state", "state": ev.state.value, "reason": ev.reason, "t": ev.time})

    pumping = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():  # EOF: the parent is done with us
            if line.strip() == b"stats":
                _emit({"ev": "stats", "stats": adapter.stats()})
            elif line.strip() == b"segv":  # --inject-crash: what a c104 crash looks like from here
                os.kill(os.getpid(), signal.SIGSEGV)
    finally:
        async with asyncio.timeout(10):
            await adapter.close()
        _emit({"ev": "stats", "stats": adapter.stats(), "final": True})
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pumping


# ---------------------------------------------------------------------------------------
# the parent: rogue outstation, child per run, judge


@dataclass
class Run:
    engine: str
    scenario: str
    rep: int
    crashed: bool = False  # the child died by a signal or exited non-zero before we let it go
    returncode: int | None = None
    crash_phase: str = ""  # connect / scenario / close
    linked: bool = False  # the link came up and GI values arrived before the scenario
    closed: bool = False  # the link went down after the scenario
    detect_s: float | None = None  # scenario (stall: its start) -> link down
    reconnected: bool = False
    recover_s: float | None = None  # link down (stall: its end) -> up again
    value_used: bool = False  # the value sent after the scenario arrived
    as_standard: bool = False
    stats: dict[str, int] = field(default_factory=dict)
    last_down: str = ""
    stderr_tail: str = ""
    started_at: float = 0.0  # wall-clock time the (last) scenario began (0: it never did)
    rounds_done: int = 0  # scenarios sent to this child and watched to the end (--rounds)
    states: list[str] = field(default_factory=list)  # the child's link states, with seconds since the scenario


class Child:
    """The client engine in its own process; its JSON lines collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.proc = proc
        self.stderr_path = stderr_path
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, engine: str, port: int, stderr_path: Path) -> "Child":
        with stderr_path.open("wb") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(SELF), "client", "--engine", engine, "--port", str(port),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=err,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"},
            )  # fmt: skip
        return cls(proc, stderr_path)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            with contextlib.suppress(ValueError):
                self.events.append(json.loads(line))
            self.changed.set()
        self.changed.set()

    async def wait_for(self, check: Any, timeout_s: float, since: int = 0) -> Any:
        """The first event from index ``since`` on for which ``check`` is true, or None by the
        timeout or once the child's output ended."""
        deadline = time.monotonic() + timeout_s
        seen = since
        while True:
            for ev in self.events[seen:]:
                if check(ev):
                    return ev
            seen = len(self.events)
            left = deadline - time.monotonic()
            if left <= 0 or self.task.done():
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.changed.wait()

    def first(self, check: Any, since: int = 0) -> dict[str, Any] | None:
        return next((ev for ev in self.events[since:] if check(ev)), None)

    async def stats(self) -> dict[str, int]:
        assert self.proc.stdin is not None
        n = len(self.events)
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.write(b"stats\n")
            await self.proc.stdin.drain()
        got = await self.wait_for(lambda ev: ev.get("ev") == "stats", 3, since=n)
        return dict(got["stats"]) if got else {}

    async def finish(self) -> int | None:
        """Close stdin (the child closes its adapter and exits); kill it after 15 s."""
        assert self.proc.stdin is not None
        with contextlib.suppress(ConnectionError):
            self.proc.stdin.close()
        try:
            async with asyncio.timeout(15):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            return None
        finally:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(2):
                    await self.task
        return self.proc.returncode

    def stderr_tail(self, n: int = 1500) -> str:
        """From faulthandler's "Fatal Python error" on (which thread, where), else the tail."""
        try:
            text = self.stderr_path.read_bytes().decode("utf-8", "replace")
        except OSError:
            return ""
        at = text.find("Fatal Python error")
        return text[at : at + n] if at >= 0 else text[-n:]


def _is_state(state: str) -> Any:
    return lambda ev: ev.get("ev") == "state" and ev["state"] == state


async def one_run(engine: str, scenario: str, rep: int, args: argparse.Namespace, workdir: Path) -> Run:
    run = Run(engine, scenario, rep)
    cfg = load_config(SIM_CONFIG)
    dev = cfg.devices[DEVICE]
    spec = SCENARIOS[scenario]
    async with RogueOutstation(
        monitor_points(cfg.points_of(DEVICE)), common_address=dev.common_address, seed=args.seed + rep
    ) as rogue:
        spawned = time.time()
        child = await Child.spawn(engine, rogue.port, workdir / f"{engine}-{scenario}-{rep}.stderr")
        try:
            await _drive(run, child, rogue, spec.closes, args)
        finally:
            if child.proc.returncode is None:
                run.stats = await child.stats()
            code = await child.finish()
            run.returncode = code
            # 0: closed when told; None: hung at close and killed; else a crash (at close if not before)
            if code != 0 and not run.crashed:
                run.crashed = code is not None
                run.crash_phase = "close" if code is not None else "hung at close"
            if run.crashed or code != 0:
                run.stderr_tail = child.stderr_tail()
    t0 = run.started_at or spawned
    states = (ev for ev in child.events if ev.get("ev") == "state")
    run.states = [f"{ev['t'] - t0:+.2f} {ev['state']} {ev['reason']}"[:120] for ev in states]
    if not run.stats:
        final = next((ev for ev in reversed(child.events) if ev.get("ev") == "stats"), None)
        run.stats = dict(final["stats"]) if final else {}
    run.as_standard = judge(run, spec.closes)
    return run


def judge(run: Run, closes: bool) -> bool:
    """Whether the client did what IEC 60870-5-104 5.1/5.2 asks (see the module docstring).

    A trickled frame may also end in a close: a TESTFR act of the client that crossed the
    frame's first octet (or one sent because t3 counts complete frames, as lib60870 does) is
    answered only after the frame's last, later than t1, and t1 unanswered must close.
    """
    if run.crashed or not run.linked:
        return False
    in_time = run.detect_s is not None and run.detect_s <= T3 + T1 + 0.5
    if closes:
        return run.closed and run.reconnected and in_time
    if run.scenario == "trickle" and run.closed:
        return run.reconnected and in_time
    return not run.closed and run.value_used


def _is_proof(ev: dict[str, Any]) -> bool:
    return ev.get("ev") == "value" and ev["point"] == PROOF_POINT and ev["value"] == PROOF_VALUE


async def _drive(run: Run, child: Child, rogue: RogueOutstation, closes: bool, args: argparse.Namespace) -> None:
    def died(phase: str) -> bool:
        if child.task.done() or child.proc.returncode is not None:
            run.crashed, run.crash_phase = True, run.crash_phase or phase
            return True
        return False

    up = await child.wait_for(_is_state("up"), 10)
    gi = await child.wait_for(lambda ev: ev.get("ev") == "value" and ev["point"] == PROOF_POINT, 5) if up else None
    if died("connect") or up is None or gi is None:
        return
    run.linked = True
    for n in range(args.rounds):
        if n:  # the next round on the next (or the same) connection, in the same child
            last = next((ev for ev in reversed(child.events) if ev.get("ev") == "state"), None)
            if (last is None or last["state"] != "up") and await child.wait_for(
                _is_state("up"), 10, since=len(child.events) - 1
            ) is None:
                break
        await _round(run, child, rogue, closes, args)
        if died("scenario"):
            return
        run.rounds_done = n + 1


async def _round(run: Run, child: Child, rogue: RogueOutstation, closes: bool, args: argparse.Namespace) -> None:
    def died(phase: str) -> bool:
        if child.task.done() or child.proc.returncode is not None:
            run.crashed, run.crash_phase = True, run.crash_phase or phase
            return True
        return False

    await asyncio.sleep(args.delay_s)  # garbage some time after STARTDT, as in the drill that found the crashes
    mark = len(child.events)
    started = run.started_at = time.time()
    task = asyncio.ensure_future(
        rogue.misbehave(run.scenario, stall_s=args.stall_s, flood_n=args.flood_n, timeout_s=max(20.0, args.stall_s))
    )
    if args.inject_crash:
        assert child.proc.stdin is not None
        child.proc.stdin.write(b"segv\n")
    try:
        if run.scenario == "stall":
            await _watch_stall(run, child, task, started, mark, args.stall_s)
        elif closes:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await task
            down = await child.wait_for(_is_state("down"), args.close_window_s, since=mark)
            if down is not None:
                run.closed, run.detect_s, run.last_down = True, down["t"] - started, down["reason"]
                again = await child.wait_for(lambda ev: _is_state("up")(ev) and ev["t"] > down["t"], 10)
                if again is not None:
                    run.reconnected, run.recover_s = True, again["t"] - down["t"]
            elif not died("scenario") and await rogue.send_value():  # not closed: does it still take values?
                run.value_used = await child.wait_for(_is_proof, 3, since=mark) is not None
        else:
            with contextlib.suppress(TimeoutError, ConnectionError):
                await task
            point, want = (TRICKLE_POINT, True) if run.scenario == "trickle" else (PROOF_POINT, PROOF_VALUE)
            got = await child.wait_for(
                lambda ev: ev.get("ev") == "value" and ev["point"] == point and ev["value"] == want
                and ev["cause"] == "spontaneous", 5, since=mark,
            )  # fmt: skip
            run.value_used = got is not None
            await asyncio.sleep(0.5)  # a close that follows the value
            down = child.first(_is_state("down"), mark)
            if down is not None:
                run.closed, run.detect_s, run.last_down = True, down["t"] - started, down["reason"]
                again = await child.wait_for(lambda ev: _is_state("up")(ev) and ev["t"] > down["t"], 10)
                run.reconnected = again is not None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        rogue.resume()
        await asyncio.sleep(0.2)  # a crash right after the last check
        died("scenario")


async def _watch_stall(
    run: Run, child: Child, task: "asyncio.Future[None]", started: float, mark: int, stall_s: float
) -> None:
    down = await child.wait_for(_is_state("down"), stall_s + 1, since=mark)
    if down is not None:
        run.closed, run.detect_s, run.last_down = True, down["t"] - started, down["reason"]
    with contextlib.suppress(Exception):
        await task  # the stall is over: the rogue answers again
    resumed = time.time()
    again = await child.wait_for(lambda ev: _is_state("up")(ev) and ev["t"] > resumed - 0.05, 15)
    if again is not None and run.closed:
        run.reconnected, run.recover_s = True, again["t"] - resumed


def _max(values: list[float | None]) -> str:
    got = [v for v in values if v is not None]
    return f"{max(got):.2f}" if got else "-"


def summary(runs: list[Run]) -> str:
    rows = ["| engine | scenario | runs | linked | crashed | as the standard says | closed | reconnected "
            "| detect s (max) | recover s (max) |", "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r.engine, r.scenario) for r in runs}, key=lambda k: (k[0], list(SCENARIOS).index(k[1])))
    for engine, scenario in keys:
        rs = [r for r in runs if (r.engine, r.scenario) == (engine, scenario)]
        counts = [len(rs), sum(r.linked for r in rs), sum(r.crashed for r in rs), sum(r.as_standard for r in rs),
                  sum(r.closed for r in rs), sum(r.reconnected for r in rs)]  # fmt: skip
        cells = [engine, scenario, *map(str, counts), _max([r.detect_s for r in rs]), _max([r.recover_s for r in rs])]
        rows.append("| " + " | ".join(cells) + " |")
    for engine in sorted({r.engine for r in runs}):
        rs = [r for r in runs if r.engine == engine]
        rows.append(f"\n{engine}: {len(rs)} runs, {sum(r.crashed for r in rs)} crashed, "
                    f"{sum(r.as_standard for r in rs)} as the standard says")  # fmt: skip
    return "\n".join(rows)


async def bench(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="rogue104-") as tmp:
        for rep in range(args.repeat):
            for engine in args.engines:
                for scenario in args.scenarios:
                    t = time.monotonic()
                    r = await one_run(engine, scenario, rep, args, Path(tmp))
                    runs.append(r)
                    if args.json is not None:  # after every run: a run cut short keeps what it has
                        args.json.write_text(json.dumps([asdict(x) for x in runs], indent=1))
                    verdict = "CRASH " + str(r.returncode) if r.crashed else ("ok" if r.as_standard else "off-standard")
                    det = f"{r.detect_s:.2f}" if r.detect_s is not None else "-"
                    print(
                        f"{engine:8} {scenario:13} #{rep}: {verdict:14} linked={r.linked} closed={r.closed} "
                        f"detect={det} reconnected={r.reconnected} value={r.value_used} "
                        f"({time.monotonic() - t:.1f} s) {r.last_down[:70]}",
                        flush=True,
                    )
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    child = sub.add_parser("client", help="(internal) run one engine, events as JSON lines")
    child.add_argument("--engine", choices=ENGINES, required=True)
    child.add_argument("--port", type=int, required=True)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--scenarios", default="all", help=f"comma-separated, or all: {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stall-s", type=float, default=6.0)
    parser.add_argument("--flood-n", type=int, default=30_000)
    parser.add_argument("--delay-s", type=float, default=1.0, help="link up -> scenario")
    parser.add_argument("--rounds", type=int, default=1, help="scenarios per child (one connection each)")
    parser.add_argument("--close-window-s", type=float, default=12.0, help="how long to wait for a late close")
    parser.add_argument("--inject-crash", action="store_true", help="(self-test) the child SIGSEGVs itself")
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)
    if args.cmd == "client":
        faulthandler.enable()
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_client(args.engine, args.port))
        return 0
    args.engines = [e for e in args.engines.split(",") if e]
    args.scenarios = list(SCENARIOS) if args.scenarios == "all" else [s for s in args.scenarios.split(",") if s]
    bad = [e for e in args.engines if e not in ENGINES] + [s for s in args.scenarios if s not in SCENARIOS]
    if bad or args.repeat < 1:
        parser.error(f"unknown engine/scenario {bad}" if bad else "--repeat must be >= 1")
    runs = asyncio.run(bench(args))
    print(summary(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
