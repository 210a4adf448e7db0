"""What the write-ahead intent costs a command (docs/latency.md): its HSET (fsync'd, before the
send) and the two commands it adds to the outcome's MULTI (SET of P:cmd:done:{id}, HDEL of the
intent), against a redis-server with ``appendfsync always`` as the gateway runs it.

Run:  python bench/intent_cost.py [--n 2000]

Interleaved (one of each per round) so a busy machine shifts both alike; prints medians and p99
in ms. The breaker route's end-to-end figure moves by the HSET plus the MULTI difference.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config import load_config
from gateway.points import now
from gateway.services import RedisServer
from gateway.store import CommandIntent, CommandRecord, CommandResult, RedisStore

SIM_CONFIG = Path(__file__).resolve().parents[1] / "lab_configs" / "multipower-sim.yaml"


def q(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(p * len(xs)))]


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as d, RedisServer(data_dir=Path(d)) as redis:
        store = RedisStore.from_url(load_config(SIM_CONFIG), redis.client_url())
        hset: list[float] = []
        multi_old: list[float] = []
        multi_new: list[float] = []
        k = store.keys
        for i in range(n):
            rid = f"bench-{i}"
            intent = CommandIntent(rid, "feeder.breaker.command", "1", "bench", "feeder.breaker.position", "2", 0)
            t0 = time.perf_counter()
            await store.write_intent(intent)
            hset.append((time.perf_counter() - t0) * 1e3)
            rec = CommandRecord(rid, "feeder.breaker.command", "1", "bench", CommandResult.CONFIRMED, sent_ts=now())
            doc = rec.to_json()
            for with_intent, out in ((False, multi_old), (True, multi_new)):
                pipe = store.redis.pipeline(transaction=True)
                pipe.xadd(k.cmd_log, rec.to_fields())  # type: ignore[arg-type]
                pipe.rpush(k.cmd_reply(rid), doc)
                pipe.expire(k.cmd_reply(rid), 300)
                if with_intent:
                    pipe.set(k.cmd_done(rid), doc, ex=86_400)
                    pipe.hdel(k.cmd_intents, rid)
                t0 = time.perf_counter()
                await pipe.execute()
                out.append((time.perf_counter() - t0) * 1e3)
        await store.aclose()
    rows = (("intent HSET", hset), ("outcome MULTI before", multi_old), ("outcome MULTI with intent", multi_new))
    for name, xs in rows:
        print(f"{name:28} median {statistics.median(xs):.3f} ms  p99 {q(xs, 0.99):.3f} ms  (n={len(xs)})")
    extra = statistics.median(hset) + statistics.median(multi_new) - statistics.median(multi_old)
    print(f"added per command (medians): {extra:.3f} ms")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000)
    asyncio.run(main(ap.parse_args().n))
