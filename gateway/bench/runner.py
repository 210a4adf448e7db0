"""``mgms bench``: the routes of HEILA's Table 3 and more, each next to its floor.

Run on simulators (the default): every phase starts what it needs (Redis, simulators, a TLS
mosquitto, HTTPS listeners) on loopback, in temporary directories, and stops it again.
With ``--lab`` nothing is started: :mod:`gateway.bench.lab` reads the probes a running
gateway (and AMS) stored. See docs/latency.md for what each route measures.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import ssl
import sys
import tempfile
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ams.sandbox import DsoSandbox
from gateway.bench.args import PHASES, BenchError
from gateway.bench.clock import (
    ClockOffset,
    Host,
    MqttClockResponder,
    clock_acl,
    clock_app,
    estimate_offset,
    estimate_offset_mqtt,
)
from gateway.bench.progress import Progress
from gateway.bench.report import RouteSpec, apply_clock, build_report, console_table, write_outputs
from gateway.bench.routes import (
    AMS,
    LOOP_HOPS,
    MGMS,
    Series,
    dlms_phase,
    iec104_phase,
    iec61850_phase,
    loop_phase,
    messages_phase,
)
from gateway.config import ProbeSettings, load_config
from gateway.services import MosquittoServer, MqttTls, RedisServer, free_port
from gateway.transport.mqtt import MqttSettings

__all__ = ["HOP_HOSTS", "ROUTES", "bench_broker", "hop_hosts", "run", "run_bench"]


#: the gateway's IEC 104 client engines the 104 routes are measured with: (series suffix, label)
_ENGINES = (("", ""), ("_aio", " (asyncio engine)"))
_MSG = "created in the sender's Messenger (signed/encrypted, queued in its Redis outbox) -> stored in the receiver's"
ROUTES: tuple[RouteSpec, ...] = (
    *(
        RouteSpec(
            f"flex_{t}_{sec}",
            f"Flexibility MGMS db -> AMS db ({sec})",
            t.upper(),
            "MGMS -> AMS",
            f"floor_{t}",
            heila,
            measures=f"{_MSG} inbox (Redis TIME in the accepting Lua script), over {t.upper()}.",
            start_host="mgms",
            end_host="ams",
            durable_floor=f"floor_{t}_durable",
        )
        for sec in ("signed", "encrypted")
        for t, heila in (("https", 47.0), ("mqtt", 52.0))
    ),
    *(
        RouteSpec(
            f"iec104_voltage{suffix}",
            f"Feeder phase voltage REF615 -> MGMS db{label}",
            "IEC 104",
            "monitoring",
            "floor_raw104_value" if suffix else "floor_c104_value",
            483.0,
            measures="the simulator process changes the value (its control channel returns the time) -> the "
            f"gateway{label} stored the spontaneous M_ME_TF_1 in Redis (`st` of the change feed).",
        )
        for suffix, label in _ENGINES
    ),
    *(
        RouteSpec(
            f"activation_mqtt_{sec}",
            f"Activation AMS db -> MGMS db ({sec})",
            "MQTT",
            "AMS -> MGMS",
            "floor_mqtt",
            36.0,
            measures=f"{_MSG} inbox, over MQTT (TLS, QoS 1).",
            start_host="ams",
            end_host="mgms",
            durable_floor="floor_mqtt_durable",
        )
        for sec in ("signed", "encrypted")
    ),
    *(
        RouteSpec(
            f"iec104_breaker{suffix}",
            f"Breaker command MGMS db -> REF615 -> status{label}",
            "IEC 104",
            "control",
            "floor_c104_command",
            584.0,
            measures=f"a command request written into the MGMS Redis (`P:cmd:requests`, as `mgms command` does) -> "
            f"the gateway{label} -> SBO select + execute -> the confirmed position stored in Redis. Breaker travel 0.",
        )
        for suffix, label in _ENGINES
    ),
    RouteSpec(
        "iec61850_voltage",
        "Feeder phase voltage REF615 (61850 report) -> MGMS db",
        "IEC 61850 MMS",
        "monitoring",
        "floor_iec61850_report",
        measures="the 61850 simulator (in this process) updates the value -> buffered "
        "report -> the gateway stored it in Redis.",
    ),
    RouteSpec(
        "dlms_read",
        "Meter register read -> MGMS db",
        "DLMS/COSEM",
        "monitoring",
        "floor_gurux_read",
        measures="a read requested from the gateway's DLMS adapter (HLS-GMAC, WRAPPER) -> GET round trip -> the "
        "value stored in Redis.",
    ),
    *(
        RouteSpec(
            f"dso_loop{suffix}",
            f"DSO loop: flexibility -> activation -> breaker -> settled ({sec})",
            "MQTT + IEC 104",
            "MGMS -> AMS -> MGMS -> AMS",
            "floor_mqtt+floor_mqtt+floor_c104_command+floor_mqtt",
            loop=True,
            measures="(breaker open confirmed - flexibility created) + (verification settled at the AMS - "
            "verification created), every message " + sec + ": the AMS clears, reserves and activates at once; "
            "the activation window and the restore are scheduled waits and left out; breaker travel 0. Floor: "
            "three bare MQTT hops and a bare c104 command.",
            start_host="mgms",
            end_host="ams",
        )
        for suffix, sec in (("_signed", "signed"), ("", "encrypted"))
    ),
)

#: Whose clocks stamp each DSO-loop hop (start, end), for both loops (encrypted, signed).
HOP_HOSTS: dict[str, tuple[Host, Host]] = {
    f"loop_hop_{hop}{suffix}": hosts for hop, hosts in LOOP_HOPS.items() for suffix in ("", "_signed")
}


def hop_hosts(keys: Iterable[str]) -> dict[str, tuple[Host, Host]]:
    """The loop hops above, and each message route's two hops: ``created_to_received`` spans
    the sender's clock to the receiver's, ``received_to_stored`` is the receiver's alone."""
    out = dict(HOP_HOSTS)
    for k in keys:
        if not k.startswith("hop_"):
            continue
        sender: Host = "ams" if k.startswith("hop_activation") else "mgms"
        receiver: Host = "mgms" if sender == "ams" else "ams"
        out[k] = (sender, receiver) if k.endswith("_created_to_received") else (receiver, receiver)
    return out


