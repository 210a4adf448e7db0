"""VPP coalition scaling: HiGHS solve time, MIP gap and merit-order heuristic gap vs portfolio size.

    python bench/vpp_scaling.py                      # 10/100/1000 assets x 24/96 periods, both services
    python bench/vpp_scaling.py --sizes 10 100 --periods 24 --time-limit 30 --json bench-out/vpp.json

Portfolios are random but seeded (--seed): 20 % generators (min load, ramp, start cost, quadratic
cost), 25 % PV, 25 % batteries, 30 % flexible loads, spread over one microgrid per 10 assets,
with participation costs so membership matters. Requests: capacity (target = 35 % of the firm
upward capacity, an evening-shaped profile) and energy trading against a day-shaped price.
The heuristic runs first and its coalition is HiGHS's MIP start (--cold disables that); the
solver runs single-threaded with a time limit; when it is hit the table shows HiGHS's MIP gap.
The heuristic gap is (solver value - heuristic value) / |solver value|.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

from ams.vpp.assets import upward_caps
from ams.vpp.coalition import options_for, solve_heuristic, solve_hierarchical, solve_milp
from ams.vpp.errors import Infeasible
from ams.vpp.portfolio import Portfolio, portfolio_from_mapping
from ams.vpp.services import service_from_mapping

START = "2026-06-01T00:00:00Z"


def shape(n: int, f: Any) -> list[float]:
    return [round(f(24 * t / n), 2) for t in range(n)]


def make_portfolio(n_assets: int, periods: int, rng: random.Random) -> Portfolio:
    assets: list[dict[str, Any]] = []
    mgs = max(1, n_assets // 10)
    for i in range(n_assets):
        mg = f"mg{i % mgs}"
        u = rng.random()
        if u < 0.2:
            lo = rng.uniform(0, 40)
            assets.append(
                {
                    "kind": "generator",
                    "name": f"gen{i}",
                    "microgrid": mg,
                    "min_kw": round(lo, 1),
                    "max_kw": round(lo + rng.uniform(20, 150), 1),
                    "ramp_kw_per_h": round(rng.uniform(30, 200), 1),
                    "start_cost_eur": round(rng.uniform(0, 20), 2),
                    "cost_linear_eur_per_mwh": round(rng.uniform(40, 160), 2),
                    "cost_quadratic_eur_per_mw2h": round(rng.uniform(0, 800), 1),
                    "participation_cost_eur": round(rng.uniform(0, 5), 2),
                    "reliability": round(rng.uniform(0.7, 1), 3),
                }
            )
        elif u < 0.45:
            peak = rng.uniform(10, 150)
            f = shape(
                periods, lambda h, p=peak: max(0.0, p * math.sin(math.pi * (h - 6) / 12)) if 6 <= h <= 18 else 0.0
            )
            assets.append(
                {
                    "kind": "renewable",
                    "name": f"pv{i}",
                    "microgrid": mg,
                    "forecast_kw": f,
                    "band_low_kw": [round(0.8 * x, 2) for x in f],
                    "cost_eur_per_mwh": round(rng.uniform(0, 10), 2),
                }
            )
        elif u < 0.7:
            cap = rng.uniform(20, 300)
            assets.append(
                {
                    "kind": "storage",
                    "name": f"bat{i}",
                    "microgrid": mg,
                    "capacity_kwh": round(cap, 1),
                    "depth_of_discharge": 0.8,
                    "max_charge_kw": round(cap / 3, 1),
                    "max_discharge_kw": round(cap / 3, 1),
                    "initial_soc_kwh": round(cap * 0.6, 1),
                    "discharge_cost_eur_per_mwh": round(rng.uniform(2, 20), 2),
                    "participation_cost_eur": round(rng.uniform(0, 3), 2),
                    "reliability": round(rng.uniform(0.7, 1), 3),
                }
            )
        else:
            base = rng.uniform(10, 120)
            assets.append(
                {
                    "kind": "load",
                    "name": f"load{i}",
                    "microgrid": mg,
                    "baseline_kw": shape(periods, lambda h, b=base: b * (0.7 + 0.3 * math.sin(math.pi * h / 24))),
                    "flex_down_kw": round(base * rng.uniform(0.1, 0.4), 1),
                    "flex_up_kw": round(base * rng.uniform(0, 0.3), 1),
                    "flex_cost_eur_per_mwh": round(rng.uniform(20, 120), 2),
                    "participation_cost_eur": round(rng.uniform(0, 2), 2),
                }
            )
    return portfolio_from_mapping({"start": START, "period_min": 1440 // periods, "periods": periods, "assets": assets})


def requests(p: Portfolio) -> dict[str, Any]:
    n = p.periods
    cap = service_from_mapping({"service": "capacity", "start": START, "periods": n, "target_kw": [0.0] * n})
    firm = np.sum([upward_caps(a, cap.window(p), n, options_for(cap)) for a in p.assets], axis=0)
    evening = shape(n, lambda h: 0.6 + 0.4 * math.exp(-((h - 19) ** 2) / 8))
    target = [round(0.35 * float(f) * e, 2) for f, e in zip(firm, evening, strict=True)]
    price = shape(n, lambda h: 60 + 45 * math.sin(math.pi * (h - 7) / 12) + 30 * math.exp(-((h - 19) ** 2) / 4))
    return {
        "capacity": service_from_mapping(
            {
                "service": "capacity",
                "start": START,
                "periods": n,
                "target_kw": target,
                "tolerance_kw": 0.05 * max(target),
                "compensation_eur_per_mwh": 150,
                "risk_cost_eur_per_mwh": 40,
            }
        ),
        "energy_trading": service_from_mapping(
            {"service": "energy_trading", "start": START, "periods": n, "price_eur_per_mwh": price}
        ),
    }


def run(
    sizes: list[int],
    periods: list[int],
    time_limit: float,
    seed: int,
    services: list[str],
    cold: bool = False,
    hierarchical: bool = False,
) -> list[dict[str, Any]]:
    rows = []
    for n_assets in sizes:
        for T in periods:
            p = make_portfolio(n_assets, T, random.Random(seed + n_assets + T))
            for name, r in requests(p).items():
                if name not in services:
                    continue
                row: dict[str, Any] = {"assets": n_assets, "periods": T, "service": name}
                h = solve_heuristic(p, r)
                row |= {"heuristic_value_eur": h.value_eur, "heuristic_s": h.seconds, "heuristic_status": h.status}
                t0 = time.perf_counter()
                try:  # the heuristic coalition is HiGHS's first incumbent (MIP start)
                    s = solve_milp(p, r, time_limit_s=time_limit, mip_rel_gap=1e-4, warm_start=None if cold else h)
                    row |= {
                        "status": s.status,
                        "solver_value_eur": s.value_eur,
                        "solve_s": s.seconds,
                        "total_s": time.perf_counter() - t0,
                        "mip_gap": s.mip_gap,
                        "members": len(s.members),
                    }
                except Infeasible as exc:
                    row |= {"status": f"infeasible: {exc.constraint}", "total_s": time.perf_counter() - t0}
                    s = None
                if s is not None and h.status != "infeasible":
                    row["gap"] = (s.value_eur - h.value_eur) / max(abs(s.value_eur), 1e-6)
                if hierarchical:
                    t0 = time.perf_counter()
                    try:
                        hh = solve_hierarchical(p, r, time_limit_s=time_limit)
                        row |= {
                            "hier_value_eur": hh.value_eur,
                            "hier_s": time.perf_counter() - t0,
                            "hier_violations": len(hh.violations),
                        }
                        if s is not None:
                            row["hier_gap"] = (s.value_eur - hh.value_eur) / max(abs(s.value_eur), 1e-6)
                    except Infeasible as exc:
                        row["hier_value_eur"] = f"infeasible: {exc.constraint}"
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], time_limit: float) -> str:
    out = [
        "| assets | periods | service | status | solve s | build+solve s | MIP gap | members | heuristic s "
        "| heuristic gap |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = (
            "infeasible"
            if r.get("heuristic_status") == "infeasible"
            else (f"{100 * r['gap']:.2f} %" if "gap" in r else "-")
        )
        mip = f"{100 * r['mip_gap']:.3f} %" if r.get("mip_gap") is not None and math.isfinite(r["mip_gap"]) else "-"
        status = r["status"] + (f" ({time_limit:g} s)" if r["status"] == "time_limit" else "")
        out.append(
            f"| {r['assets']} | {r['periods']} | {r['service']} | {status} | {r.get('solve_s', float('nan')):.2f} | "
            f"{r['total_s']:.2f} | {mip} | {r.get('members', '-')} | {r['heuristic_s']:.3f} | {gap} |"
        )
    if any("hier_value_eur" in r for r in rows):
        out += [
            "",
            "| assets | periods | service | hierarchical s | hierarchical value EUR | gap to MILP "
            "| service violations |",
            "|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            if "hier_s" in r:
                hg = f"{100 * r['hier_gap']:.2f} %" if "hier_gap" in r else "-"
                out.append(
                    f"| {r['assets']} | {r['periods']} | {r['service']} | {r['hier_s']:.2f} | "
                    f"{r['hier_value_eur']:,.2f} | {hg} | {r['hier_violations']} |"
                )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--periods", type=int, nargs="+", default=[24, 96])
    ap.add_argument("--services", nargs="+", default=["capacity", "energy_trading"])
    ap.add_argument("--time-limit", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=6)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--cold", action="store_true", help="no MIP start from the heuristic")
    ap.add_argument("--hierarchical", action="store_true", help="also time the VPP-of-VPPs coalition")
    a = ap.parse_args()
    rows = run(a.sizes, a.periods, a.time_limit, a.seed, a.services, a.cold, a.hierarchical)
    print(f"\nmachine: {platform.machine()}, Python {platform.python_version()}, HiGHS single-threaded\n")
    print(markdown(rows, a.time_limit))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
