"""The embedded Redis's users and secrets (docs/security.md), on a real redis-server.

Each user may do what its role needs and nothing else; nobody gets in without a user and its
secret; the secrets are files of mode 0600 and appear in no url, log or config file.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from gateway.config import LabConfig
from gateway.redisauth import default_user_is_open, warn_if_open
from gateway.services import RedisServer, embedded_redis, free_port, lab_redis_users
from gateway.store import RedisStore, StoreKeys

P = "mgms:testlab"  # the prefix of conftest's lab


@pytest.fixture
def lab_redis() -> Iterator[RedisServer]:
    """A Redis with the users `mgms run` gives a lab's own (prefix P only)."""
    with RedisServer(users=lab_redis_users(P)) as server:
        yield server


@pytest.fixture
async def gateway(lab_redis: RedisServer, lab: LabConfig) -> AsyncIterator[RedisStore]:
    """The gateway's store, with its command group made (as `mgms run` does at start)."""
    store = RedisStore(lab, url=lab_redis.client_url("gateway"))
    await store._ensure_group()
    try:
        yield store
    finally:
        await store.aclose()


def _raw(server: RedisServer, *lines: bytes) -> list[bytes]:
    """Inline commands on a socket that never authenticated; one reply line each."""
    with socket.create_connection((server.host, server.port), timeout=2) as s:
        s.sendall(b"".join(line + b"\r\n" for line in lines))
        data = b""
        while data.count(b"\r\n") < len(lines):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[: len(lines)]


def test_without_credentials_everything_is_refused(lab_redis: RedisServer) -> None:
    replies = _raw(
        lab_redis,
        b"PING",
        f"XADD {P}:cmd:requests * point feeder.breaker.command value open by nobody".encode(),
        b"CONFIG SET appendonly no",
        b"AUTH default ''",
    )
    assert [r.split(b" ")[0] for r in replies] == [b"-NOAUTH", b"-NOAUTH", b"-NOAUTH", b"-WRONGPASS"], replies


async def _refused(client: aioredis.Redis, *cmd: str) -> None:
    with pytest.raises(NoPermissionError):
        await client.execute_command(*cmd)


async def test_the_gateway_user_cannot_change_or_erase_the_server(lab_redis: RedisServer, gateway: RedisStore) -> None:
    g = gateway.redis
    for cmd in (
        ("CONFIG", "SET", "appendonly", "no"),
        ("CONFIG", "GET", "appendonly"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "default", "on", "nopass"),
        ("SHUTDOWN", "NOSAVE"),
        ("XGROUP", "DESTROY", f"{P}:cmd:requests", "mgms"),
        ("KEYS", "*"),
        ("SET", "other:lab:x", "1"),  # another prefix
    ):
        await _refused(g, *cmd)
    with pytest.raises(ResponseError):  # refused twice over: by the ACL and enable-debug-command
        await g.execute_command("DEBUG", "SLEEP", "0")
    assert lab_redis.running
    info = await g.info("persistence")  # what it needs instead of CONFIG GET
    assert info["aof_enabled"] == 1


async def test_the_operator_appends_requests_and_pops_its_reply_only(
    lab_redis: RedisServer, lab: LabConfig, gateway: RedisStore
) -> None:
    operator = RedisStore(lab, url=lab_redis.client_url("operator"))
    try:
        rid = await operator.submit_command("feeder.breaker.command", "open", by="anna")
        [(_, [(_, fields)])] = await gateway.redis.xreadgroup("mgms", "gw", {gateway.keys.cmd_requests: ">"})
        assert fields["id"] == rid and fields["by"] == "anna"
        reply_json = json.dumps(
            {"request_id": rid, "point": "feeder.breaker.command", "value": "1", "requested_by": "anna",
             "result": "confirmed"}
        )  # fmt: skip
        await gateway.redis.rpush(gateway.keys.cmd_reply(rid), reply_json)
        reply = await operator.wait_reply(rid, 2)
        assert reply is not None and reply.request_id == rid
        o = operator.redis
        assert await o.hgetall(f"{P}:stats") == {}  # may read
        for cmd in (
            ("CONFIG", "GET", "appendonly"),
            ("XGROUP", "DESTROY", f"{P}:cmd:requests", "mgms"),
            ("XGROUP", "CREATE", f"{P}:cmd:requests", "mine", "0"),
            ("XACK", f"{P}:cmd:requests", "mgms", "0-1"),
            ("DEL", f"{P}:cmd:requests"),
            ("DEL", f"{P}:point:feeder.p"),
            ("HSET", f"{P}:point:feeder.p", "value", "0"),
            ("XADD", f"{P}:changes", "*", "point", "feeder.p"),
            ("XADD", f"{P}:msg:inbox", "*", "forged", "1"),
            ("FLUSHALL",),
        ):
            await _refused(o, *cmd)
    finally:
        await operator.aclose()


