"""Operator command requests: submit, consume, log, reply, acknowledge, redeliver."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import redis.asyncio as aioredis

from gateway.config import LabConfig
from gateway.points import now
from gateway.services import RedisServer
from gateway.store import (
    COMMAND_GROUP,
    DONE_TTL_S,
    REPLY_TTL_S,
    CommandIntent,
    CommandRecord,
    CommandRequestEntry,
    CommandResult,
    RedisStore,
    StoreKeys,
)

pytestmark = pytest.mark.timeout(30)

K = StoreKeys("mgms:testlab")
POINT = "feeder.breaker.command"


async def next_request(it: AsyncIterator[CommandRequestEntry], timeout_s: float = 5.0) -> CommandRequestEntry:
    return await asyncio.wait_for(anext(it), timeout_s)


async def pending_count(client: aioredis.Redis) -> int:
    info = await client.xpending(K.cmd_requests, COMMAND_GROUP)
    return int(info["pending"])


async def test_submit_consume_log_reply_ack(store: RedisStore, client: aioredis.Redis) -> None:
    rid = await store.submit_command(POINT, 2, by="alice")
    async with contextlib.aclosing(store.command_requests()) as requests:
        req = await next_request(requests)
    assert (req.request_id, req.point, req.value, req.requested_by) == (rid, POINT, "2", "alice")
    assert not req.redelivered
    assert abs(req.requested_ts - now()) < 5
    assert await pending_count(client) == 1  # received, not yet finished

    sent = now()
    record = CommandRecord.for_request(
        req, CommandResult.CONFIRMED, sent_ts=sent, ack_ts=sent + 0.01, confirm_ts=sent + 0.08
    )
    log_id = await store.log_command(record, req)
    assert await pending_count(client) == 0

    reply = await store.wait_reply(rid, 5)
    assert reply == record
    assert reply is not None and reply.duration_ms == pytest.approx(80, abs=0.01)

    [(entry_id, fields)] = await client.xrange(K.cmd_log)
    assert entry_id == log_id
    assert fields["id"] == rid and fields["point"] == POINT and fields["value"] == "2"
    assert fields["by"] == "alice" and fields["result"] == "confirmed"
    assert float(fields["sent_ts"]) == sent and float(fields["confirm_ts"]) == sent + 0.08
    assert [r.request_id for r in await store.command_log()] == [rid]


async def test_reply_list_expires(store: RedisStore, client: aioredis.Redis) -> None:
    rid = await store.submit_command(POINT, 1)
    async with contextlib.aclosing(store.command_requests()) as requests:
        req = await next_request(requests)
    await store.log_command(CommandRecord.for_request(req, "rejected", reason="negative ACTCON"), req)
    assert 0 < await client.ttl(K.cmd_reply(rid)) <= REPLY_TTL_S
    assert await client.llen(K.cmd_reply(rid)) == 1
    reply = await store.wait_reply(rid, 1)
    assert reply is not None and reply.result is CommandResult.REJECTED
    assert reply.reason == "negative ACTCON"


async def test_wait_reply_times_out(store: RedisStore) -> None:
    assert await store.wait_reply("nobody-answers", 0.3) is None


@dataclass
class Outcome:
    """Shaped like the core's CommandOutcome: log_command takes any such object."""

    request_id: str
    point: str
    value: float | int | bool
    requested_by: str
    result: str = "timeout"
    reason: str = "status did not follow"
    sent_ts: float | None = field(default_factory=now)
    ack_ts: float | None = None
    confirm_ts: float | None = None


async def test_log_command_takes_an_outcome_object_and_a_stream_id(
    store: RedisStore, client: aioredis.Redis
) -> None:
    rid = await store.submit_command(POINT, "2")
    async with contextlib.aclosing(store.command_requests()) as requests:
        req = await next_request(requests)
    await store.log_command(Outcome(rid, POINT, 2, "operator"), req.stream_id)
    assert await pending_count(client) == 0
    reply = await store.wait_reply(rid, 1)
    assert reply is not None and reply.result is CommandResult.TIMEOUT and reply.value == "2"


