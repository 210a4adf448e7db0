"""``plan`` / ``coalition`` / ``balance``: the VPP subcommands of the ``ams`` console script.

The AMS CLI wires them in with :func:`add_vpp_commands`; every subcommand stores its handler in
``args.func`` (``(argparse.Namespace) -> int``, the exit code): 0 ok, 2 bad input, 3 infeasible
(the binding constraint is named on stderr). Until then ``python -m ams.vpp`` runs them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ams.vpp.balancing import balance
from ams.vpp.coalition import compare, solve_heuristic, solve_hierarchical, solve_milp
from ams.vpp.dayahead import plan_day_ahead
from ams.vpp.errors import BadInput, Infeasible
from ams.vpp.portfolio import load_portfolio, read_mapping
from ams.vpp.report import (
    balance_table,
    coalition_table,
    gap_line,
    plan_table,
    plot_balance,
    plot_coalition,
    plot_plan,
)
from ams.vpp.services import balance_from_mapping, dayahead_from_mapping, service_from_mapping
from gateway.cliutil import quiet_on_broken_pipe

EXIT_OK, EXIT_BAD_INPUT, EXIT_INFEASIBLE = 0, 2, 3
WARM_START_ASSETS = 200


def _out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInput(f"--out {out}: {exc.strerror}") from exc
    return out


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _cmd_plan(args: argparse.Namespace) -> None:
    p = load_portfolio(args.portfolio)
    req = dayahead_from_mapping(read_mapping(args.request))
    res = plan_day_ahead(p, req, args.time_limit)
    out = _out_dir(args)
    print(plan_table(res))
    _write_json(out / "plan.json", res.to_json())
    plot_plan(res, out / "plan.png")
    print(f"wrote {out / 'plan.json'} and {out / 'plan.png'}")


def _cmd_coalition(args: argparse.Namespace) -> None:
    p = load_portfolio(args.portfolio)
    req = service_from_mapping(read_mapping(args.request))
    data: dict[str, object] = {}
    if args.method == "compare":
        g = compare(p, req, args.time_limit)
        res = g.solver
        data["gap"] = g.to_json()
        data["heuristic"] = g.heuristic.to_json()
    elif args.method == "heuristic":
        res = solve_heuristic(p, req)
    elif args.method == "hierarchical":
        res = solve_hierarchical(p, req, args.time_limit)
    else:
        # large portfolios: the merit-order coalition is HiGHS's first incumbent, so a time limit still yields one
        start = solve_heuristic(p, req) if len(p.assets) >= WARM_START_ASSETS else None
        res = solve_milp(p, req, args.time_limit, warm_start=start)
    data["result"] = res.to_json()
    out = _out_dir(args)
    print(coalition_table(res))
    if args.method == "compare":
        print(gap_line(g))
    _write_json(out / "coalition.json", data)
    plot_coalition(res, out / "coalition.png")
    print(f"wrote {out / 'coalition.json'} and {out / 'coalition.png'}")


def _cmd_balance(args: argparse.Namespace) -> None:
    p = load_portfolio(args.portfolio)
    req = balance_from_mapping(read_mapping(args.request))
    res = balance(p, req, args.time_limit)
    out = _out_dir(args)
    print(plan_table(res.day_ahead))
    print()
    print(balance_table(res))
    _write_json(out / "balance.json", res.to_json())
    plot_balance(res, out / "balance.png")
    print(f"wrote {out / 'balance.json'} and {out / 'balance.png'}")


def _guarded(cmd: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """Map the VPP errors to exit codes and one-line messages on stderr."""

    def run(args: argparse.Namespace) -> int:
        try:
            cmd(args)
        except BadInput as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Infeasible as exc:
            print(
                f"infeasible: binding constraint: {exc.constraint}" + (f" -- {exc.detail}" if exc.detail else ""),
                file=sys.stderr,
            )
            return EXIT_INFEASIBLE
        return EXIT_OK

    return run


def add_vpp_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``plan``, ``coalition`` and ``balance``; each sets ``args.func(args) -> exit code``."""

    def common(sp: argparse.ArgumentParser, request_help: str) -> None:
        sp.add_argument("portfolio", help="portfolio YAML/JSON (lab_configs/vpp/portfolio.yaml)")
        sp.add_argument("request", help=request_help)
        sp.add_argument(
            "--out", default="vpp-out", help="folder for the JSON result and the PNG plot (default vpp-out)"
        )
        sp.add_argument("--time-limit", type=float, default=60.0, help="HiGHS time limit in seconds (default 60)")

    sp = subparsers.add_parser(
        "plan",
        help="day-ahead VPP schedule and hourly bids (profit with DR)",
        description="Maximise the VPP's day-ahead profit (Romanian VPP model).",
    )
    common(sp, "day-ahead request YAML/JSON (prices, internal and DR price, minimum reduction)")
    sp.set_defaults(func=_guarded(_cmd_plan))
    sp = subparsers.add_parser(
        "coalition",
        help="form a VPP coalition for a service request",
        description="Choose assets and schedules for a service (eDREAM coalition model).",
    )
    common(sp, "service request YAML/JSON (energy_trading, capacity, demand_response, reactive_power)")
    sp.add_argument(
        "--method",
        choices=("milp", "heuristic", "hierarchical", "compare"),
        default="milp",
        help="milp (HiGHS, default), merit-order heuristic, hierarchical VPP of microgrid VPPs, "
        "or compare (milp + heuristic gap)",
    )
    sp.set_defaults(func=_guarded(_cmd_coalition))
    sp = subparsers.add_parser(
        "balance",
        help="real-time balancing after the day-ahead bid, with transfers",
        description="Balance realised deviations inside the VPP, then on the two-price market.",
    )
    common(sp, "YAML/JSON with day_ahead: (as for plan) and realised: (renewables, demand, balancing prices)")
    sp.set_defaults(func=_guarded(_cmd_balance))


@quiet_on_broken_pipe
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ams.vpp", description="AMS virtual power plant")
    sub = parser.add_subparsers(dest="command", required=True)
    add_vpp_commands(sub)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code