async def test_the_viewer_reads_and_the_auditor_reads_the_audit_stream_only(
    lab_redis: RedisServer, gateway: RedisStore
) -> None:
    await gateway.redis.xadd(f"{P}:audit", {"what": "config loaded"})
    await gateway.redis.hset(f"{P}:point:feeder.p", mapping={"value": "1"})
    viewer = lab_redis.client("viewer")
    auditor = lab_redis.client("auditor")
    try:
        assert await viewer.hget(f"{P}:point:feeder.p", "value") == "1"
        await _refused(viewer, "XADD", f"{P}:cmd:requests", "*", "point", "x", "value", "1")
        await _refused(viewer, "HSET", f"{P}:point:feeder.p", "value", "0")
        assert len(await auditor.xrange(f"{P}:audit")) == 1
        await _refused(auditor, "HGET", f"{P}:point:feeder.p", "value")
        await _refused(auditor, "XADD", f"{P}:audit", "*", "what", "forged")
    finally:
        await viewer.aclose()
        await auditor.aclose()


async def test_transactions_survive_a_restart_with_nobody_able_to_be_default(lab_redis: RedisServer) -> None:
    """Redis up to 7.2 drops a MULTI/EXEC of the AOF at replay when ``default`` is off
    (redis/redis#14541): our ``default`` is on with a secret nobody holds, so they replay."""
    c = lab_redis.client()
    try:
        async with c.pipeline(transaction=True) as pipe:
            await pipe.set(f"{P}:a", "1").set(f"{P}:b", "2").execute()
    finally:
        await c.aclose()
    lab_redis.restart(hard=True)
    c = lab_redis.client()
    try:
        assert await c.mget(f"{P}:a", f"{P}:b") == ["1", "2"]
    finally:
        await c.aclose()


async def test_secrets_are_private_files_and_nowhere_else(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "lab"
    async with embedded_redis(None, state, who="mgms", users=lab_redis_users(P)) as url:
        secrets_dir = state / "secrets"
        assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
        secrets = {}
        for user in ("gateway", "operator", "viewer", "auditor"):
            f = secrets_dir / f"redis-{user}.secret"
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
            secrets[user] = f.read_text().strip()
        assert len(set(secrets.values())) == 4 and all(len(s) >= 40 for s in secrets.values())
        marker = (state / "redis.url").read_text()
        assert "@" not in marker and marker.startswith("redis://127.0.0.1:")
        assert secrets["gateway"] in url  # the url handed to the client carries it ...
        conf = (state / "redis" / "redis.conf").read_text()
        assert stat.S_IMODE((state / "redis" / "redis.conf").stat().st_mode) == 0o600
        # ... and nothing written down or logged does
        written = [marker, conf, (state / "redis" / "redis-server.log").read_text(), caplog.text]
        for text in written:
            for secret in secrets.values():
                assert secret not in text
        assert "user default reset on #" in conf and "nopass" not in conf
    assert not (state / "redis.url").exists()


async def test_an_open_redis_is_told_apart_and_warned_about(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """`mgms run` against a Redis whose default user has no password warns (docs/security.md)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):  # 5 s at most for a bare redis-server to listen
            if await default_user_is_open(url):
                break
            await asyncio.sleep(0.05)
        with caplog.at_level(logging.WARNING, logger="mgms"):
            assert await warn_if_open(url, "mgms")
        assert "without a password" in caplog.text
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 10)
    async with RedisServer() as ours:
        assert not await default_user_is_open(ours.url)


def test_a_user_needs_a_prefix_of_its_own() -> None:
    users = lab_redis_users(StoreKeys("mgms:lab1").prefix)
    assert "~mgms:lab1:*" in users["gateway"] and "%W~mgms:lab1:cmd:requests" in users["operator"]
    assert "%R~mgms:lab1:audit " in users["auditor"]
    with pytest.raises(ValueError, match="default"):
        RedisServer(users={"default": "+@all"})
