"""Text tables and PNG plots of VPP results.

Plots use matplotlib's object API (``Figure`` + the Agg canvas) rather than pyplot, so no global
backend is selected and nothing GUI-related is imported: the CLI runs headless and inside tests
without backend warnings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ams.vpp.balancing import BalanceResult
from ams.vpp.coalition import CoalitionResult, GapReport
from ams.vpp.dayahead import DayAheadResult
from ams.vpp.milp import FloatArray

MAX_COLS = 8  # asset columns in a table before the rest are summed into "others"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _f(x: float) -> str:
    return f"{x + 0.0:,.1f}".replace("-0.0", "0.0")


def coalition_table(res: CoalitionResult) -> str:
    members = res.members
    shown = members[:MAX_COLS]
    headers = ["time (UTC)"]
    if res.target_kw is not None:
        headers.append("target kW")
    headers.append("VPP kW")
    if res.vpp_kvar is not None:
        headers.append("VPP kvar")
    headers += [f"{s.name}@{s.microgrid}" for s in shown]
    if len(members) > MAX_COLS:
        headers.append(f"{len(members) - MAX_COLS} others")
    rows = []
    for t, ts in enumerate(res.times):
        row = [f"{ts:%m-%d %H:%M}"]
        if res.target_kw is not None:
            row.append(_f(res.target_kw[t]))
        row.append(_f(res.vpp_kw[t]))
        if res.vpp_kvar is not None:
            row.append(_f(res.vpp_kvar[t]))
        for s in shown:
            v = s.reactive_kvar[t] if res.vpp_kvar is not None and s.reactive_kvar is not None else s.power_kw[t]
            row.append(_f(v))
        if len(members) > MAX_COLS:
            row.append(_f(sum(s.power_kw[t] for s in members[MAX_COLS:])))
        rows.append(row)
    head = (
        f"{res.service} by {res.method}: {res.status}, value {res.value_eur:,.2f} EUR (revenue {res.revenue_eur:,.2f}, "
        f"cost {res.cost_eur:,.2f}, penalty {res.penalty_eur:,.2f}), {len(members)} members, {res.seconds:.3f} s"
    )
    if res.violations:
        head += "\nviolations: " + "; ".join(res.violations)
    return head + "\n" + _table(headers, rows)


def gap_line(g: GapReport) -> str:
    gap = "inf (heuristic infeasible)" if not np.isfinite(g.gap) else f"{100 * g.gap:.3f} %"
    return (
        f"heuristic gap: {gap}; solver {g.solver.value_eur:,.2f} EUR in {g.solver.seconds:.3f} s, "
        f"heuristic {g.heuristic.value_eur:,.2f} EUR in {g.heuristic.seconds:.4f} s"
    )


def plan_table(res: DayAheadResult) -> str:
    gens = [s for s in res.schedules if s.kind == "generator"][:MAX_COLS]
    stores = [s for s in res.schedules if s.kind == "storage"][:MAX_COLS]
    headers = ["time (UTC)", "price EUR/MWh", "bid kW", "load kW", "DR kW"]
    headers += [f"{g.name} kW (on)" for g in gens] + [f"{s.name} SoC kWh" for s in stores]
    rows = []
    for t, ts in enumerate(res.times):
        row = [
            f"{ts:%m-%d %H:%M}",
            _f(res.price_eur_per_mwh[t]),
            _f(res.bid_kw[t]),
            _f(res.load_kw[t]),
            _f(res.reduction_kw[t]),
        ]
        row += [f"{_f(g.power_kw[t])} ({int(g.on[t]) if g.on is not None else '-'})" for g in gens]
        row += [_f(s.soc_kwh[t]) if s.soc_kwh is not None else "-" for s in stores]
        rows.append(row)
    head = (
        f"day-ahead plan: {res.status}, profit {res.profit_eur:,.2f} EUR = market {res.market_revenue_eur:,.2f} "
        f"+ internal {res.internal_revenue_eur:,.2f} - generation {res.generation_cost_eur:,.2f} "
        f"- DR {res.dr_payment_eur:,.2f} - other {res.other_cost_eur:,.2f}"
    )
    return head + "\n" + _table(headers, rows)


def balance_table(res: BalanceResult) -> str:
    c, d = res.centralised, res.distributed
    headers = [
        "time (UTC)",
        "bid kW",
        "need kW",
        "thermal kW",
        "DR kW",
        "storage kW",
        "curtail kW",
        "buy kW",
        "sell kW",
        "distr. thermal kW",
        "distr. buy kW",
        "distr. sell kW",
    ]
    rows = []
    for t, ts in enumerate(res.day_ahead.times):
        rows.append(
            [
                f"{ts:%m-%d %H:%M}",
                _f(res.day_ahead.bid_kw[t]),
                _f(c.need_kw[t]),
                _f(c.thermal_adj_kw[t]),
                _f(c.dr_kw[t]),
                _f(c.storage_adj_kw[t]),
                _f(c.curtail_kw[t]),
                _f(c.buy_kw[t]),
                _f(c.sell_kw[t]),
                _f(d.thermal_adj_kw[t]),
                _f(d.buy_kw[t]),
                _f(d.sell_kw[t]),
            ]
        )
    lines = [
        f"real-time balancing after a day-ahead profit of {res.day_ahead.profit_eur:,.2f} EUR",
        f"system cost (real time): centralised {c.system_cost_eur:,.2f} EUR, distributed {d.system_cost_eur:,.2f} EUR "
        f"(privacy cost {res.privacy_cost_eur:,.2f} EUR)",
        f"VPP cost (real time): centralised {c.vpp_cost_eur:,.2f} EUR, distributed {d.vpp_cost_eur:,.2f} EUR",
    ]
    if d.thermal_transfers_eur or d.renewable_transfers_eur:
        tr = {**d.thermal_transfers_eur, **d.renewable_transfers_eur}
        lines.append(
            "transfers to private generators (EUR, + = VPP pays): " + ", ".join(f"{k} {v:,.2f}" for k, v in tr.items())
        )
    return "\n".join(lines) + "\n" + _table(headers, rows)


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)


def _x(n: int) -> FloatArray:
    return np.arange(n, dtype=np.float64)


def plot_coalition(res: CoalitionResult, path: Path) -> None:
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.add_subplot()
    n = len(res.times)
    x = _x(n)
    by_mg: dict[str, FloatArray] = {}
    for s in res.members:
        v = s.reactive_kvar if res.vpp_kvar is not None and s.reactive_kvar is not None else s.power_kw
        by_mg[s.microgrid] = by_mg.get(s.microgrid, np.zeros(n)) + v
    pos, neg = np.zeros(n), np.zeros(n)
    for mg, v in by_mg.items():
        vp, vn = np.maximum(v, 0), np.minimum(v, 0)
        ax.bar(x, vp, bottom=pos, label=mg, width=0.8)
        ax.bar(x, vn, bottom=neg, width=0.8, color=ax.patches[-1].get_facecolor())
        pos, neg = pos + vp, neg + vn
    if res.target_kw is not None:
        edges = np.append(x - 0.5, x[-1] + 0.5) if n else x
        ax.stairs(res.target_kw, edges, baseline=None, color="k", linewidth=2, label="target")
    ax.set_xlabel(f"period ({res.period_min} min) from {res.times[0]:%Y-%m-%d %H:%M} UTC" if res.times else "period")
    ax.set_ylabel("kvar" if res.vpp_kvar is not None else "kW (injection / reduction)")
    ax.set_title(f"{res.service} coalition ({res.method}), value {res.value_eur:,.2f} EUR")
    ax.legend(fontsize="small")
    _save(fig, path)


def plot_plan(res: DayAheadResult, path: Path) -> None:
    fig = Figure(figsize=(10, 6), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    x = _x(len(res.times))
    ax.bar(x, res.bid_kw, label="bid (+ sell / - buy)", color="tab:blue")
    for s in res.schedules:
        if s.kind == "generator":
            ax.step(x, s.power_kw, where="mid", label=s.name)
    ax.plot(x, res.reduction_kw, "o-", label="DR reduction")
    ax.set_ylabel("kW")
    ax.legend(fontsize="small")
    ax.set_title(f"day-ahead plan, profit {res.profit_eur:,.2f} EUR")
    ax2.step(x, res.price_eur_per_mwh, where="mid", color="tab:red")
    ax2.set_ylabel("day-ahead price EUR/MWh")
    ax2.set_xlabel(f"period ({res.period_min} min)")
    _save(fig, path)


def plot_balance(res: BalanceResult, path: Path) -> None:
    fig = Figure(figsize=(10, 6), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    x = _x(len(res.day_ahead.times))
    for ax, case in zip(axes, (res.centralised, res.distributed), strict=True):
        bottom_p, bottom_n = np.zeros(len(x)), np.zeros(len(x))
        for label, v in (
            ("thermal", case.thermal_adj_kw),
            ("DR", case.dr_kw),
            ("storage", case.storage_adj_kw),
            ("curtail", -case.curtail_kw),
            ("buy", case.buy_kw),
            ("sell", -case.sell_kw),
        ):
            vp, vn = np.maximum(v, 0), np.minimum(v, 0)
            ax.bar(x, vp, bottom=bottom_p, label=label)
            ax.bar(x, vn, bottom=bottom_n, color=ax.patches[-1].get_facecolor())
            bottom_p, bottom_n = bottom_p + vp, bottom_n + vn
        ax.plot(x, case.need_kw, "k.-", label="imbalance")
        ax.set_ylabel("kW")
        ax.set_title(f"{case.name}: system cost {case.system_cost_eur:,.2f} EUR")
        ax.legend(fontsize="small", ncols=4)
    axes[1].set_xlabel(f"period ({res.day_ahead.period_min} min)")
    _save(fig, path)
