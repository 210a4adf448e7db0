"""The embedded redis-server: free port, AOF persistence across restarts, clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway.services import RedisServer, ServiceError, ServiceNotInstalled, embedded_redis, free_port

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


async def test_embedded_redis_with_a_relative_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative data dir (the CLI default ``.mgms/<lab>``) works from any working directory.

    The server runs with its cwd set to the data dir; a config path left relative was looked up
    inside it again (issue 12 item 3) and redis-server refused to start.
    """
    monkeypatch.chdir(tmp_path)
    async with embedded_redis(None, Path(".mgms") / "lab", who="test") as url:
        c = aioredis.Redis.from_url(url)
        try:
            assert await c.ping()
        finally:
            await c.aclose()
        assert (tmp_path / ".mgms" / "lab" / "redis.url").read_text().strip() == url
        assert (tmp_path / ".mgms" / "lab" / "redis" / "redis.conf").is_file()
    assert not (tmp_path / ".mgms" / "lab" / "redis.url").exists()
    assert (tmp_path / ".mgms" / "lab" / "redis" / "appendonlydir").is_dir()


def test_relative_data_dir_is_fixed_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data dir is resolved once: a later chdir does not move a server's data."""
    monkeypatch.chdir(tmp_path)
    server = RedisServer(data_dir="rel/redis")
    assert server.data_dir == tmp_path / "rel" / "redis"
    monkeypatch.chdir("/")
    with server, redis.Redis.from_url(server.url) as c:
        assert c.ping()
    assert (tmp_path / "rel" / "redis" / "redis.conf").is_file()
