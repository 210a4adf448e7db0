"""IEC 104 benchmark: simulator -> gateway -> Redis, next to the bare c104 floor, and ingest.

Run:  python bench/iec104_bench.py [--samples 1000] [--out bench-out/iec104]

Three measurements, each with the simulator in its own process (``iedsim``) and the gateway
plus a bare c104 client in this one:

1. value latency: the simulator forces ``feeder.voltage.l1`` (control channel ``set``, which
   answers with the wall-clock time the frame was written); we take the time the gateway's
   store wrote it to Redis (``st`` of the change-feed entry) and, in the same sample, the
   time a bare c104 client's ``on_receive`` callback saw it (the floor: lib60870 receive +
   one Python callback). One sample at a time.
2. command latency: breaker open/close through the gateway (SBO double command) with the
   simulated travel set to 0: command sent -> ACTCON, and -> confirmed status stored in
   Redis; floor: a bare c104 client sending the same SBO command, -> position callback.
3. sustained ingest: 1 and 10 simulator stations sending spontaneous values as fast as their
   period allows; updates/s stored in Redis, and a loss check (sent = received = stored).

Writes ``report.json`` and ``samples.csv`` into --out and prints a Markdown table. (No
``from __future__ import annotations``: c104 rejects string annotations on callbacks.)
"""

import argparse
import asyncio
import csv
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import c104
import yaml

from gateway.bench.stats import summarise
from gateway.config import LabConfig, load_config
from gateway.iedsim.launch import SimProcess
from gateway.runtime import Gateway
from gateway.services import RedisServer, free_port
from gateway.store import RedisStore

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615"


def summary(values: list[float]) -> dict[str, float]:
    """n, mean, median, p95, p99, max (ms) by the one definition in gateway.bench.stats."""
    return dict(summarise(values).as_dict())


