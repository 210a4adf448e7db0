"""``ams``: the aggregator's command line.

``ams run`` serves flexibility, offers, clearance, activation and settlement; the other
commands look at or act on the state a running AMS keeps in Redis, so an operator needs no
other tool. Exit codes as for ``mgms``: 0 success; 1 ran but failed; 2 bad input (config,
arguments); 3 a service (Redis) unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ams.config import AmsConfig, load_ams_config
from gateway.cli import redis_url_arg, report_config_error
from gateway.cliutil import add_version, configure_logging, quiet_on_broken_pipe
from gateway.errors import ConfigError, GatewayError, StoreError
from gateway.semantic import FlexibilityType

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    import redis.asyncio as aioredis

    from gateway.audit import AuditLog
    from gateway.auditcli import AuditTarget
    from gateway.semantic.security import PrivateIdentity

__all__ = ["main"]

DEFAULT_STATE_DIR = Path(".ams")
log = logging.getLogger("ams")


def _state_dir(args: argparse.Namespace, cfg: AmsConfig) -> Path:
    base = Path(args.data_dir) if getattr(args, "data_dir", None) else DEFAULT_STATE_DIR
    # absolute: the embedded Redis and the CLI commands must agree on it whatever their cwd
    return (base / cfg.participant).absolute()


def _redis_url(args: argparse.Namespace, cfg: AmsConfig, *, user: str = "ams") -> str:
    """The AMS's Redis as ``user`` (``ams``: the worker; ``viewer``: read only), with its
    credentials (:mod:`gateway.redisauth`); never print it."""
    from gateway.redisauth import client_url

    url = client_url(args, cfg.redis, _state_dir(args, cfg), user=user)
    if url is None:
        raise StoreError(f"no Redis: give --redis-url, set redis.url, or start `ams run -c {args.config}` first")
    return url


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="ams", description="Aggregator Management System (AMS)")
    add_version(ap)
    ap.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO for run, WARNING for the others (their own output is the point)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, user: str = "ams") -> None:
        from gateway.redisauth import add_redis_user_arguments

        p.add_argument("--config", "-c", required=True, help="AMS config file (YAML)")
        p.add_argument("--redis-url", type=redis_url_arg, help="Redis URL (overrides the config's redis.url)")
        add_redis_user_arguments(p, user=user)
        p.add_argument(
            "--data-dir",
            metavar="DIR",
            help="parent folder of the AMS's state: the embedded Redis keeps its data and url in "
            f"DIR/<participant> (default {DEFAULT_STATE_DIR}); give the same DIR to run and the other commands",
        )

    p = sub.add_parser("check-config", help="validate an AMS config and print a summary")
    p.add_argument("--config", "-c", help="AMS config file (YAML)")
    p.add_argument("file", nargs="?", help="the same file as a positional argument (as `mgms check-config FILE`)")
    p = sub.add_parser("run", help="serve the AMS until SIGINT/SIGTERM")
    common(p)
    p.add_argument(
        "--worker",
        default=f"{socket.gethostname()}-{os.getpid()}",
        help="consumer name of this worker, unique per running worker (default host-pid); entries a "
        "stopped worker left pending are taken over by the others after 30 s",
    )
    p = sub.add_parser("register", help="register (or move) a microgrid")
    common(p)
    p.add_argument("participant", help="the microgrid's MGMS participant name (its messaging.participant)")
    p.add_argument("location", help="its grid location, as DSO requests name it (e.g. FI-Espoo/feeder-3)")
    p = sub.add_parser(
        "request",
        help="submit a DSO request and print how a running worker cleared it",
        description="Queue a DSO request; a running `ams run` worker clears it against the open offers. "
        "Exit 0 when it was cleared in full, 1 when partly, not at all, or not within --wait-s.",
    )
    common(p)
    p.add_argument("--type", choices=[t.value for t in FlexibilityType], required=True, help="direction bought")
    p.add_argument("--power-kw", type=float, required=True, help="power wanted, kW")
    p.add_argument("--location", default="*", help="grid location of the offers it may take (default *: any)")
    p.add_argument("--start-in-s", type=float, default=0.0, help="window start, seconds from now (default 0)")
    p.add_argument("--duration-s", type=float, default=900.0, help="window length in seconds (default 900)")
    p.add_argument("--price-cap", type=float, default=None, help="EUR/MWh (default: no cap)")
    p.add_argument(
        "--wait-s", type=float, default=10.0,
        help="how long to wait for a worker's clearance (default 10; 0: print the request id and exit)",
    )  # fmt: skip
    p = sub.add_parser(
        "dispatch",
        help="form a VPP coalition for a service and activate it through the running AMS",
        description="Solve the coalition (ams.vpp) with the reliabilities the AMS measured, then queue the "
        "chosen assets' blocks: a running `ams run` worker sends their Activation Notifications.",
    )
    common(p)
    p.add_argument("portfolio", help="portfolio YAML/JSON (lab_configs/vpp/portfolio.yaml)")
    p.add_argument("request", help="service request YAML/JSON (lab_configs/vpp/request-*.yaml)")
    p.add_argument(
        "--method", choices=("milp", "heuristic", "hierarchical"), default="milp",
        help="milp (HiGHS, default), merit-order heuristic, or hierarchical VPP of microgrid VPPs",
    )  # fmt: skip
    p.add_argument("--time-limit", type=float, default=60.0, help="HiGHS time limit in seconds")
    p = sub.add_parser("status", help="microgrids, open offers, activations and settlements")
    common(p, user="viewer")
    p.add_argument("--json", action="store_true", help="print it as JSON (numbers and booleans typed)")
    p.add_argument("--last", type=int, default=20, help="activations and settlements shown (default 20, newest)")
    from gateway.auditcli import add_audit_command

    add_audit_command(sub, lambda p: common(p, user="viewer"), _audit_target)
    with contextlib.suppress(ImportError):
        from ams.vpp.cli import add_vpp_commands

        add_vpp_commands(sub)
    return ap


async def _with_service(args: argparse.Namespace, cfg: AmsConfig, fn: Any, *, user: str = "ams") -> Any:
    """Run ``fn(service)`` against the AMS state in Redis (no transports started), as ``user``."""
    import redis.asyncio as aioredis

    from ams.service import AmsService

    client: aioredis.Redis = aioredis.Redis.from_url(_redis_url(args, cfg, user=user), decode_responses=True)
    try:
        if user == "viewer":  # a read-only look: nothing to record
            return await fn(AmsService(cfg.service_settings(), client, cfg.participant))
        async with _audit_log(client, cfg, None) as audit:  # e.g. `ams register`: recorded
            return await fn(AmsService(cfg.service_settings(), client, cfg.participant, audit=audit))
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def _audit_log(
    client: aioredis.Redis, cfg: AmsConfig, identity: PrivateIdentity | None
) -> AsyncIterator[AuditLog]:
    """The AMS's audit trail (``ams:<participant>:audit``), closed (last checkpoint) on the way out.

    ``identity`` None (a one-shot CLI command): the messaging key signs if this account may read it."""
    from gateway.audit import AuditLog
    from gateway.semantic.security import load_private_identity

    if identity is None:
        with contextlib.suppress(ConfigError):
            identity = load_private_identity(cfg.messaging.identity_file)
    audit = AuditLog(client, prefix=f"ams:{cfg.participant}", identity=identity)
    await audit.start()
    try:
        yield audit
    finally:
        await audit.close()


def _audit_target(args: argparse.Namespace) -> AuditTarget:
    """The AMS's audit stream (``ams audit``), read as its viewer user."""
    from gateway.auditcli import AuditTarget, public_key_near

    cfg = load_ams_config(args.config)
    url = _redis_url(args, cfg, user="viewer") if not getattr(args, "file", None) else None
    return AuditTarget(f"ams:{cfg.participant}", url, public_key_near(cfg.messaging.identity_file))