async def test_unfinished_request_is_delivered_again_after_restart(
    lab: LabConfig, redis_server: RedisServer, client: aioredis.Redis
) -> None:
    first = RedisStore(lab, url=redis_server.client_url())
    rid = await first.submit_command(POINT, 1, by="bob")
    async with contextlib.aclosing(first.command_requests()) as requests:
        req = await next_request(requests)
    assert req.request_id == rid
    await first.close()  # "crash": the command never got logged

    # Redis restarts too (SIGKILL): the pending entry is in the AOF
    await asyncio.to_thread(redis_server.restart, hard=True)

    second = RedisStore(lab, url=redis_server.client_url())
    try:
        async with contextlib.aclosing(second.command_requests()) as requests:
            again = await next_request(requests)
        assert again.request_id == rid and again.stream_id == req.stream_id
        assert again.redelivered
        await second.log_command(CommandRecord.for_request(again, "confirmed"), again)
        assert await pending_count(client) == 0
        # and it is not delivered a third time
        async with contextlib.aclosing(second.command_requests(block_ms=100)) as requests:
            with pytest.raises(TimeoutError):
                await next_request(requests, 0.5)
    finally:
        await second.close()


async def test_pending_request_of_another_consumer_is_taken_over(
    lab: LabConfig, redis_server: RedisServer
) -> None:
    old = RedisStore(lab, url=redis_server.client_url())
    rid = await old.submit_command(POINT, 2)
    async with contextlib.aclosing(old.command_requests(consumer="old-host")) as requests:
        await next_request(requests)
    await old.close()

    new = RedisStore(lab, url=redis_server.client_url())
    try:
        async with contextlib.aclosing(new.command_requests(consumer="new-host")) as requests:
            again = await next_request(requests)
        assert again.request_id == rid and again.redelivered
    finally:
        await new.close()


async def test_request_in_flight_is_not_yielded_twice_by_one_store(store: RedisStore) -> None:
    await store.submit_command(POINT, 1)
    async with contextlib.aclosing(store.command_requests()) as requests:
        await next_request(requests)
    # a new iteration in the same process (e.g. after a reconnect) skips what is being executed
    async with contextlib.aclosing(store.command_requests(block_ms=100)) as requests:
        with pytest.raises(TimeoutError):
            await next_request(requests, 0.5)


async def test_malformed_and_stale_requests_are_logged_invalid(
    store: RedisStore, client: aioredis.Redis
) -> None:
    # ten minutes old (stream ids carry the time): older than max_age_s below
    old_ms = int((now() - 600) * 1000)
    await client.xadd(K.cmd_requests, {"point": POINT, "value": "1", "id": "stale"}, id=f"{old_ms}-0")
    await client.xadd(K.cmd_requests, {"value": "1", "by": "eve", "id": "no-point"})
    await client.xadd(K.cmd_requests, {"point": POINT, "by": "eve", "id": "no-value"})
    good = await store.submit_command(POINT, 2)

    async with contextlib.aclosing(store.command_requests(max_age_s=60)) as requests:
        req = await next_request(requests)
    assert req.request_id == good
    log = {r.request_id: r for r in await store.command_log()}
    assert set(log) == {"stale", "no-point", "no-value"}
    for rid in ("no-point", "no-value"):
        assert log[rid].result is CommandResult.INVALID and log[rid].reason
    # too old: refused as expired (a documented result of its own), not sent
    assert log["stale"].result is CommandResult.EXPIRED
    assert "old" in log["stale"].reason and "not sent" in log["stale"].reason
    assert await pending_count(client) == 1  # only the yielded one is left


async def test_operator_request_with_redis_cli_fields(store: RedisStore, client: aioredis.Redis) -> None:
    """What docs/redis-keys.md tells an operator to type works, including without an id."""
    await store.submit_command(POINT, 1)
    sid = await client.xadd(K.cmd_requests, {"point": POINT, "value": "2", "by": "operator"})
    async with contextlib.aclosing(store.command_requests()) as requests:
        await next_request(requests)
        req = await next_request(requests)
    assert req.request_id == sid and req.stream_id == sid


