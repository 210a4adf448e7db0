"""Crash drills for exactly-once commands and interrupted activations (issue 13 items 2, 3).

Run:  python bench/command_crash_soak.py                       # the issue's drill, ~6 min
      python bench/command_crash_soak.py --operator-kills 4 --activation-kills 2 --redis-kills 4 \
          --activation-redis-kills 2 --json out.json

Everything real and on loopback: a redis-server (AOF, ``appendfsync always``), the IEC 104
simulator in this process (breaker travel 0.3 s, so a kill lands while the breaker moves),
`mgms run` as a child process killed with SIGKILL, mosquitto and an AMS for the activations.
The drills:

* **operator**: a breaker request (open/close in turn); `mgms run` is SIGKILLed the moment
  its intent is in Redis or the moment the simulator received the execute (in turn), then
  started again; the request must end in exactly one log entry.
* **activation**: a fresh `mgms run` offers the feeder, the AMS activates it; `mgms run` is
  SIGKILLed at the open's intent or its arrival (in turn), started again, and must resume,
  close at the stop and verify; the AMS's settlement is read.
* **redis**: the gateway's redis-server is SIGKILLed at the execute moment of a breaker
  request (just submitted / intent written / command at the device, in turn) and started
  again after ``--outage-s`` (1.8 s, as the outage that failed 3 of 4 activations).
* **activation-redis**: the same outage at an activation's start (its hash just written),
  its open's intent, or the open's arrival at the breaker (in turn).

Counted per drill, from the simulator (execute ASDUs it received; selects are not
operations) and the command log: device operations, executed twice (more operations than
requests), missing from the log (a request without exactly one entry), results, and for the
activations the settlements and false ``failed`` ones (the breaker was opened: every
activation here sheds the load). Prints a table; ``--json`` writes every round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ams.sandbox import DsoSandbox, feeder_flexibility  # noqa: E402
from ams.service import AmsService, AmsSettings, MicrogridEntry  # noqa: E402
from gateway.config import load_config  # noqa: E402
from gateway.iedsim.iec104.server import Iec104Outstation  # noqa: E402
from gateway.messaging import Messenger, build_messenger  # noqa: E402
from gateway.services import RedisServer  # noqa: E402
from gateway.store import CommandRecord, RedisStore  # noqa: E402

SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615"
BREAKER = "feeder.breaker.command"
MGMS = "mgms-multipower"
LOCATION = "FI-Vaasa/feeder-4"


@dataclass
class Round:
    drill: str
    moment: str
    request: str
    operations: int
    log_entries: int
    results: list[str]
    settlement: str = ""
    note: str = ""


@dataclass
class Totals:
    rounds: int = 0
    operations: int = 0
    twice: int = 0
    missing: int = 0
    results: Counter[str] = field(default_factory=Counter)
    settlements: Counter[str] = field(default_factory=Counter)
    false_failed: int = 0


def executes(sim: Iec104Outstation) -> int:
    st = sim.stats()
    return st.commands - st.selects


async def until(probe: Callable[[], Awaitable[Any]], timeout_s: float, what: str, poll_s: float = 0.001) -> Any:
    """Await ``probe`` until truthy (Redis errors count as not yet), bounded by ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(OSError, aioredis.RedisError):
            got = await probe()
            if got:
                return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(poll_s)


