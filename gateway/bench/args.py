"""The command line of ``mgms bench`` (kept apart so building the parser imports nothing heavy)."""

from __future__ import annotations

import argparse

__all__ = ["PHASES", "add_arguments"]

PHASES = ("iec104", "iec61850", "dlms", "messages", "loop")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=200, help="samples per route and floor (default 200)")
    p.add_argument("--loop-n", type=int, help="DSO loops (each waits its 1 s activation window; default min(n, 100))")
    p.add_argument("--routes", default=",".join(PHASES), help=f"comma-separated phases, of: {', '.join(PHASES)}")
    p.add_argument("--out", default="bench-out/mgms-bench", help="output folder (default bench-out/mgms-bench)")
    p.add_argument("--config", help="lab config of the simulators (default lab_configs/multipower-sim.yaml)")
    p.add_argument("--clock-url", help="/clock endpoint on the AMS host (python -m gateway.bench.clock serve)")
    p.add_argument("--clock-ca", help="CA file for --clock-url")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
