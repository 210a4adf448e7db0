"""The store with ``probes`` off writes no hop fields and still does everything else; on, the
hops are there as ``mgms bench`` and docs/latency.md expect them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from gateway.config import LabConfig, ProbeSettings
from gateway.points import PointUpdate, Quality, UpdateCause
from gateway.services import RedisServer
from gateway.store import RedisStore, stream_entries
from gateway.watch import render

pytestmark = pytest.mark.timeout(30)

HOP_ENTRY_FIELDS = {"rcv", "st"}


@pytest.fixture(params=[False, True], ids=["probes-off", "probes-on"])
def probes(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
async def probed_store(lab: LabConfig, probes: bool, redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    cfg = lab.model_copy(update={"probes": ProbeSettings(enabled=probes)})
    s = RedisStore(cfg, url=redis_server.client_url())
    await s.start()
    try:
        yield s
    finally:
        await s.close()


async def test_values_history_and_change_feed_with_and_without_hops(
    probed_store: RedisStore, probes: bool, client: aioredis.Redis
) -> None:
    store = probed_store
    t0 = time.time()
    tail = await store.changes_tail()
    tagged = PointUpdate("feeder.voltage.l1", 230.5, Quality.GOOD, source_time=t0 - 0.01, cause=UpdateCause.SPONTANEOUS)
    store.put(tagged)
    store.put(PointUpdate("feeder.voltage.l1", 231.5, Quality.GOOD, cause=UpdateCause.PERIODIC))  # no device time tag
    store.put(PointUpdate("feeder.breaker.position", 2, Quality.GOOD, source_time=t0))
    await store.flush(5.0)
    assert store.stats().get("write_errors", 0) == 0  # the XADD argument counts match the entries

    h = await client.hgetall(store.keys.point("feeder.voltage.l1"))
    assert h["value"] == "231.5" and h["source_ts"] == "" and h["cause"] == "periodic"
    assert float(h["recv_ts"]) >= t0  # kept either way: mgms watch shows a value's age from it
    assert ("store_ts" in h) is probes

    v = await store.latest("feeder.voltage.l1")
    assert v is not None and v.value == 231.5 and v.quality == Quality.GOOD and v.unit == "V"
    assert (v.store_ts >= v.recv_ts) if probes else v.store_ts == 0.0

    hist = await store.history("feeder.voltage.l1")
    assert [e.value for e in hist] == [230.5, 231.5]
    assert hist[0].source_ts == pytest.approx(t0 - 0.01) and hist[1].source_ts is None  # data: always
    raw = stream_entries(await client.xrange(store.keys.hist("feeder.voltage.l1")))
    for _, fields in raw:
        assert set(fields) == {"v", "q", "src"} | (HOP_ENTRY_FIELDS if probes else set())
    for e in hist:
        if probes:
            assert t0 <= e.recv_ts <= e.store_ts
        else:
            assert e.recv_ts == e.store_ts == 0.0

    feed = await store.changes(tail, block_ms=100)
    assert [(e.point, e.value) for e in feed] == [
        ("feeder.voltage.l1", 230.5),
        ("feeder.voltage.l1", 231.5),
        ("feeder.breaker.position", 2),
    ]
    raw_feed = stream_entries(await client.xrange(store.keys.changes))
    assert all(set(f) == {"point", "v", "q", "src"} | (HOP_ENTRY_FIELDS if probes else set()) for _, f in raw_feed)

    # what `mgms watch` draws, read through the store API: values and ages, probes or not
    screen = render(store.config, await store.latest_all(), {"relay": "up"}, time.time())
    assert "231.500" in screen and "intermediate" not in screen
    line = next(x for x in screen.splitlines() if x.startswith("feeder.voltage.l1"))
    assert line.split()[-2].endswith("s") and line.split()[-2] != "-"


async def test_substituted_source_time_is_marked_with_and_without_hops(
    probed_store: RedisStore, probes: bool, client: aioredis.Redis
) -> None:
    """The ``src_from`` pair changes the XADD argument count: right with either prefix."""
    store = probed_store
    t0 = time.time()
    store.put(PointUpdate("feeder.voltage.l1", 230.0, Quality.GOOD, t0, t0, UpdateCause.INTERROGATED, True))
    store.put(PointUpdate("feeder.voltage.l1", 232.0, Quality.GOOD, source_time=t0 + 0.5))
    await store.flush(5.0)
    assert store.stats().get("write_errors", 0) == 0
    raw = stream_entries(await client.xrange(store.keys.hist("feeder.voltage.l1")))
    hops = HOP_ENTRY_FIELDS if probes else set()
    assert [set(f) for _, f in raw] == [{"v", "q", "src", "src_from"} | hops, {"v", "q", "src"} | hops]
    assert [e.time_substituted for e in await store.history("feeder.voltage.l1")] == [True, False]
    feed = stream_entries(await client.xrange(store.keys.changes))
    assert [f.get("src_from") for _, f in feed] == ["receive", None]


async def test_double_point_text_and_deadband_without_probes(lab: LabConfig, redis_server: RedisServer) -> None:
    cfg = lab.model_copy(update={"probes": ProbeSettings(enabled=False)})
    async with RedisStore(cfg, url=redis_server.client_url()) as store:
        store.put(PointUpdate("feeder.breaker.position", 1, Quality.GOOD))
        store.put(PointUpdate("feeder.voltage.l1", 230.0, Quality.GOOD))
        store.put(PointUpdate("feeder.voltage.l1", 230.2, Quality.GOOD))  # inside the 0.5 V deadband
        await store.flush(5.0)
        pos = await store.latest("feeder.breaker.position")
        assert pos is not None and pos.text == "off"
        assert [e.value for e in await store.history("feeder.voltage.l1")] == [230.0]
        assert (await store.latest("feeder.voltage.l1")) is not None
        assert store.stats()["deadband_suppressed"] == 1