def write_lab(tmp: Path, port: int, redis: RedisServer, extra: dict[str, Any]) -> Path:
    cfg = load_config(SIM_CONFIG).only(DEVICE)
    doc: dict[str, Any] = {
        "lab": cfg.lab.model_dump(),
        "devices": {n: d.model_dump(mode="json", exclude={"name"}) for n, d in cfg.devices.items()},
        "points": [p.model_dump(mode="json", exclude_defaults=True) for p in cfg.points],
        # the lab's own Redis, named as a lab file names it: url, the gateway's user, its secret
        "redis": {"url": redis.url, "user": "gateway", "password_file": str(redis.secret_file("gateway"))},
    }
    doc["devices"][DEVICE] |= {"port": port, "timers": {"t1_s": 2, "t2_s": 1, "t3_s": 1}}
    doc |= extra
    path = tmp / f"lab-{len(list(tmp.glob('lab-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Run:
    """`mgms run` as a child process."""

    def __init__(self, lab_file: Path, reader: RedisStore) -> None:
        self.lab_file, self.reader = lab_file, reader
        self.log_file = lab_file.with_suffix(".log")  # the runs' log, for a round that went wrong
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "--log-level", "INFO", "run", "--config", str(self.lab_file),
            stdout=asyncio.subprocess.DEVNULL, stderr=self.log_file.open("ab"),
        )  # fmt: skip
        proc = self.proc

        async def up() -> bool:
            if proc.returncode is not None:
                raise RuntimeError(f"mgms run exited {proc.returncode}")
            link = await self.reader.link(DEVICE)
            pid = await self.reader.redis.hget(self.reader.keys.meta, "pid")
            return link is not None and link.state == "up" and pid == str(proc.pid)

        await until(up, 30, "mgms run connected", poll_s=0.05)

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def log_of(reader: RedisStore, pred: Callable[[CommandRecord], bool]) -> list[CommandRecord]:
    return [r for r in await reader.command_log(1000) if pred(r)]


async def moment_reached(moment: str, reader: RedisStore, sim: Iec104Outstation, n0: int) -> bool:
    if moment == "intent":
        return bool(await reader.redis.hlen(reader.keys.cmd_intents))
    return executes(sim) > n0


# ---------------------------------------------------------------------------------------- drills


