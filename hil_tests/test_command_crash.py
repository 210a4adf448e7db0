"""Exactly-once commands across a gateway crash: `mgms run` killed with SIGKILL at the moment
a command's intent is written, or the moment the simulator received it; the next run resolves
it from the breaker's status and logs it, and never sends it again (issue 13 item 2).

The counts asserted are the simulator's (execute ASDUs it received) and the command log's:
each request ends in exactly one log entry and at most one device operation.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import pytest
from dsokit import MGMS, start_ams
from hilkit import DEVICE, eventually, need_sim
from test_mgms_cli import profile

from ams.sandbox import DsoSandbox, feeder_flexibility
from gateway.config import load_config
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.points import DoublePoint
from gateway.services import RedisServer
from gateway.store import CommandResult, RedisStore

pytestmark = pytest.mark.timeout(90)

BREAKER = "feeder.breaker.command"
POSITION = "feeder.breaker.position"


def executes(sim: Iec104Outstation) -> int:
    """Operate (execute) ASDUs the simulator received: selects are not operations."""
    st = sim.stats()
    return st.commands - st.selects


async def start_run(lab_file: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "--log-level", "WARNING", "run", "--config", str(lab_file),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def up(reader: RedisStore, run: asyncio.subprocess.Process) -> None:
    async def link_up() -> bool:
        assert run.returncode is None, "mgms run exited"
        link = await reader.link(DEVICE)
        meta = await reader.redis.hget(reader.keys.meta, "pid")
        return link is not None and link.state == "up" and meta == str(run.pid)

    await eventually(link_up, 20, "mgms run connected")


async def kill9(run: asyncio.subprocess.Process) -> None:
    run.send_signal(signal.SIGKILL)
    await asyncio.wait_for(run.wait(), 10)
    assert run.returncode == -signal.SIGKILL


async def stop(run: asyncio.subprocess.Process) -> None:
    if run.returncode is None:
        run.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(run.wait(), 20)
        except TimeoutError:
            run.kill()
            await run.wait()


@pytest.mark.parametrize("moment", ["intent", "sent"])
async def test_kill9_mid_operator_command_executes_once_and_logs_once(
    tmp_path: Path, redis_server: RedisServer, sim: Iec104Outstation | None, moment: str
) -> None:
    sim = need_sim(sim)
    sim.set_breaker_travel(0.3)  # the kill lands while the breaker travels
    lab_file = profile(tmp_path, sim.port, redis_server)
    cfg = load_config(lab_file)
    reader = RedisStore.from_url(cfg, redis_server.client_url("operator"))
    # a request made 60 s ago (the gateway was down then): older than its validity (30 s)
    await reader.redis.xadd(
        reader.keys.cmd_requests, {"point": BREAKER, "value": "1", "by": "old", "id": "stale"},
        id=f"{int((time.time() - 60) * 1000)}-0",
    )  # fmt: skip
    run = await start_run(lab_file)
    again: asyncio.subprocess.Process | None = None
    try:
        await up(reader, run)
        stale = await reader.wait_reply("stale", 10)
        assert stale is not None and stale.result is CommandResult.EXPIRED, stale
        before = executes(sim)
        rounds = []
        for word in ("open", "close"):
            n0 = executes(sim)
            rid = await reader.submit_command(BREAKER, word, by="alice")
            deadline = time.monotonic() + 10
            while True:  # poll the moment, 1 ms at a time (bounded)
                if moment == "intent" and await reader.redis.hexists(reader.keys.cmd_intents, rid):
                    break
                if moment == "sent" and executes(sim) > n0:
                    break
                assert time.monotonic() < deadline, f"no {moment} within 10 s"
                await asyncio.sleep(0.001)
            await kill9(run)
            run = await start_run(lab_file)
            await up(reader, run)
            rec = await reader.wait_reply(rid, 20)
            assert rec is not None, "the cut command was never logged"
            rounds.append((word, rec))
        again = run
        log = [r for r in await reader.command_log(50) if r.requested_by == "alice"]
        assert len(log) == 2, log  # one entry per request: none missing, none twice
        ops = executes(sim) - before
        assert ops <= 2, f"{ops} device operations for 2 requests"
        for _word, rec in rounds:
            if rec.result is CommandResult.CONFIRMED:
                assert "not re-sent" in rec.reason, rec
            else:  # killed before the command left: the status shows it did not happen
                assert moment == "intent" and rec.result is CommandResult.INTERRUPTED, rec
        if moment == "sent":  # every command reached the device: each confirmed by its status
            assert [r.result for _, r in rounds] == [CommandResult.CONFIRMED] * 2 and ops == 2
        confirmed = [w for w, r in rounds if r.result is CommandResult.CONFIRMED]
        # one operation per confirmed command, but one whose status was at the requested
        # value already (the previous round was cut before it left) may not have been sent
        proven = [w for w, r in rounds if r.result is CommandResult.CONFIRMED and "already" not in r.reason]
        assert len(proven) <= ops <= len(confirmed), (ops, rounds)
        assert not await reader.redis.hlen(reader.keys.cmd_intents)
        assert not (await reader.redis.xpending(reader.keys.cmd_requests, "mgms"))["pending"]
        expect = DoublePoint.ON if not confirmed or confirmed[-1] == "close" else DoublePoint.OFF

        async def position() -> bool:  # the value writer may store it a moment after the log entry
            pos = await reader.latest(POSITION)
            return pos is not None and pos.value == expect

        await eventually(position, 5, f"breaker position {expect.name} stored")
    finally:
        await stop(run)
        if again is not None:
            await stop(again)
        await reader.aclose()


@pytest.mark.parametrize("moment", ["intent", "sent"])
async def test_kill9_mid_activation_executes_each_step_once_and_settles(
    tmp_path: Path, box: DsoSandbox, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None, moment: str,
) -> None:  # fmt: skip
    """`mgms run` killed the moment the activation's breaker-open intent is written, or the
    moment the breaker received it: the next run resolves the open from the breaker's status
    (never re-sent), measures against the baseline persisted before it (not a re-measured
    0 kW), closes at the stop and verifies; the AMS settles it as delivered."""
    sim = need_sim(sim)
    sim.set_breaker_travel(0.3)
    lab_file = profile(tmp_path, sim.port, redis_server)
    flex = feeder_flexibility(window_s=12, step_s=6).model_copy(update={"period_s": 3600.0})
    with lab_file.open("a") as f:  # JSON is YAML: the blocks as the sandbox builds them
        f.write(f"messaging: {box.messaging(MGMS, transport='mqtt').model_dump_json()}\n")
        f.write(f"flexibility: {flex.model_dump_json()}\n")
    cfg = load_config(lab_file)
    reader = RedisStore.from_url(cfg, redis_server.client_url("operator"))
    ams = await start_ams(box, ams_redis, "mqtt", "encrypted")
    run = await start_run(lab_file)
    try:
        await up(reader, run)
        deadline = time.monotonic() + 20
        n0 = executes(sim)
        while not (  # the open's intent, or its arrival at the breaker: 1 ms polls
            await reader.redis.hlen(reader.keys.cmd_intents) if moment == "intent" else executes(sim) > n0
        ):
            assert time.monotonic() < deadline, "no activation command within 20 s"
            await asyncio.sleep(0.001)
        await kill9(run)
        [act_key] = [k async for k in reader.redis.scan_iter(match=f"{reader.keys.prefix}:flex:act:*")]
        act_id = act_key.removeprefix(f"{reader.keys.prefix}:flex:act:")
        assert await reader.redis.hget(act_key, "baseline_kw") not in (None, "None")  # persisted first
        run = await start_run(lab_file)
        await up(reader, run)

        async def settled() -> dict[str, str] | None:
            return (await ams.service.settlement(act_id)) or None

        settlement = await eventually(settled, 40, "the settlement after the kill")
        assert settlement["state"] == "settled", settlement  # the load was shed: no false `failed`
        h = await reader.redis.hgetall(act_key)
        assert h["state"] == "verified", h
        log = await reader.command_log(50)
        assert {r.requested_by for r in log} == {f"ams:{act_id}"}, log  # no second activation meanwhile
        if log[0].result is CommandResult.CONFIRMED:  # the open had left: confirmed by the status
            assert [str(r.value) for r in log] == ["1", "2"], log
            assert "not re-sent" in log[0].reason, log[0]
        else:  # killed before it left: logged as interrupted, then issued once by the agent
            assert moment == "intent" and log[0].result is CommandResult.INTERRUPTED, log
            assert [(str(r.value), r.result) for r in log[1:]] == [("1", CommandResult.CONFIRMED),
                                                                  ("2", CommandResult.CONFIRMED)], log  # fmt: skip
        assert executes(sim) == 2  # one open, one close reached the breaker: none twice
        assert not await reader.redis.hlen(reader.keys.cmd_intents)
    finally:
        await stop(run)
        await ams.shutdown()
        await reader.aclose()


async def test_redis_kill9_at_the_execute_moment_executes_once_and_logs_once(
    tmp_path: Path, redis_server: RedisServer, sim: Iec104Outstation | None
) -> None:
    """The gateway's redis-server SIGKILLed the moment the intent is written, and the moment
    the breaker received the command, for a 1.8 s outage: the command goes once, its log
    entry comes once Redis is back."""
    sim = need_sim(sim)
    sim.set_breaker_travel(0.3)
    lab_file = profile(tmp_path, sim.port, redis_server)
    reader = RedisStore.from_url(load_config(lab_file), redis_server.client_url("operator"))
    run = await start_run(lab_file)
    try:
        await up(reader, run)
        for word, moment in (("open", "intent"), ("close", "sent")):
            n0 = executes(sim)
            rid = await reader.submit_command(BREAKER, word, by="bob")
            deadline = time.monotonic() + 10
            while not (await reader.redis.hexists(reader.keys.cmd_intents, rid) if moment == "intent"
                       else executes(sim) > n0):  # fmt: skip
                assert time.monotonic() < deadline, f"no {moment} within 10 s"
                await asyncio.sleep(0.001)
            await asyncio.to_thread(redis_server.stop, hard=True)
            await asyncio.sleep(1.8)
            await asyncio.to_thread(redis_server.restart)
            rec = await reader.wait_reply(rid, 40)
            assert rec is not None and rec.result is CommandResult.CONFIRMED, rec
            assert executes(sim) - n0 == 1, f"{moment}: {executes(sim) - n0} operations"
        log = [r for r in await reader.command_log(50) if r.requested_by == "bob"]
        assert len(log) == 2, log
        assert run.returncode is None  # the gateway rode the outages out
    finally:
        await stop(run)
        await reader.aclose()
