"""``mgms bench --lab``: the routes measured on a running lab from the probes it stores anyway.

Why a mode of its own: on real equipment the bench cannot make a value change at a known
moment (the simulators' control channel does that), nor start and stop the gateway per
phase. What it can do without disturbing anything is read back the timestamps every hop
already writes (see :mod:`gateway.bench`) over a window, and measure the floors that need
no more than a second client. Nothing is started; nothing is written into the lab's Redis
except, with ``--allow-commands`` only, command requests exactly as ``mgms command`` makes.

Routes:

* field, per device: the device's own time tag (``source_ts``: CP56Time2a, 61850 ``t``) ->
  stored in Redis (``store_ts``), from ``P:hist:{name}`` over the window. It includes the
  device/gateway clock-sync error (PTP/NTP), which may be larger than the route itself.
* command (``--allow-commands``): request written into ``P:cmd:requests`` -> confirmed, with
  the hops request -> first frame sent -> ACTCON -> confirmed from ``P:cmd:log``.
* activation AMS -> MGMS db: ``P:flex:act:{id}`` (envelope ``created_ns`` by the AMS,
  ``stored_ns`` by the MGMS Redis): crosses hosts.
* flexibility MGMS -> AMS db and the DSO loop: from the AMS's Redis (``--ams-redis``, read
  only): ``ams:{participant}:flex:*``, ``:activation:*``, ``:settlement:*``. The loop ends
  where the AMS stored the verification (the moment it settled it is not probed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.bench.args import FLOORS_LAB, BenchError
from gateway.bench.clock import (
    ClockOffset,
    Host,
    MqttEcho,
    estimate_offset,
    estimate_offset_mqtt,
)
from gateway.bench.progress import Progress
from gateway.bench.report import RouteSpec, apply_clock, build_report, write_outputs
from gateway.bench.stats import summarise
from gateway.config import Direction, LabConfig, load_config
from gateway.errors import StoreError, TransportError
from gateway.store import RedisStore, stream_entries
from gateway.transport.mqtt import MqttSettings

__all__ = ["PROTOCOLS", "LabPlan", "run_lab"]

PROTOCOLS = {"iec104": "IEC 104", "iec61850": "IEC 61850 MMS", "dlms": "DLMS/COSEM"}
FLOOR_104 = "floor_c104_timetag"
#: the 104 floor collects spontaneous time-tagged values for at most this long
FLOOR_104_LIMIT_S = 20.0


@dataclass
class LabPlan:
    """What one lab run reads and from where, checked before anything is touched."""

    cfg: LabConfig
    url: str
    ams_participant: str
    mgms_participant: str | None
    command_point: str | None
    floors: tuple[str, ...]
    series: dict[str, list[float]] = field(default_factory=dict)
    specs: list[RouteSpec] = field(default_factory=list)
    not_measured: dict[str, str] = field(default_factory=dict)
    commands_sent: int = 0


def _redacted(url: str) -> str:
    """A Redis URL without its password (the report is shared)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _command_point(cfg: LabConfig, name: str | None) -> str:
    """The breaker to operate: named, else the first double command; refused on read-only devices."""
    if name is not None:
        try:
            pt = cfg.point(name)
        except KeyError:
            raise BenchError(f"no point {name!r} in the lab config") from None
    else:
        doubles = [p for p in cfg.points if p.direction is Direction.CONTROL and p.address.kind == "double"]
        if not doubles:
            raise BenchError("--allow-commands: the lab config has no double (breaker) command point")
        pt = doubles[0]
    if pt.direction is not Direction.CONTROL or pt.address.kind != "double":
        raise BenchError(f"{pt.name} is not a double (breaker) command: the bench only times open/close")
    if cfg.devices[pt.device].read_only:
        raise BenchError(f"{pt.name}: device {pt.device} is read-only (read_only: true): the bench does not command it")
    return pt.name