async def _run(args: argparse.Namespace, cfg: AmsConfig) -> int:
    """The AMS until SIGINT/SIGTERM; a signal during start-up stops what was started.

    As ``mgms run``: handlers first (gateway.lifecycle), the data dir locked before the
    embedded Redis starts (a second run on it exits with 2; a second *worker* shares the
    first one's Redis with ``--redis-url``).
    """
    import redis.asyncio as aioredis

    from ams.service import AmsService
    from gateway.lifecycle import StopSignals
    from gateway.messaging import build_messenger
    from gateway.redisauth import service_url, warn_if_open
    from gateway.services import DataDirInUse, ams_redis_users, embedded_redis

    with StopSignals() as signals:
        try:
            external = service_url(args, cfg.redis, _state_dir(args, cfg), user="ams")
            async with embedded_redis(
                external, _state_dir(args, cfg), who="ams", users=ams_redis_users(f"ams:{cfg.participant}")
            ) as url:
                if external is not None:
                    await warn_if_open(url, "ams")
                client: aioredis.Redis = aioredis.Redis.from_url(url, decode_responses=True)
                try:
                    messenger = build_messenger(
                        cfg.messaging, client, prefix=f"ams:{cfg.participant}", probes=cfg.probes.enabled
                    )
                    async with messenger, _audit_log(client, cfg, messenger.sealer.keystore.own) as audit:
                        audit.config_load(args.config, who="ams run", worker=args.worker)
                        log.info("AMS %s running (worker %s)", cfg.participant, args.worker)
                        svc = AmsService(
                            cfg.service_settings(),
                            client,
                            cfg.participant,
                            messenger=messenger,
                            worker=args.worker,
                            probes=cfg.probes.enabled,
                            audit=audit,
                        )
                        signals.started()
                        await svc.run(signals.stop)
                finally:
                    await client.aclose()
        except DataDirInUse as exc:
            marker = _state_dir(args, cfg) / "redis.url"
            print(
                f"error: {exc}\n(a second worker of the same AMS: `ams run -c {args.config} "
                f"--redis-url $(cat {marker})`)",
                file=sys.stderr,
            )
            return 2
    return 0


