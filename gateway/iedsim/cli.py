"""``iedsim``: run IED simulators from a lab config.

One subcommand per protocol (``iec104``, ``iec61850``, ``dlms``), so a lab starts exactly
the devices its config describes, and ``all``: every device of the config in one process
(what ``mgms lab up`` runs; one terminal instead of one per simulator). The process prints
one ready line per station on stdout (scripts and HIL fixtures wait for it; ``all`` ends
with ``all N simulators ready``), logs to stderr, and stops cleanly on SIGINT/SIGTERM or
after ``--duration-s``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from gateway.cliutil import add_version, quiet_on_broken_pipe
from gateway.config import LabConfig, load_config
from gateway.errors import ConfigError

__all__ = ["main"]

_log = logging.getLogger(__name__)

Runner = Callable[[argparse.Namespace, LabConfig, asyncio.Event], Awaitable[int]]


def _pick_device(config: LabConfig, protocol: str, wanted: str | None) -> str:
    if wanted is not None:
        if wanted not in config.devices:
            raise SystemExit(f"iedsim: no device {wanted!r} in {config.source}; devices: {', '.join(config.devices)}")
        if config.devices[wanted].protocol != protocol:
            raise SystemExit(f"iedsim: device {wanted!r} speaks {config.devices[wanted].protocol}, not {protocol}")
        return wanted
    names = [n for n, d in config.devices.items() if d.protocol == protocol]
    if len(names) != 1:
        found = ", ".join(names) or "none"
        raise SystemExit(f"iedsim: name the device with --device ({protocol} devices: {found})")
    return names[0]


# -- iec104 --------------------------------------------------------------------------------


def _add_iec104(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("iec104", help="IEC 60870-5-104 outstation (REF615 behind a COM600)")
    p.add_argument("--device", help="device name in the config (default: the only iec104 device)")
    p.add_argument("--host", help="listen address (default: the device's host)")
    p.add_argument("--port", type=int, help="listen port (default: the device's port; 0 = any free port)")
    p.add_argument("--stations", type=int, default=1, help="run N stations on consecutive ports (scale tests)")
    p.add_argument("--control-port", type=int, help="line-based fault-injection channel on 127.0.0.1:PORT")
    p.add_argument("--seed", type=int, help="random seed of the feeder model (default: simulator.seed)")
    p.set_defaults(run=_run_iec104)


async def _run_iec104(args: argparse.Namespace, config: LabConfig, stop: asyncio.Event) -> int:
    from gateway.iedsim.iec104.server import ControlChannel, Iec104Outstation, serve_many

    device = _pick_device(config, "iec104", args.device)
    if args.stations < 1:
        raise SystemExit("iedsim: --stations must be at least 1")
    port = args.port if args.port is not None else config.devices[device].port
    if args.stations == 1:
        one = Iec104Outstation(config, device, host=args.host, port=port, seed=args.seed)
        await one.start()
        stations = [one]
    else:
        stations = await serve_many(config, device, port, args.stations, host=args.host, seed=args.seed)
    control: ControlChannel | None = None
    try:
        if args.control_port is not None:
            control = ControlChannel(stations, port=args.control_port)
            await control.start()
        for o in stations:
            tls = ", TLS" if o.tls else ""
            print(f"iec104 simulator {o.name} listening on {o.host}:{o.port} ({len(o.points)} points{tls})")
        if control is not None:
            print(f"control channel listening on 127.0.0.1:{control.port}")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
        for o in stations:
            await o.close()
    return 0


# -- iec61850 ------------------------------------------------------------------------------


def _add_iec61850(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("iec61850", help="IEC 61850 MMS server (REF615-class feeder relay)")
    p.add_argument("--device", help="device name in the config (default: the only iec61850 device)")
    p.add_argument("--host", help="listen address (default: the device's host)")
    p.add_argument("--port", type=int, help="listen port (default: the device's port; 0 = any free port)")
    p.add_argument("--seed", type=int, help="random seed of the feeder model (default: simulator.seed)")
    p.add_argument("--control-port", type=int, help="line-based fault-injection channel on 127.0.0.1:PORT")
    p.add_argument("--scl", help="build the data model from this SCL file (ICD/CID) instead of the built-in one")
    p.add_argument("--ied", help="IED of the SCL file to serve (default: the only one)")
    p.set_defaults(run=_run_iec61850)


async def _run_iec61850(args: argparse.Namespace, config: LabConfig, stop: asyncio.Event) -> int:
    from gateway.iedsim.iec61850.control import MmsControlChannel
    from gateway.iedsim.iec61850.scl import SclError, load_scl
    from gateway.iedsim.iec61850.server import Iec61850Server

    device = _pick_device(config, "iec61850", args.device)
    port = args.port if args.port is not None else config.devices[device].port
    try:
        scl = load_scl(args.scl, args.ied) if args.scl else None
    except SclError as exc:
        print(f"iedsim: invalid SCL: {exc}", file=sys.stderr)
        return 2
    server = Iec61850Server(config, device, host=args.host, port=port, seed=args.seed, scl=scl)
    await server.start()
    control: MmsControlChannel | None = None
    try:
        if args.control_port is not None:
            control = MmsControlChannel(server, port=args.control_port)
            await control.start()
        print(
            f"iec61850 simulator {server.name} ({server.ied_name}) listening on {server.host}:{server.port}"
            f" ({len(server.points)} points{', model from ' + args.scl if args.scl else ''})"
        )
        if control is not None:
            print(f"control channel listening on 127.0.0.1:{control.port}")
        sys.stdout.flush()
        await stop.wait()
    finally:
        if control is not None:
            await control.close()
        await server.close()
    return 0


# -- dlms ----------------------------------------------------------------------------------


def _add_dlms(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("dlms", help="DLMS/COSEM meter (WRAPPER or HDLC over TCP)")
    p.add_argument("--device", help="device name in the config (default: the only dlms device)")
    p.add_argument("--host", help="listen address (default: the device's host)")
    p.add_argument("--port", type=int, help="listen port (default: the device's port; 0 = any free port)")
    p.add_argument("--seed", type=int, help="random seed of the feeder model (default: simulator.seed)")
    p.set_defaults(run=_run_dlms)


async def _run_dlms(args: argparse.Namespace, config: LabConfig, stop: asyncio.Event) -> int:
    from gateway.iedsim.dlms import DlmsMeter

    device = _pick_device(config, "dlms", args.device)
    meter = DlmsMeter(config, device, host=args.host, port=args.port, seed=args.seed)
    await meter.start()
    try:
        dlms = meter.device.dlms
        print(
            f"dlms simulator {meter.name} listening on {meter.host}:{meter.port}"
            f" ({len(meter.points)} points, {dlms.framing}, security {dlms.security})"
        )
        sys.stdout.flush()
        await stop.wait()
    finally:
        await meter.close()
    return 0


# -- all -----------------------------------------------------------------------------------

SIMULATED = ("iec104", "iec61850", "dlms")
ALL_READY = "simulators ready"


def _add_all(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("all", help="every device of the config, each on its configured host and port")
    p.add_argument(
        "--control-port-base",
        type=int,
        metavar="PORT",
        help="control channels on 127.0.0.1:PORT, PORT+1, ... (IEC 104 and 61850 devices in config order; "
        "0 = any free port each; default: none)",
    )
    p.set_defaults(run=_run_all)


async def _run_all(args: argparse.Namespace, config: LabConfig, stop: asyncio.Event) -> int:
    """Start every simulated device, print its ready line, serve until ``stop``, close all.

    A device that fails to start stops the whole set (the ones already up are closed): a lab
    missing one simulator is not the lab the config describes.
    """
    from gateway.iedsim.control import LineControlServer
    from gateway.iedsim.dlms import DlmsMeter
    from gateway.iedsim.iec104.server import ControlChannel, Iec104Outstation
    from gateway.iedsim.iec61850.control import MmsControlChannel
    from gateway.iedsim.iec61850.server import Iec61850Server

    names = [n for n, d in config.devices.items() if d.protocol in SIMULATED]
    if not names:
        print(f"iedsim: no simulated device ({', '.join(SIMULATED)}) in {config.source}", file=sys.stderr)
        return 2
    closers: list[Callable[[], Awaitable[None]]] = []
    lines: list[str] = []
    next_control = args.control_port_base
    try:
        for name in names:
            dev = config.devices[name]
            control: LineControlServer | None = None
            if dev.protocol == "iec104":
                station = Iec104Outstation(config, name)
                await station.start()
                closers.append(station.close)
                tls = ", TLS" if station.tls else ""
                lines.append(
                    f"iec104 simulator {station.name} listening on {station.host}:{station.port}"
                    f" ({len(station.points)} points{tls})"
                )
                if next_control is not None:
                    control = ControlChannel([station], port=next_control)
            elif dev.protocol == "iec61850":
                server = Iec61850Server(config, name)
                await server.start()
                closers.append(server.close)
                lines.append(
                    f"iec61850 simulator {server.name} ({server.ied_name}) listening on"
                    f" {server.host}:{server.port} ({len(server.points)} points)"
                )
                if next_control is not None:
                    control = MmsControlChannel(server, port=next_control)
            else:
                meter = DlmsMeter(config, name)
                await meter.start()
                closers.append(meter.close)
                lines.append(
                    f"dlms simulator {meter.name} listening on {meter.host}:{meter.port}"
                    f" ({len(meter.points)} points, {dev.dlms.framing}, security {dev.dlms.security})"
                )
            if control is not None:
                await control.start()
                closers.append(control.close)
                lines.append(f"control channel of {name} listening on 127.0.0.1:{control.port} (`help` lists commands)")
                next_control = 0 if next_control == 0 else control.port + 1
        for line in lines:
            print(line)
        print(f"all {len(names)} {ALL_READY}: {', '.join(names)}", flush=True)
        await stop.wait()
    finally:
        for close in reversed(closers):
            try:
                async with asyncio.timeout(5):
                    await close()
            except Exception:  # one simulator failing to close must not keep the others open
                _log.exception("closing a simulator failed")
    return 0


# -- entry point ---------------------------------------------------------------------------

_PROTOCOLS: tuple[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None], ...] = (
    _add_iec104,
    _add_iec61850,
    _add_dlms,
    _add_all,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iedsim", description="IED simulators driven by an MGMS lab config.")
    add_version(parser)
    parser.add_argument("--log-level", default="INFO", help="logging level on stderr (default INFO)")
    sub = parser.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for add in _PROTOCOLS:
        add(sub)
    for p in sub.choices.values():
        p.add_argument("--config", "-c", required=True, help="lab config file (YAML)")
        p.add_argument("--duration-s", type=float, help="exit by itself after this many seconds")
        p.add_argument(
            "--parent-pid",
            type=int,
            metavar="PID",
            help="exit once PID is no longer this process's parent (benchmarks and tests: a parent killed "
            "without cleaning up, e.g. by a native abort, leaves no simulator behind)",
        )
    return parser


async def _watch_parent(parent: int, stop: asyncio.Event, period_s: float = 0.5) -> None:
    """Set ``stop`` once ``parent`` is not this process's parent (it died and we were
    re-parented; checked against the pid given, so a parent gone before we started counts)."""
    while not stop.is_set():
        if os.getppid() != parent:
            _log.warning("parent process %d is gone: stopping", parent)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(period_s):
                await stop.wait()


async def _main(args: argparse.Namespace, config: LabConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    timer = loop.call_later(args.duration_s, stop.set) if args.duration_s is not None else None
    watchdog = asyncio.create_task(_watch_parent(args.parent_pid, stop)) if args.parent_pid is not None else None
    run: Runner = args.run
    try:
        return await run(args, config, stop)
    finally:
        if timer is not None:
            timer.cancel()
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(RuntimeError):
                loop.remove_signal_handler(sig)


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"iedsim: invalid config:\n{exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(args, config))
    except ConfigError as exc:  # found when a station starts, e.g. its TLS certificate file is missing
        print(f"iedsim: invalid config:\n{exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout's reader went away: quiet_on_broken_pipe's business
        raise
    except OSError as exc:  # typically the port is taken
        print(f"iedsim: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
