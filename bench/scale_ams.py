"""Scale scenario, AMS side: many microgrids sending encrypted Flexibility to the AMS over MQTT.

Run:  python bench/scale_ams.py --microgrids 100 1000 --workers 1 2 --rate 500 --seconds 10

Set-up (a :class:`~ams.sandbox.DsoSandbox`: key pairs, PKI, a TLS mosquitto with one user and
per-participant ACLs for the AMS and each of the N MGMS participants):

* the N microgrids are lightweight senders in this process: each has its own identity key
  and its own MQTT connection (TLS, its own user name and password, so the broker's ACLs
  apply as in a real deployment) and publishes sealed (encrypted + signed) Flexibility
  messages straight to the AMS topic, at QoS 1. They skip the MGMS side's Redis outbox (not
  what is measured here). The offered load ``--rate`` messages/s is spread round-robin over
  the microgrids.
* the AMS runs as ``--workers`` child processes (so the GIL of one is not the limit), each
  an :class:`~ams.service.AmsService` with its own Messenger on one shared AMS Redis. With
  two or more workers they share the MQTT inbox through an MQTT v5 shared subscription
  (``share_group``) and the Redis inbox through its consumer group. Market auto-clearing is
  off: each message ends as a stored Flexibility plus an open offer in the merit order.

Per run it reports messages/s handled (all workers together, over the window), whether
every message sent was handled exactly once, and the latency percentiles of the probe hops
of each message: created (sender) -> received (AMS transport) -> stored (AMS inbox in
Redis, Redis clock) -> handled (offer written, the worker's clock). All on one host, so
the clocks are the same.

Everything runs on one machine: with 2 cores, senders, broker, Redis and the workers share
them, which bounds what a second worker can add.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from ams.sandbox import DsoSandbox
from ams.service import AmsService, AmsSettings, MarketSettings
from gateway.bench.stats import pct
from gateway.config import MessagingSettings
from gateway.messaging import Received, build_messenger
from gateway.semantic import Envelope, Flexibility, FlexibilityType, Keystore, KeystoreSettings, Sealer, SecurityMode
from gateway.services import RedisServer
from gateway.transport.base import Outgoing, topic_for
from gateway.transport.mqtt import MqttTransport
from gateway.transport.mqtt.settings import MqttSettings

AMS = "ams"
PREFIX = "ams:ams"
LOCATION = "FI-Vaasa/feeder-4"
ROOT = Path(__file__).resolve().parents[1]


async def _clear(client: aioredis.Redis) -> None:
    """What FLUSHDB did, for a user that may not run it (docs/security.md): unlink every key."""
    async with client.pipeline(transaction=False) as pipe:
        async for key in client.scan_iter(count=1000):
            pipe.unlink(key)
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values), 2) if values else float("nan"),
        "p95_ms": round(pct(values, 0.95), 2),
        "p99_ms": round(pct(values, 0.99), 2),
        "max_ms": round(max(values), 2) if values else float("nan"),
    }


# ---------------------------------------------------------------------------------------
# AMS worker (child process)


async def worker_main(settings_file: Path, redis_url: str, name: str, stop_file: Path, out: Path) -> None:
    messaging = MessagingSettings.model_validate_json(settings_file.read_text())  # noqa: ASYNC240
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    messenger = build_messenger(messaging, client, prefix=PREFIX)
    service = AmsService(
        AmsSettings(market=MarketSettings(auto_clear=False)), client, AMS, messenger=messenger, worker=name
    )
    rows: list[tuple[int, int, int, int]] = []
    handle = service.handle

    async def timed(item: Received) -> None:
        await handle(item)
        rows.append((item.created_ns, item.received_ns, item.stored_ns, time.time_ns()))

    service.handle = timed  # type: ignore[method-assign]
    await messenger.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    print("ready", flush=True)
    while not stop_file.exists():  # noqa: ASYNC110, ASYNC240 - a file: the simplest cross-process stop
        await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 30)
    stats = messenger.stats()
    await messenger.close()
    await client.aclose()
    out.write_text(json.dumps({"rows": rows, "stats": stats, "counters": dict(service.counters)}))  # noqa: ASYNC240


# ---------------------------------------------------------------------------------------
# senders (this process)


class Sender:
    """One microgrid: its own keys and MQTT connection; sealed publishes straight to the AMS."""

    def __init__(self, box: DsoSandbox, name: str) -> None:
        keys = box.directory / "keys" / name
        keystore = Keystore.load(KeystoreSettings(identity=keys / f"{name}.key", peers_dir=keys / "peers"))
        self.name = name
        self.sealer = Sealer(keystore, mode=SecurityMode.ENCRYPTED)
        block = box.mqtt_block(name, max_inflight=50)
        self.transport = MqttTransport(MqttSettings.model_validate({**block, "participant": name}))
        self.topic = topic_for(AMS, name, "Flexibility")
        self.n = 0

    async def start(self) -> None:
        async def nothing(_: Any) -> None:  # we subscribe to our inbox but expect nothing
            return None

        await self.transport.start(nothing)

    async def send_one(self) -> None:
        self.n += 1
        begin = datetime.now(UTC) + timedelta(minutes=5)
        flex = Flexibility(
            identifier=f"{self.name}-{self.n}",
            flexibility_type=FlexibilityType.UPWARD,
            power_kw=50.0 + self.n % 10,
            start=begin,
            stop=begin + timedelta(minutes=15),
        )
        env = Envelope.create(flex, sender=self.name, recipient=AMS, topic=self.topic, ttl_s=300)
        await self.transport.send(Outgoing(env.id, AMS, self.topic, self.sealer.seal(env)))


async def start_senders(box: DsoSandbox, names: list[str], parallel: int = 25) -> list[Sender]:
    senders = [Sender(box, n) for n in names]
    for i in range(0, len(senders), parallel):
        await asyncio.gather(*(s.start() for s in senders[i : i + parallel]))
    return senders


async def stop_senders(senders: list[Sender]) -> None:
    for i in range(0, len(senders), 50):
        await asyncio.gather(*(s.transport.close() for s in senders[i : i + 50]), return_exceptions=True)


# ---------------------------------------------------------------------------------------
# one run


def write_worker_settings(box: DsoSandbox, tmp: Path, name: str, share: bool, inflight: int) -> Path:
    # a fresh client id and no session kept after the run: a session left by an earlier run
    # (same id, other subscription) would have the broker deliver to it twice or queue for it
    mqtt: dict[str, Any] = {
        "client_id": f"{AMS}-{name}-{os.urandom(3).hex()}",
        "max_inflight": inflight,
        "session_expiry_s": 0,
    }
    if share:
        mqtt["share_group"] = "ams-workers"
    settings = box.messaging(AMS, transport="mqtt", security="encrypted", mqtt=mqtt)
    path = tmp / f"messaging-{name}.json"
    path.write_text(settings.model_dump_json())
    return path


async def one_run(
    box: DsoSandbox,
    names: list[str],
    workers: int,
    rate: float,
    seconds: float,
    redis_url: str,
    tmp: Path,
    ams_inflight: int = 1000,
) -> dict[str, Any]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    await _clear(client)
    # register every microgrid (what `ams register` does), before the workers start
    service = AmsService(AmsSettings(), client, AMS)
    for n in names:
        await client.hset(service.keys.microgrids, n, json.dumps({"location": LOCATION, "reliability": 1.0}))
    stop_file = tmp / f"stop-{len(names)}-{workers}"
    stop_file.unlink(missing_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    outs: list[Path] = []
    # the url carries the worker's secret: through the environment, not the command line (ps)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SCALE_AMS_REDIS_URL": redis_url}
    for w in range(workers):
        name = f"w{w + 1}"
        settings = write_worker_settings(box, tmp, name, share=workers > 1, inflight=ams_inflight)
        outs.append(tmp / f"result-{len(names)}-{workers}-{name}.json")
        cmd = [sys.executable, __file__, "worker", str(settings), name, str(stop_file), str(outs[-1])]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env))  # noqa: ASYNC220 - before timing
    senders: list[Sender] = []
    try:
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.to_thread(p.stdout.readline)
            if not line.startswith(b"ready"):
                raise RuntimeError(f"AMS worker did not start: {line!r}")
        t_conn = time.monotonic()
        senders = await start_senders(box, names)
        connect_s = time.monotonic() - t_conn
        # offered load: one send every 1/rate s, round-robin over the microgrids, each
        # send its own task (a microgrid waits for its PUBACK, the others do not wait for it)
        sent = 0
        errors = 0
        inflight: set[asyncio.Task[None]] = set()
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while time.monotonic() - t0 < seconds:
            due = int((loop.time() - next_at) * rate) + 1
            for _ in range(max(1, due)):
                task = asyncio.create_task(senders[sent % len(senders)].send_one())
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                sent += 1
            next_at += max(1, due) / rate
            await asyncio.sleep(max(0.0, next_at - loop.time()))
        send_s = time.monotonic() - t0
        results = await asyncio.gather(*inflight, return_exceptions=True)
        errors = sum(1 for r in results if isinstance(r, BaseException))
        # wait until the workers have handled everything (stored flexibility hashes)
        deadline = time.monotonic() + 120
        handled = 0
        while time.monotonic() < deadline:
            handled = 0
            async for _k in client.scan_iter(service.keys.flex("*", "*"), count=5000):
                handled += 1
            if handled >= sent - errors:
                break
            await asyncio.sleep(0.5)
    finally:
        stop_file.touch()
        for p in procs:
            await asyncio.to_thread(p.wait, 60)
        await stop_senders(senders)
        await client.aclose()
    rows: list[tuple[int, int, int, int]] = []
    worker_stats: list[dict[str, Any]] = []
    for out in outs:
        if out.exists():
            d = json.loads(out.read_text())
            rows += [(r[0], r[1], r[2], r[3]) for r in d["rows"]]
            kept = {k: v for k, v in d["stats"].items() if k.startswith(("rejected_", "received", "duplicates"))}
            worker_stats.append({"handled": len(d["rows"]), **d["counters"], **kept})
    rows.sort(key=lambda r: r[0])
    first_created = rows[0][0] if rows else 0
    last_handled = max((r[3] for r in rows), default=0)
    span_s = (last_handled - first_created) / 1e9 if rows else float("nan")
    # the window: messages created while the offered load ran (drop the first second: warm-up)
    steady = [r for r in rows if r[0] >= first_created + 1e9] or rows
    return {
        "microgrids": len(names),
        "workers": workers,
        "rate_offered": rate,
        "seconds": round(send_s, 2),
        "connect_s": round(connect_s, 2),
        "sent": sent,
        "send_errors": errors,
        "sent_per_s": round(sent / send_s),
        "handled": len(rows),
        "flexibilities_stored": handled,
        "handled_per_s": round(len(rows) / span_s) if rows else 0,
        "lossless": len(rows) == handled == sent - errors and errors == 0,
        "per_worker": worker_stats,
        "latency_created_to_received": summary([(r[1] - r[0]) / 1e6 for r in steady]),
        "latency_created_to_stored": summary([(r[2] - r[0]) / 1e6 for r in steady]),
        "latency_created_to_handled": summary([(r[3] - r[0]) / 1e6 for r in steady]),
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| microgrids | AMS workers | offered/s | sent/s | handled/s | lossless | per worker "
        "| created->received p50 / p99 ms | created->stored p50 / p99 ms | created->handled p50 / p95 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b, c = r["latency_created_to_received"], r["latency_created_to_stored"], r["latency_created_to_handled"]
        split = " / ".join(str(w["handled"]) for w in r["per_worker"])
        lines.append(
            f"| {r['microgrids']:,} | {r['workers']} | {r['rate_offered']:,.0f} | {r['sent_per_s']:,} | "
            f"{r['handled_per_s']:,} | {'yes' if r['lossless'] else 'NO'} | {split} | "
            f"{a['median_ms']:.1f} / {a['p99_ms']:.1f} | {b['median_ms']:.1f} / {b['p99_ms']:.1f} | "
            f"{c['median_ms']:.1f} / {c['p95_ms']:.1f} / {c['p99_ms']:.1f} |"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything is timed
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_before": os.getloadavg(),
        },
        "runs": [],
    }
    biggest = max(args.microgrids)
    names = [f"mg{i:04d}" for i in range(biggest)]
    with tempfile.TemporaryDirectory(prefix="mgms-scale-ams-") as tmpdir:
        tmp = Path(tmpdir)
        t = time.monotonic()
        box = DsoSandbox(tmp / "box", mgms=names)
        print(f"sandbox for {biggest} microgrids: {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
        redis = RedisServer(data_dir=tmp / "redis")
        redis.start()
        try:
            with box:
                for n in args.microgrids:
                    for workers in args.workers:
                        for rate in args.rate:
                            print(f"{n} microgrids, {workers} worker(s), {rate:,.0f}/s", file=sys.stderr, flush=True)
                            row = await one_run(
                                box, names[:n], workers, rate, args.seconds, redis.client_url(), tmp, args.ams_inflight
                            )
                            print(table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                            results["runs"].append(row)
        finally:
            redis.close()
    (out / "scale_ams.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        settings, name, stop, out = sys.argv[2:6]
        url = os.environ["SCALE_AMS_REDIS_URL"]
        asyncio.run(worker_main(Path(settings), url, name, Path(stop), Path(out)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--microgrids", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rate", type=float, nargs="+", default=[500.0], help="offered Flexibility messages/s (total)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument(
        "--ams-inflight",
        type=int,
        default=1000,
        help="max_inflight (MQTT Receive Maximum; the transport's inbox holds 4x) of each AMS worker",
    )
    ap.add_argument("--out", default="bench-out/scale")
    args = ap.parse_args()
    r = asyncio.run(main_async(args))
    md = table(r["runs"])
    (Path(args.out) / "scale_ams.md").write_text(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