def plan(args: argparse.Namespace) -> LabPlan:
    from gateway.cli import resolve_redis_url

    if not args.config:
        raise BenchError("--lab needs --config (the running lab's config)")
    cfg = load_config(args.config)
    if not cfg.probes.enabled:
        raise BenchError(
            f"{args.config} has probes: false, so the running lab stores no hop timestamps to measure; "
            "set probes: true and restart mgms run"
        )
    url = resolve_redis_url(args, cfg, user="operator")  # it commands the breaker and reads
    if url is None:
        raise BenchError("no Redis to read: is `mgms run` running? (or give --redis-url)")
    floors = tuple(f.strip() for f in args.floors.split(",") if f.strip())
    unknown = sorted(set(floors) - set(FLOORS_LAB))
    if unknown:
        raise BenchError(f"unknown floor(s) {unknown}; known: {', '.join(FLOORS_LAB)}")
    if args.ams_remote and not (args.clock_url or args.clock_mqtt):
        raise BenchError("--ams-remote needs the offset: give --clock-url or --clock-mqtt")
    aggregator = cfg.flexibility.aggregator if cfg.flexibility is not None else "ams"
    return LabPlan(
        cfg=cfg,
        url=url,
        ams_participant=args.ams_participant or aggregator,
        mgms_participant=cfg.messaging.participant if cfg.messaging is not None else None,
        command_point=_command_point(cfg, args.command_point) if args.allow_commands else None,
        floors=floors,
    )


def _mqtt_settings(cfg: LabConfig) -> MqttSettings | None:
    if cfg.messaging is None or "mqtt" not in cfg.messaging.transports:
        return None
    raw = cfg.messaging.transports["mqtt"]
    return MqttSettings.model_validate({**raw, "participant": cfg.messaging.participant})


def _transport_to(cfg: LabConfig, peer: str) -> str | None:
    m = cfg.messaging
    if m is None:
        return None
    return m.routes.get(peer) or m.default_transport or next(iter(m.transports), None)


async def _redis_time(r: aioredis.Redis) -> float:
    """The Redis server's clock (s): stream ids and ``stored_ns`` are stamped by it."""
    sec, usec = await r.time()
    return float(sec) + float(usec) / 1e6


# ---------------------------------------------------------------------------- clock, floors


async def _clock(args: argparse.Namespace, p: LabPlan, progress: Progress) -> list[ClockOffset]:
    out: list[ClockOffset] = []
    if args.clock_url:
        progress.note(f"clock offset over HTTPS against {args.clock_url}")
        ctx = ssl.create_default_context(cafile=args.clock_ca) if args.clock_url.startswith("https") else None
        out.append(await estimate_offset(args.clock_url, ctx))
    if args.clock_mqtt:
        settings = _mqtt_settings(p.cfg)
        if settings is None:
            raise BenchError("--clock-mqtt: the lab config's messaging block has no mqtt transport")
        progress.note(f"clock offset over MQTT ({settings.host}:{settings.port}) against {p.ams_participant}")
        try:
            out.append(await estimate_offset_mqtt(settings, p.ams_participant))
        except (TransportError, TimeoutError) as exc:
            raise BenchError(
                f"--clock-mqtt: no exchange with {p.ams_participant}'s responder ({exc or 'timeout'}); is "
                "`python -m gateway.bench.clock serve --mqtt` running on the AMS host, and does the broker "
                "allow heila/v1/clock/ (docs/latency.md)?"
            ) from exc
    return out


async def _floors(p: LabPlan, n: int, progress: Progress) -> None:
    if "mqtt" in p.floors:
        settings = _mqtt_settings(p.cfg)
        if settings is None:
            p.not_measured["floor_mqtt"] = "the lab config has no MQTT transport"
        else:
            label = "floor MqttTransport publish -> on_message, lab broker"
            vals: list[float] = []
            try:
                async with MqttEcho(settings) as echo:
                    for i in range(n + 20):
                        v = await echo.one()
                        if i >= 20:
                            vals.append(v)
                            progress.step(label, i - 19, n)
                p.series["floor_mqtt"] = vals
                progress.done(label, len(vals), n, summarise(vals).median_ms)
            except (TransportError, TimeoutError) as exc:
                p.not_measured["floor_mqtt"] = (
                    f"no echo through {settings.host}:{settings.port} ({exc or 'timeout'}); the broker must "
                    "allow heila/v1/clock/to/<participant>/... (docs/latency.md)"
                )
    else:
        p.not_measured["floor_mqtt"] = "not asked (--floors)"
    p.not_measured["floor_https"] = (
        "a bare POST needs a bare handler on the AMS host; the AMS's own listener would take it as a message "
        "(and count it rejected)"
    )
    protocols = {d.protocol for d in p.cfg.devices.values()}
    if "iec104" in protocols:
        if "iec104" in p.floors:
            await _floor_104(p, n, progress)
        else:
            p.not_measured[FLOOR_104] = "not asked (--floors)"
    if "iec61850" in protocols:
        p.not_measured["floor_iec61850_report"] = (
            "a second MMS association on real equipment competes with the gateway's (report control blocks are "
            "reserved per client): not attempted"
        )
    if "dlms" in protocols:
        p.not_measured["floor_gurux_read"] = "a meter usually allows one DLMS association: not attempted"


