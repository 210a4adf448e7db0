"""IEC 61850 benchmark: report from the simulator -> gateway -> Redis, next to the raw floor.

Run:  python bench/iec61850_bench.py [--samples 500] [--out bench-out/iec61850]

The REF615-class simulator runs in this process (it has no control channel yet), so the
gateway, the simulator and the bare client share one interpreter: the figures are an upper
bound of what separate processes would show.

1. value latency: the simulator sets ``mms.feeder.voltage.l1`` (server data model update ->
   report, bufTm 0); we take the time the gateway's store wrote it to Redis.
2. raw floor: the same change seen by a bare adapter (libiec61850 receive thread -> ctypes
   callback -> decoded PointUpdate ``receive_time``), no core and no Redis.
3. commands: breaker open/close through the gateway, direct-normal (XCBR1.Pos) and
   SBO-enhanced (CSWI1.Pos), travel 0: request -> operate accepted, -> confirmed in Redis.
4. set-point: the APC power limit (DWMX1.WMaxSpt, direct-normal): request -> operate
   accepted, -> confirmed by the ``mxVal`` read-back in Redis.

Writes ``report.json`` into --out and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.bench.stats import summarise
from gateway.config import LabConfig, load_config
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.points import PointUpdate
from gateway.protocols import create_adapter
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import RedisStore

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615_mms"
POINT = "mms.feeder.voltage.l1"


def summary(values: list[float]) -> dict[str, float]:
    """n, mean, median, p95, p99, max (ms; keys without the unit, as this report always had)."""
    return {k.removesuffix("_ms"): v for k, v in summarise(values).as_dict().items()}


def _config() -> LabConfig:
    cfg = load_config(SIM_CONFIG).only(DEVICE)
    sim = cfg.devices[DEVICE].simulator.model_dump()
    # Slow model steps so the forced value is the only traffic; instant breaker.
    return cfg.with_device(DEVICE, simulator={**sim, "period_s": 3600, "breaker_travel_s": 0.0})


async def raw_floor(cfg: LabConfig, sim: Iec61850Server, samples: int) -> list[float]:
    lab = cfg.with_device(DEVICE, port=sim.port)
    adapter = create_adapter(lab.devices[DEVICE], lab.points)
    seen: asyncio.Queue[PointUpdate] = asyncio.Queue()

    async def pump() -> None:
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate) and ev.point == POINT:
                seen.put_nowait(ev)

    task = asyncio.create_task(pump())
    await adapter.start()
    await adapter.wait_connected(10)
    await asyncio.sleep(0.3)
    while not seen.empty():
        seen.get_nowait()
    out: list[float] = []
    try:
        for i in range(samples):
            value = 230.0 + (i % 50) * 0.25 + 0.125
            t0 = time.time()
            sim.set_value(POINT, value)
            while True:
                ev = await asyncio.wait_for(seen.get(), 2)
                if ev.value is not None and abs(float(ev.value) - value) < 1e-3:
                    out.append((ev.receive_time - t0) * 1000)
                    break
            await asyncio.sleep(0.002)
    finally:
        await adapter.close()
        await task
    return out


async def through_gateway(cfg: LabConfig, sim: Iec61850Server, samples: int) -> dict[str, list[float]]:
    lab = cfg.with_device(DEVICE, port=sim.port)
    with tempfile.TemporaryDirectory(prefix="mgms-bench61850-") as tmp:
        redis = RedisServer(data_dir=Path(tmp) / "redis")
        await asyncio.to_thread(redis.start)
        store = RedisStore.from_url(lab, redis.client_url())
        reader = RedisStore.from_url(lab, redis.client_url())
        gw = Gateway(lab, store)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run(stop))
        res: dict[str, list[float]] = {"value": [], "direct_ack": [], "direct_confirmed": [], "sbo_ack": [],
                                       "sbo_confirmed": [], "setpoint_ack": [], "setpoint_confirmed": []}
        try:
            await gw.wait_connected(10)
            await asyncio.sleep(0.3)
            for i in range(samples):
                value = 240.0 + (i % 50) * 0.25 + 0.125
                t0 = time.time()
                sim.set_value(POINT, value)
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    v = await reader.latest(POINT)
                    if v is not None and v.value is not None and abs(float(v.value) - value) < 1e-3:
                        res["value"].append((v.store_ts - t0) * 1000)
                        break
                    await asyncio.sleep(0.0005)
            for point, key in (("mms.feeder.breaker.command", "direct"), ("mms.feeder.breaker.command_sbo", "sbo")):
                for i in range(max(10, samples // 10)):
                    out = await gw.execute(point, "open" if i % 2 == 0 else "close", requested_by="bench")
                    if out.result != "confirmed" or out.sent_ts is None:
                        continue
                    if out.ack_ts is not None:
                        res[f"{key}_ack"].append((out.ack_ts - out.sent_ts) * 1000)
                    if out.duration_ms is not None:
                        res[f"{key}_confirmed"].append(out.duration_ms)
            for i in range(max(10, samples // 10)):
                # APC DWMX1.WMaxSpt: operate, confirmed by the mxVal read-back in Redis
                out = await gw.execute("mms.feeder.p_limit.setpoint", 100.0 + (i % 50), requested_by="bench")
                if out.result != "confirmed" or out.sent_ts is None:
                    continue
                if out.ack_ts is not None:
                    res["setpoint_ack"].append((out.ack_ts - out.sent_ts) * 1000)
                if out.duration_ms is not None:
                    res["setpoint_confirmed"].append(out.duration_ms)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)
            await reader.aclose()
            await asyncio.to_thread(redis.close)
    return res


async def main_async(samples: int) -> dict[str, Any]:
    cfg = _config()
    sim = Iec61850Server(cfg, DEVICE, host="127.0.0.1", port=0, seed=1)
    await sim.start()
    try:
        floor = await raw_floor(cfg, sim, samples)
        gw = await through_gateway(cfg, sim, samples)
    finally:
        await sim.close()
    report = {
        "host": platform.node(),
        "python": platform.python_version(),
        "samples": samples,
        "raw_floor_ms": summary(floor),
        **{f"{k}_ms": summary(v) for k, v in gw.items()},
    }
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--out", type=Path, default=Path("bench-out/iec61850"))
    args = ap.parse_args()
    report = asyncio.run(main_async(args.samples))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print("| measurement | n | median ms | p95 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for key, val in report.items():
        if isinstance(val, dict):
            print(f"| {key.removesuffix('_ms')} | {val['n']} | {val['median']:.2f} | {val['p95']:.2f} |"
                  f" {val['p99']:.2f} | {val['max']:.2f} |")


if __name__ == "__main__":
    main()