class BareClient:
    """A bare c104 client on the same simulator: the floor of the stack without the gateway."""

    def __init__(self, port: int, cfg: LabConfig) -> None:
        self.client = c104.Client(tick_rate_ms=50, command_timeout_ms=5000)
        self.conn = self.client.add_connection(ip="127.0.0.1", port=port, init=c104.Init.INTERROGATION)
        station = self.conn.add_station(common_address=cfg.devices[DEVICE].common_address)
        self.seen: dict[int, tuple[float, Any]] = {}
        self.event = threading.Event()
        self.watch_ioa: int | None = None
        self.watch_value: Any = None
        for p in cfg.points_of(DEVICE):
            cp = station.add_point(io_address=p.address.ioa, type=getattr(c104.Type, p.address.type))
            if p.direction.value == "monitor":
                cp.on_receive(callable=self._on_receive)
        bp = cfg.point("feeder.breaker.command")
        self.breaker = station.get_point(io_address=bp.address.ioa)
        self.breaker.command_mode = c104.CommandMode.SELECT_AND_EXECUTE

    def _on_receive(
        self, point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        t = time.time()
        if point.io_address == self.watch_ioa:
            v = point.value
            v = v.value if hasattr(v, "value") and not isinstance(v, float) else v
            if (
                self.watch_value is None
                or v == self.watch_value
                or (isinstance(v, float) and abs(v - float(self.watch_value)) < 1e-3)
            ):
                self.seen[point.io_address] = (t, v)
                self.event.set()
        return c104.ResponseState.NONE

    def arm(self, ioa: int, value: Any) -> None:
        self.event.clear()
        self.watch_ioa, self.watch_value = ioa, value

    def start(self) -> None:
        self.client.start()
        deadline = time.monotonic() + 10
        while not self.conn.is_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        if self.conn.is_muted:
            self.conn.unmute()

    def stop(self) -> None:
        self.client.stop()


async def next_change(
    reader: RedisStore, last_id: str, point: str, value: float, timeout_s: float = 3.0
) -> tuple[str, float]:
    """Follow the change feed until ``point`` shows ``value``; returns (stream id, store time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for e in await reader.changes(last_id, block_ms=int(timeout_s * 1000), count=100):
            last_id = e.id
            if e.point == point and e.value is not None and abs(float(e.value) - value) < 1e-3:
                return last_id, e.store_ts
    raise TimeoutError(f"{point}={value} not in the change feed")


def _progress(what: str, i: int, n: int) -> None:
    if (i + 1) % max(1, n // 10) == 0:
        print(f"  {what}: {i + 1}/{n}", file=sys.stderr, flush=True)


def _voltage(i: int) -> float:
    return 225.0 + (i % 20) * 1.0 + 0.25  # steps of 1 V: above the 0.5 V deadband


async def floor_values(sim: SimProcess, bare: BareClient, cfg: LabConfig, n: int) -> list[float]:
    """Simulator change -> bare c104 client callback (nothing else connected)."""
    pt = cfg.point("feeder.voltage.l1")
    out: list[float] = []
    for i in range(n):
        value = _voltage(i)
        bare.arm(pt.address.ioa, pt.to_raw(value))
        sent = float((await sim.control(f"set feeder.voltage.l1 {value}")).split()[1])
        if await asyncio.to_thread(bare.event.wait, 2.0):
            out.append((bare.seen[pt.address.ioa][0] - sent) * 1000)
        _progress("floor, values", i, n)
    await sim.control("release feeder.voltage.l1")
    return out


async def gateway_values(sim: SimProcess, reader: RedisStore, n: int) -> list[float]:
    """Simulator change -> stored in Redis by the gateway (the store time in the change feed)."""
    out: list[float] = []
    last_id = await reader.changes_tail()
    for i in range(n):
        value = _voltage(i)
        sent = float((await sim.control(f"set feeder.voltage.l1 {value}")).split()[1])
        last_id, st = await next_change(reader, last_id, "feeder.voltage.l1", value)
        out.append((st - sent) * 1000)
        _progress("gateway, values", i, n)
    await sim.control("release feeder.voltage.l1")
    return out


async def floor_commands(bare: BareClient, cfg: LabConfig, n: int) -> list[float]:
    """The SBO breaker command from a bare c104 client -> position callback (travel 0)."""
    pos = cfg.point("feeder.breaker.position")
    out: list[float] = []
    for i in range(n):
        state = c104.Double.OFF if i % 2 == 0 else c104.Double.ON
        bare.arm(pos.address.ioa, int(state.value))
        bare.breaker.value = state
        t0 = time.time()
        ok = await asyncio.to_thread(bare.breaker.transmit, cause=c104.Cot.ACTIVATION)
        if ok and await asyncio.to_thread(bare.event.wait, 2.0):
            out.append((bare.seen[pos.address.ioa][0] - t0) * 1000)
        await asyncio.sleep(0.005)  # c104 clears an SBO selection in a deferred task (protocol-facts)
        _progress("floor, commands", i, n)
    return out


async def gateway_commands(gateway: Gateway, reader: RedisStore, cfg: LabConfig, n: int) -> dict[str, list[float]]:
    """Breaker open/close through the gateway: -> ACTCON, and -> confirmed position stored in Redis."""
    ack_ms: list[float] = []
    stored_ms: list[float] = []
    pos = cfg.point("feeder.breaker.position")
    last_id = await reader.changes_tail()
    for i in range(n):
        word, state = ("open", 1) if i % 2 == 0 else ("close", 2)
        out = await gateway.execute("feeder.breaker.command", word, requested_by="bench")
        if out.result != "confirmed" or out.sent_ts is None or out.ack_ts is None:
            print(f"  command {i}: {out.result} {out.reason}", file=sys.stderr)
            continue
        if out.reason:
            print(f"  command {i}: {out.result} ({out.reason})", file=sys.stderr)
        ack_ms.append((out.ack_ts - out.sent_ts) * 1000)
        last_id, st = await next_change(reader, last_id, pos.name, float(state))
        stored_ms.append((st - out.sent_ts) * 1000)
        _progress("gateway, commands", i, n)
    return {"ack": ack_ms, "stored": stored_ms}


def scale_config(base: LabConfig, stations: int, base_port: int, period_s: float, tmp: Path) -> tuple[LabConfig, Path]:
    """A lab of ``stations`` copies of the feeder (distinct point names, consecutive ports)."""
    raw = yaml.safe_load(SIM_CONFIG.read_text())
    parent = yaml.safe_load((SIM_CONFIG.parent / raw["extends"]).read_text())
    dev = {**parent["devices"][DEVICE], **{k: v for k, v in raw["devices"][DEVICE].items() if k != "timers"}}
    dev["simulator"] = {**dev.get("simulator", {}), "period_s": period_s, "noise": 0.05}
    dev["gi_period_s"] = 0
    devices = {}
    points = []
    for s in range(stations):
        name = f"st{s:03d}"
        devices[name] = {**dev, "host": "127.0.0.1", "port": base_port + s}
        for p in parent["points"]:
            q = {**p, "name": f"{name}.{p['name']}", "device": name, "deadband": 0}
            if "status_point" in q:
                q["status_point"] = f"{name}.{p['status_point']}"
            points.append(q)
    doc = {
        "lab": {"name": f"scale{stations}"},
        "devices": devices,
        "points": points,
        "redis": {"history_maxlen": 1000, "changes_maxlen": 10000},
    }
    path = tmp / f"scale{stations}.yaml"
    path.write_text(yaml.safe_dump(doc))
    # the simulator serves the first device's points on every port
    return load_config(path), path


async def ingest(stations: int, duration_s: float, period_s: float, redis: RedisServer, tmp: Path) -> dict[str, Any]:
    base_port = free_port()
    cfg, path = scale_config(load_config(SIM_CONFIG), stations, base_port, period_s, tmp)
    sim = SimProcess(path, "st000", base_port, free_port(), stations=stations)
    await sim.start(30)
    store = RedisStore.from_url(cfg, redis.client_url())
    gateway = Gateway(cfg, store)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        await gateway.wait_connected(20)
        await asyncio.sleep(0.5)
        stats0 = json.loads((await sim.control("stats"))[3:])
        recv0 = gateway.counters["updates"]
        stored0 = store.stats().get("updates_stored", 0)
        t0 = time.monotonic()
        await asyncio.sleep(duration_s)
        stats1 = json.loads((await sim.control("stats"))[3:])
        recv1 = gateway.counters["updates"]
        elapsed = time.monotonic() - t0
        stored1 = store.stats().get("updates_stored", 0)
        # loss check: stop the flow, let everything in flight land, compare totals
        await sim.control("stall")
        await asyncio.sleep(1.0)
        await store.flush(30)
        final = json.loads((await sim.control("stats"))[3:])
        written_total = sum(r["objects_out"] for r in final)
        received_total = gateway.counters["updates"]
        stored_total = store.stats().get("updates_stored", 0)
        sent = sum(r["objects_out"] for r in stats1) - sum(r["objects_out"] for r in stats0)
        drops = sum(r["drops"] for r in final)
        per_station = [
            (r["port"], r["objects_out"], gateway.adapters[f"st{r['port'] - base_port:03d}"].stats().get("values", 0))
            for r in final
        ]
        if written_total != received_total:
            print(f"  per station (port, objects written, values received): {per_station}", file=sys.stderr)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await sim.stop()
    received = recv1 - recv0
    return {
        "stations": stations,
        "duration_s": round(elapsed, 2),
        "sent_per_s": round(sent / elapsed),
        "received_per_s": round(received / elapsed),
        "stored_per_s": round((stored1 - stored0) / elapsed),
        "sim_drops": drops,
        "objects_written_total": written_total,
        "received_total": received_total,
        "stored_total": stored_total,
        "lossless": written_total == received_total == stored_total and drops == 0,
        "gateway_dropped": store.stats().get("updates_dropped", 0)
        + gateway.adapters["st000"].stats().get("events_dropped", 0),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything is timed
    cfg0 = load_config(SIM_CONFIG).only(DEVICE)  # the 104 relay alone: no 61850/DLMS simulator here
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "c104": getattr(c104, "__version__", "?"),
        },
        "samples": args.samples,
    }
    with tempfile.TemporaryDirectory(prefix="mgms-bench-") as tmpdir:
        tmp = Path(tmpdir)
        redis = RedisServer(data_dir=tmp / "redis")
        redis.start()
        try:
            port = free_port()
            sim = SimProcess(SIM_CONFIG, DEVICE, port, free_port())
            await sim.start()
            cfg = cfg0.with_device(DEVICE, port=port, gi_period_s=0)
            n_cmd = max(50, args.samples // 5)
            await sim.control("travel 0")
            # Phase 1, the floor: a bare c104 client alone on the simulator.
            bare = BareClient(port, cfg)
            await asyncio.to_thread(bare.start)
            try:
                print("floor: bare c104 client", file=sys.stderr)
                floor_v = await floor_values(sim, bare, cfg, args.samples)
                floor_c = await floor_commands(bare, cfg, n_cmd)
            finally:
                await asyncio.to_thread(bare.stop)
            # Phase 2, the gateway alone on the same simulator, in the same run.
            store = RedisStore.from_url(cfg, redis.client_url())
            reader = RedisStore.from_url(cfg, redis.client_url())
            gateway = Gateway(cfg, store)
            stop = asyncio.Event()
            task = asyncio.create_task(gateway.run(stop))
            try:
                await gateway.wait_connected(10)
                print("gateway: simulator -> Redis, commands -> confirmed status", file=sys.stderr)
                gw_v = await gateway_values(sim, reader, args.samples)
                c = await gateway_commands(gateway, reader, cfg, n_cmd)
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
                await reader.aclose()
                await sim.stop()
            v = {"gateway": gw_v, "floor": floor_v}
            c["floor"] = floor_c
            results["routes"] = [
                {
                    "name": "feeder voltage, simulator -> MGMS Redis",
                    "protocol": "IEC 104",
                    "direction": "monitoring",
                    **summary(v["gateway"]),
                    "floor_median_ms": summary(v["floor"])["median_ms"],
                    "floor": summary(v["floor"]),
                    "heila_ms": 483,
                },
                {
                    "name": "breaker command -> ACTCON",
                    "protocol": "IEC 104",
                    "direction": "control",
                    **summary(c["ack"]),
                    "floor_median_ms": None,
                    "heila_ms": None,
                },
                {
                    "name": "breaker command -> confirmed position in Redis (travel 0)",
                    "protocol": "IEC 104",
                    "direction": "control",
                    **summary(c["stored"]),
                    "floor_median_ms": summary(c["floor"])["median_ms"],
                    "floor": summary(c["floor"]),
                    "heila_ms": 584,
                },
            ]
            with (out / "samples.csv").open("w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["route", "i", "ms"])
                for key, series in (
                    ("value_gateway", v["gateway"]),
                    ("value_floor", v["floor"]),
                    ("cmd_ack", c["ack"]),
                    ("cmd_stored", c["stored"]),
                    ("cmd_floor", c["floor"]),
                ):
                    for i, ms in enumerate(series):
                        w.writerow([key, i, f"{ms:.4f}"])
            results["ingest"] = []
            for stations in args.stations:
                print(f"ingest with {stations} station(s), {args.ingest_s:g} s", file=sys.stderr)
                results["ingest"].append(await ingest(stations, args.ingest_s, args.period_s, redis, tmp))
        finally:
            redis.close()
    (out / "report.json").write_text(json.dumps(results, indent=2))
    return results


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "| route | n | mean | median | p95 | p99 | max | floor median | HEILA mean |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in r["routes"]:
        floor = f"{x['floor_median_ms']:.3f}" if x.get("floor_median_ms") is not None else "-"
        heila = f"{x['heila_ms']}" if x.get("heila_ms") is not None else "-"
        lines.append(
            f"| {x['name']} | {x['n']} | {x['mean_ms']:.3f} | {x['median_ms']:.3f} | {x['p95_ms']:.3f} | "
            f"{x['p99_ms']:.3f} | {x['max_ms']:.3f} | {floor} | {heila} |"
        )
    lines += [
        "",
        "| stations | sent/s | received/s | stored/s | sent total | received total | stored total | lossless |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in r["ingest"]:
        lines.append(
            f"| {g['stations']} | {g['sent_per_s']} | {g['received_per_s']} | {g['stored_per_s']} | "
            f"{g['objects_written_total']} | {g['received_total']} | {g['stored_total']} | {g['lossless']} |"
        )
    m = r["machine"]
    lines += ["", f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--stations", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--ingest-s", type=float, default=10.0)
    ap.add_argument("--period-s", type=float, default=0.001, help="simulator update period for the ingest run")
    ap.add_argument("--out", default="bench-out/iec104")
    args = ap.parse_args()
    os.environ.setdefault("TZ", "UTC")
    r = asyncio.run(main_async(args))
    md = markdown(r)
    (Path(args.out) / "report.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