async def _floor_104(p: LabPlan, n: int, progress: Progress, limit_s: float = FLOOR_104_LIMIT_S) -> None:
    """Time tag -> callback of a bare c104 client, as a second connection to the first IEC 104
    device (monitoring only: it never commands): the floor of that device's field route."""
    from gateway.protocols.iec104.bare import BareC104

    dev = next(d for d in p.cfg.devices.values() if d.protocol == "iec104")
    if dev.tls.enabled:
        p.not_measured[FLOOR_104] = f"{dev.name} uses TLS; the bare c104 client speaks plain TCP only"
        return
    label = f"floor c104 time tag -> callback, second connection to {dev.name}"
    try:
        bare = BareC104(dev.port, p.cfg, dev.name, None, host=dev.host, record_tags=True)
    except RuntimeError as exc:
        p.not_measured[FLOOR_104] = f"c104 refused the connection to {dev.name}: {exc}"
        return
    await asyncio.to_thread(bare.start)
    try:
        t0 = time.monotonic()
        while len(bare.tag_delays_ms) < n and time.monotonic() - t0 < limit_s:
            await asyncio.sleep(0.2)
            progress.step(label, min(len(bare.tag_delays_ms), n), n)
    finally:
        await asyncio.to_thread(bare.stop)
    vals = bare.tag_delays_ms[:n]
    if not vals:
        p.not_measured[FLOOR_104] = (
            f"no spontaneous time-tagged value from {dev.name} in {limit_s:g} s on a second connection "
            "(does the relay or COM600 accept a second IEC 104 client?)"
        )
        return
    p.series[FLOOR_104] = vals
    progress.done(label, len(vals), n, summarise(vals).median_ms)


# ---------------------------------------------------------------------------- window


async def _follow(store: RedisStore, p: LabPlan, deadline: float, window_s: float, progress: Progress) -> None:
    """Progress while the window runs: time-tagged values seen so far on the change feed."""
    last = await store.changes_tail()
    seen = 0
    tick = max(1.0, window_s / 10)
    next_note = time.monotonic() + tick
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        block = max(1, int(min(1.0, deadline - time.monotonic()) * 1000))
        for e in await store.changes(last, block_ms=block, count=1000):
            last = e.id
            seen += e.source_ts is not None and not e.time_substituted
        if time.monotonic() >= next_note:
            next_note += tick
            progress.note(
                f"  window {time.monotonic() - t0:.0f}/{window_s:g} s: {seen} time-tagged values, "
                f"{p.commands_sent} commands"
            )


