"""The lab's Redis users against the running gateway and simulator (docs/security.md).

Issue 14: any local process could open the breaker with one XADD. Now a client needs a user
and its secret, and only the operator's may append to the request stream: a viewer's request
or an anonymous one is refused by Redis itself, before the gateway could see it, and the
breaker does not move. The operator's request is confirmed (test_iec104.py runs every command
through Redis as the operator too: hilkit's reader is that user).
"""

from __future__ import annotations

import asyncio
import socket

import pytest
from hilkit import Lab, eventually, need_commands, need_sim

from gateway.errors import StoreError
from gateway.points import DoublePoint
from gateway.store import RedisStore

BREAKER = "feeder.breaker.command"
POSITION = "feeder.breaker.position"


async def _position_stays(lab: Lab, expected: object, for_s: float = 0.5) -> None:
    """The breaker's position (in Redis and in the simulator's command count) does not move."""
    sim = need_sim(lab.sim)
    before = sim.stats().as_dict()["commands"]
    await asyncio.sleep(for_s)
    latest = await lab.reader.latest(POSITION)
    assert latest is not None and latest.value == expected
    assert sim.stats().as_dict()["commands"] == before, "a command reached the simulator"


async def _closed(lab: Lab) -> object:
    v = await lab.reader.latest(POSITION)
    return v.value if v is not None and v.value == DoublePoint.ON else None


async def test_a_viewer_request_is_refused_by_redis_and_the_breaker_stays(lab: Lab) -> None:
    need_commands()
    closed = await eventually(lambda: _closed(lab), 5, "breaker closed at start")
    viewer = RedisStore(lab.config, url=lab.redis.client_url("viewer"))
    try:
        with pytest.raises(StoreError, match="no permissions"):
            await viewer.submit_command(BREAKER, "open", by="viewer")
        assert await viewer.latest(POSITION) is not None  # it may read
    finally:
        await viewer.aclose()
    await _position_stays(lab, closed)
    assert not [r for r in await lab.reader.command_log(20) if r.requested_by == "viewer"]


async def test_an_anonymous_request_is_refused_and_the_breaker_stays(lab: Lab) -> None:
    """The XADD of issue 14, as any local process would send it."""
    need_commands()
    closed = await eventually(lambda: _closed(lab), 5, "breaker closed at start")
    key = lab.reader.keys.cmd_requests.encode()
    with socket.create_connection((lab.redis.host, lab.redis.port), timeout=2) as s:
        s.sendall(b"XADD " + key + b" * point " + BREAKER.encode() + b" value open by nobody\r\n")
        reply = s.recv(200)
    assert reply.startswith(b"-NOAUTH"), reply
    await _position_stays(lab, closed)


async def test_the_operator_request_is_confirmed(lab: Lab) -> None:
    need_commands()
    await eventually(lambda: _closed(lab), 5, "breaker closed at start")
    operator = RedisStore(lab.config, url=lab.redis.client_url("operator"))
    try:
        rid = await operator.submit_command(BREAKER, "open", by="operator-anna")
        reply = await operator.wait_reply(rid, 10)
        assert reply is not None and reply.result == "confirmed", reply
        rid = await operator.submit_command(BREAKER, "close", by="operator-anna")
        reply = await operator.wait_reply(rid, 10)
        assert reply is not None and reply.result == "confirmed", reply
    finally:
        await operator.aclose()
