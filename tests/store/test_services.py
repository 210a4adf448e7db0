"""The embedded redis-server: free port, AOF persistence across restarts, clear errors; no
server outlives its owner, one embedded Redis per data dir."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway.services import (
    DataDirInUse,
    DataDirLock,
    RedisServer,
    ServiceError,
    ServiceNotInstalled,
    embedded_redis,
    free_port,
)

pytestmark = pytest.mark.timeout(30)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def _without_credentials(url: str) -> str:
    """The url as the ``redis.url`` file has it: no user, no secret."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"


@pytest.mark.parametrize("hard", [False, True], ids=["sigterm", "sigkill"])
def test_restart_keeps_port_and_data(hard: bool) -> None:
    with RedisServer() as server:
        port, url = server.port, server.client_url()
        with redis.Redis.from_url(url) as c:
            c.set("k", "v")
            c.xadd("s", {"a": "1"})
        server.restart(hard=hard)
        assert (server.port, server.client_url()) == (port, url)  # same secrets after a restart
        with redis.Redis.from_url(url, decode_responses=True) as c:
            assert c.get("k") == "v" and c.xlen("s") == 1
            assert c.info("persistence")["aof_enabled"] == 1  # CONFIG is no user's: INFO says it
        conf = (server.data_dir / "redis.conf").read_text()
        assert "appendfsync always\n" in conf and 'save ""\n' in conf


def test_temporary_data_dir_is_removed_given_one_is_kept(tmp_path: Path) -> None:
    with RedisServer() as server:
        tmp = server.data_dir
        assert (tmp / "redis-server.log").exists()
    assert not tmp.exists()

    given = tmp_path / "redis"
    with (
        RedisServer(data_dir=given, appendfsync="everysec") as server,
        redis.Redis.from_url(server.client_url(), decode_responses=True) as c,
    ):
        assert "appendfsync everysec\n" in (given / "redis.conf").read_text()
        c.set("k", "v")
    assert (given / "appendonlydir").is_dir()
    with RedisServer(data_dir=given) as server, redis.Redis.from_url(server.client_url()) as c:
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
        c = aioredis.Redis.from_url(server.client_url())
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
        assert (tmp_path / ".mgms" / "lab" / "redis.url").read_text().strip() == _without_credentials(url)
        assert (tmp_path / ".mgms" / "lab" / "redis" / "redis.conf").is_file()
    assert not (tmp_path / ".mgms" / "lab" / "redis.url").exists()
    assert (tmp_path / ".mgms" / "lab" / "redis" / "appendonlydir").is_dir()


def test_relative_data_dir_is_fixed_at_construction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The data dir is resolved once: a later chdir does not move a server's data."""
    monkeypatch.chdir(tmp_path)
    server = RedisServer(data_dir="rel/redis")
    assert server.data_dir == tmp_path / "rel" / "redis"
    monkeypatch.chdir("/")
    with server, redis.Redis.from_url(server.client_url()) as c:
        assert c.ping()
    assert (tmp_path / "rel" / "redis" / "redis.conf").is_file()


# -- no server outlives its owner (issue 17 item 10) ---------------------------------------


def _proc_stat(pid: int) -> tuple[str, str, int] | None:
    """(comm, state, ppid) of ``pid`` from /proc, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm, rest = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return comm, rest[0], int(rest[1])


def _exited(pid: int) -> bool:
    """Gone, or a zombie (it has exited; whether its new parent reaps it is not ours to test)."""
    stat = _proc_stat(pid)
    return stat is None or stat[1] == "Z"


def _servers_of(parent: int, comm: str) -> set[int]:
    """Live ``comm`` processes whose parent is ``parent``."""
    out = set()
    for entry in Path("/proc").glob("[0-9]*"):
        stat = _proc_stat(int(entry.name))
        if stat is not None and stat[0] == comm and stat[2] == parent and stat[1] != "Z":
            out.add(int(entry.name))
    return out


def _lock_free(directory: Path) -> bool:
    try:
        with DataDirLock(directory, who="probe"):
            return True
    except DataDirInUse:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait(probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.01)


async def _until(probe: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``probe`` every 2 ms (the points of a start-up are milliseconds apart)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if probe():
            return
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.002)


def test_a_server_outlives_the_thread_that_started_it() -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* ends: servers are forked from one
    thread kept for the process's life, so a short-lived starter thread takes nothing along."""
    server = RedisServer()
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join(15)
    try:
        assert not starter.is_alive() and server.running
        time.sleep(0.3)  # a death signal tied to the starter thread would have landed by now
        assert server.running
        with redis.Redis.from_url(server.client_url()) as c:
            assert c.ping()
    finally:
        server.close()