#: stored as text in Redis hashes and streams; typed again for ``ams status --json``
_FLOAT_FIELDS = frozenset(
    {"mean_kw", "step_share", "energy_mwh", "payment_eur", "power_kw", "reserved_kw", "price", "reliability"}
)
_BOOL_FIELDS = frozenset({"delivered"})


def _typed(record: dict[str, str]) -> dict[str, Any]:
    """A stored record with its numbers and booleans as JSON numbers and booleans.

    By name, not by guessing from the text: an identifier that happens to look like a
    number stays a string. ``*_ns`` fields are integers (nanosecond stamps).
    """
    out: dict[str, Any] = {}
    for k, v in record.items():
        try:
            if k in _FLOAT_FIELDS:
                out[k] = float(v)
            elif k.endswith("_ns"):
                out[k] = int(v)
            elif k in _BOOL_FIELDS:
                out[k] = v.lower() in ("true", "1", "yes")
            else:
                out[k] = v
        except ValueError:  # written by hand or by an older version: keep the text
            out[k] = v
    return out


#: the worker's messaging counters ``ams status`` shows next to the outbox (from ``A:stats``)
_MESSAGING_COUNTERS = ("receipted", "resent", "unreceipted", "duplicates", "receipts_sent")

#: activations read per ``ams status`` at most (SCAN is bounded so a long-lived AMS answers fast)
_ACTIVATIONS_SCANNED = 5000


async def _status(args: argparse.Namespace, cfg: AmsConfig) -> int:
    from gateway.messaging import MessagingKeys, outbox_status

    async def collect(svc: Any) -> dict[str, Any]:
        r = svc.redis
        open_offers = await svc.open_offers()
        mgs = {k: json.loads(v) for k, v in (await r.hgetall(svc.keys.microgrids)).items()}
        offers = [
            asdict(o) | {"flexibility_type": o.flexibility_type.value, "start": o.start.isoformat(),
                         "stop": o.stop.isoformat()}
            for o in open_offers
        ]  # fmt: skip
        activations: list[dict[str, Any]] = []
        prefix = svc.keys.activation("")
        async for key in r.scan_iter(match=svc.keys.activation("*"), count=500):
            activations.append({"activation": key[len(prefix):], **_typed(await r.hgetall(key))})
            if len(activations) >= _ACTIVATIONS_SCANNED:
                break
        activations.sort(key=lambda a: (str(a.get("start", "")), a["activation"]))
        settlements = [_typed(f) for _, f in await r.xrevrange(svc.keys.settlements, count=args.last)]
        # the outbox as Redis holds it now (no Messenger needed), and the worker's counters
        outbox = await outbox_status(r, MessagingKeys(svc.keys.prefix), list(cfg.messaging.transports))
        stats = await r.hgetall(svc.keys.stats)
        counted = {k: int(stats.get(k, 0) or 0) for k in _MESSAGING_COUNTERS}
        return {
            "microgrids": mgs,
            "open_offers": offers,
            "activations": activations[-args.last:] if args.last > 0 else [],
            "settlements": settlements,
            "messaging": {**asdict(outbox), **counted},
        }

    data = await _with_service(args, cfg, collect, user="viewer")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print(f"AMS {cfg.participant}: {len(data['microgrids'])} microgrid(s)")
    for name, mg in data["microgrids"].items():
        print(
            f"  {name:20s} {mg.get('location', ''):24s} reliability {float(mg.get('reliability', 1)):.3f}"
            f"  delivered {mg.get('delivered', 0)}  failed {mg.get('failed', 0)}"
        )
    print(f"open offers (merit order): {len(data['open_offers'])}")
    for o in data["open_offers"]:
        print(
            f"  {o['offer_id']:40s} {o['flexibility_type']:9s} {o['power_kw']:8.1f} kW"
            f" {o['price_eur_per_mwh']:8.2f} EUR/MWh"
        )
    print(f"activations (newest {len(data['activations'])}):")
    for a in data["activations"]:
        print(
            f"  {a['activation']:40s} {a.get('microgrid', '?'):18s} {a.get('state', '?'):9s}"
            f" {float(a.get('power_kw', 0)):8.1f} kW  {_clock(a.get('start'))}-{_clock(a.get('stop'))}"
        )
    m = data["messaging"]
    print(
        f"outbox: {m['unsent']} unsent (oldest {m['oldest_unsent_age_s']:.1f} s), {m['awaiting_receipt']} awaiting"
        f" a receipt (oldest {m['oldest_awaiting_age_s']:.1f} s); receipted {m['receipted']}, resent {m['resent']},"
        f" given up {m['unreceipted']}"
    )
    print("last settlements:")
    for st in data["settlements"]:
        print(
            f"  {st['activation']:40s} {st['state']:8s} {float(st['mean_kw']):8.2f} kW"
            f"  {float(st['payment_eur']):9.4f} EUR  {st['reason']}"
        )
    return 0


