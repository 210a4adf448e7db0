"""Scale scenario, ingest side: many IEC 104 stations on one gateway, lossless updates/s.

Run:  python bench/scale_ingest.py --stations 10 50 100 --rate 20000 --seconds 10 [--engine asyncio] [--out DIR]

The simulator (``iedsim iec104 --stations N``) runs in its own process and serves N
stations on consecutive ports, each with the REF615 feeder's 12 measured points. Every
station sends all of them cyclically (COT periodic, packed into one ASDU) with the period
that makes the offered total ``--rate`` updates/s; the gateway (this process: one IEC 104
client per station on the engine ``--engine`` selects - c104 or the asyncio client - the
pump and ``RedisStore``) stores every one of them (deadband 0, so
nothing is suppressed) into a local ``redis-server`` (AOF, ``appendfsync always``).

For each size it reports:

* offered (objects the simulator wrote), received (gateway adapters) and stored (Redis)
  updates/s during the window, then stops the flow, lets everything land and compares the
  totals: objects written = values received = updates stored = entries in the change feed,
  and no drop counted anywhere -> ``lossless``;
* latency percentiles from the change feed entries written during the window:
  ``rcv -> st`` (c104 callback to the Redis write: what the gateway adds) and
  ``src -> st`` (the CP56Time2a time tag to the Redis write). Caution: in cyclic
  transmission the simulator tags each value with the time it last *changed* (as a relay
  does), not the time it was sent, so ``src -> st`` here is not a transfer time; it is kept
  in the JSON only. The transfer time simulator -> Redis is measured one value at a time by
  ``bench/iec104_bench.py``.

``--rate`` may be given several times (e.g. 10000 20000 30000): each size is run at each
rate, so the highest lossless rate per size can be read off the table. A run is lossless
when the totals match; "kept up" means the store did not fall behind during the window
(stored/s within 2 % of received/s) - a rate that is lossless only because the buffer
absorbed it for 10 s is not sustained.

``--profile DIR`` additionally samples the gateway process with py-spy (if on PATH or
given with ``--py-spy``) into collapsed stacks per run (``DIR/st<N>-r<rate>.txt``).
"""

import argparse
import asyncio
import gc
import importlib.metadata
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

from gateway.bench.stats import pct
from gateway.config import LabConfig, load_config
from gateway.iedsim.launch import SimProcess
from gateway.runtime import Gateway
from gateway.services import RedisServer, free_port
from gateway.store import RedisStore, StoreKeys

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615"


async def _clear(client: aioredis.Redis) -> None:
    """What FLUSHDB did, for a user that may not run it (docs/security.md): unlink every key."""
    async with client.pipeline(transaction=False) as pipe:
        async for key in client.scan_iter(count=1000):
            pipe.unlink(key)
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()


