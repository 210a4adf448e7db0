"""The audit trail of a real command: gateway on the IEC 104 simulator, a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.audit import audit_key, read_stream, verify
from gateway.config import Iec104Timers, load_config
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.runtime import Gateway
from gateway.semantic.security import PrivateIdentity
from gateway.services import RedisServer
from gateway.store import RedisStore

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615"
BREAKER = "feeder.breaker.command"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(data_dir=tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def running(redis_server: RedisServer) -> AsyncIterator[tuple[Gateway, RedisStore, PrivateIdentity]]:
    base = load_config(SIM_CONFIG)
    sim = Iec104Outstation(base, DEVICE, host="127.0.0.1", port=0, seed=7)
    await sim.start()
    cfg = base.only(DEVICE).with_device(
        DEVICE,
        port=sim.port,
        timers=Iec104Timers(t0_s=2, t1_s=2, t2_s=1, t3_s=1, k=12, w=8),
        reconnect={"initial_s": 0.1, "max_s": 0.5},
    )
    gw = Gateway(cfg, RedisStore.from_url(cfg, redis_server.client_url()), stats_period_s=0.2)
    identity = PrivateIdentity.generate("mgms-multipower")
    gw.audit.identity = identity  # this profile has no messaging block: sign with a test key
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    operator = RedisStore.from_url(cfg, redis_server.client_url("operator"))
    try:
        await gw.wait_connected(10)
        yield gw, operator, identity
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await operator.aclose()
        await sim.close()


async def test_a_breaker_command_leaves_its_steps_in_a_verified_chain(
    running: tuple[Gateway, RedisStore, PrivateIdentity], redis_server: RedisServer
) -> None:
    gw, operator, identity = running
    rid = await operator.submit_command(BREAKER, "open", "alice")
    reply = await operator.wait_reply(rid, 10)
    assert reply is not None and reply.result == "confirmed", reply
    bad = await operator.submit_command(BREAKER, "sideways", "bob")
    refused = await operator.wait_reply(bad, 10)
    assert refused is not None and refused.result == "invalid"
    assert await gw.audit.flush(5)

    c = aioredis.Redis.from_url(redis_server.client_url("auditor"))  # may read P:audit only
    try:
        entries = await read_stream(c, audit_key(gw.store.keys.prefix))
    finally:
        await c.aclose()
    mine = [e for e in entries if e.data.get("request_id") == rid]
    assert [e.kind for e in mine] == [
        "command.request",
        "command.decision",
        "command.sent",
        "command.ack",
        "command.outcome",
    ]
    assert {e.actor for e in mine} == {"alice"}
    assert mine[0].data["via"] == "stream" and mine[0].data["point"] == BREAKER
    assert mine[1].data["decision"] == "authorised"
    assert mine[3].data["actcon"] == "positive"
    assert mine[4].data["result"] == "confirmed"
    assert mine[4].data["ack_ts"] == reply.ack_ts and mine[4].data["confirm_ts"] == reply.confirm_ts

    theirs = [e for e in entries if e.data.get("request_id") == bad]
    assert [(e.kind, e.actor) for e in theirs] == [
        ("command.request", "bob"),
        ("command.decision", "bob"),
        ("command.outcome", "bob"),
    ]
    assert theirs[1].data["decision"] == "refused" and "invalid" in theirs[1].data["reason"]

    assert entries[0].kind == "config.load" and entries[0].data["file"].endswith("multipower-sim.yaml")
    assert len(entries[0].data["sha256"]) == 64
    rep = verify(entries, identity.public)
    assert rep.ok, rep.problems


async def test_the_trail_is_signed_at_shutdown(redis_server: RedisServer, tmp_path: Path) -> None:
    """Stopping the gateway writes a checkpoint over everything it recorded."""
    base = load_config(SIM_CONFIG)
    cfg = base.only(DEVICE).with_device(DEVICE, port=1, reconnect={"initial_s": 0.1, "max_s": 0.5})
    gw = Gateway(cfg, RedisStore.from_url(cfg, redis_server.client_url()), stats_period_s=0.2)
    identity = PrivateIdentity.generate("mgms-multipower")
    gw.audit.identity = identity
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop))
    await gw.wait_ready()
    stop.set()
    await asyncio.wait_for(task, 15)
    c = aioredis.Redis.from_url(redis_server.client_url("auditor"))
    try:
        entries = await read_stream(c, audit_key(gw.store.keys.prefix))
    finally:
        await c.aclose()
    assert [e.kind for e in entries] == ["config.load", "checkpoint"]
    rep = verify(entries, identity.public)
    assert rep.ok and rep.checkpoints_ok == 1 and rep.unsigned_tail == 0
