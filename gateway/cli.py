"""``mgms``: the gateway's command line.

Exit codes: 0 success; 1 the operation ran but failed (command rejected, timed out);
2 bad input (config invalid, bad arguments); 3 an external service was unreachable;
141 the reader of stdout went away (``mgms ... | head``), as a shell reports for SIGPIPE.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.cliutil import add_version, configure_logging, did_you_mean, quiet_on_broken_pipe
from gateway.config import LabConfig, load_config
from gateway.errors import CommandInvalid, ConfigError, GatewayError

if TYPE_CHECKING:
    from gateway.auditcli import AuditTarget
    from gateway.store import CommandRecord, RedisStore

__all__ = ["main", "redis_url_arg", "report_config_error"]

DEFAULT_STATE_DIR = Path(".mgms")


def _state_dir(args: argparse.Namespace, cfg: LabConfig) -> Path:
    base = Path(args.data_dir) if getattr(args, "data_dir", None) else DEFAULT_STATE_DIR
    # absolute: the embedded Redis and the CLI commands must agree on it whatever their cwd
    return (base / cfg.lab.name).absolute()


def resolve_redis_url(args: argparse.Namespace, cfg: LabConfig, *, user: str = "viewer") -> str | None:
    """The Redis to talk to as ``user``, with its credentials (never print it; :func:`display_url`).

    --redis-url (and --redis-user/--redis-secret-file), else the config's url and user, else
    the url a running embedded gateway wrote down with the secret file of ``user``
    (:mod:`gateway.redisauth`).
    """
    from gateway.redisauth import client_url

    return client_url(args, cfg.redis, _state_dir(args, cfg), user=user)


def service_redis_url(args: argparse.Namespace, cfg: LabConfig) -> str | None:
    """The lab's own Redis for ``mgms run`` (with the gateway's credentials); None: start one."""
    from gateway.redisauth import service_url

    return service_url(args, cfg.redis, _state_dir(args, cfg), user="gateway")


def redis_url_arg(value: str) -> str:
    """argparse type of ``--redis-url``: checked as the config's ``redis.url`` is (redis-py's
    ValueError came out of ``run`` as a traceback)."""
    from gateway.config import check_redis_url

    try:
        return check_redis_url(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_common(p: argparse.ArgumentParser, config_required: bool = True, *, user: str = "gateway") -> None:
    from gateway.redisauth import add_redis_user_arguments

    p.add_argument("--config", "-c", required=config_required, help="lab config file (YAML)")
    p.add_argument("--redis-url", type=redis_url_arg, help="Redis URL (overrides the config's redis.url)")
    add_redis_user_arguments(p, user=user)
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="parent folder of the lab's state: the embedded Redis keeps its data and url in DIR/<lab name> "
        f"(default {DEFAULT_STATE_DIR}); give the same DIR to run, watch and command",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mgms", description="Microgrid lab integration gateway (MGMS)")
    add_version(ap)
    ap.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default INFO for run, WARNING for the others (their own output is the point)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("check-config", help="validate a lab config and print a summary")
    p.add_argument("--config", "-c", help="lab config file (YAML)")
    p.add_argument("file", nargs="?", help="the same file as a positional argument (the older form)")

    p = sub.add_parser("run", help="run the gateway until SIGINT/SIGTERM")
    _add_common(p)

    p = sub.add_parser("command", help="operate a control point through the running gateway")
    _add_common(p, user="operator")
    p.add_argument("point", help="control point name, as in the config (e.g. feeder.breaker.command)")
    p.add_argument("value", help="open/close, on/off, or a number in the point's unit")
    p.add_argument("--by", default="cli", help="who asks (goes into the command log)")
    p.add_argument("--timeout-s", type=float, default=15.0, help="how long to wait for the result")
    p.add_argument("--json", action="store_true", help="print the whole command record as JSON (for scripts)")

    p = sub.add_parser("watch", help="show the live points from Redis in the terminal")
    _add_common(p, user="viewer")
    p.add_argument("--once", action="store_true", help="print the table once and exit")

    p = sub.add_parser("keys", help="create a participant's key pair for signed/encrypted AMS messages")
    p.add_argument("participant", help="participant name (as in the message sender/recipient)")
    p.add_argument("--out-dir", "-o", default="keys", help="directory for <participant>.key and .pub (default ./keys)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")

    p = sub.add_parser("demo", help="the lab on simulators: Redis, simulator, gateway, breaker operations")
    p.add_argument("--config", "-c", default=str(_default_sim_config()), help="simulator profile of the lab")
    p.add_argument("--operations", type=int, default=3, help="open/close cycles to time")
    p.add_argument("--keep-running", action="store_true", help="after the steps, keep the lab running until Ctrl-C")

    from gateway.bench.args import add_arguments as add_bench_arguments

    p = sub.add_parser(
        "bench",
        help="latency of the HEILA routes next to each protocol's floor: on simulators, or --lab on a running lab",
    )
    add_bench_arguments(p)
    from gateway.labcli import add_lab_commands

    add_lab_commands(sub)  # pki, peers, broker, lab up
    from gateway.auditcli import add_audit_command

    add_audit_command(sub, lambda p: _add_common(p, config_required=False, user="auditor"), _audit_target)
    return ap


def _audit_target(args: argparse.Namespace) -> AuditTarget:
    """The lab's audit stream (``mgms audit``): its key prefix, Redis, and signer's public key."""
    from gateway.auditcli import AuditTarget, public_key_near
    from gateway.store import StoreKeys

    cfg = load_config(args.config)
    identity = cfg.messaging.identity_file if cfg.messaging is not None else None
    url = resolve_redis_url(args, cfg, user="auditor")
    return AuditTarget(StoreKeys.for_lab(cfg).prefix, url, public_key_near(identity))


def _default_sim_config() -> Path:
    return Path(__file__).resolve().parent.parent / "lab_configs" / "multipower-sim.yaml"


def _check_config_file(ap: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``check-config -c FILE`` as every other command; ``check-config FILE`` still works."""
    if args.config and args.file and args.config != args.file:
        ap.error(f"check-config: two files given ({args.file} and --config {args.config}): give one")
    if not (args.config or args.file):
        ap.error("check-config: give the lab config with --config/-c FILE")
    return str(args.config or args.file)


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.preflight import load_runnable_config

    cfg = load_runnable_config(args.file)  # what run would refuse, too (secrets, keys, PEM files)
    print(f"{args.file}: OK - lab {cfg.lab.name!r}: {len(cfg.devices)} device(s), {len(cfg.points)} point(s)")
    for name, dev in cfg.devices.items():
        pts = cfg.points_of(name)
        ctl = [p for p in pts if p.direction.value == "control"]
        where = {"iec104": f" CA {dev.common_address}", "iec61850": f" IED {dev.ied_name}"}.get(dev.protocol, "")
        print(
            f"  {name}: {dev.protocol} {dev.host}:{dev.port}{where}: "
            f"{len(pts) - len(ctl)} monitored, {len(ctl)} control"
        )
        for p in ctl:
            print(f"    {p.name} -> confirmed by {p.status_point}{' (SBO)' if p.select_before_operate else ''}")
    if cfg.redis.url is None:
        print("  redis: embedded (started by the gateway, ACL users and secrets in its data dir)")
    else:
        from gateway.services import display_url

        who = f" as {cfg.redis.user}" if cfg.redis.user else ""
        print(f"  redis: {display_url(cfg.redis.url)}{who}")
    if cfg.messaging is not None:
        m = cfg.messaging
        routes = (
            ", ".join(f"{peer} via {t}" for peer, t in m.routes.items())
            or f"all via {m.default_transport or next(iter(m.transports))}"
        )
        print(
            f"  messaging: participant {m.participant}, {m.security}, transports {', '.join(m.transports)} ({routes})"
        )
    if cfg.flexibility is not None:
        f = cfg.flexibility
        for r in f.resources:
            every = f"every {f.period_s:g} s" if f.period_s else "on demand"
            print(f"  flexibility: {r.name} ({r.flexibility_type}, {r.power_point}) to {f.aggregator}, {every}")
    if not cfg.probes.enabled:
        print("  probes: off (no hop timestamps stored; mgms bench --lab has nothing to measure)")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Write <participant>.key (0600) and .pub; print the public part for the peers' keystores."""
    from gateway.semantic.security import write_key_pair

    out = Path(args.out_dir)
    try:
        ident = write_key_pair(args.participant, out, overwrite=args.force)
    except FileExistsError:
        print(f"error: {out / (args.participant + '.key')} exists (use --force to replace it)", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"private key: {out / (args.participant + '.key')} (mode 0600, keep it secret)", file=sys.stderr)
    print(f"public key:  {out / (args.participant + '.pub')} (give this to the peers)", file=sys.stderr)
    (out / "peers").mkdir(exist_ok=True)  # where the peers' .pub files go (`mgms peers add`)
    sys.stdout.write(ident.public.to_json())
    return 0