def _version(dist: str) -> str:
    """A package's version without importing it (the bench imports no protocol library)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) a process has used so far; 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 3) if values else float("nan"),
        "p95_ms": round(pct(values, 0.95), 3),
        "p99_ms": round(pct(values, 0.99), 3),
        "max_ms": round(max(values), 3) if values else float("nan"),
    }


def copy_points(points: list[dict[str, Any]], template: str, name: str) -> list[dict[str, Any]]:
    """The template device's points for its copy ``name``: prefixed names, deadband 0 (every
    value is stored, so the totals can be compared)."""
    out = []
    for p in points:
        if p.get("device") != template:
            continue
        q = {**p, "name": f"{name}.{p['name']}", "device": name, "deadband": 0}
        if "status_point" in q:
            q["status_point"] = f"{name}.{p['status_point']}"
        out.append(q)
    return out


def scale_config(
    stations: int,
    base_port: int,
    cyclic_s: float,
    capacity: int,
    tmp: Path,
    engine: str = "c104",
    batch_max: int | None = None,
) -> tuple[LabConfig, Path]:
    """``stations`` copies of the REF615 feeder (distinct point names, consecutive ports)."""
    raw = yaml.safe_load(SIM_CONFIG.read_text())
    parent = yaml.safe_load((SIM_CONFIG.parent / raw["extends"]).read_text())
    dev = {**parent["devices"][DEVICE], **{k: v for k, v in raw["devices"][DEVICE].items() if k != "timers"}}
    # the feeder itself barely moves (spontaneous changes are rare); the load is the cyclic
    # transmission, which the simulator packs 12 objects to an ASDU
    dev["simulator"] = {**dev.get("simulator", {}), "period_s": 1.0, "noise": 0.0, "cyclic_period_s": cyclic_s}
    dev["gi_period_s"] = 0
    dev["iec104_engine"] = engine
    devices = {}
    points = []
    for s in range(stations):
        name = f"st{s:03d}"
        devices[name] = {**dev, "host": "127.0.0.1", "port": base_port + s}
        points += copy_points(parent["points"], DEVICE, name)
    doc = {
        "lab": {"name": f"scale{stations}"},
        "devices": devices,
        "points": points,
        # the change feed must hold every update of the run so the check can count them
        "redis": {
            "history_maxlen": 1000,
            "changes_maxlen": capacity,
            "buffer_max": 400_000,
            **({"batch_max": batch_max} if batch_max is not None else {}),
        },
    }
    path = tmp / f"scale{stations}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path), path


def free_range(n: int, attempts: int = 50) -> int:
    """A base port with ``n`` consecutive free ports after it (others run benches here too)."""
    rng = random.Random()
    for _ in range(attempts):
        base = rng.randrange(20_000, 60_000 - n)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


def measured_per_station(cfg: LabConfig) -> int:
    first = next(iter(cfg.devices))
    return sum(1 for p in cfg.points_of(first) if p.direction.value == "monitor" and p.address.kind == "measured")


async def latency_samples(
    url: str, cfg: LabConfig, t0: float, t1: float, chunks: int = 20, per: int = 1000
) -> dict[str, Any]:
    """rcv->st and src->st of change-feed entries stored between t0 and t1 (wall clock):
    ``chunks`` runs of ``per`` consecutive entries spread evenly over the window."""
    keys = StoreKeys.for_lab(cfg)
    r = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=60)
    added: list[float] = []
    e2e: list[float] = []
    try:
        total = await r.xlen(keys.changes)
        for k in range(chunks):
            start = t0 + (t1 - t0) * k / chunks
            raw = await r.xrange(keys.changes, min=f"{int(start * 1000)}", max=f"{int(t1 * 1000)}", count=per)
            for _sid, f in raw or []:
                assert f is not None
                st = float(f["st"])
                added.append((st - float(f["rcv"])) * 1000)
                if f.get("src"):
                    e2e.append((st - float(f["src"])) * 1000)
    finally:
        await r.aclose()
    return {"feed_len": total, "added": summary(added), "src_to_stored": summary(e2e)}


class PySpy:
    """py-spy record on this process for the measuring window (optional)."""

    def __init__(self, exe: str | None, out: Path | None, tag: str) -> None:
        self.exe, self.out, self.tag = exe, out, tag
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, seconds: float) -> None:
        if self.exe is None or self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        pid = str(os.getpid())
        # collapsed stacks (one line per stack with its sample count): greppable, and
        # flamegraph.pl / speedscope turn them into a picture
        cmd = [self.exe, "record", "--pid", pid, "--threads", "--native", "--rate", "100"]
        cmd += ["--duration", str(max(1, int(seconds))), "--format", "raw"]
        cmd += ["--output", str(self.out / f"{self.tag}.txt")]
        self.procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def stop(self) -> None:
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(timeout=10)
        self.procs.clear()


async def one_run(
    stations: int,
    rate: float,
    seconds: float,
    redis: RedisServer,
    tmp: Path,
    spy: PySpy,
    engine: str,
    gc_threshold: int | None = None,
    batch_max: int | None = None,
) -> dict[str, Any]:
    probe, _ = scale_config(1, 20_000, 1.0, 1000, tmp)
    per_station = measured_per_station(probe)
    cyclic_s = per_station * stations / rate
    capacity = int(rate * (seconds + 20) * 1.5) + 100_000
    flush = aioredis.Redis.from_url(redis.client_url())
    await _clear(flush)
    await flush.aclose()
    for attempt in range(5):  # a port taken between our check and the simulator's bind
        base_port = free_range(stations)
        cfg, path = scale_config(stations, base_port, cyclic_s, capacity, tmp, engine, batch_max)
        sim = SimProcess(path, "st000", base_port, free_port(), stations=stations)
        try:
            await sim.start(60)
            break
        except RuntimeError:
            if attempt == 4:
                raise
    store = RedisStore.from_url(cfg, redis.client_url())
    gateway = Gateway(cfg, store, stats_period_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await gateway.wait_connected(60)
        await asyncio.sleep(2.0)  # GI answers, c104 start-up, the first cycles
        gc_before = gc.get_threshold()
        if gc_threshold is not None:  # an experiment on the gateway process, off by default
            gc.collect()
            gc.freeze()
            gc.set_threshold(gc_threshold, *gc_before[1:])
        stats0 = json.loads((await sim.control("stats"))[3:])
        recv0 = gateway.counters["updates"]
        stored0 = store.stats().get("updates_stored", 0)
        t0_wall, t0 = time.time(), time.monotonic()
        sim_pid = sim.proc.pid if sim.proc is not None else None
        redis_pid = redis._proc.pid if redis._proc is not None else None
        cpu0 = (time.process_time(), cpu_s(sim_pid), cpu_s(redis_pid))
        adapter0 = [a.stats() for a in gateway.adapters.values()]
        spy.start(seconds)
        max_buffered = 0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.1)
            max_buffered = max(max_buffered, store.buffered)
        stats1 = json.loads((await sim.control("stats"))[3:])
        recv1 = gateway.counters["updates"]
        stored1 = store.stats().get("updates_stored", 0)
        elapsed, t1_wall = time.monotonic() - t0, time.time()
        cpu1 = (time.process_time(), cpu_s(sim_pid), cpu_s(redis_pid))
        adapter1 = [a.stats() for a in gateway.adapters.values()]
        load = os.getloadavg()[0]
        # stop the flow, let everything in flight land, compare totals
        await sim.control("stall")
        await asyncio.sleep(1.0)
        drain0 = time.monotonic()
        await store.flush(120)
        drain_s = time.monotonic() - drain0
        await asyncio.to_thread(spy.stop)
        final = json.loads((await sim.control("stats"))[3:])
        written_total = sum(r["objects_out"] for r in final)
        received_total = gateway.counters["updates"]
        stored_total = store.stats().get("updates_stored", 0)
        link_changes = gateway.counters["link_changes"]
        sent = sum(r["objects_out"] for r in stats1) - sum(r["objects_out"] for r in stats0)
        sim_drops = sum(r["drops"] for r in final)
        gw_dropped = store.stats().get("updates_dropped", 0) + sum(
            a.stats().get("events_dropped", 0) for a in gateway.adapters.values()
        )
        lat = await latency_samples(redis.client_url(), cfg, t0_wall, t1_wall)
    finally:
        if gc_threshold is not None:
            gc.set_threshold(*gc_before)
            gc.unfreeze()
        stop.set()
        await asyncio.wait_for(task, 60)
        await sim.stop()
    received = recv1 - recv0
    reads = sum(a.get("reads", 0) for a in adapter1) - sum(a.get("reads", 0) for a in adapter0)
    frames = sum(a.get("frames_in", 0) for a in adapter1) - sum(a.get("frames_in", 0) for a in adapter0)
    names = ("gateway", "simulator", "redis")
    cpu = {k: round((b - a) / elapsed, 3) for k, a, b in zip(names, cpu0, cpu1, strict=True)}
    stored = stored1 - stored0
    # A link that drops (c104 under GIL pressure missing its timers) makes the gateway mark
    # that station's points stale: extra stored updates, not received ones. Lossless means
    # nothing received went missing and nothing was dropped.
    lossless = (
        written_total == received_total
        and stored_total >= received_total
        and lat["feed_len"] >= received_total
        and sim_drops == 0
        and gw_dropped == 0
    )
    return {
        "stations": stations,
        "engine": engine,
        "gc_threshold0": gc_threshold,
        "batch_max": cfg.redis.batch_max,
        "protocols": {"iec104": stations},
        "points": len(cfg.points),
        "rate_offered": rate,
        "cyclic_period_ms": round(cyclic_s * 1000, 3),
        "duration_s": round(elapsed, 2),
        "sent_per_s": round(sent / elapsed),
        "received_per_s": round(received / elapsed),
        "stored_per_s": round(stored / elapsed),
        "max_buffered": max_buffered,
        "drain_after_s": round(drain_s, 2),
        "objects_written_total": written_total,
        "received_total": received_total,
        "stored_total": stored_total,
        "change_feed_total": lat["feed_len"],
        "sim_drops": sim_drops,
        "gateway_dropped": gw_dropped,
        "stale_marks_stored": stored_total - received_total,
        "link_changes": link_changes,
        "lossless": lossless,
        "kept_up": lossless and stored >= 0.98 * received,
        "cpu_cores": cpu,
        "load_1min": round(load, 2),
        "frames_per_read": round(frames / reads, 2) if reads else None,
        "latency_rcv_to_stored": lat["added"],
        "latency_src_to_stored": lat["src_to_stored"],
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| engine | stations | offered/s | sent/s | received/s | stored/s | max buffered | lossless | kept up "
        "| rcv->st p50 / p95 / p99 ms | link changes | CPU gw / sim / redis | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in rows:
        a = g["latency_rcv_to_stored"]
        c = g["cpu_cores"]
        lines.append(
            f"| {g.get('engine', 'c104')} | {g['stations']} | {g['rate_offered']:,.0f} | {g['sent_per_s']:,} | "
            f"{g['received_per_s']:,} | "
            f"{g['stored_per_s']:,} | {g['max_buffered']:,} | {'yes' if g['lossless'] else 'NO'} | "
            f"{'yes' if g['kept_up'] else 'no'} | {a['median_ms']:.1f} / {a['p95_ms']:.1f} / {a['p99_ms']:.1f} | "
            f"{g['link_changes']} | {c['gateway']:.2f} / {c['simulator']:.2f} / {c['redis']:.2f} | {g['load_1min']} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything is timed
    spy_exe = args.py_spy or shutil.which("py-spy")
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "c104": _version("c104"),
            "load_before": os.getloadavg(),
        },
        "seconds": args.seconds,
        "fsync": args.fsync,
        "engine": args.engine,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="mgms-scale-") as tmpdir:
        tmp = Path(tmpdir)
        redis = RedisServer(data_dir=tmp / "redis", appendfsync=args.fsync)
        redis.start()
        try:
            for stations in args.stations:
                for rate in args.rate:
                    what = f"{stations} stations at {rate:,.0f}/s for {args.seconds:g} s ({args.engine})"
                    print(what, file=sys.stderr, flush=True)
                    spy = PySpy(spy_exe if args.profile else None, Path(args.profile) if args.profile else None,
                                f"st{stations}-r{int(rate)}")  # fmt: skip
                    row = await one_run(
                        stations, rate, args.seconds, redis, tmp, spy, args.engine, args.gc_threshold, args.batch_max
                    )
                    print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                    results["runs"].append(row)
        finally:
            redis.close()
    (out / "scale_ingest.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stations", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--rate", type=float, nargs="+", default=[20_000.0], help="offered point updates/s (total)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window per run")
    ap.add_argument("--fsync", choices=("always", "everysec", "no"), default="always")
    ap.add_argument("--engine", choices=("c104", "asyncio"), default="c104", help="IEC 104 client engine")
    ap.add_argument("--batch-max", type=int, metavar="N", help="experiment: redis.batch_max of the store")
    ap.add_argument(
        "--gc-threshold",
        type=int,
        metavar="N",
        help="experiment: gc.freeze() and generation-0 threshold N in the gateway process during the run",
    )
    ap.add_argument("--out", default="bench-out/scale")
    ap.add_argument("--profile", metavar="DIR", help="py-spy flame graph of the gateway per run into DIR")
    ap.add_argument("--py-spy", help="path of the py-spy executable (default: on PATH)")
    args = ap.parse_args()
    r = asyncio.run(main_async(args))
    md = table(r["runs"])
    (Path(args.out) / "scale_ingest.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