def _clock(iso: object) -> str:
    """``2026-12-07T23:15:00+00:00`` -> ``23:15:00`` (UTC, as stored); anything else as is."""
    text = str(iso or "?")
    return text[11:19] if len(text) >= 19 and text[10] == "T" else text


async def _request(args: argparse.Namespace, cfg: AmsConfig) -> int:
    from ams.market import DsoRequest
    from ams.service import new_request_id, request_window

    start, stop = request_window(args.start_in_s, args.duration_s)
    req = DsoRequest(
        request_id=new_request_id(),
        location=args.location,
        flexibility_type=FlexibilityType(args.type),
        power_kw=args.power_kw,
        start=start,
        stop=stop,
        price_cap_eur_per_mwh=args.price_cap,
    )

    async def submit(svc: Any) -> int:
        # the events stream's newest id before queueing: the worker's "cleared" entry comes after it
        last = await svc.redis.xrevrange(svc.keys.events, count=1)
        since = last[0][0] if last else "0-0"
        rid = str(await svc.submit_request(req))
        if args.wait_s <= 0:
            print(rid)
            return 0
        cleared = await _wait_for_event(svc, since, "cleared", rid, args.wait_s)
        if cleared is None:
            print(
                f"{rid}: queued; no AMS worker cleared it within {args.wait_s:g} s (is `ams run -c {args.config}` "
                "running?) - a worker that starts later still clears it"
            )
            return 1
        accepted, short = float(cleared.get("accepted_kw", 0)), float(cleared.get("shortfall_kw", 0))
        taken = [o for o in cleared.get("offers", "").split(",") if o]
        if not taken:
            print(f"{rid}: nothing cleared - no open offer fits ({args.type} {args.power_kw:g} kW at {args.location})")
            return 1
        print(
            f"{rid}: cleared {accepted:.1f} of {args.power_kw:g} kW from {len(taken)} offer(s)"
            + (f", short {short:.1f} kW" if short > 0 else "")
        )
        for o in taken:
            print(f"  {o}")
        return 0 if short <= 1e-9 else 1

    return int(await _with_service(args, cfg, submit))


