"""Memory of the gateway process over many connect/read/close cycles of one adapter.

Run:  python bench/adapter_memory.py --device ref615 --cycles 1000
      (devices of lab_configs/multipower-sim.yaml: ref615 = IEC 104, ref615_mms = IEC 61850,
       meter1 = DLMS/COSEM)

The simulator runs as its own process (``iedsim``), so only the adapter's memory is in the
figure. Each cycle builds a new adapter, waits for its link, waits for one value, and
closes it. RSS is read from /proc after a warm-up and at the end; a leak of native objects
(c104 clients, libiec61850 connections, gurux buffers) shows as steady growth.
"""

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from gateway.config import load_config
from gateway.points import PointUpdate
from gateway.protocols import create_adapter
from gateway.services import free_port

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def start_sim(protocol: str, device: str, port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", protocol,
        "--config", str(SIM_CONFIG), "--device", device, "--host", "127.0.0.1", "--port", str(port),
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        while b"listening" not in await proc.stdout.readline():
            if proc.returncode is not None:
                raise RuntimeError(f"{protocol} simulator exited")
    return proc


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    cfg = load_config(SIM_CONFIG)
    dev = cfg.devices[args.device]
    port = free_port()
    sim = await start_sim(dev.protocol, args.device, port)
    dev = cfg.with_device(args.device, port=port).devices[args.device]
    points = cfg.points_of(args.device)
    samples: list[tuple[int, int]] = []
    t0 = time.monotonic()
    try:
        for i in range(args.cycles):
            adapter = create_adapter(dev, points)
            await adapter.start()
            await adapter.wait_connected(10)
            async with asyncio.timeout(10):
                async for ev in adapter.events():
                    if isinstance(ev, PointUpdate):
                        break
            await adapter.close()
            if i + 1 == args.warmup or (i + 1) % max(1, args.cycles // 10) == 0:
                samples.append((i + 1, rss_kib()))
                print(f"  {i + 1}/{args.cycles} cycles, RSS {samples[-1][1] / 1024:.1f} MiB", file=sys.stderr)
    finally:
        sim.terminate()
        await sim.wait()
    base = next(kib for n, kib in samples if n >= args.warmup)
    return {
        "device": args.device,
        "protocol": dev.protocol,
        "cycles": args.cycles,
        "seconds": round(time.monotonic() - t0, 1),
        "rss_after_warmup_mib": round(base / 1024, 1),
        "rss_end_mib": round(samples[-1][1] / 1024, 1),
        "growth_kib_per_100_cycles": round((samples[-1][1] - base) / max(1, args.cycles - args.warmup) * 100, 1),
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="ref615")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
