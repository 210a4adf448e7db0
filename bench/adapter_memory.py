"""Memory of the gateway process over many connect/read/close cycles, or link drops, of one adapter.

Run:  python bench/adapter_memory.py --device ref615 --cycles 1000
      python bench/adapter_memory.py --device ref615_mms --mode reconnect --cycles 1000
      (devices of lab_configs/multipower-sim.yaml: ref615 = IEC 104, ref615_mms = IEC 61850,
       meter1 = DLMS/COSEM)

The simulator runs as its own process (``iedsim``), so only the adapter's memory is in the
figure. Two modes:

* ``cycles``: each cycle builds a new adapter, waits for its link and one value, closes it.
* ``reconnect``: one adapter for the whole run; each cycle the simulator's control channel
  drops the link (``drop``: the 104 outstation closes its connections, the 61850 IED stops
  and serves again), the adapter sees it DOWN, reconnects by itself (backoff 10-20 ms),
  resynchronises (61850: browse, control objects, data set directories, RCB enable and GI;
  104: STARTDT and GI) and delivers a value again.

Why several memory figures and not RSS alone: RSS also counts memory glibc keeps after a
``free`` (fragmented arenas, per-thread arenas of libiec61850's threads), which is not a leak.
Each sample therefore has RSS, glibc's own count of bytes in use (``mallinfo2().uordblks``
plus mmapped blocks ``hblkhd``), the Python heap (``tracemalloc``, with ``--tracemalloc``),
and with ``--trim`` RSS again after ``malloc_trim(0)`` (memory glibc gives back). A real
leak of native objects (a libiec61850 connection, a c104 client, an MmsValue) grows the
in-use figure; allocator retention grows only RSS. Run with ``MALLOC_ARENA_MAX=2`` in the
environment to see how much per-thread arenas contribute.
"""

import argparse
import asyncio
import ctypes
import json
import sys
import time
import tracemalloc
from pathlib import Path

from gateway.config import Device, Point, load_config
from gateway.points import PointUpdate
from gateway.protocols import create_adapter
from gateway.protocols.base import LinkState, LinkStateChange
from gateway.services import free_port

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2
_libc.malloc_trim.argtypes = [ctypes.c_size_t]


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(n: int, trim: bool) -> dict[str, float]:
    """One line of figures (MiB) after ``n`` cycles."""
    mi = _libc.mallinfo2()
    out = {
        "cycles": n,
        "rss_mib": rss_kib() / 1024,
        "malloc_in_use_mib": (mi.uordblks + mi.hblkhd) / 2**20,
        "malloc_arena_mib": (mi.arena + mi.hblkhd) / 2**20,
    }
    if tracemalloc.is_tracing():
        out["python_heap_mib"] = tracemalloc.get_traced_memory()[0] / 2**20
    if trim:
        _libc.malloc_trim(0)
        out["rss_after_trim_mib"] = rss_kib() / 1024
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


async def start_sim(protocol: str, device: str, port: int, control_port: int | None) -> asyncio.subprocess.Process:
    """The device's simulator as a child process; with ``control_port`` (IEC 104 and 61850
    only: the DLMS meter has no control channel) its fault-injection channel too."""
    control = ["--control-port", str(control_port)] if control_port is not None else []
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-X", "faulthandler", "-m", "gateway.iedsim.cli", "--log-level", "WARNING", protocol,
        "--config", str(SIM_CONFIG), "--device", device, "--host", "127.0.0.1", "--port", str(port), *control,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready = b"control channel listening" if control else str(port).encode()
    async with asyncio.timeout(20):
        while ready not in await proc.stdout.readline():
            if proc.returncode is not None:
                raise RuntimeError(f"{protocol} simulator exited")
    return proc


async def connect_read_close(dev: Device, points: tuple[Point, ...]) -> None:
    adapter = create_adapter(dev, points)
    await adapter.start()
    await adapter.wait_connected(10)
    async with asyncio.timeout(10):
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate):
                break
    await adapter.close()


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    cfg = load_config(SIM_CONFIG)
    dev = cfg.devices[args.device]
    if args.mode == "reconnect" and dev.protocol == "dlms":
        raise SystemExit("--mode reconnect needs a simulator control channel: iec104 and iec61850 devices only")
    port = free_port()
    control_port = free_port() if dev.protocol != "dlms" else None
    sim = await start_sim(dev.protocol, args.device, port, control_port)
    dev = cfg.with_device(args.device, port=port, reconnect={"initial_s": 0.02, "max_s": 0.05}).devices[args.device]
    points = cfg.points_of(args.device)
    samples: list[dict[str, float]] = []
    t0 = time.monotonic()
    ctl_r, ctl_w = (
        await asyncio.open_connection("127.0.0.1", control_port) if control_port is not None else (None, None)
    )
    adapter = create_adapter(dev, points) if args.mode == "reconnect" else None
    if args.tracemalloc:
        tracemalloc.start()
    try:
        if adapter is not None:
            await adapter.start()
            await adapter.wait_connected(10)
            events = adapter.events()
        for i in range(args.cycles):
            if adapter is None:
                await connect_read_close(dev, points)
            else:
                assert ctl_w is not None and ctl_r is not None
                ctl_w.write(b"drop\n")
                await ctl_w.drain()
                answer = (await asyncio.wait_for(ctl_r.readline(), 10)).decode().strip()
                if not answer.startswith("ok"):
                    await asyncio.sleep(0.5)
                    raise RuntimeError(f"simulator refused drop after {i} cycles: {answer!r}"
                                       f" (simulator exit status {sim.returncode})")
                went_down = came_up = fresh = False
                async with asyncio.timeout(20):
                    async for ev in events:
                        if isinstance(ev, LinkStateChange):
                            went_down |= ev.state is LinkState.DOWN
                            came_up |= went_down and ev.state is LinkState.UP
                        elif went_down and isinstance(ev, PointUpdate) and ev.value is not None:
                            # the GI of the new association may be queued before the UP event
                            fresh = True
                        if came_up and fresh:
                            break  # resynchronised: link up again and a value from the new association
            if i + 1 == args.warmup or (i + 1) % max(1, args.cycles // 10) == 0:
                samples.append(sample(i + 1, args.trim))
                print(f"  {json.dumps(samples[-1])}", file=sys.stderr)
    finally:
        if adapter is not None:
            stats = adapter.stats()
            await adapter.close()
        else:
            stats = {}
        if ctl_w is not None:
            ctl_w.close()
        if sim.returncode is None:
            sim.terminate()
        await sim.wait()
    base = next(s for s in samples if s["cycles"] >= args.warmup)
    end = samples[-1]
    per = max(1, args.cycles - args.warmup)
    return {
        "device": args.device,
        "protocol": dev.protocol,
        "mode": args.mode,
        "cycles": args.cycles,
        "seconds": round(time.monotonic() - t0, 1),
        "rss_after_warmup_mib": base["rss_mib"],
        "rss_end_mib": end["rss_mib"],
        "rss_growth_kib_per_cycle": round((end["rss_mib"] - base["rss_mib"]) * 1024 / per, 2),
        "malloc_in_use_growth_kib_per_cycle": round(
            (end["malloc_in_use_mib"] - base["malloc_in_use_mib"]) * 1024 / per, 2),
        "adapter_stats": stats,
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="ref615")
    ap.add_argument("--mode", choices=("cycles", "reconnect"), default="cycles")
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--tracemalloc", action="store_true", help="also trace the Python heap (slower)")
    ap.add_argument("--trim", action="store_true", help="malloc_trim(0) at each sample and read RSS again")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