def _sim_config(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    return Path(__file__).resolve().parents[2] / "lab_configs" / "multipower-sim.yaml"


def bench_broker(box: DsoSandbox) -> MosquittoServer:
    """The sandbox's broker (TLS, users, layout ACLs, the clock exchange's ACLs) with
    mosquitto's periodic autosave.

    Not the sandbox's save-on-every-change (there so a ``kill -9`` in the HIL tests loses
    nothing): that writes the broker's database after each QoS 1 message and measured
    ~6 ms per message for the bare floor against ~0.2 ms with periodic saves, i.e. it
    measures the disk, not MQTT.
    """
    return MosquittoServer(
        data_dir=box.directory / "mosquitto",
        tls=MqttTls(box.pki.server.cert, box.pki.server.key, box.pki.ca),
        users=box.passwords,
        acl=[*box.acl(), *clock_acl([box.ams, *box.mgms])],
    )


async def _local_clock_mqtt(box: DsoSandbox) -> ClockOffset:
    """The exchange over the sandbox's broker: an AMS responder, the MGMS probing it."""

    def settings(p: str) -> MqttSettings:
        return MqttSettings.model_validate({**box.mqtt_block(p), "participant": p})

    responder = MqttClockResponder(settings(AMS))
    await responder.start()
    try:
        return await estimate_offset_mqtt(settings(MGMS), AMS)
    finally:
        await responder.close()


async def _local_clock(box: DsoSandbox) -> ClockOffset:
    """The exchange against a /clock endpoint on loopback with the sandbox's mutual TLS."""
    from aiohttp import web

    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(box.pki.ca))
    server_tls.load_cert_chain(str(box.pki.server.cert), str(box.pki.server.key))
    server_tls.verify_mode = ssl.CERT_REQUIRED
    client_tls = ssl.create_default_context(cafile=str(box.pki.ca))
    cert = box.pki.clients[MGMS]
    client_tls.load_cert_chain(str(cert.cert), str(cert.key))
    runner = web.AppRunner(clock_app(), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_tls).start()
    try:
        return await estimate_offset(f"https://127.0.0.1:{port}/clock", client_tls)
    finally:
        await runner.cleanup()


async def _appendfsync(*servers: RedisServer) -> str:
    """The policy the servers run with: what the figures were taken with.

    Read from the config each server was started with (no user of ours may run CONFIG GET,
    docs/security.md); INFO confirms that AOF is on.
    """
    seen: set[str] = set()
    for server in servers:
        client = server.client()
        try:
            aof = str((await client.info("persistence")).get("aof_enabled"))
        finally:
            await client.aclose()
        seen.add(server.appendfsync if aof == "1" else "aof-off")
    return ",".join(sorted(seen))