async def operator_drill(n: int, tmp: Path, redis: RedisServer, sim: Iec104Outstation) -> list[Round]:
    lab = write_lab(tmp, sim.port, redis, {})
    reader = RedisStore.from_url(load_config(lab), redis.client_url("operator"))
    run = Run(lab, reader)
    rounds: list[Round] = []
    try:
        await run.start()
        for i in range(n):
            word, moment = ("open", "close")[i % 2], ("intent", "sent")[(i // 2) % 2]
            n0 = executes(sim)
            rid = await reader.submit_command(BREAKER, word, by=f"soak-{i}")
            await until(lambda m=moment, k=n0: moment_reached(m, reader, sim, k), 15, f"{moment} of {rid}")
            await run.kill9()
            await run.start()
            rec = await reader.wait_reply(rid, 30)
            await asyncio.sleep(0.5)  # a second execution would show here
            entries = await log_of(reader, lambda r, x=rid: r.request_id == x)  # type: ignore[misc]
            rounds.append(Round("operator", moment, rid, executes(sim) - n0, len(entries),
                                [r.result.value for r in entries], note=rec.reason if rec else "no reply"))  # fmt: skip
            print(f"  operator {i + 1}/{n} ({moment}): {rounds[-1].results} ops {rounds[-1].operations}", flush=True)
    finally:
        await run.stop()
        await reader.aclose()
    return rounds


async def redis_drill(n: int, outage_s: float, tmp: Path, redis: RedisServer, sim: Iec104Outstation) -> list[Round]:
    lab = write_lab(tmp, sim.port, redis, {})
    reader = RedisStore.from_url(load_config(lab), redis.client_url("operator"))
    run = Run(lab, reader)
    rounds: list[Round] = []
    try:
        await run.start()
        for i in range(n):
            word, moment = ("open", "close")[i % 2], ("submitted", "intent", "sent")[i % 3]
            n0 = executes(sim)
            rid = await reader.submit_command(BREAKER, word, by=f"soak-redis-{i}")
            if moment != "submitted":
                await until(lambda m=moment, k=n0: moment_reached(m, reader, sim, k), 15, f"{moment} of {rid}")
            await asyncio.to_thread(redis.stop, hard=True)
            await asyncio.sleep(outage_s)
            await asyncio.to_thread(redis.restart)
            rec = await reader.wait_reply(rid, 40)
            await asyncio.sleep(0.5)
            entries = await log_of(reader, lambda r, x=rid: r.request_id == x)  # type: ignore[misc]
            rounds.append(Round("redis", moment, rid, executes(sim) - n0, len(entries),
                                [r.result.value for r in entries], note=rec.reason if rec else "no reply"))  # fmt: skip
            print(f"  redis {i + 1}/{n} ({moment}): {rounds[-1].results} ops {rounds[-1].operations}", flush=True)
    finally:
        await run.stop()
        await reader.aclose()
    return rounds


@contextlib.asynccontextmanager
async def ams_running(box: DsoSandbox, redis: RedisServer) -> AsyncIterator[AmsService]:
    client = redis.client("ams")
    messenger: Messenger = build_messenger(box.messaging("ams", transport="mqtt"), client, prefix="ams:ams")  # type: ignore[arg-type]
    await messenger.start()
    service = AmsService(
        AmsSettings(microgrids=(MicrogridEntry(participant=MGMS, location=LOCATION),)), client, "ams",
        messenger=messenger,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop), name="ams")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await messenger.close()
        await client.aclose()


async def activation_drill(
    n: int, outage_s: float | None, tmp: Path, redis: RedisServer, sim: Iec104Outstation
) -> list[Round]:
    """``outage_s`` None: kill -9 of `mgms run`; else of its redis-server for that long."""
    drill = "activation" if outage_s is None else "activation-redis"
    rounds: list[Round] = []
    with DsoSandbox(tmp / f"dso-{drill}", mgms=[MGMS]) as box, RedisServer(data_dir=tmp / f"ams-{drill}") as ams_redis:
        flex = feeder_flexibility(window_s=12, step_s=6).model_copy(update={"period_s": 3600.0})
        lab = write_lab(tmp, sim.port, redis, {
            "messaging": json.loads(box.messaging(MGMS, transport="mqtt").model_dump_json()),
            "flexibility": json.loads(flex.model_dump_json()),
        })  # fmt: skip
        reader = RedisStore.from_url(load_config(lab), redis.client_url("operator"))
        act_prefix = f"{reader.keys.prefix}:flex:act:"
        run = Run(lab, reader)
        try:
            async with ams_running(box, ams_redis) as ams:
                for i in range(n):
                    # the Redis outage also right at the activation's start (its hash just
                    # written, the baseline and the open's intent still to come)
                    moments = ("intent", "sent") if outage_s is None else ("received", "intent", "sent")
                    moment = moments[i % len(moments)]
                    seen = {k async for k in reader.redis.scan_iter(match=act_prefix + "*")}
                    # the feeder closed (a round before may have left it open: nothing to offer)
                    sim.set_value("feeder.breaker.position", 2.0)
                    n0 = executes(sim)
                    for attempt in range(3):
                        # a fresh run offers the feeder at start (if its power is known by then:
                        # else it offers nothing, and is started again); the AMS activates it
                        await run.start()
                        try:
                            async def reached(m: str = moment, k: int = n0, before: set[str] = seen) -> bool:
                                if m == "received":
                                    now_keys = {x async for x in reader.redis.scan_iter(match=act_prefix + "*")}
                                    return bool(now_keys - before)
                                return await moment_reached(m, reader, sim, k)

                            await until(reached, 10, f"activation {moment}")
                            break
                        except TimeoutError:
                            await run.stop()
                            if attempt == 2:
                                raise
                    if outage_s is None:
                        await run.kill9()
                    else:
                        await asyncio.to_thread(redis.stop, hard=True)
                        await asyncio.sleep(outage_s)
                        await asyncio.to_thread(redis.restart)
                    [key] = {k async for k in reader.redis.scan_iter(match=act_prefix + "*")} - seen
                    act_id = key.removeprefix(act_prefix)
                    if outage_s is None:
                        await run.start()

                    async def settled(a: str = act_id) -> dict[str, str] | None:
                        return (await ams.settlement(a)) or None

                    try:
                        st = await until(settled, 60, f"settlement of {act_id}", poll_s=0.1)
                        settlement = st["state"]
                    except TimeoutError:
                        settlement = "none"
                    await run.stop()
                    entries = await log_of(reader, lambda r, a=act_id: r.requested_by == f"ams:{a}")  # type: ignore[misc]
                    ops = executes(sim) - n0
                    rounds.append(Round(drill, moment, act_id, ops, len(entries), [r.result.value for r in entries],
                                        settlement, note=await reader.redis.hget(key, "state") or ""))  # fmt: skip
                    print(f"  {drill} {i + 1}/{n} ({moment}): {rounds[-1].results} ops {ops} "
                          f"settlement {settlement}", flush=True)  # fmt: skip
        finally:
            await run.stop()
            await reader.aclose()
    return rounds


# ---------------------------------------------------------------------------------------- report


def totals(rounds: list[Round]) -> Totals:
    t = Totals()
    for r in rounds:
        t.rounds += 1
        t.operations += r.operations
        t.results.update(r.results)
        if r.drill.startswith("activation"):
            # each activation: one open and one close at the breaker; an open logged as
            # interrupted (cut before it left) is followed by the one the agent issued
            t.twice += max(0, r.operations - 2)
            executed = sum(1 for x in r.results if x == "confirmed")
            t.missing += max(0, r.operations - executed)
            t.settlements[r.settlement] += 1
            t.false_failed += r.settlement == "failed"
        else:
            t.twice += max(0, r.operations - 1)
            t.missing += r.log_entries != 1 or (r.operations > 0 and r.results != ["confirmed"])
    return t


def table(all_rounds: dict[str, list[Round]]) -> str:
    lines = [
        "| drill | rounds | device operations | executed twice | missing from the log | results | settlements |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, rounds in all_rounds.items():
        if not rounds:
            continue
        t = totals(rounds)
        res = ", ".join(f"{k} {v}" for k, v in sorted(t.results.items()))
        sett = ", ".join(f"{k} {v}" for k, v in sorted(t.settlements.items())) or "-"
        lines.append(f"| {name} | {t.rounds} | {t.operations} | {t.twice} | {t.missing} | {res} | {sett} |")
    return "\n".join(lines)


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="crash-soak-") as d:
        tmp = Path(args.keep) if args.keep else Path(d)
        tmp.mkdir(parents=True, exist_ok=True)
        out: dict[str, list[Round]] = {}
        with RedisServer(data_dir=tmp / "redis") as redis:
            sim = Iec104Outstation(load_config(SIM_CONFIG), DEVICE, host="127.0.0.1", port=0, seed=7)
            await sim.start()
            sim.set_breaker_travel(0.3)
            try:
                if args.operator_kills:
                    print(f"operator: mgms run kill -9 x{args.operator_kills}", flush=True)
                    out["gateway kill -9 mid-operator-command"] = await operator_drill(
                        args.operator_kills, tmp, redis, sim
                    )
                if args.redis_kills:
                    print(f"redis: redis-server kill -9 at the execute moment x{args.redis_kills}", flush=True)
                    out["gateway Redis kill -9 at the execute moment"] = await redis_drill(
                        args.redis_kills, args.outage_s, tmp, redis, sim
                    )
                if args.activation_kills:
                    print(f"activation: mgms run kill -9 x{args.activation_kills}", flush=True)
                    out["gateway kill -9 mid-activation"] = await activation_drill(
                        args.activation_kills, None, tmp, redis, sim
                    )
                if args.activation_redis_kills:
                    print(f"activation-redis: redis-server kill -9 x{args.activation_redis_kills}", flush=True)
                    out["gateway Redis kill -9 at an activation's command"] = await activation_drill(
                        args.activation_redis_kills, args.outage_s, tmp, redis, sim
                    )
            finally:
                await sim.close()
    print()
    print(table(out))
    if args.json:
        doc = json.dumps({k: [asdict(r) for r in v] for k, v in out.items()}, indent=1)
        await asyncio.to_thread(Path(args.json).write_text, doc)
    bad = sum(totals(r).twice + totals(r).missing + totals(r).false_failed for r in out.values())
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--operator-kills", type=int, default=10)
    ap.add_argument("--activation-kills", type=int, default=10)
    ap.add_argument("--redis-kills", type=int, default=8)
    ap.add_argument("--activation-redis-kills", type=int, default=6)
    ap.add_argument("--outage-s", type=float, default=1.8, help="Redis outage length (default 1.8 s)")
    ap.add_argument("--json", help="write every round here")
    ap.add_argument("--keep", help="work in this directory and keep it (lab files, the runs' logs)")
    sys.exit(asyncio.run(main(ap.parse_args())))
