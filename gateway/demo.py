"""``mgms demo``: the MultiPower lab on simulators, end to end, in about twenty seconds.

It starts what a lab would run — a redis-server (own port, throw-away data), the
REF615/COM600 simulator as its own process (``iedsim iec104``), the 61850 and DLMS
simulators, the gateway — then shows the values arriving in Redis, times value changes from
the simulator into Redis, operates the breaker and the set-point the way an operator does (a
request on the Redis command stream), and runs the DSO flexibility use case with an AMS: a
TLS mosquitto with per-participant ACLs, the AMS with its own Redis, encrypted and signed
messages; Flexibility over HTTPS, Activation over MQTT (the pair HEILA measured), the
breaker opened and closed by the activation, Verification, settlement. Every step is printed
with its timing; everything is shut down at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import cast

from ams.sandbox import DsoSandbox, feeder_flexibility
from ams.service import AmsService, AmsSettings, MicrogridEntry
from gateway.config import Direction, LabConfig, ProbeSettings, load_config
from gateway.iedsim.dlms import DlmsMeter
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.iedsim.launch import SimProcess
from gateway.runtime import Gateway
from gateway.services import RedisServer, ams_redis_users, free_port, lab_redis_users
from gateway.store import RedisStore, StoreKeys
from gateway.watch import render

__all__ = ["run_demo"]

DEMO_MGMS = "mgms-multipower"
DEMO_LOCATION = "FI-Vaasa/feeder-4"


def _say(msg: str = "") -> None:
    print(msg, flush=True)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def ms(self) -> str:
        return f"{(time.monotonic() - self.t0) * 1000:8.1f} ms"


async def _wait_all_points(reader: RedisStore, cfg: LabConfig, timeout_s: float) -> int:
    names = {p.name for p in cfg.points if p.direction is Direction.MONITOR}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = await reader.latest_all()
        if names <= got.keys():
            return len(names)
        await asyncio.sleep(0.01)
    raise RuntimeError("not every point reached Redis in time")


async def _keep_running(config_file: Path, lab: LabConfig, redis: RedisServer, box: DsoSandbox) -> None:
    """``--keep-running``: say how to reach the lab, then wait for Ctrl-C or SIGTERM.

    The commands it prints name each user's secret file, never the secret (docs/security.md).
    """
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ports = ", ".join(f"{name} {dev.host}:{dev.port}" for name, dev in lab.devices.items())
    _say("")
    url = redis.url
    _say(f"the lab keeps running (simulators {ports}; Redis {url}); in another terminal:")
    _say(
        f"  mgms watch --config {config_file} --redis-url {url} "
        f"--redis-user viewer --redis-secret-file {redis.secret_file('viewer')}"
    )
    _say(
        f"  mgms command feeder.breaker.command open --config {config_file} --redis-url {url} "
        f"--redis-user operator --redis-secret-file {redis.secret_file('operator')}"
    )
    if box.broker is not None:
        _say(f"  (mosquitto at 127.0.0.1:{box.broker.port}, files in {box.directory})")
    _say("Ctrl-C stops everything.")
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    _say("")


async def run_demo(config_file: Path, *, operations: int = 3, keep_running: bool = False) -> int:
    """Run the demo's steps; with ``keep_running`` leave the lab up until Ctrl-C before stopping it."""
    cfg = load_config(config_file)
    if not cfg.probes.enabled:
        # the demo reports latencies, which it reads from the hop timestamps
        cfg = cfg.model_copy(update={"probes": ProbeSettings(enabled=True)})
    devices = [n for n, d in cfg.devices.items() if d.protocol == "iec104"]
    if not devices:
        _say(f"{config_file}: no iec104 device to simulate")
        return 2
    device = devices[0]
    clock = _Clock()
    failures = 0
    _say(f"MGMS demo - lab {cfg.lab.name!r} ({cfg.lab.description}) on simulators")
    _say(f"config: {config_file}")
    _say("")
    with tempfile.TemporaryDirectory(prefix="mgms-demo-") as tmp, contextlib.ExitStack() as stack:
        redis = RedisServer(data_dir=Path(tmp) / "redis", users=lab_redis_users(StoreKeys.for_lab(cfg).prefix))
        await asyncio.to_thread(redis.start)
        _say(
            f"[{clock.ms()}] redis-server started at {redis.url} "
            f"(AOF on, ACL users {', '.join(redis.users)}, data in a temp dir)"
        )
        sim = SimProcess(config_file, device, free_port(), free_port())
        mms_sims: list[Iec61850Server] = []
        meters: list[DlmsMeter] = []
        try:
            first = await sim.start()
            _say(f"[{clock.ms()}] {first}")
            port = int(first.rsplit(":", 1)[1].split()[0])
            lab = cfg.with_device(device, host="127.0.0.1", port=port)
            for name, dev in cfg.devices.items():
                if dev.protocol == "iec61850":
                    # the 61850 view of the relay: its simulator runs in this process
                    mms = Iec61850Server(cfg, name, host="127.0.0.1", port=0)
                    await mms.start()
                    mms_sims.append(mms)
                    lab = lab.with_device(name, host="127.0.0.1", port=mms.port)
                    _say(f"[{clock.ms()}] iec61850 simulator {name} ({mms.ied_name}) listening on 127.0.0.1:{mms.port}")
                if dev.protocol == "dlms":
                    # the feeder's energy meter: its simulator runs in this process too
                    meter = DlmsMeter(cfg, name, host="127.0.0.1", port=0)
                    await meter.start()
                    meters.append(meter)
                    lab = lab.with_device(name, host="127.0.0.1", port=meter.port)
                    _say(
                        f"[{clock.ms()}] dlms simulator {name} listening on 127.0.0.1:{meter.port}"
                        f" ({dev.dlms.framing}, security {dev.dlms.security})"
                    )
            lab = lab.only(device, *(m.name for m in mms_sims), *(m.name for m in meters))
            box = await asyncio.to_thread(DsoSandbox, Path(tmp) / "dso", [DEMO_MGMS])
            await asyncio.to_thread(box.start)
            stack.callback(box.close)
            assert box.broker is not None
            _say(f"[{clock.ms()}] mosquitto (TLS, per-participant users and ACLs) at 127.0.0.1:{box.broker.port}")
            if "feeder.p" in {p.name for p in lab.points} and "feeder.breaker.command" in {p.name for p in lab.points}:
                lab = lab.model_copy(
                    update={
                        "messaging": box.messaging(DEMO_MGMS, transport="both", security="encrypted"),
                        "flexibility": feeder_flexibility(window_s=2, step_s=1),
                    }
                )
            store = RedisStore.from_url(lab, redis.client_url("gateway"))
            reader = RedisStore.from_url(lab, redis.client_url("operator"))  # what an operator's client sees
            gateway = Gateway(lab, store)
            stop = asyncio.Event()
            task = asyncio.create_task(gateway.run(stop), name="gateway")
            try:
                t = time.monotonic()
                await gateway.wait_connected(15)
                _say(
                    f"[{clock.ms()}] gateway connected to {', '.join(lab.devices)} (IEC 104 + MMS + DLMS) "
                    f"(STARTDT + general interrogation) in {(time.monotonic() - t) * 1000:.1f} ms"
                )
                n = await _wait_all_points(reader, lab, 10)
                _say(f"[{clock.ms()}] all {n} monitored points are in Redis")
                _say("")
                links = {name: "up" for name in lab.devices}
                _say(render(lab, await reader.latest_all(), links, time.time()))
                _say("")
                failures += await _value_latency(sim, reader, clock)
                failures += await _commands(reader, clock, operations)
                if gateway.flex_agent is not None:
                    failures += await _dso_flow(gateway, box, Path(tmp), clock)
                _say("")
                _say(f"command log (Redis stream {lab.redis.key_prefix}:{lab.lab.name}:cmd:log), newest last:")
                for rec in await reader.command_log(6):
                    _say(
                        f"  {rec.point:<26} {rec.value:>6} by {rec.requested_by:<6} {rec.result.value:<9} "
                        f"{(rec.duration_ms or 0):7.1f} ms {rec.reason}"
                    )
                stats = store.stats()
                _say("")
                _say(
                    f"store: {stats.get('updates_stored', 0)} updates written, "
                    f"{stats.get('updates_dropped', 0)} dropped; gateway: {gateway.stats()['updates']} values received"
                )
                if keep_running:
                    await _keep_running(config_file, lab, redis, box)
            finally:
                stop.set()
                await asyncio.wait_for(task, 15)
                await reader.aclose()
            _say(f"[{clock.ms()}] gateway stopped cleanly")
        finally:
            for meter in meters:
                await meter.close()
            for mms in mms_sims:
                await mms.close()
            await sim.stop()
            await asyncio.to_thread(redis.close)
    _say(f"[{clock.ms()}] simulator and redis-server stopped")
    _say("")
    _say("demo OK" if failures == 0 else f"demo finished with {failures} failed step(s)")
    return 0 if failures == 0 else 1