async def _run(args: argparse.Namespace) -> int:
    """The gateway until SIGINT/SIGTERM; a signal during start-up stops what was started.

    The signal handlers come first, before the embedded Redis (gateway.lifecycle); the data
    dir is locked before anything in it is touched, so a second run of the same lab is
    refused with exit code 2 instead of sharing the first one's AOF.
    """
    from gateway.lifecycle import StopSignals
    from gateway.preflight import load_runnable_config
    from gateway.redisauth import warn_if_open
    from gateway.runtime import Gateway
    from gateway.services import DataDirInUse, embedded_redis, lab_redis_users
    from gateway.store import RedisStore, StoreKeys

    with StopSignals() as signals:
        cfg = load_runnable_config(args.config)  # refuses a config that cannot run before Redis starts
        external = service_redis_url(args, cfg)
        try:
            async with embedded_redis(
                external, _state_dir(args, cfg), who="mgms", users=lab_redis_users(StoreKeys.for_lab(cfg).prefix)
            ) as url:
                store = RedisStore.from_url(cfg, url)
                await store.write_meta(str(args.config))
                await _warn_if_not_durable(store, url)
                if external is not None:
                    await warn_if_open(url, "mgms")
                gateway = Gateway(cfg, store)
                signals.started()  # Gateway.run honours a stop set at any point of its own start
                await gateway.run(signals.stop)
        except DataDirInUse as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    return 0


