"""The embedded redis-server: free port, AOF persistence across restarts, clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway.services import RedisServer, ServiceError, ServiceNotInstalled, free_port

pytestmark = pytest.mark.timeout(30)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_restart_keeps_port_and_data(hard: bool) -> None:
    with RedisServer() as server:
        port, url = server.port, server.url
        with redis.Redis.from_url(url) as c:
            c.set("k", "v")
            c.xadd("s", {"a": "1"})
        server.restart(hard=hard)
        assert (server.port, server.url) == (port, url)
        with redis.Redis.from_url(url, decode_responses=True) as c:
            assert c.get("k") == "v" and c.xlen("s") == 1
            assert c.config_get("appendonly")["appendonly"] == "yes"
            assert c.config_get("appendfsync")["appendfsync"] == "always"
            assert c.config_get("save")["save"] == ""


def test_temporary_data_dir_is_removed_given_one_is_kept(tmp_path: Path) -> None:
    with RedisServer() as server:
        tmp = server.data_dir
        assert (tmp / "redis-server.log").exists()
    assert not tmp.exists()

    given = tmp_path / "redis"
    with (
        RedisServer(data_dir=given, appendfsync="everysec") as server,
        redis.Redis.from_url(server.url, decode_responses=True) as c,
    ):
        assert c.config_get("appendfsync")["appendfsync"] == "everysec"
        c.set("k", "v")
    assert (given / "appendonlydir").is_dir()
    with RedisServer(data_dir=given) as server, redis.Redis.from_url(server.url) as c:
        assert c.get("k") == b"v"  # a new server on the same directory has the data


def test_taken_port_is_a_clear_error() -> None:
    with RedisServer() as first:
        second = RedisServer(port=first.port)
        with pytest.raises(ServiceError, match="already in use"):
            second.start()
        second.close()
        assert first.running


def test_missing_binary_says_how_to_install() -> None:
    server = RedisServer(executable=None)
    server.binary = "redis-server-that-does-not-exist"
    with pytest.raises(ServiceNotInstalled, match="apt-get install redis-server"):
        server.start()


def test_bad_config_exit_is_reported_with_the_log() -> None:
    server = RedisServer(extra_config={"no-such-directive": "1"})
    with pytest.raises(ServiceError, match="exited with code"):
        server.start()
    server.close()


async def test_async_context_manager() -> None:
    async with RedisServer() as server:
        c = aioredis.Redis.from_url(server.url)
        try:
            assert await c.ping()
        finally:
            await c.aclose()
    assert not server.running