async def _value_latency(sim: SimProcess, reader: RedisStore, clock: _Clock, samples: int = 20) -> int:
    """Force feeder.voltage.l1 in the simulator; time change -> stored in Redis."""
    lat: list[float] = []
    for i in range(samples):
        value = 230.0 + (i % 7) * 0.5 + 0.125
        answer = await sim.control(f"set feeder.voltage.l1 {value}")
        if not answer.startswith("ok"):
            _say(f"  simulator refused 'set': {answer}")
            return 1
        sent = float(answer.split()[1])
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            v = await reader.latest("feeder.voltage.l1")
            if v is not None and v.value is not None and abs(float(v.value) - value) < 1e-6 and v.store_ts >= sent:
                lat.append((v.store_ts - sent) * 1000)
                break
            await asyncio.sleep(0.002)
        else:
            _say(f"  value {value} did not reach Redis within 2 s")
            return 1
    await sim.control("release feeder.voltage.l1")
    _say(
        f"[{clock.ms()}] value change in the simulator -> stored in Redis, {samples} samples: "
        f"median {statistics.median(lat):.2f} ms, max {max(lat):.2f} ms (IEC 104, spontaneous M_ME_TF_1)"
    )
    return 0


async def _commands(reader: RedisStore, clock: _Clock, operations: int) -> int:
    failures = 0
    _say("")
    _say(
        "operating the breaker through the Redis command stream (SBO double command, confirmed by "
        "the position read back):"
    )
    for _ in range(operations):
        for word in ("open", "close"):
            rid = await reader.submit_command("feeder.breaker.command", word, by="demo")
            rec = await reader.wait_reply(rid, 15)
            if rec is None:
                _say(f"  {word:<5}: no reply")
                failures += 1
                continue
            ack = (rec.ack_ts - rec.sent_ts) * 1000 if rec.ack_ts and rec.sent_ts else float("nan")
            _say(
                f"[{clock.ms()}]   {word:<5} -> {rec.result.value} in {(rec.duration_ms or 0):6.1f} ms "
                f"(ACTCON after {ack:5.2f} ms; includes the simulated breaker travel)"
            )
            failures += rec.result.value != "confirmed"
    for point, value, expect in (
        ("feeder.p_limit.setpoint", "45", "confirmed"),
        ("feeder.p_limit.setpoint", "500", "invalid"),
        ("feeder.breaker.command", "sideways", "invalid"),
    ):
        rid = await reader.submit_command(point, value, by="demo")
        rec = await reader.wait_reply(rid, 15)
        result = rec.result.value if rec is not None else "no reply"
        why = f" ({rec.reason})" if rec is not None and rec.reason else ""
        _say(
            f"[{clock.ms()}]   {point} = {value} -> {result}{why}{'' if result == expect else f'  [expected {expect}]'}"
        )
        failures += result != expect
    return failures