async def _warn_if_not_durable(store: RedisStore, url: str) -> None:
    """A lab's own Redis without AOF loses acknowledged values on a restart: say so once.

    Asked with ``INFO persistence``, not ``CONFIG GET``: the gateway's Redis user has no
    CONFIG (docs/security.md), and INFO says what the server really does.
    """
    from redis.exceptions import RedisError

    from gateway.services import display_url

    try:
        info = await store.redis.info("persistence")
    except RedisError:  # INFO may be renamed or forbidden on a managed Redis
        return
    if str(info.get("aof_enabled")) != "1":
        logging.getLogger("mgms").warning(
            "Redis at %s runs without AOF (appendonly no): a Redis restart can lose values and "
            "command log entries the gateway already counted as stored",
            display_url(url),
        )


async def _command(args: argparse.Namespace) -> int:
    from gateway.commands import parse_command_value
    from gateway.store import RedisStore

    cfg = load_config(args.config)
    controls = [p.name for p in cfg.points if p.direction.value == "control"]
    try:
        point = cfg.point(args.point)
    except KeyError:
        print(f"error: no point {args.point!r} in {args.config}{did_you_mean(args.point, controls)}", file=sys.stderr)
        print(_control_points_text(controls), file=sys.stderr)
        return 2
    if point.direction.value != "control":
        print(f"error: {args.point} is a monitored point, not a control point", file=sys.stderr)
        print(_control_points_text(controls), file=sys.stderr)
        return 2
    parse_command_value(point, args.value)
    url = resolve_redis_url(args, cfg, user="operator")
    if url is None:
        print("error: no Redis to talk to: is `mgms run` running? (or give --redis-url)", file=sys.stderr)
        return 3
    store = RedisStore.from_url(cfg, url)
    try:
        rid = await store.submit_command(args.point, args.value, args.by)
        reply = await store.wait_reply(rid, args.timeout_s)
    finally:
        await store.aclose()
    if reply is None:
        print(f"{args.point} = {args.value}: no answer from the gateway within {args.timeout_s:g} s (request {rid})")
        return 1
    print(json.dumps(reply.to_dict(), indent=2, sort_keys=True) if args.json else command_line(reply, args.value))
    return 0 if reply.result == "confirmed" else 1


def _control_points_text(names: Sequence[str]) -> str:
    return "control points: " + (", ".join(names) if names else "none in this config")


def command_line(reply: CommandRecord, asked: str | None = None) -> str:
    """One line for a person: ``feeder.breaker.command open -> confirmed in 63.2 ms``.

    ``asked``: the value as the operator typed it (the record holds it as sent, e.g. ``1``).
    """
    took = f" in {reply.duration_ms:.1f} ms" if reply.duration_ms is not None else ""
    why = f": {reply.reason}" if reply.reason and reply.result != "confirmed" else ""
    return f"{reply.point} {asked if asked is not None else reply.value} -> {reply.result.value}{took}{why}"


async def _watch(args: argparse.Namespace) -> int:
    from gateway.store import RedisStore
    from gateway.watch import watch

    cfg = load_config(args.config)
    url = resolve_redis_url(args, cfg, user="viewer")
    if url is None:
        print("error: no Redis to watch: is `mgms run` running? (or give --redis-url)", file=sys.stderr)
        return 3
    store = RedisStore.from_url(cfg, url)
    try:
        await watch(cfg, store, once=args.once, out=sys.stdout)
    finally:
        await store.aclose()
    return 0


def report_config_error(exc: ConfigError) -> int:
    """Print every issue of a config error (file:line: key: reason) to stderr; exit code 2."""
    print(f"config error ({len(exc.issues)} issue{'s' if len(exc.issues) > 1 else ''}):", file=sys.stderr)
    for issue in exc.issues:
        print(f"  {issue}", file=sys.stderr)
    return 2


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "check-config":
        args.file = _check_config_file(ap, args)
    level = args.log_level or ("INFO" if args.cmd == "run" else "WARNING")
    configure_logging(level)  # journal lines (priority, no timestamp) under systemd
    try:
        if getattr(args, "func", None) is not None:
            return int(args.func(args))
        if args.cmd == "check-config":
            return cmd_check_config(args)
        if args.cmd == "run":
            return asyncio.run(_run(args))
        if args.cmd == "command":
            return asyncio.run(_command(args))
        if args.cmd == "watch":
            return asyncio.run(_watch(args))
        if args.cmd == "keys":
            return cmd_keys(args)
        if args.cmd == "demo":
            from gateway.demo import run_demo

            return asyncio.run(run_demo(Path(args.config), operations=args.operations, keep_running=args.keep_running))
        if args.cmd == "bench":
            from gateway.bench.runner import run as run_bench

            return run_bench(args)
    except ConfigError as exc:
        return report_config_error(exc)
    except KeyboardInterrupt:
        return 130
    except CommandInvalid as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3 if exc.retryable else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
