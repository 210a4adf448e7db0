"""The command line of ``mgms bench`` (kept apart so building the parser imports nothing heavy)."""

from __future__ import annotations

import argparse

__all__ = ["FLOORS_LAB", "PHASES", "BenchError", "add_arguments"]

PHASES = ("iec104", "iec61850", "dlms", "messages", "loop")
FLOORS_LAB = ("mqtt", "iec104")


class BenchError(Exception):
    """Bad input or a refused request (exit code 2): the message says what to change."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=200, help="samples per route and floor (default 200)")
    p.add_argument("--loop-n", type=int, help="DSO loops (each waits its 1 s activation window; default min(n, 100))")
    p.add_argument("--routes", default=",".join(PHASES), help=f"comma-separated phases, of: {', '.join(PHASES)}")
    p.add_argument("--out", default="bench-out/mgms-bench", help="output folder (default bench-out/mgms-bench)")
    p.add_argument(
        "--config", "-c", help="lab config: of the simulators (default lab_configs/multipower-sim.yaml), or with --lab "
        "of the running lab"
    )  # fmt: skip
    p.add_argument(
        "--fsync", choices=("always", "everysec"), default="always",
        help="appendfsync of the Redis servers the simulator mode starts (default always)",
    )  # fmt: skip
    clock = p.add_argument_group("clock offset (AMS clock - MGMS clock)")
    clock.add_argument("--clock-url", help="/clock endpoint on the AMS host (python -m gateway.bench.clock serve)")
    clock.add_argument("--clock-ca", help="CA file for --clock-url")
    clock.add_argument(
        "--clock-mqtt", action="store_true",
        help="with --lab: exchange over the lab config's MQTT broker with the AMS's responder "
        "(python -m gateway.bench.clock serve --mqtt)",
    )  # fmt: skip
    clock.add_argument(
        "--ams-remote", action="store_true",
        help="the AMS stamps with another host's clock: correct cross-host routes by the offset",
    )  # fmt: skip
    lab = p.add_argument_group("against a running lab (--lab): starts nothing, reads the stored probes")
    lab.add_argument("--lab", action="store_true", help="measure the running gateway of --config")
    lab.add_argument("--redis-url", help="the gateway's Redis (default: the config's redis.url or the embedded one)")
    lab.add_argument(
        "--data-dir", metavar="DIR",
        help="the --data-dir of the gateway's run: its embedded Redis's url is in DIR/<lab name> (default .mgms)",
    )  # fmt: skip
    lab.add_argument("--redis-user", metavar="USER", help="Redis user (default: operator of the embedded Redis)")
    lab.add_argument(
        "--redis-secret-file", metavar="FILE", help="that user's secret (default: DIR/<lab name>/secrets/)"
    )
    lab.add_argument("--ams-redis", help="the AMS's Redis (read only): message routes and the DSO loop")
    lab.add_argument(
        "--ams-redis-secret-file", metavar="FILE",
        help="secret of the AMS Redis's viewer (its data dir's secrets/redis-viewer.secret), "
        "unless --ams-redis has one",
    )  # fmt: skip
    lab.add_argument("--ams-participant", help="the AMS's participant name (default: flexibility.aggregator, else ams)")
    lab.add_argument("--window-s", type=float, default=60.0, help="how long to watch (default 60)")
    lab.add_argument(
        "--lookback-s", type=float, default=0.0,
        help="also take what was stored this many seconds before the window (default 0)",
    )  # fmt: skip
    lab.add_argument(
        "--allow-commands", action="store_true",
        help="operate --command-point (through the gateway's command stream) to time the command route",
    )  # fmt: skip
    lab.add_argument("--command-point", help="the breaker command point (default: the first double command)")
    lab.add_argument("--command-n", type=int, default=10, help="commands with --allow-commands (default 10, even)")
    lab.add_argument(
        "--floors", default=",".join(FLOORS_LAB),
        help=f"floors to measure against the lab, of: {', '.join(FLOORS_LAB)} (default all; '' for none)",
    )  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress lines")