async def _commands(store: RedisStore, p: LabPlan, n: int, progress: Progress) -> None:
    """``n`` (even: the breaker ends as it was) open/close requests, one at a time, each as
    ``mgms command`` sends it; times from the command log."""
    assert p.command_point is not None
    status = p.cfg.point(p.command_point).status_point
    assert status is not None
    label = f"{p.command_point}: request -> confirmed"
    route, to_sent, to_ack, to_confirm = [], [], [], []
    n += n % 2
    for i in range(n):
        now = await store.latest(status)
        word = "close" if now is not None and now.value == 1 else "open"
        t0 = time.time()
        rid = await store.submit_command(p.command_point, word, by="mgms-bench")
        p.commands_sent += 1
        reply = await store.wait_reply(rid, 30.0)
        rec = next((r for r in await store.command_log(50) if r.request_id == rid), None)
        if reply is None or rec is None or rec.result != "confirmed" or rec.confirm_ts is None:
            why = reply.result + " " + reply.reason if reply is not None else "no reply within 30 s"
            progress.note(f"  command {i} ({word}): {why}")
        else:
            route.append((rec.confirm_ts - t0) * 1000)
            if rec.sent_ts is not None:
                to_sent.append((rec.sent_ts - t0) * 1000)
                if rec.ack_ts is not None:
                    to_ack.append((rec.ack_ts - rec.sent_ts) * 1000)
                    to_confirm.append((rec.confirm_ts - rec.ack_ts) * 1000)
        progress.step(label, i + 1, n)
    progress.done(label, len(route), n, summarise(route).median_ms)
    p.series.update(
        {
            "lab_command": route,
            "cmd_hop_request_to_sent": to_sent,
            "cmd_hop_sent_to_ack": to_ack,
            "cmd_hop_ack_to_confirmed": to_confirm,
        }
    )


def _field(p: LabPlan, hist: Mapping[str, list[tuple[str, dict[str, str]]]]) -> None:
    """Per device: store_ts - source_ts of every time-tagged value stored in the window."""
    for dev_name, dev in p.cfg.devices.items():
        key = f"field_{dev_name}"
        vals: list[float] = []
        untagged = 0
        points = [pt for pt in p.cfg.points_of(dev_name) if pt.direction is Direction.MONITOR]
        for pt in points:
            for _sid, f in hist.get(pt.name, []):
                src, st = f.get("src", ""), f.get("st", "")
                if src and st and f.get("src_from") != "receive":  # receive time: not the device's
                    vals.append((float(st) - float(src)) * 1000)
                else:
                    untagged += 1
        if not vals:
            why = f"no value with a device time tag stored in the window ({untagged} without one)"
            p.not_measured[key] = why if points else "no monitored points"
            continue
        proto = PROTOCOLS.get(dev.protocol, dev.protocol)
        p.series[key] = vals
        p.specs.append(
            RouteSpec(
                key,
                f"{dev_name}: device time tag -> MGMS db ({len(points)} points)",
                proto,
                "monitoring",
                FLOOR_104 if dev.protocol == "iec104" else None,
                measures=f"the device's time tag (source_ts) -> the gateway stored the value (store_ts), every "
                f"time-tagged value of {dev_name} stored in the window ({untagged} without a time tag left out). "
                "Includes the device/gateway clock-sync error (PTP/NTP).",
            )
        )


async def _hist(
    store: RedisStore, p: LabPlan, since: float, until: float
) -> dict[str, list[tuple[str, dict[str, str]]]]:
    out: dict[str, list[tuple[str, dict[str, str]]]] = {}
    lo, hi = f"{int(since * 1000)}-0", f"{int(until * 1000)}-18446744073709551615"
    for pt in p.cfg.points:
        if pt.direction is Direction.MONITOR:
            out[pt.name] = stream_entries(await store.redis.xrange(store.keys.hist(pt.name), lo, hi))
    return out


