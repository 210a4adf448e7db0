"""Values from put() end up in the latest-value hash, the history and the change feed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.config import LabConfig
from gateway.points import DoublePoint, PointUpdate, Quality, UpdateCause
from gateway.services import RedisServer
from gateway.store import RedisStore, StoreKeys, _BadReply, _read_replies

pytestmark = pytest.mark.timeout(30)

K = StoreKeys("mgms:testlab")


async def test_untagged_value_says_its_source_time_is_the_receive_time(
    store: RedisStore, client: aioredis.Redis
) -> None:
    """An IEC 104 GI answer comes untagged: its receive time stands in as source time, and
    the hash, the history and the change feed say so; a tagged value after it does not."""
    store.put(PointUpdate("feeder.p", 1.5, Quality.GOOD, 1700000000.5, 1700000000.5,
                          UpdateCause.INTERROGATED, time_substituted=True))  # fmt: skip
    await store.flush(5)
    h = await client.hgetall(K.point("feeder.p"))
    assert (h["source_ts"], h["source_ts_from"], h["quality"], h["flags"]) == (repr(1700000000.5), "receive", "0", "")
    [(_, hist)] = await client.xrange(K.hist("feeder.p"))
    assert hist["src"] == repr(1700000000.5) and hist["src_from"] == "receive"
    [(_, change)] = await client.xrange(K.changes)
    assert change == {"point": "feeder.p", **hist}
    latest = await store.latest("feeder.p")
    assert latest is not None and latest.time_substituted and latest.quality is Quality.GOOD
    [entry] = await store.history("feeder.p")
    assert entry.time_substituted and entry.source_ts == 1700000000.5

    store.put(PointUpdate("feeder.p", 2.5, Quality.GOOD, 1700000001.25, 1700000001.5))
    await store.flush(5)
    h = await client.hgetall(K.point("feeder.p"))
    assert (h["source_ts"], h["source_ts_from"]) == (repr(1700000001.25), "device")
    newest = (await client.xrange(K.hist("feeder.p")))[-1][1]
    assert "src_from" not in newest
    latest = await store.latest("feeder.p")
    assert latest is not None and not latest.time_substituted
    store.put(PointUpdate("feeder.p", 3.5, Quality.GOOD, None, 1700000002.0))
    await store.flush(5)
    assert (await client.hget(K.point("feeder.p"), "source_ts_from")) == ""


async def test_value_reaches_hash_history_and_change_feed(
    store: RedisStore, client: aioredis.Redis
) -> None:
    q = Quality.NOT_TOPICAL | Quality.INVALID
    store.put(
        PointUpdate("feeder.p", 12.345678901234567, q, source_time=1700000000.123456789,
                    receive_time=1700000000.25, cause=UpdateCause.PERIODIC)
    )  # fmt: skip
    await store.flush(5)

    h = await client.hgetall(K.point("feeder.p"))
    st = h.pop("store_ts")
    assert h == {
        "value": "12.345678901234567",
        "quality": str(int(q)),
        "flags": "not_topical,invalid",
        "source_ts": repr(1700000000.123456789),
        "source_ts_from": "device",
        "recv_ts": "1700000000.25",
        "cause": "periodic",
        "unit": "kW",
        "device": "relay",
        "quantity": "active_power",
    }
    assert float(st) > 1700000000.25

    [(_, hist)] = await client.xrange(K.hist("feeder.p"))
    assert hist == {
        "v": "12.345678901234567",
        "q": str(int(q)),
        "src": repr(1700000000.123456789),
        "rcv": "1700000000.25",
        "st": st,
    }
    [(_, change)] = await client.xrange(K.changes)
    assert change == {"point": "feeder.p", **hist}

    latest = await store.latest("feeder.p")
    assert latest is not None
    assert latest.value == 12.345678901234567
    assert latest.quality == q and latest.flags == ["not_topical", "invalid"]
    assert latest.source_ts == 1700000000.123456789
    assert latest.store_ts == float(st)
    assert latest.unit == "kW" and latest.device == "relay"
    [entry] = await store.history("feeder.p")
    assert entry.value == latest.value and entry.store_ts == latest.store_ts


async def test_missing_source_time_and_value_are_empty_fields(
    store: RedisStore, client: aioredis.Redis
) -> None:
    store.put(PointUpdate("feeder.p", None, Quality.INVALID, cause=UpdateCause.LINK_LOST))
    await store.flush(5)
    h = await client.hgetall(K.point("feeder.p"))
    assert h["value"] == "" and h["source_ts"] == "" and h["cause"] == "link_lost"
    latest = await store.latest("feeder.p")
    assert latest is not None and latest.value is None and latest.source_ts is None


async def test_latest_hash_holds_the_newest_of_a_batch(store: RedisStore) -> None:
    for i in range(50):
        store.put(PointUpdate("feeder.p", float(i)))
    await store.flush(5)
    latest = await store.latest("feeder.p")
    assert latest is not None and latest.value == 49.0
    assert [e.value for e in await store.history("feeder.p", 100)] == [float(i) for i in range(50)]


async def test_history_and_change_feed_are_capped(
    redis_server: RedisServer, client: aioredis.Redis, make_lab: Callable[..., LabConfig]
) -> None:
    lab = make_lab(history_maxlen=10, changes_maxlen=50)
    async with RedisStore(lab, url=redis_server.client_url()) as store:
        for i in range(3000):
            store.put(PointUpdate("feeder.p", float(i)))
        await store.flush(10)
    # MAXLEN ~ trims whole stream nodes (100 entries by default), never below the limit
    node = 100
    assert 10 <= await client.xlen(K.hist("feeder.p")) <= 10 + node
    assert 50 <= await client.xlen(K.changes) <= 50 + node
    # the newest entries are the ones kept
    [(_, last)] = await client.xrevrange(K.hist("feeder.p"), count=1)
    assert last["v"] == repr(2999.0)


async def test_deadband_suppresses_history_but_updates_latest(
    store: RedisStore, client: aioredis.Redis
) -> None:
    name = "feeder.voltage.l1"  # deadband 0.5 V
    for v in (230.0, 230.2, 230.4, 230.6, 230.7, 230.2):
        store.put(PointUpdate(name, v))
    await store.flush(5)
    # 230.6 is 0.6 from the last stored 230.0; 230.2 is 0.4 from 230.6; 230.7 only 0.1
    assert [e.value for e in await store.history(name)] == [230.0, 230.6]
    latest = await store.latest(name)
    assert latest is not None and latest.value == 230.2
    assert (await store.read_stats())["deadband_suppressed"] == 4
    assert await client.xlen(K.changes) == 2

    # a quality change is always history, even with the same value
    store.put(PointUpdate(name, 230.2, Quality.NOT_TOPICAL))
    await store.flush(5)
    hist = await store.history(name)
    assert [(e.value, e.quality) for e in hist][-1] == (230.2, Quality.NOT_TOPICAL)
    assert store.stats()["deadband_suppressed"] == 4


async def test_deadband_zero_keeps_every_value(store: RedisStore) -> None:
    for _ in range(5):
        store.put(PointUpdate("feeder.p", 1.0))
    await store.flush(5)
    assert len(await store.history("feeder.p")) == 5


async def test_double_point_text(store: RedisStore, client: aioredis.Redis) -> None:
    name = "feeder.breaker.position"
    expected = {
        DoublePoint.INTERMEDIATE: "intermediate",
        DoublePoint.OFF: "off",
        DoublePoint.ON: "on",
        DoublePoint.INDETERMINATE: "indeterminate",
    }
    for dp, text in expected.items():
        store.put(PointUpdate(name, dp))
        await store.flush(5)
        h = await client.hgetall(K.point(name))
        assert (h["value"], h["text"]) == (str(int(dp)), text)
        latest = await store.latest(name)
        assert latest is not None and latest.value == int(dp) and latest.text == text
    store.put(PointUpdate("feeder.p", 2.0))
    await store.flush(5)
    assert "text" not in await client.hgetall(K.point("feeder.p"))


async def test_single_point_is_bool(store: RedisStore, client: aioredis.Redis) -> None:
    store.put(PointUpdate("feeder.recloser.blocked", True))
    await store.flush(5)
    assert (await client.hgetall(K.point("feeder.recloser.blocked")))["value"] == "1"
    latest = await store.latest("feeder.recloser.blocked")
    assert latest is not None and latest.value is True and latest.text is None


async def test_unknown_point_is_stored_without_unit(store: RedisStore) -> None:
    store.put(PointUpdate("not.configured", 3.0))
    await store.flush(5)
    latest = await store.latest("not.configured")
    assert latest is not None and latest.value == 3.0 and latest.unit == ""


async def test_latest_all(store: RedisStore) -> None:
    store.put(PointUpdate("feeder.p", 1.5))
    store.put(PointUpdate("feeder.breaker.position", DoublePoint.OFF))
    await store.flush(5)
    all_ = await store.latest_all()
    assert set(all_) == {"feeder.p", "feeder.breaker.position"}
    assert all_["feeder.breaker.position"].text == "off"
    assert await store.latest("feeder.voltage.l1") is None


async def test_buffer_overflow_drops_oldest_and_counts(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, make_lab: Callable[..., LabConfig]
) -> None:
    lab = make_lab(buffer_max=100)
    store = RedisStore(lab, url=redis_server.client_url())
    try:
        for i in range(150):  # writer not started yet: everything stays in the buffer
            store.put(PointUpdate("feeder.p", float(i)))
        assert store.buffered == 100
        assert store.stats()["updates_dropped"] == 50
        assert "dropped 1 oldest" in caplog.text  # logged once, not 50 times
        assert caplog.text.count("buffer full") == 1
        await store.start()
        await store.flush(5)
        assert [e.value for e in await store.history("feeder.p", 1000)] == [
            float(i) for i in range(50, 150)
        ]
        stats = await store.read_stats()
        assert stats["updates_dropped"] == 50 and stats["updates_stored"] == 100
    finally:
        await store.close()


async def test_link_state_stats_and_meta(store: RedisStore, client: aioredis.Redis) -> None:
    await store.set_link_state("relay", "connecting")
    await store.set_link_state("relay", "up", since=100.0)
    await store.set_link_state("relay", "down", "connection reset")
    await store.set_link_state("relay", "up", since=200.0)
    await store.incr_stat("frames", 3)
    await store.write_meta(extra_field="x")
    await store.flush(5)
    link = await store.link("relay")
    assert link is not None
    assert (link.state, link.since, link.reason, link.reconnects) == ("up", 200.0, "", 1)
    assert (await store.read_stats())["frames"] == 3
    meta = await client.hgetall(K.meta)
    assert meta["config"] == "tests/store/conftest.py" and meta["extra_field"] == "x"
    assert {"started_at", "version", "pid"} <= set(meta)


async def test_pipelined_writes_land_completely(store: RedisStore, client: aioredis.Redis) -> None:
    n = 20_000
    names = ["feeder.p", "feeder.breaker.position", "x.a", "x.b"]
    for i in range(n):
        store.put(PointUpdate(names[i % 4], i))
    await store.flush(30)
    assert await client.xlen(K.changes) == n
    for name in names:
        assert await client.xlen(K.hist(name)) == n // 4
    stats = await store.read_stats()
    assert stats["updates_stored"] == n
    assert stats.get("updates_dropped", 0) == 0 and stats.get("write_errors", 0) == 0


async def test_counters_are_written_once(store: RedisStore, client: aioredis.Redis) -> None:
    await store.incr_stat("frames", 2)
    await store.incr_stat("updates_stored", 5)  # a name the writer also counts
    await store.flush(5)
    for i in range(3):  # later batches must not repeat the counts
        store.put(PointUpdate("feeder.p", float(i)))
        await store.flush(5)
    stats = await store.read_stats()
    assert stats["frames"] == 2 and stats["updates_stored"] == 5 + 3


async def test_store_takes_a_client_that_does_not_decode(
    lab: LabConfig, redis_server: RedisServer
) -> None:
    """Dependency injection: whatever client the caller configured, bytes replies included."""
    raw = aioredis.Redis.from_url(redis_server.client_url())  # decode_responses=False
    try:
        async with RedisStore(lab, raw) as store:
            store.put(PointUpdate("feeder.breaker.position", DoublePoint.ON))
            await store.set_link_state("relay", "up")
            await store.flush(5)
            latest = await store.latest("feeder.breaker.position")
            assert latest is not None and latest.value == 2 and latest.text == "on"
            assert [e.value for e in await store.history("feeder.breaker.position")] == [2]
            assert set(await store.latest_all()) == {"feeder.breaker.position"}
            link = await store.link("relay")
            assert link is not None and link.state == "up"
        assert await raw.ping()  # not ours: the store leaves it open
    finally:
        await raw.aclose()


async def test_a_refused_command_fails_alone_and_is_counted(
    store: RedisStore, client: aioredis.Redis
) -> None:
    """One point's history key holds the wrong type: inside the batch's MULTI/EXEC only that
    command fails (Redis runs the rest of a transaction), the others land and the error is
    counted."""
    await client.set(K.hist("feeder.p"), "not a stream")
    store.put(PointUpdate("feeder.p", 1.0))
    store.put(PointUpdate("x.other", 2.0))
    await store.flush(5)
    assert await client.get(K.hist("feeder.p")) == "not a stream"
    assert [f["point"] for _, f in await client.xrange(K.changes)] == ["feeder.p", "x.other"]
    assert await client.xlen(K.hist("x.other")) == 1
    assert (await store.read_stats())["write_errors"] == 1


def _stream(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_reply_scanner_unwraps_exec() -> None:
    ok_queued = b"+OK\r\n+QUEUED\r\n+QUEUED\r\n"
    results, clean = await _read_replies(
        _stream(ok_queued + b"*2\r\n$3\r\n1-0\r\n-WRONGTYPE bad\r\n"), 5, unwrap_at=3
    )
    assert clean and results[:4] == [None, None, None, None]
    assert isinstance(results[4], ResponseError) and "WRONGTYPE" in str(results[4])


async def test_reply_scanner_execabort_fails_every_command() -> None:
    data = b"+OK\r\n-ERR wrong number of arguments\r\n+QUEUED\r\n-EXECABORT discarded\r\n"
    results, clean = await _read_replies(_stream(data), 5, unwrap_at=3)
    assert clean and results[0] is None and isinstance(results[1], ResponseError)
    assert [str(r) for r in results[3:]] == ["EXECABORT discarded"] * 2


async def test_reply_scanner_rejects_a_short_exec() -> None:
    with pytest.raises(_BadReply):
        await _read_replies(_stream(b"+OK\r\n+QUEUED\r\n+QUEUED\r\n*1\r\n:1\r\n"), 5, unwrap_at=3)


async def test_a_backlog_is_written_in_catch_up_batches(
    redis_server: RedisServer, make_lab: Callable[..., LabConfig], client: aioredis.Redis
) -> None:
    """More than two batches waiting: up to 4 x batch_max per transaction, all of it stored."""
    async with RedisStore(make_lab(batch_max=100), url=redis_server.client_url()) as store:
        sizes: list[int] = []
        write = store._write_batch

        async def recording(batch: list[PointUpdate]) -> None:
            sizes.append(len(batch))
            await write(batch)

        store._write_batch = recording  # type: ignore[method-assign]
        for i in range(2_000):
            store.put(PointUpdate("feeder.p", float(i)))
        await store.flush(10)
    assert sum(sizes) == 2_000 and sizes[0] == 400  # (the last ones may be smaller)
    assert await client.xlen(K.changes) == 2_000


async def test_non_finite_values_are_invalid_and_do_not_freeze_history(store: RedisStore) -> None:
    # Seen: a NaN stored as good, and the next 10 values suppressed (abs(x - nan) >= deadband
    # is never true). Now NaN/Inf are invalid and never compared for deadband.
    name = "feeder.voltage.l1"  # deadband 0.5 V
    values = (230.0, float("nan"), float("nan"), 231.0, 232.0, float("inf"), 233.0, 234.0)
    for v in values:
        store.put(PointUpdate(name, v))
    await store.flush(5)
    hist = await store.history(name)
    got = [(e.value, e.quality) for e in hist]
    assert [v for v, _ in got if v == v] == [230.0, 231.0, 232.0, float("inf"), 233.0, 234.0]
    nan_entries = [q for v, q in got if v != v]
    assert nan_entries == [Quality.INVALID]  # the second NaN: same (no) value, same quality
    assert dict((v, q) for v, q in got if v == v)[float("inf")] == Quality.INVALID
    assert all(q == Quality.GOOD for v, q in got if v == v and v != float("inf"))
    latest = await store.latest(name)
    assert latest is not None and latest.value == 234.0 and latest.quality == Quality.GOOD