async def _wait_for_event(svc: Any, since: str, event: str, request: str, timeout_s: float) -> dict[str, str] | None:
    """The first ``event`` entry about ``request`` after stream id ``since``; None at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (remaining := deadline - loop.time()) > 0:
        block_ms = max(1, int(min(1.0, remaining) * 1000))
        got = await svc.redis.xread({svc.keys.events: since}, count=100, block=block_ms)
        for _stream, entries in got or []:
            for eid, fields in entries:
                since = eid
                if fields.get("event") == event and fields.get("request") == request:
                    return cast(dict[str, str], fields)
    return None


async def _dispatch(args: argparse.Namespace, cfg: AmsConfig) -> int:
    from ams.dispatch import portfolio_as_known
    from ams.service import new_request_id
    from ams.vpp.coalition import solve_heuristic, solve_hierarchical, solve_milp
    from ams.vpp.errors import BadInput, Infeasible
    from ams.vpp.offers import offers_from_coalition
    from ams.vpp.portfolio import load_portfolio, read_mapping
    from ams.vpp.report import coalition_table
    from ams.vpp.services import service_from_mapping

    async def run(svc: Any) -> int:
        try:
            loaded = load_portfolio(args.portfolio)
            registered = set(await svc.redis.hkeys(svc.keys.microgrids))
            missing = sorted({a.microgrid for a in loaded.assets} - registered)
            if missing:
                # the worker would refuse each of their blocks one by one; say it once, before anything is queued
                print(
                    f"error: {args.portfolio}: microgrid(s) not registered with AMS {cfg.participant}: "
                    f"{', '.join(missing)} (registered: {', '.join(sorted(registered)) or 'none'}); "
                    f"register them first (`ams register -c {args.config} NAME LOCATION`, or `microgrids:` in the "
                    "config) or remove their assets from the portfolio",
                    file=sys.stderr,
                )
                return 2
            portfolio = await portfolio_as_known(loaded, svc.redis, cfg.participant)
            req = service_from_mapping(read_mapping(args.request))
            if args.method == "heuristic":
                res = solve_heuristic(portfolio, req)
            elif args.method == "hierarchical":
                res = solve_hierarchical(portfolio, req, args.time_limit)
            else:
                # large portfolios: the merit-order coalition as HiGHS's first incumbent, so a
                # time limit still yields a coalition (as `ams coalition` does)
                start = solve_heuristic(portfolio, req) if len(portfolio.assets) >= 200 else None
                res = solve_milp(portfolio, req, args.time_limit, warm_start=start)
        except BadInput as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Infeasible as exc:
            print(f"infeasible: binding constraint: {exc.constraint} {exc.detail}", file=sys.stderr)
            return 3
        print(coalition_table(res))
        lines = offers_from_coalition(res)
        if not lines:
            print("the coalition chose no active-power block: nothing to activate", file=sys.stderr)
            return 1
        dispatch_id = await svc.submit_dispatch(lines, new_request_id())
        print(f"dispatch {dispatch_id}: {len(lines)} block(s) queued for the AMS workers")
        for x in lines:
            print(
                f"  {x.microgrid:18s} {x.asset:14s} {x.flexibility_type.value:9s} {x.power_kw:8.1f} kW"
                f" {x.start:%Y-%m-%d %H:%M}-{x.stop:%H:%M} {x.price_eur_per_mwh:8.2f} EUR/MWh"
            )
        return 0

    return int(await _with_service(args, cfg, run))


async def _register(args: argparse.Namespace, cfg: AmsConfig) -> int:
    async def reg(svc: Any) -> None:
        await svc.register(args.participant, args.location)

    await _with_service(args, cfg, reg)
    print(f"registered {args.participant} at {args.location}")
    return 0


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "check-config":
        if args.config and args.file and args.config != args.file:
            ap.error(f"check-config: two files given ({args.file} and --config {args.config}): give one")
        args.config = args.config or args.file
        if not args.config:
            ap.error("check-config: give the AMS config with --config/-c FILE")
    level = args.log_level or ("INFO" if args.cmd == "run" else "WARNING")
    configure_logging(level)  # journal lines (priority, no timestamp) under systemd
    try:
        if getattr(args, "func", None) is not None:  # the VPP commands (ams.vpp.cli)
            return int(args.func(args))
        # check-config and run: also what run reads at start, so the two refuse the same configs
        cfg = load_ams_config(args.config, runnable=args.cmd in ("check-config", "run"))
        if args.cmd == "check-config":
            transports = ", ".join(cfg.messaging.transports)
            n = len(cfg.microgrids)
            probes = "" if cfg.probes.enabled else ", probes off"
            print(f"{args.config}: OK - AMS {cfg.participant!r}, transports {transports}, {n} microgrid(s){probes}")
            return 0
        handlers = {"run": _run, "status": _status, "request": _request, "register": _register, "dispatch": _dispatch}
        return int(asyncio.run(handlers[args.cmd](args, cfg)))
    except ConfigError as exc:
        return report_config_error(exc)
    except KeyboardInterrupt:
        return 130
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.retryable else 1
    except BrokenPipeError:  # stdout's reader went away (`ams status | head`): quiet_on_broken_pipe's business
        raise
    except OSError as exc:  # e.g. Redis refused the connection
        print(f"error: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
