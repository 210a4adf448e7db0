"""Text tables and PNG plots of VPP results.

Plots use matplotlib's object API (``Figure`` + the Agg canvas) rather than pyplot, so no global
backend is selected and nothing GUI-related is imported: the CLI runs headless and inside tests
without backend warnings.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ams.vpp.assets import AssetSchedule
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
    reactive = res.vpp_kvar is not None  # a reactive-power service: target and members in kvar
    unit = "kvar" if reactive else "kW"
    headers = ["time (UTC)"]
    if res.target_kw is not None:
        headers.append(f"target {unit}")
    headers.append("VPP kW")
    if reactive:
        headers.append("VPP kvar")
    headers += [f"{s.name}@{s.microgrid} {unit}" for s in shown]
    if len(members) > MAX_COLS:
        headers.append(f"{len(members) - MAX_COLS} others kW")
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


def _clock_axis(ax: Axes, times: Sequence[datetime], period_min: int) -> None:
    """Ticks at the periods' clock times (UTC, HH:MM), at most ~12 labels; the date in the label."""
    n = len(times)
    if not n:
        ax.set_xlabel(f"period ({period_min} min)")
        return
    step = max(1, -(-n // 12))
    ticks = list(range(0, n, step))
    ax.set_xticks([float(i) for i in ticks], [f"{times[i]:%H:%M}" for i in ticks])
    days = sorted({f"{t:%Y-%m-%d}" for t in times})
    ax.set_xlabel(f"period start, UTC ({' to '.join((days[0], days[-1])) if len(days) > 1 else days[0]}; "
                  f"{period_min} min periods)")  # fmt: skip


def _storage_panel(ax: Axes, schedules: Sequence[AssetSchedule]) -> bool:
    """Each storage asset's state of charge (kWh, end of period); False when there is none."""
    stores = [s for s in schedules if s.kind == "storage" and s.soc_kwh is not None]
    for st in stores:
        assert st.soc_kwh is not None
        ax.plot(_x(len(st.soc_kwh)), st.soc_kwh, "o-", ms=3, label=f"{st.name}@{st.microgrid}")
    if stores:
        ax.set_ylabel("storage SoC, kWh")
        ax.legend(fontsize="small", title="state of charge", title_fontsize="small")
        ax.grid(alpha=0.3)
    return bool(stores)


def plot_coalition(res: CoalitionResult, path: Path) -> None:
    _save(figure_coalition(res), path)


def figure_coalition(res: CoalitionResult) -> Figure:
    """Contribution per microgrid (stacked), the target, the margin over it, and storage SoC."""
    members = res.members
    has_storage = any(s.kind == "storage" and s.soc_kwh is not None for s in members)
    rows = 1 + (res.target_kw is not None) + has_storage
    fig = Figure(figsize=(10, 3 + 2.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0])
    ax = axes[0]
    n = len(res.times)
    x = _x(n)
    reactive = res.vpp_kvar is not None
    unit = "kvar" if reactive else "kW"
    by_mg: dict[str, FloatArray] = {}
    for s in members:
        v = s.reactive_kvar if reactive and s.reactive_kvar is not None else s.power_kw
        by_mg[s.microgrid] = by_mg.get(s.microgrid, np.zeros(n)) + v
    pos, neg = np.zeros(n), np.zeros(n)
    for mg, v in by_mg.items():
        vp, vn = np.maximum(v, 0), np.minimum(v, 0)
        ax.bar(x, vp, bottom=pos, label=f"{mg} (stacked)", width=0.8)
        ax.bar(x, vn, bottom=neg, width=0.8, color=ax.patches[-1].get_facecolor())
        pos, neg = pos + vp, neg + vn
    total = res.vpp_kvar if reactive and res.vpp_kvar is not None else res.vpp_kw
    ax.plot(x, total, "k.", label=f"VPP total {unit}")
    if res.target_kw is not None and n:
        edges = np.append(x - 0.5, x[-1] + 0.5)
        ax.stairs(res.target_kw, edges, baseline=None, color="tab:red", linewidth=2, label=f"target {unit}")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_ylabel("reactive power, kvar" if reactive else "power, kW (+ injection or reduction)")
    ax.set_title(f"{res.service} coalition ({res.method}): value {res.value_eur:,.2f} EUR, {len(members)} members")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    i = 1
    if res.target_kw is not None:
        margin = np.round(total - res.target_kw, 6) + 0.0  # solver noise (1e-14) is not a margin
        m_ax = axes[i]
        i += 1
        m_ax.bar(x, margin, width=0.8, color=np.where(margin >= 0, "tab:green", "tab:red"))
        m_ax.axhline(0, color="k", lw=0.8)
        span = max(1.0, 0.05 * float(np.max(np.abs(res.target_kw), initial=0.0)), float(np.max(np.abs(margin))))
        m_ax.set_ylim(-1.1 * span, 1.1 * span)
        m_ax.set_ylabel(f"margin over target, {unit}")
        m_ax.set_title("VPP total - target (green: met, red: short)", fontsize="small", loc="left")
        m_ax.grid(alpha=0.3, axis="y")
    if has_storage:
        _storage_panel(axes[i], members)
    _clock_axis(axes[-1], res.times, res.period_min)
    return fig


def plot_plan(res: DayAheadResult, path: Path) -> None:
    _save(figure_plan(res), path)


def figure_plan(res: DayAheadResult) -> Figure:
    """Bids and generator schedules, the price, and storage SoC, on the periods' clock times."""
    has_storage = any(s.kind == "storage" and s.soc_kwh is not None for s in res.schedules)
    fig = Figure(figsize=(10, 6 + 2.2 * has_storage), layout="constrained")
    axes = list(fig.subplots(2 + has_storage, 1, sharex=True, squeeze=False)[:, 0])
    ax, ax2 = axes[0], axes[1]
    x = _x(len(res.times))
    ax.bar(x, res.bid_kw, label="bid kW (+ sell / - buy)", color="tab:blue", alpha=0.7)
    for s in res.schedules:
        if s.kind == "generator":
            ax.step(x, s.power_kw, where="mid", label=f"{s.name} output kW")
    ax.plot(x, res.reduction_kw, "o-", ms=3, label="DR reduction kW")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_ylabel("power, kW")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"day-ahead plan: profit {res.profit_eur:,.2f} EUR")
    ax2.step(x, res.price_eur_per_mwh, where="mid", color="tab:red", label="day-ahead price")
    ax2.set_ylabel("price, EUR/MWh")
    ax2.legend(fontsize="small")
    ax2.grid(alpha=0.3)
    if has_storage:
        _storage_panel(axes[2], res.schedules)
    _clock_axis(axes[-1], res.times, res.period_min)
    return fig


def plot_balance(res: BalanceResult, path: Path) -> None:
    _save(figure_balance(res), path)


def figure_balance(res: BalanceResult) -> Figure:
    """How each case covers the imbalance (stacked), on the periods' clock times, and storage SoC."""
    stores = [s for s in res.day_ahead.schedules if s.kind == "storage" and s.soc_kwh is not None]
    fig = Figure(figsize=(10, 6 + 2.2 * bool(stores)), layout="constrained")
    axes = list(fig.subplots(2 + bool(stores), 1, sharex=True, squeeze=False)[:, 0])
    x = _x(len(res.day_ahead.times))
    for ax, case in zip(axes, (res.centralised, res.distributed), strict=False):
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
        ax.plot(x, case.need_kw, "k.-", label="imbalance to cover")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_ylabel("power, kW")
        ax.set_title(f"{case.name}: system cost {case.system_cost_eur:,.2f} EUR", fontsize="small", loc="left")
        ax.legend(fontsize="small", ncols=4)
        ax.grid(alpha=0.3, axis="y")
    if stores:
        _storage_panel(axes[2], stores)
        axes[2].set_title("day-ahead state of charge", fontsize="small", loc="left")
    _clock_axis(axes[-1], res.day_ahead.times, res.day_ahead.period_min)
    return fig