async def _hashes(r: aioredis.Redis, pattern: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    async for k in r.scan_iter(pattern, count=1000):
        key = k.decode() if isinstance(k, bytes) else str(k)
        h = await r.hgetall(key)
        out[key] = {(a.decode() if isinstance(a, bytes) else a): (b.decode() if isinstance(b, bytes) else b)
                    for a, b in h.items()}  # fmt: skip
    return out


def _ns_in(h: Mapping[str, str], key: str, since: float, until: float) -> int | None:
    v = h.get(key, "")
    if not v:
        return None
    ns = int(v)
    return ns if since * 1e9 <= ns <= until * 1e9 else None


def _ms(a: int | float, b: int | float) -> float:
    return (float(b) - float(a)) / 1e6


async def _messages(
    store: RedisStore,
    ams: aioredis.Redis | None,
    p: LabPlan,
    mgms_window: tuple[float, float],
    ams_window: tuple[float, float] | None,
) -> None:
    """Message routes and the DSO loop from the hashes both sides store anyway."""
    peer = p.ams_participant
    mg = p.mgms_participant
    transport_out = (_transport_to(p.cfg, peer) or "?").upper()
    acts = await _hashes(store.redis, f"{store.keys.prefix}:flex:act:*")
    act_vals, act_sent, act_store = [], [], []
    in_window: dict[str, dict[str, str]] = {}
    for key, h in acts.items():
        stored = _ns_in(h, "stored_ns", *mgms_window)
        if stored is None or not h.get("created_ns"):
            continue
        in_window[key.rsplit(":flex:act:", 1)[1]] = h
        act_vals.append(_ms(int(h["created_ns"]), stored))
        act_sent.append(_ms(int(h["created_ns"]), int(h["received_ns"])))
        act_store.append(_ms(int(h["received_ns"]), stored))
    if act_vals:
        p.series.update(
            {
                "lab_activation": act_vals,
                "hop_activation_lab_created_to_received": act_sent,
                "hop_activation_lab_received_to_stored": act_store,
            }
        )
        p.specs.append(
            RouteSpec(
                "lab_activation",
                "Activation AMS db -> MGMS db",
                " / ".join(t.upper() for t in (p.cfg.messaging.transports if p.cfg.messaging else ())),
                "AMS -> MGMS",
                "floor_mqtt",
                36.0,
                measures="the AMS created the Activation Notification (envelope created, AMS clock) -> the MGMS "
                "inbox stored it (stored_ns, MGMS Redis TIME): P:flex:act:{id} hashes stored in the window.",
                start_host="ams",
                end_host="mgms",
            )
        )
    else:
        p.not_measured["lab_activation"] = "no activation stored in the window"
    if ams is None or ams_window is None:
        why = "needs the AMS's Redis (--ams-redis)"
        p.not_measured["lab_flexibility"] = why
        p.not_measured["lab_dso_loop"] = why
        return
    if mg is None:
        p.not_measured["lab_flexibility"] = p.not_measured["lab_dso_loop"] = "the lab config has no messaging block"
        return
    prefix = f"ams:{peer}"
    flexes = await _hashes(ams, f"{prefix}:flex:{mg}:*")
    fx_vals, fx_sent, fx_store = [], [], []
    by_offer: dict[str, dict[str, str]] = {}
    for h in flexes.values():
        if h.get("offer"):
            by_offer[h["offer"]] = h
        stored = _ns_in(h, "stored_ns", *ams_window)
        if stored is None or not h.get("created_ns"):
            continue
        fx_vals.append(_ms(int(h["created_ns"]), stored))
        fx_sent.append(_ms(int(h["created_ns"]), int(h["received_ns"])))
        fx_store.append(_ms(int(h["received_ns"]), stored))
    if fx_vals:
        p.series.update(
            {
                "lab_flexibility": fx_vals,
                "hop_flex_lab_created_to_received": fx_sent,
                "hop_flex_lab_received_to_stored": fx_store,
            }
        )
        p.specs.append(
            RouteSpec(
                "lab_flexibility",
                "Flexibility MGMS db -> AMS db",
                transport_out,
                "MGMS -> AMS",
                f"floor_{transport_out.lower()}",
                {"HTTPS": 47.0, "MQTT": 52.0}.get(transport_out),
                measures="the MGMS created the Flexibility (envelope created, MGMS clock) -> the AMS inbox stored it "
                f"(stored_ns, AMS Redis TIME): {prefix}:flex:{mg}:* hashes stored in the window.",
                start_host="mgms",
                end_host="ams",
            )
        )
    else:
        p.not_measured["lab_flexibility"] = "no flexibility stored at the AMS in the window"
    loop: dict[str, list[float]] = {
        k: []
        for k in (
            "lab_dso_loop",
            "loop_hop_flex_to_ams_db",
            "loop_hop_ams_db_to_activation_sent",
            "loop_hop_activation_to_mgms_db",
            "loop_hop_mgms_db_to_command_sent",
            "loop_hop_command_to_confirmed",
            "loop_hop_verification_to_ams_db",
        )
    }
    for act_id, mh in in_window.items():
        ah = await _hget(ams, f"{prefix}:activation:{act_id}")
        settle = await _hget(ams, f"{prefix}:settlement:{act_id}")
        fh = by_offer.get(ah.get("offer", ""))
        commands = json.loads(mh.get("commands", "[]") or "[]")
        if fh is None or not settle.get("stored_ns") or not commands or commands[0].get("result") != "confirmed":
            continue
        c0 = commands[0]
        created, confirm_ns, sent_ns = (
            int(fh["created_ns"]),
            int(float(c0["confirm_ts"]) * 1e9),
            int(float(c0["sent_ts"]) * 1e9),
        )
        ver_created, ver_stored = int(settle["created_ns"]), int(settle["stored_ns"])
        loop["lab_dso_loop"].append(_ms(created, confirm_ns) + _ms(ver_created, ver_stored))
        loop["loop_hop_flex_to_ams_db"].append(_ms(created, int(fh["stored_ns"])))
        loop["loop_hop_ams_db_to_activation_sent"].append(_ms(int(fh["stored_ns"]), int(ah["sent_ns"])))
        loop["loop_hop_activation_to_mgms_db"].append(_ms(int(ah["sent_ns"]), int(mh["stored_ns"])))
        loop["loop_hop_mgms_db_to_command_sent"].append(_ms(int(mh["stored_ns"]), sent_ns))
        loop["loop_hop_command_to_confirmed"].append(_ms(sent_ns, confirm_ns))
        loop["loop_hop_verification_to_ams_db"].append(_ms(ver_created, ver_stored))
    if loop["lab_dso_loop"]:
        p.series.update(loop)
        p.specs.append(
            RouteSpec(
                "lab_dso_loop",
                "DSO loop: flexibility -> activation -> breaker -> verification stored",
                "messages + field",
                "MGMS -> AMS -> MGMS -> AMS",
                loop=True,
                measures="(breaker open confirmed - flexibility created) + (verification stored at the AMS - "
                "verification created), for each activation stored in the window whose verification the AMS "
                "stored: the activation window is a scheduled wait and left out; the breaker's real travel is in.",
                start_host="mgms",
                end_host="ams",
            )
        )
    else:
        p.not_measured["lab_dso_loop"] = "no activation in the window was confirmed and its verification stored"


async def _hget(r: aioredis.Redis, key: str) -> dict[str, str]:
    h = await r.hgetall(key)
    return {(a.decode() if isinstance(a, bytes) else a): (b.decode() if isinstance(b, bytes) else b)
            for a, b in h.items()}  # fmt: skip


# ---------------------------------------------------------------------------- the run

#: Whose clocks stamp each lab-only hop; the message and loop hops follow runner.hop_hosts.
LAB_HOSTS: dict[str, tuple[Host, Host]] = {
    "cmd_hop_request_to_sent": ("mgms", "mgms"),
    "cmd_hop_sent_to_ack": ("mgms", "mgms"),
    "cmd_hop_ack_to_confirmed": ("mgms", "mgms"),
}


async def run_lab(args: argparse.Namespace) -> dict[str, Any]:
    """Attach to the running lab, watch ``--window-s``, write the same outputs as the simulator mode."""
    from gateway.bench.runner import _command_line, hop_hosts

    p = plan(args)
    progress = Progress(quiet=args.quiet)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    t_run = time.monotonic()
    store = RedisStore.from_url(p.cfg, p.url)
    ams: aioredis.Redis | None = None
    try:
        try:
            await store.redis.ping()
        except RedisError as exc:
            raise StoreError(f"no Redis at {_redacted(p.url)}: {exc}") from exc
        if args.ams_redis:
            ams_url = str(args.ams_redis)
            if getattr(args, "ams_redis_secret_file", None):
                from gateway.services import read_redis_secret, url_with_credentials

                ams_url = url_with_credentials(ams_url, "viewer", read_redis_secret(Path(args.ams_redis_secret_file)))
            ams = aioredis.Redis.from_url(ams_url, decode_responses=True)
            try:
                await ams.ping()
            except RedisError as exc:
                raise StoreError(f"no AMS Redis at {_redacted(args.ams_redis)}: {exc}") from exc
        progress.note(
            f"lab {p.cfg.lab.name}: attached to {_redacted(p.url)}"
            + (f" and the AMS's {_redacted(args.ams_redis)}" if ams is not None else "")
            + "; nothing started"
        )
        estimates = await _clock(args, p, progress)
        await _floors(p, args.n, progress)
        lookback = float(args.lookback_s)
        since_mgms = await _redis_time(store.redis) - lookback
        since_ams = await _redis_time(ams) - lookback if ams is not None else None
        progress.note(
            f"window {args.window_s:g} s (+ {lookback:g} s before it): field time tags"
            + (f", {args.command_n + args.command_n % 2} commands on {p.command_point}" if p.command_point else "")
        )
        deadline = time.monotonic() + float(args.window_s)
        # the commands run in the window (their status changes are field values too); an error
        # in either ends both and comes out as itself
        follow = asyncio.create_task(
            _follow(store, p, deadline, float(args.window_s), progress), name="bench-lab-follow"
        )
        try:
            if p.command_point is not None:
                await _commands(store, p, args.command_n, progress)
            await follow
        finally:
            if not follow.done():
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follow
        if p.command_point is None:
            p.not_measured["lab_command"] = "commands operate the breaker: only with --allow-commands"
        elif not p.series.get("lab_command"):
            p.not_measured["lab_command"] = "no command was confirmed (see the run's log)"
        until_mgms = await _redis_time(store.redis)
        until_ams = await _redis_time(ams) if ams is not None else None
        _field(p, await _hist(store, p, since_mgms, until_mgms))
        if p.command_point is not None and p.series.get("lab_command"):
            dev = p.cfg.point(p.command_point).device
            p.specs.append(
                RouteSpec(
                    "lab_command",
                    f"Breaker command MGMS db -> {dev} -> status",
                    PROTOCOLS.get(p.cfg.devices[dev].protocol, p.cfg.devices[dev].protocol),
                    "control",
                    measures="a request written into P:cmd:requests (as `mgms command` does) -> the confirmed "
                    "status (confirm_ts in P:cmd:log); the breaker's real travel is in.",
                )
            )
        ams_window = (since_ams, until_ams) if since_ams is not None and until_ams is not None else None
        await _messages(store, ams, p, (since_mgms, until_mgms), ams_window)
    except RedisError as exc:  # mgms's convention: an unreachable service is exit code 3
        raise StoreError(f"bench --lab: Redis failed while reading the probes: {exc}") from exc
    finally:
        await store.aclose()
        if ams is not None:
            with contextlib.suppress(RedisError):
                await ams.aclose()
    clock = min(estimates, key=lambda e: e.uncertainty_ms) if estimates else None
    extra: dict[str, Any] = {
        "mode": "lab",
        "started": started,
        "command": _command_line(),
        "config": str(args.config),
        "redis": _redacted(p.url),
        "ams_redis": _redacted(args.ams_redis) if args.ams_redis else None,
        "window_s": float(args.window_s),
        "lookback_s": float(args.lookback_s),
        "n": args.n,
        "commands_allowed": p.command_point is not None,
        "commands_sent": p.commands_sent,
        "not_measured": p.not_measured,
        "command_hops": {k: summarise(v).as_dict() for k, v in p.series.items() if k.startswith("cmd_hop_")},
        "duration_s": round(time.monotonic() - t_run, 1),
    }
    if clock is not None:
        extra["clock"] = {**clock.as_dict(), "applied": bool(args.ams_remote)}
        extra["clock_estimates"] = [e.as_dict() for e in estimates]
        extra["clock_note"] = (
            "--ams-remote: cross-host routes corrected by this offset."
            if args.ams_remote
            else "AMS taken to share this host's clock (no --ams-remote): reported, not applied."
        )
    else:
        extra["clock_note"] = "no clock exchange asked for (--clock-url / --clock-mqtt): AMS taken to share this clock."
    hosts = {**hop_hosts(p.series), **LAB_HOSTS}
    corrected, corrections = apply_clock(p.specs, p.series, hosts, clock, ams_remote=bool(args.ams_remote))
    report = build_report(p.specs, corrected, extra, corrections)
    write_outputs(report, corrected, Path(args.out))
    return report