def _command_line() -> str:
    """``mgms bench ...`` as typed (global options such as --log-level before ``bench`` left out)."""
    argv = sys.argv[1:]
    rest = argv[argv.index("bench") + 1 :] if "bench" in argv else []
    return shlex.join(["mgms", "bench", *rest])


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected phases (or, with ``--lab``, measure a running lab); write the outputs;
    return report.json's content."""
    if getattr(args, "lab", False):
        from gateway.bench.lab import run_lab

        return await run_lab(args)
    phases = [p.strip() for p in args.routes.split(",") if p.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        raise BenchError(f"unknown phase(s) {unknown}; known: {', '.join(PHASES)}")
    n: int = args.n
    loop_n: int = args.loop_n if args.loop_n is not None else min(n, 100)
    fsync: str = getattr(args, "fsync", "always")
    ams_remote: bool = getattr(args, "ams_remote", False)
    progress = Progress(quiet=args.quiet)
    sim_config = _sim_config(args)
    # the routes are read off the probes: on, whatever the simulators' config says
    base = load_config(sim_config).model_copy(update={"probes": ProbeSettings()})
    series: Series = {}
    extra: dict[str, Any] = {
        "mode": "simulators",
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": _command_line(),
        "n": n,
        "loop_n": loop_n,
        "phases": phases,
        "breaker_travel_s": 0.0,
        "redis_appendfsync": fsync,
    }
    estimates: list[ClockOffset] = []
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mgms-bench-") as tmpdir:
        tmp = Path(tmpdir)
        mgms_redis = RedisServer(data_dir=tmp / "mgms-redis", appendfsync=fsync)
        ams_redis = RedisServer(data_dir=tmp / "ams-redis", appendfsync=fsync)
        await asyncio.to_thread(mgms_redis.start)
        await asyncio.to_thread(ams_redis.start)
        extra["redis_appendfsync"] = await _appendfsync(mgms_redis, ams_redis)
        box: DsoSandbox | None = None
        try:
            if "iec104" in phases:
                progress.note("phase iec104: 104 simulator process, bare c104 client, then the gateway")
                series.update(await iec104_phase(sim_config, base, mgms_redis, n, progress))
            if "iec61850" in phases:
                progress.note("phase iec61850: 61850 simulator, bare adapter, then the gateway")
                series.update(await iec61850_phase(base, mgms_redis, n, progress))
            if "dlms" in phases:
                progress.note("phase dlms: meter simulator, bare gurux session, then the gateway")
                series.update(await dlms_phase(base, mgms_redis, n, progress))
            if "messages" in phases or "loop" in phases:
                box = DsoSandbox(tmp / "dso", mgms=[MGMS], start_broker=False)
                box.broker = bench_broker(box)
                await asyncio.to_thread(box.broker.start)
            if "messages" in phases and box is not None:
                progress.note("phase messages: TLS mosquitto + HTTPS, two Redis, MGMS and AMS Messengers")
                series.update(await messages_phase(box, mgms_redis, ams_redis, n, progress))
            if "loop" in phases and box is not None and loop_n > 0:
                progress.note("phase loop: gateway + FlexAgent + AMS service, MQTT, signed then encrypted")
                for security in ("signed", "encrypted"):
                    series.update(
                        await loop_phase(
                            sim_config, base, box, mgms_redis, ams_redis, loop_n, progress, security=security
                        )
                    )
            if box is not None:
                progress.note("clock offset MGMS -> AMS: NTP-style exchanges over HTTPS and MQTT (loopback)")
                estimates = [await _local_clock(box), await _local_clock_mqtt(box)]
            if args.clock_url:
                ctx = ssl.create_default_context(cafile=args.clock_ca) if args.clock_url.startswith("https") else None
                remote = await estimate_offset(args.clock_url, ctx)
                extra["clock_remote"] = {
                    **remote.as_dict(),
                    "applied": False,
                    "note": "another host's clock minus this host's: the simulator run's AMS is on this host",
                }
        finally:
            if box is not None:
                await asyncio.to_thread(box.close)
            await asyncio.to_thread(ams_redis.close)
            await asyncio.to_thread(mgms_redis.close)
    clock = min(estimates, key=lambda e: e.uncertainty_ms) if estimates else None
    if clock is not None:
        extra["clock"] = {**clock.as_dict(), "applied": ams_remote}
        extra["clock_estimates"] = [e.as_dict() for e in estimates]
        extra["clock_note"] = (
            "--ams-remote: cross-host routes corrected by this offset (here on one host, so ~0 +- its bound)."
            if ams_remote
            else "MGMS and AMS share this host's clock: the offset is ~0 by construction and the exchange shows "
            "its own resolution; no correction applied."
        )
    elif ams_remote:
        raise BenchError("--ams-remote needs the messages or loop phase (the clock exchange runs with them)")
    extra["duration_s"] = round(time.monotonic() - t0, 1)
    corrected, corrections = apply_clock(ROUTES, series, hop_hosts(series), clock, ams_remote=ams_remote)
    report = build_report(ROUTES, corrected, extra, corrections)
    write_outputs(report, corrected, Path(args.out))
    return report


def run(args: argparse.Namespace) -> int:
    """The CLI entry: 0 when every judged target is met, 1 when one is missed; 2 on bad input."""
    try:
        report = asyncio.run(run_bench(args))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(console_table(report))
    if report.get("not_measured"):
        for key, why in report["not_measured"].items():
            print(f"not measured: {key}: {why}")
    if report.get("durable_targets_judged"):
        print(f"durable-floor targets met: {report['durable_targets_met']} of {report['durable_targets_judged']}")
    print(f"near-floor targets met: {report['targets_met']} of {report['targets_judged']}; outputs in {args.out}")
    if "clock" in report:
        c = report["clock"]
        applied = "applied to cross-host routes" if c.get("applied") else "not applied"
        print(f"clock offset ({c['method'].upper()}, {c['peer']}): {c['offset_ms']:+.3f} ms +- "
              f"{c['uncertainty_ms']:.3f} ms, {applied}")  # fmt: skip
    return 0 if report["targets_met"] == report["targets_judged"] else 1