async def test_request_stream_survives_a_redis_restart(
    store: RedisStore, redis_server: RedisServer
) -> None:
    async with contextlib.aclosing(store.command_requests(block_ms=200)) as requests:
        rid1 = await store.submit_command(POINT, 1)
        assert (await next_request(requests)).request_id == rid1
        await asyncio.to_thread(redis_server.restart)
        rid2 = await store.submit_command(POINT, 2)
        assert (await next_request(requests, 15)).request_id == rid2


async def test_commands_with_a_client_that_does_not_decode(
    lab: LabConfig, redis_server: RedisServer
) -> None:
    raw = aioredis.Redis.from_url(redis_server.client_url())  # bytes replies
    try:
        store = RedisStore(lab, raw)
        rid = await store.submit_command(POINT, 2, by="carol")
        async with contextlib.aclosing(store.command_requests()) as requests:
            req = await next_request(requests)
        assert (req.request_id, req.value, req.requested_by) == (rid, "2", "carol")
        await store.log_command(CommandRecord.for_request(req, "confirmed"), req)
        reply = await store.wait_reply(rid, 2)
        assert reply is not None and reply.result is CommandResult.CONFIRMED
        [logged] = await store.command_log()
        assert logged.request_id == rid and logged.log_id
        await store.close()
    finally:
        await raw.aclose()


async def test_cancelling_the_consumer_ends_it(store: RedisStore) -> None:
    """Cancelled at any point (group creation, pending scan, blocking read), the task ends.

    redis-py was seen to swallow a cancellation that arrived during XGROUP CREATE; the
    iterator must not then loop on forever.
    """

    async def consume() -> None:
        async for _ in store.command_requests(block_ms=1000):
            pass

    for i in range(60):
        task = asyncio.create_task(consume())
        await asyncio.sleep((i % 12) * 0.002)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=3)
        assert done, f"consumer did not end after cancel (round {i})"


async def test_stop_event_ends_the_stream(store: RedisStore) -> None:
    stop = asyncio.Event()
    got: list[CommandRequestEntry] = []

    async def consume() -> None:
        async for req in store.command_requests(block_ms=100, stop=stop):
            got.append(req)

    task = asyncio.create_task(consume())
    rid = await store.submit_command(POINT, 1)
    for _ in range(100):
        if got:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert [r.request_id for r in got] == [rid]


async def test_intent_is_written_then_removed_with_the_log_entry(store: RedisStore, client: aioredis.Redis) -> None:
    """The write-ahead intent: readable back as written, gone in the MULTI that logs, replies
    and acknowledges; the outcome stays readable by request id (a caller asking again)."""
    rid = await store.submit_command(POINT, 1, by="alice")
    async with contextlib.aclosing(store.command_requests()) as requests:
        req = await next_request(requests)
    intent = CommandIntent(
        request_id=rid, point=POINT, value="1", requested_by="alice", status_point="feeder.breaker.position",
        status_value="2", status_quality=0, stream_id=req.stream_id, requested_ts=req.requested_ts,
        extra={"signature": "later-version-field"},
    )  # fmt: skip
    await store.write_intent(intent)
    [back] = await store.pending_intents()
    assert back == intent and back.extra == {"signature": "later-version-field"}
    assert await store.finished_command(rid) is None

    record = CommandRecord.for_request(req, CommandResult.CONFIRMED, sent_ts=now())
    await store.log_command(record, req)
    assert await store.pending_intents() == []
    assert await pending_count(client) == 0
    assert await store.finished_command(rid) == record
    assert DONE_TTL_S - 5 < await client.ttl(K.cmd_done(rid)) <= DONE_TTL_S


async def test_unreadable_intent_is_skipped_and_left(store: RedisStore, client: aioredis.Redis) -> None:
    await client.hset(K.cmd_intents, "broken", "{not json")
    await store.write_intent(CommandIntent("ok", POINT, "2", "bob", "feeder.breaker.position"))
    assert [i.request_id for i in await store.pending_intents()] == ["ok"]
    assert await client.hexists(K.cmd_intents, "broken")
