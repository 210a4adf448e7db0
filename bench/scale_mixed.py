"""Scale scenario with mixed protocols: IEC 104, IEC 61850 MMS and DLMS/COSEM devices on one gateway.

Run:  python bench/scale_mixed.py --devices 10 50 100 --rate 5000 --seconds 10 [--out bench-out/scale-mixed]

Each size is split by ``--mix`` (default 60 % IEC 104 stations, 20 % IEC 61850 IEDs, 20 %
DLMS meters: 10 -> 6/2/2, 100 -> 60/20/20). The simulators run outside the gateway's
process, as a lab's devices do: the IEC 104 stations in one ``iedsim iec104 --stations N``
process (as in ``bench/scale_ingest.py``), the 61850 IEDs and DLMS meters in one "fleet"
process (this script with ``--serve-fleet``), each IED/meter on its own port. The gateway
(this process) runs one adapter per device, the pump and ``RedisStore`` into a local
redis-server (AOF, ``appendfsync always``):

* IEC 104: every station sends its 12 measured points cyclically; ``--rate`` is their total;
* IEC 61850: every IED steps its feeder model every ``--mms-period`` s, writing all its
  served values with noise, so each measured value in the buffered report's data set changes
  and is reported (data-change trigger);
* DLMS: the gateway polls every meter's registers every ``--dlms-poll`` s (HLS-GMAC, WRAPPER).

After the window the flows stop (the 104 stations stall, the IEDs freeze their models; the
gateway's DLMS polls go on but are not counted), everything in flight lands and the totals
are checked: 104 objects written = 104 values received; every value the gateway received is
in the change feed; no drop counted anywhere (simulator, adapters, store buffer) ->
``lossless``. For 61850 the simulator's count of written values is reported next to the
received ones for information only: values outside the report data sets (the breaker,
set-point read-backs) are written too but only read at GI, so the two are not expected to be
equal.

Per protocol it reports received and stored values/s during the window and the gateway's
added latency ``rcv -> st`` (adapter receive to Redis write) from the change feed; for
61850 also ``src -> st`` (the simulator's time stamp ``t``, set when it writes the value, to
the Redis write: a transfer time, both ends on this host's clock).
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_ingest import copy_points, free_range, summary

from gateway.config import LabConfig, load_config
from gateway.iedsim.launch import SimProcess
from gateway.runtime import Gateway
from gateway.services import RedisServer, free_port
from gateway.store import RedisStore, StoreKeys

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
TEMPLATES = {"iec104": "ref615", "iec61850": "ref615_mms", "dlms": "meter1"}
PREFIX = {"iec104": "st", "iec61850": "ied", "dlms": "mtr"}


async def _clear(client: aioredis.Redis) -> None:
    """What FLUSHDB did, for a user that may not run it (docs/security.md): unlink every key."""
    async with client.pipeline(transaction=False) as pipe:
        async for key in client.scan_iter(count=1000):
            pipe.unlink(key)
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()


def split(devices: int, mix: tuple[float, float, float]) -> dict[str, int]:
    """Devices per protocol; every protocol keeps at least one device."""
    n61850 = max(1, round(devices * mix[1]))
    ndlms = max(1, round(devices * mix[2]))
    return {"iec104": max(1, devices - n61850 - ndlms), "iec61850": n61850, "dlms": ndlms}


def mixed_config(
    counts: dict[str, int], ports: dict[str, int], rate: float, mms_period: float, dlms_poll: float,
    capacity: int, tmp: Path, engine: str = "c104",
) -> tuple[LabConfig, Path]:
    """Copies of the MultiPower simulator devices (distinct names, ports from ``ports``)."""
    raw = yaml.safe_load(SIM_CONFIG.read_text())
    parent = yaml.safe_load((SIM_CONFIG.parent / raw["extends"]).read_text())
    templates: dict[str, dict[str, Any]] = {}
    for proto, tpl in TEMPLATES.items():
        child = raw["devices"][tpl]
        merged = {**parent["devices"][tpl], **{k: v for k, v in child.items() if k not in ("timers", "dlms")}}
        merged["dlms"] = {**parent["devices"][tpl].get("dlms", {}), **child.get("dlms", {})}
        if not merged["dlms"]:
            del merged["dlms"]
        merged["gi_period_s"] = 0
        templates[proto] = merged
    per_station = sum(
        1 for p in parent["points"]
        if p.get("device") == TEMPLATES["iec104"] and p.get("direction", "monitor") == "monitor"
        and str(p["address"].get("type", "")).startswith("M_ME")
    )  # fmt: skip
    cyclic_s = per_station * counts["iec104"] / rate
    templates["iec104"]["simulator"] = {
        **templates["iec104"].get("simulator", {}), "period_s": 1.0, "noise": 0.0, "cyclic_period_s": cyclic_s,
    }  # fmt: skip
    templates["iec104"]["iec104_engine"] = engine
    templates["iec61850"]["simulator"] = {
        **templates["iec61850"].get("simulator", {}), "period_s": mms_period, "noise": 0.01,
    }  # fmt: skip
    templates["dlms"]["dlms"] = {**templates["dlms"]["dlms"], "poll_period_s": dlms_poll, "clock_period_s": 60}
    templates["dlms"]["dlms"].pop("load_profile", None)
    devices: dict[str, Any] = {}
    points: list[dict[str, Any]] = []
    for proto, n in counts.items():
        tpl = TEMPLATES[proto]
        for i in range(n):
            name = f"{PREFIX[proto]}{i:03d}"
            devices[name] = {**templates[proto], "host": "127.0.0.1", "port": ports[proto] + i}
            points += copy_points(parent["points"], tpl, name)
    doc = {
        "lab": {"name": f"mixed{sum(counts.values())}"},
        "devices": devices,
        "points": points,
        "redis": {"history_maxlen": 1000, "changes_maxlen": capacity, "buffer_max": 400_000},
    }
    path = tmp / f"mixed{sum(counts.values())}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path), path


# -- the fleet process: every 61850 IED and DLMS meter of a config ------------------------


async def serve_fleet(config_file: str) -> int:
    """Serve the config's 61850 and DLMS devices; stdin lines ``stats``/``freeze``, EOF ends."""
    from gateway.iedsim.dlms import DlmsMeter
    from gateway.iedsim.iec61850 import Iec61850Server

    cfg = load_config(config_file)
    ieds: list[Iec61850Server] = []
    meters: list[DlmsMeter] = []
    try:
        for name, dev in cfg.devices.items():
            if dev.protocol == "iec61850":
                ieds.append(Iec61850Server(cfg, name, host="127.0.0.1", port=dev.port))
                await ieds[-1].start()
            elif dev.protocol == "dlms":
                meters.append(DlmsMeter(cfg, name, host="127.0.0.1", port=dev.port))
                await meters[-1].start()
        print(f"fleet ready: {len(ieds)} iec61850, {len(meters)} dlms", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "freeze":
                for ied in ieds:
                    await ied.freeze()
            written = {ied.name: ied.values_written for ied in ieds}
            print(json.dumps({"iec61850_written": written, "dlms": {m.name: m.stats() for m in meters}}), flush=True)
    finally:
        for ied in ieds:
            await ied.close()
        for meter in meters:
            await meter.close()
    return 0


class Fleet:
    """The fleet process, driven over its stdin/stdout."""

    def __init__(self, config_file: Path) -> None:
        self.args = [sys.executable, str(Path(__file__).resolve()), "--serve-fleet", str(config_file)]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout_s: float) -> str:
        self.proc = await asyncio.create_subprocess_exec(
            *self.args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )  # fmt: skip
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = (await self.proc.stdout.readline()).decode().strip()
        if not line.startswith("fleet ready"):
            raise RuntimeError(f"fleet did not start (exit {await self.proc.wait()})")
        return line

    async def ask(self, line: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(30):
            answer: dict[str, Any] = json.loads(await self.proc.stdout.readline())
        return answer

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            async with asyncio.timeout(20):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# -- one run --------------------------------------------------------------------------------


def proto_of(point: str) -> str:
    head = point.split(".", 1)[0]
    for proto, prefix in PREFIX.items():
        if head.startswith(prefix) and head[len(prefix):].isdigit():
            return proto
    return "other"


async def feed_scan(url: str, cfg: LabConfig, t0: float, t1: float) -> dict[str, Any]:
    """Count change-feed entries per protocol (all, and stored inside the window) and sample
    latencies of window entries (every entry up to 20,000 per protocol, evenly thinned)."""
    keys = StoreKeys.for_lab(cfg)
    r = aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=60)
    total: Counter[str] = Counter()
    in_window: Counter[str] = Counter()
    added: dict[str, list[float]] = {p: [] for p in PREFIX}
    transfer: list[float] = []
    try:
        start = "-"
        while True:
            raw = await r.xrange(keys.changes, min=start, max="+", count=10_000)
            if not raw:
                break
            for _sid, f in raw:
                assert f is not None
                proto = proto_of(f["point"])
                total[proto] += 1
                st = float(f["st"])
                if t0 <= st <= t1 and proto in added:
                    in_window[proto] += 1
                    added[proto].append((st - float(f["rcv"])) * 1000)
                    if proto == "iec61850" and f.get("src"):
                        transfer.append((st - float(f["src"])) * 1000)
            start = "(" + raw[-1][0]
    finally:
        await r.aclose()

    def thin(xs: list[float], n: int = 20_000) -> list[float]:
        return xs if len(xs) <= n else xs[:: len(xs) // n + 1]

    return {
        "total": dict(total),
        "in_window": dict(in_window),
        "added": {p: summary(thin(v)) for p, v in added.items()},
        "iec61850_src_to_stored": summary(thin(transfer)),
    }


async def one_run(
    devices: int, mix: tuple[float, float, float], rate: float, mms_period: float, dlms_poll: float,
    seconds: float, redis: RedisServer, tmp: Path, engine: str = "c104",
) -> dict[str, Any]:
    counts = split(devices, mix)
    flush = aioredis.Redis.from_url(redis.client_url())
    await _clear(flush)
    await flush.aclose()
    capacity = int((rate + 400 * devices) * (seconds + 30) * 1.5) + 100_000
    sim: SimProcess | None = None
    fleet: Fleet | None = None
    for attempt in range(5):  # ports taken between our check and the simulators' bind
        base = free_range(sum(counts.values()))
        ports = {"iec104": base, "iec61850": base + counts["iec104"],
                 "dlms": base + counts["iec104"] + counts["iec61850"]}  # fmt: skip
        cfg, path = mixed_config(counts, ports, rate, mms_period, dlms_poll, capacity, tmp, engine)
        sim = SimProcess(path, "st000", base, free_port(), stations=counts["iec104"])
        fleet = Fleet(path)
        try:
            await sim.start(60)
            await fleet.start(120)
            break
        except (RuntimeError, TimeoutError):
            await sim.stop()
            await fleet.stop()
            if attempt == 4:
                raise
    assert sim is not None and fleet is not None
    store = RedisStore.from_url(cfg, redis.client_url())
    gateway = Gateway(cfg, store, stats_period_s=3600)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await gateway.wait_connected(120)
        await asyncio.sleep(3.0)  # GI answers, report enabling, the first cycles and polls
        s104_0 = json.loads((await sim.control("stats"))[3:])
        f0 = await fleet.ask("stats")
        recv0 = gateway.counters["updates"]
        t0_wall, t0 = time.time(), time.monotonic()
        max_buffered = 0
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(0.1)
            max_buffered = max(max_buffered, store.buffered)
        s104_1 = json.loads((await sim.control("stats"))[3:])
        f1 = await fleet.ask("freeze")
        recv1 = gateway.counters["updates"]
        elapsed, t1_wall = time.monotonic() - t0, time.time()
        await sim.control("stall")
        await asyncio.sleep(2.0)
        drain0 = time.monotonic()
        await store.flush(120)
        drain_s = time.monotonic() - drain0
        final104 = json.loads((await sim.control("stats"))[3:])
        received_total = gateway.counters["updates"]
        stored_total = store.stats().get("updates_stored", 0)
        link_changes = gateway.counters["link_changes"]
        sim_drops = sum(r["drops"] for r in final104)
        gw_dropped = store.stats().get("updates_dropped", 0) + sum(
            a.stats().get("events_dropped", 0) for a in gateway.adapters.values()
        )
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await sim.stop()
        await fleet.stop()
    feed = await feed_scan(redis.client_url(), cfg, t0_wall, t1_wall)
    written104 = sum(r["objects_out"] for r in final104)
    sent104 = sum(r["objects_out"] for r in s104_1) - sum(r["objects_out"] for r in s104_0)
    mms_written = sum(f1["iec61850_written"].values()) - sum(f0["iec61850_written"].values())
    feed_total = sum(feed["total"].values())
    # stale marks (link drops) add stored values nobody received; the 104 count then exceeds
    # what its simulator wrote by exactly those
    lossless = (
        feed["total"].get("iec104", 0) >= written104
        and feed_total >= received_total
        and stored_total >= received_total
        and sim_drops == 0
        and gw_dropped == 0
    )
    per_proto = {
        proto: {
            "devices": counts[proto],
            "stored_per_s": round(feed["in_window"].get(proto, 0) / elapsed),
            "latency_rcv_to_stored": feed["added"][proto],
        }
        for proto in PREFIX
    }
    per_proto["iec104"]["sent_per_s"] = round(sent104 / elapsed)
    per_proto["iec104"]["written_total"] = written104
    per_proto["iec104"]["stored_total"] = feed["total"].get("iec104", 0)
    per_proto["iec61850"]["simulator_values_written_per_s"] = round(mms_written / elapsed)
    per_proto["iec61850"]["latency_src_to_stored"] = feed["iec61850_src_to_stored"]
    return {
        "devices": devices,
        "iec104_engine": engine,
        "protocols": counts,
        "points": len(cfg.points),
        "rate_offered_iec104": rate,
        "mms_period_s": mms_period,
        "dlms_poll_s": dlms_poll,
        "duration_s": round(elapsed, 2),
        "received_per_s": round((recv1 - recv0) / elapsed),
        "stored_per_s": round(sum(feed["in_window"].values()) / elapsed),
        "max_buffered": max_buffered,
        "drain_after_s": round(drain_s, 2),
        "received_total": received_total,
        "stored_total": stored_total,
        "change_feed_total": feed_total,
        "sim_drops": sim_drops,
        "gateway_dropped": gw_dropped,
        "link_changes": link_changes,
        "lossless": lossless,
        "per_protocol": per_proto,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| devices (104/61850/DLMS) | 104 offered/s | received/s | stored/s (104 / 61850 / DLMS) | max buffered "
        "| engine | lossless | rcv->st p50 / p99 ms (104; 61850; DLMS) | 61850 src->st p50 / p99 ms | link changes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in rows:
        c, pp = g["protocols"], g["per_protocol"]
        lat = "; ".join(
            f"{pp[p]['latency_rcv_to_stored']['median_ms']:.1f} / {pp[p]['latency_rcv_to_stored']['p99_ms']:.1f}"
            for p in PREFIX
        )
        src = pp["iec61850"]["latency_src_to_stored"]
        lines.append(
            f"| {g['devices']} ({c['iec104']}/{c['iec61850']}/{c['dlms']}) | {g['rate_offered_iec104']:,.0f} "
            f"| {g['received_per_s']:,} | {g['stored_per_s']:,} ({pp['iec104']['stored_per_s']:,} / "
            f"{pp['iec61850']['stored_per_s']:,} / {pp['dlms']['stored_per_s']:,}) | {g['max_buffered']:,} "
            f"| {g['iec104_engine']} | {'yes' if g['lossless'] else 'NO'} | {lat} "
            f"| {src['median_ms']:.1f} / {src['p99_ms']:.1f} "
            f"| {g['link_changes']} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything is timed
    mix = tuple(float(x) for x in args.mix.split(","))
    if len(mix) != 3:
        raise SystemExit("--mix takes three shares: iec104,iec61850,dlms")
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },
        "seconds": args.seconds,
        "fsync": args.fsync,
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="mgms-mixed-") as tmpdir:
        tmp = Path(tmpdir)
        redis = RedisServer(data_dir=tmp / "redis", appendfsync=args.fsync)
        redis.start()
        try:
            for devices in args.devices:
                counts = split(devices, mix)  # type: ignore[arg-type]
                print(f"{devices} devices {counts}, 104 at {args.rate:,.0f}/s for {args.seconds:g} s",
                      file=sys.stderr, flush=True)  # fmt: skip
                row = await one_run(devices, mix, args.rate, args.mms_period, args.dlms_poll,  # type: ignore[arg-type]
                                    args.seconds, redis, tmp, args.engine)  # fmt: skip
                print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                results["runs"].append(row)
        finally:
            redis.close()
    results["machine"]["load_after"] = os.getloadavg()
    (out / "scale_mixed.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--serve-fleet", metavar="CONFIG", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=int, nargs="+", default=[10, 50, 100])
    ap.add_argument("--mix", default="0.6,0.2,0.2", help="shares of iec104,iec61850,dlms devices (default 0.6,0.2,0.2)")
    ap.add_argument("--rate", type=float, default=5000.0, help="offered IEC 104 point updates/s, all stations")
    ap.add_argument("--mms-period", type=float, default=0.1, help="61850 model step period, s (default 0.1)")
    ap.add_argument("--dlms-poll", type=float, default=1.0, help="DLMS register poll period, s (default 1)")
    ap.add_argument("--seconds", type=float, default=10.0, help="measuring window per run")
    ap.add_argument("--engine", choices=("c104", "asyncio"), default="c104", help="the gateway's IEC 104 client")
    ap.add_argument("--fsync", choices=("always", "everysec", "no"), default="always")
    ap.add_argument("--out", default="bench-out/scale-mixed")
    args = ap.parse_args()
    if args.serve_fleet:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(serve_fleet(args.serve_fleet))
        return 0
    r = asyncio.run(main_async(args))
    (Path(args.out) / "scale_mixed.md").write_text(table(r["runs"]) + "\n")
    print(table(r["runs"]))
    return 0 if all(g["lossless"] for g in r["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