_OWNER = """
import asyncio, sys
from pathlib import Path
from gateway.services import MosquittoServer, embedded_redis

async def main() -> None:
    if sys.argv[1] == "redis":
        async with embedded_redis(None, Path(sys.argv[2]), who="owner") as url:
            print(url.rsplit(":", 1)[1].split("/")[0], flush=True)
            await asyncio.sleep(60)
    else:
        async with MosquittoServer(data_dir=sys.argv[2]) as broker:
            print(broker.port, flush=True)
            await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["redis", "mosquitto"])
def test_servers_stop_when_their_owner_is_killed(tmp_path: Path, kind: str) -> None:
    """SIGKILL of the process that started a server (from asyncio's worker thread, as the
    CLIs do): the server exits by itself, frees its port, and the data dir's lock is free."""
    comm = {"redis": "redis-server", "mosquitto": "mosquitto"}[kind]
    if shutil.which(comm) is None and shutil.which(comm, path="/usr/sbin") is None:
        pytest.skip(f"{comm} not installed")
    cmd = [sys.executable, "-c", _OWNER, kind, str(tmp_path)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as owner:
        try:
            assert owner.stdout is not None
            port = int(owner.stdout.readline())
            (server,) = _servers_of(owner.pid, comm)
            owner.kill()
            owner.wait(10)
            _wait(lambda: _exited(server), 5, f"{comm} (pid {server}) exited after its owner's SIGKILL")
            _wait(lambda: _port_free(port), 5, f"port {port} free")
            if kind == "redis":
                # the kernel drops the lock with its last holder, the server (whose other threads
                # may still be exiting a moment after its main one shows as a zombie)
                _wait(lambda: _lock_free(tmp_path), 5, "the data dir's lock free")
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait(10)


_LOOP_OWNER = """
import asyncio
from gateway.services import die_with_parent

async def main() -> None:
    child = await asyncio.create_subprocess_exec("sleep", "60", preexec_fn=die_with_parent())
    print(child.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def test_die_with_parent_for_a_child_the_event_loop_starts() -> None:
    """The bench's `ams run` child and `mgms lab up`'s children: forked by the loop (the
    main thread), they get SIGTERM from the kernel when their parent is killed."""
    with subprocess.Popen([sys.executable, "-c", _LOOP_OWNER], stdout=subprocess.PIPE, text=True) as owner:
        try:
            assert owner.stdout is not None
            child = int(owner.stdout.readline())
            assert not _exited(child)
            owner.kill()
            owner.wait(10)
            _wait(lambda: _exited(child), 5, f"the child {child} exited after its parent's SIGKILL")
        finally:
            if owner.poll() is None:
                owner.kill()
                owner.wait(10)


@pytest.mark.parametrize("point", ["at-once", "forked", "url-written", "delay-30ms", "delay-80ms"])
async def test_embedded_redis_cancelled_during_start_up_stops_its_server(tmp_path: Path, point: str) -> None:
    """A cancellation at any point of the start-up (a signal, in the CLIs) leaves no
    redis-server, no url marker and no lock behind."""
    me = os.getpid()
    before = _servers_of(me, "redis-server")
    marker = tmp_path / "redis.url"
    entered = asyncio.Event()

    async def owner() -> None:
        async with embedded_redis(None, tmp_path, who="test"):
            entered.set()
            await asyncio.sleep(30)

    task = asyncio.create_task(owner())
    await asyncio.sleep(0)  # "at-once": the task has taken the lock and handed the start to a thread
    if point == "forked":
        await _until(lambda: bool(_servers_of(me, "redis-server") - before), 10, "redis-server forked")
    elif point == "url-written":
        await _until(marker.exists, 10, "redis.url written")
    elif point.startswith("delay-"):
        await asyncio.sleep(int(point[6:-2]) / 1000)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _servers_of(me, "redis-server") == before
    assert not marker.exists()
    with DataDirLock(tmp_path, who="next"):
        pass
    if point == "url-written":
        assert entered.is_set()


async def test_embedded_redis_stops_its_server_when_its_user_fails(tmp_path: Path) -> None:
    """An exception in the body (a start-up step after the Redis, e.g. a transport that fails)."""
    me = os.getpid()
    before = _servers_of(me, "redis-server")
    with pytest.raises(RuntimeError, match="transport down"):
        async with embedded_redis(None, tmp_path, who="test"):
            assert _servers_of(me, "redis-server") - before
            raise RuntimeError("transport down")
    assert _servers_of(me, "redis-server") == before
    assert not (tmp_path / "redis.url").exists()
    with DataDirLock(tmp_path, who="next"):
        pass


def test_data_dir_lock_names_its_holder(tmp_path: Path) -> None:
    with DataDirLock(tmp_path, who="mgms"):
        with pytest.raises(DataDirInUse) as refused:
            DataDirLock(tmp_path, who="mgms").acquire()
        assert refused.value.pid == os.getpid() and refused.value.data_dir == tmp_path
        assert f"data dir {tmp_path} is in use by mgms (pid {os.getpid()})" in str(refused.value)
    with DataDirLock(tmp_path, who="mgms"):  # released with its holder
        pass


async def test_second_embedded_redis_on_a_data_dir_is_refused(tmp_path: Path) -> None:
    """The second one fails before it touches anything: the first keeps its url and answers."""
    async with embedded_redis(None, tmp_path, who="mgms") as url:
        with pytest.raises(DataDirInUse, match=f"pid {os.getpid()}"):
            async with embedded_redis(None, tmp_path, who="mgms"):
                pytest.fail("a second embedded Redis started on the same data dir")
        assert (tmp_path / "redis.url").read_text().strip() == _without_credentials(url)
        c = aioredis.Redis.from_url(url)
        try:
            assert await c.ping()
        finally:
            await c.aclose()
    async with embedded_redis(None, tmp_path, who="mgms") as url:  # free again once the first stopped
        assert (tmp_path / "redis.url").read_text().strip() == _without_credentials(url)
