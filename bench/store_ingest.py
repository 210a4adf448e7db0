"""Sustained ingest rate of RedisStore into a local redis-server, with a no-loss check.

Feeds N updates through ``RedisStore.put`` as fast as the writer takes them (the producer
waits for a flush whenever the buffer is half full, so nothing is dropped), then
counts what is in Redis: every update must be in the change feed and in its point's history.

    python bench/store_ingest.py                  # 200k updates, embedded redis, fsync always
    python bench/store_ingest.py --fsync everysec --updates 500000
    python bench/store_ingest.py --url redis://127.0.0.1:6379/15   # an existing server (flushes db!)
    python bench/store_ingest.py --probes off     # the lab's ``probes: false``: no rcv/st/store_ts

Besides the rate it prints the CPU time of this process per update (the writer's work is the
event loop's, which the field side shares) and the bytes Redis appended to its AOF and holds
in memory, so ``--probes on`` and ``--probes off`` runs can be compared for what the hop
fields cost. On a shared machine run them alternately, several times.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import redis.asyncio as aioredis

from gateway.config import Device, Iec104Address, LabConfig, LabInfo, Point, ProbeSettings, RedisSettings
from gateway.points import PointUpdate, Quality
from gateway.services import RedisServer
from gateway.store import RedisStore, StoreKeys


async def _clear(client: aioredis.Redis) -> None:
    """What FLUSHDB did, for a user that may not run it (docs/security.md): unlink every key."""
    async with client.pipeline(transaction=False) as pipe:
        async for key in client.scan_iter(count=1000):
            pipe.unlink(key)
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()


def bench_lab(points: int, updates: int, batch: int, buffer: int, probes: bool = True) -> LabConfig:
    dev = Device(name="relay", protocol="iec104", host="127.0.0.1", port=2404)
    pts = tuple(
        Point(
            name=f"bench.p{i}",
            device="relay",
            quantity="active_power",
            unit="kW",
            address=Iec104Address(ioa=1000 + i, type="M_ME_TF_1"),
        )
        for i in range(points)
    )
    return LabConfig(
        lab=LabInfo(name="bench"),
        devices={"relay": dev},
        points=pts,
        # caps large enough that the check below can count every single update
        redis=RedisSettings(
            history_maxlen=updates,
            changes_maxlen=updates,
            buffer_max=buffer,
            batch_max=batch,
        ),
        probes=ProbeSettings(enabled=probes),
    )


async def _redis_bytes(check: aioredis.Redis) -> tuple[int, int]:
    """AOF size (0 without AOF) and used memory, as Redis reports them."""
    info = await check.info()
    return int(info.get("aof_current_size", 0) or 0), int(info["used_memory"])


async def run(
    url: str, updates: int, points: int, batch: int, buffer: int, probes: bool = True, *, own_server: bool = False
) -> float:
    lab = bench_lab(points, updates, batch, buffer, probes)
    keys = StoreKeys.for_lab(lab)
    check = aioredis.Redis.from_url(url, decode_responses=True)
    await _clear(check)
    aof0, mem0 = await _redis_bytes(check)
    names = [p.name for p in lab.points]
    high_water = buffer // 2
    async with RedisStore(lab, url=url) as store:
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        src = time.time()
        for i in range(updates):
            store.put(PointUpdate(names[i % points], i * 0.001, Quality.GOOD, src))
            if store.buffered >= high_water:
                await store.flush(60)  # the bench's own back-pressure: never drop
        await store.flush(120)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stats = store.stats()
    try:
        changes = await check.xlen(keys.changes)
        hist = sum([await check.xlen(keys.hist(n)) for n in names])
        stored = int(await check.hget(keys.stats, "updates_stored") or 0)
        aof1, mem1 = await _redis_bytes(check)
    finally:
        await check.aclose()
    rate = updates / elapsed
    ok = changes == hist == stored == updates and stats.get("updates_dropped", 0) == 0
    print(
        f"probes {'on' if probes else 'off'}: {updates} updates over {points} points, batch {batch}: "
        f"{elapsed:.2f} s, {rate:,.0f} updates/s, cpu {cpu * 1e6 / updates:.2f} us/update; "
        f"AOF +{(aof1 - aof0) / updates:.1f} B/update, memory +{(mem1 - mem0) / updates:.1f} B/update; "
        f"in Redis: changes {changes}, history {hist}, stored {stored}, "
        f"dropped {stats.get('updates_dropped', 0)} -> {'OK' if ok else 'LOSS'}"
    )
    if not ok:
        raise SystemExit(1)
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=200_000)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2_000, help="batch_max (updates per round trip)")
    ap.add_argument("--buffer", type=int, default=100_000, help="buffer_max")
    ap.add_argument("--fsync", choices=("always", "everysec", "no"), default="always")
    ap.add_argument("--url", help="use this Redis instead of an embedded one (its db is FLUSHED)")
    ap.add_argument("--probes", choices=("on", "off"), default="on", help="the lab's probes setting")
    args = ap.parse_args(argv)
    probes = args.probes == "on"
    if args.url:
        asyncio.run(run(args.url, args.updates, args.points, args.batch, args.buffer, probes))
        return 0
    # an AOF rewrite mid-run would shrink the file and hide what the run appended
    with RedisServer(appendfsync=args.fsync, extra_config={"auto-aof-rewrite-percentage": "0"}) as server:
        print(f"embedded redis-server {server.url}, AOF appendfsync {args.fsync}", file=sys.stderr)
        url = server.client_url()
        asyncio.run(run(url, args.updates, args.points, args.batch, args.buffer, probes, own_server=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