def _ms(a_ns: int | str, b_ns: int | str) -> str:
    return f"{(int(b_ns) - int(a_ns)) / 1e6:7.2f} ms"


async def _dso_flow(gateway: Gateway, box: DsoSandbox, tmp: Path, clock: _Clock) -> int:
    """The DSO use case once, with an AMS in this process on its own Redis."""
    import redis.asyncio as aioredis

    from gateway.messaging import build_messenger

    _say("")
    _say("DSO flexibility use case (HEILA): MGMS -> AMS over HTTPS, AMS -> MGMS over MQTT, encrypted")
    ams_redis = RedisServer(data_dir=tmp / "ams-redis", users=ams_redis_users("ams:ams"))
    await asyncio.to_thread(ams_redis.start)
    client: aioredis.Redis = ams_redis.client("ams")
    messenger = build_messenger(box.messaging("ams", transport="both", security="encrypted"), client, prefix="ams:ams")
    stop = asyncio.Event()
    failures = 0
    try:
        await messenger.start()
        svc = AmsService(
            AmsSettings(microgrids=(MicrogridEntry(participant=DEMO_MGMS, location=DEMO_LOCATION),)),
            client,
            "ams",
            messenger=messenger,
        )
        task = asyncio.create_task(svc.run(stop), name="ams")
        _say(f"[{clock.ms()}] AMS 'ams' running (own redis-server at {ams_redis.url}, HTTPS and MQTT)")
        agent = gateway.flex_agent
        assert agent is not None
        flex = (await agent.publish(window_s=2))[0]
        _say(f"[{clock.ms()}] MGMS offered {flex.power_kw:.1f} kW upward flexibility ({flex.identifier}) for 2 s")
        act_id = f"act:offer:{DEMO_MGMS}:{flex.identifier}"
        deadline = time.monotonic() + 20
        settlement: dict[str, str] = {}
        while time.monotonic() < deadline and not settlement:
            settlement = await svc.settlement(act_id)
            await asyncio.sleep(0.05)
        if not settlement:
            _say(f"[{clock.ms()}] FAILED: no settlement within 20 s")
            failures += 1
        else:
            fx = cast(dict[str, str], await client.hgetall(svc.keys.flex(DEMO_MGMS, flex.identifier)))
            offer = cast(dict[str, str], await client.hgetall(svc.keys.offer(f"offer:{DEMO_MGMS}:{flex.identifier}")))
            act_key = f"{gateway.store.keys.prefix}:flex:act:{act_id}"
            act = cast(dict[str, str], await gateway.store.redis.hgetall(act_key))
            cmds = json.loads(act.get("commands", "[]")) + json.loads(act.get("restore", "[]"))
            _say(
                f"  Flexibility  MGMS created -> AMS db (HTTPS)   {_ms(fx['created_ns'], fx['stored_ns'])}"
                "  (first message: includes connecting; warm figures: mgms bench)"
            )
            _say(f"  Offer        {offer['price']} EUR/MWh, reserved and activated (simulated DSO clears at once)")
            _say(f"  Activation   AMS created -> MGMS db (MQTT)    {_ms(act['created_ns'], act['stored_ns'])}")
            for c in cmds:
                _say(f"  Breaker      {c['point']} {c['value']}: {c['result']} by status in {c['ms'] or 0:.1f} ms")
            _say(f"  Verification delivered {json.loads(act.get('series_kw', '[]'))} kW per 1 s step")
            _say(
                f"  Settlement   {settlement['state']}: mean {float(settlement['mean_kw']):.1f} kW,"
                f" {float(settlement['payment_eur']):.5f} EUR ({settlement['reason']}),"
                f" verification -> AMS db {_ms(settlement['created_ns'], settlement['stored_ns'])}"
            )
            if settlement["state"] != "settled":
                failures += 1
        stop.set()
        await asyncio.wait_for(task, 10)
    finally:
        stop.set()
        await messenger.close()
        await client.aclose()
        await asyncio.to_thread(ams_redis.close)
    _say(f"[{clock.ms()}] AMS stopped")
    return failures
