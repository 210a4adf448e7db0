"""Day-ahead scheduling: the Romanian VPP profit model (vpp-optimal-management-dr.txt, section II).

The paper's equations were lost in the text extraction; the model below follows its variable list
and prose (eq. numbers as cited there):

    max  sum_t [ lambda^ISO_t * Bid_t + lambda^VPP_t * sum_i (L_it - R_it + U_it)
                 - E^Disp_t(G_t) - Start * y_t - lambda^DR_t * sum_i R_it ] * dt            (1)
    E^Disp_t(G) = a + b G + c G^2, linearised in pieces between G_min and G_max             (2)
    G_min x_t <= G_t <= G_max x_t                                                           (3)
    |G_t - G_{t-1}| <= Ramp * dt (with start-up / shut-down allowance)                      (4)
    y_t >= x_t - x_{t-1}, y_t <= x_t, y_t <= 1 - x_{t-1}                                     (5)
    sum G_t + W_t + S_t + (d_t - c_t) = sum_i (L_it - R_it + U_it) + Bid_t                   (6)
    -import_max_t <= Bid_t <= export_max_t        (delivery constraints, 7-9)
    R_it <= min(flex_down_it, eps_it * L_it)      (DR with price elasticity, 10-11)
    R_min * delta_t <= sum_i R_it <= Rbar_t * delta_t, delta_t binary                          (12)

with every generator of the portfolio as a dispatchable unit, renewables W_t + S_t curtailable
up to their forecast, and storage (not in the paper; same constraints as in the coalition model).
Bid_t > 0 sells on the day-ahead market, Bid_t < 0 buys. Consumers pay lambda^VPP for what they
consume; a reduction R is paid lambda^DR.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np

from ams.vpp.assets import AssetSchedule, Options, build_assets, extract, load_down_cap, schedule_cost
from ams.vpp.errors import Infeasible
from ams.vpp.milp import INF, FloatArray, Model, diagnose_infeasible
from ams.vpp.portfolio import FlexibleLoad, Portfolio, expand
from ams.vpp.services import DayAheadRequest, prof


@dataclass
class DayAheadResult:
    """Hourly bids, unit schedule and the profit split of the day-ahead plan."""

    times: list[datetime]
    period_min: int
    bid_kw: FloatArray
    price_eur_per_mwh: FloatArray
    reduction_kw: FloatArray
    dr_active: FloatArray
    load_kw: FloatArray
    schedules: list[AssetSchedule]
    profit_eur: float
    market_revenue_eur: float
    internal_revenue_eur: float
    generation_cost_eur: float
    dr_payment_eur: float
    other_cost_eur: float
    status: str
    mip_gap: float
    seconds: float

    def to_json(self) -> dict[str, object]:
        def r(a: FloatArray) -> list[float]:
            return [round(float(x), 6) for x in a]

        return {
            "status": self.status,
            "profit_eur": round(self.profit_eur, 6),
            "market_revenue_eur": round(self.market_revenue_eur, 6),
            "internal_revenue_eur": round(self.internal_revenue_eur, 6),
            "generation_cost_eur": round(self.generation_cost_eur, 6),
            "dr_payment_eur": round(self.dr_payment_eur, 6),
            "other_cost_eur": round(self.other_cost_eur, 6),
            "mip_gap": self.mip_gap,
            "seconds": round(self.seconds, 4),
            "times": [t.isoformat() for t in self.times],
            "period_min": self.period_min,
            "bid_kw": r(self.bid_kw),
            "price_eur_per_mwh": r(self.price_eur_per_mwh),
            "reduction_kw": r(self.reduction_kw),
            "dr_active": r(self.dr_active),
            "load_kw": r(self.load_kw),
            "schedules": [s.to_json() for s in self.schedules],
        }


def plan_day_ahead(p: Portfolio, req: DayAheadRequest, time_limit_s: float | None = 60.0) -> DayAheadResult:
    """Maximise the VPP's day-ahead profit; raises Infeasible naming the binding constraint."""
    w = req.window(p)
    n, N, e = w.n, p.periods, w.dt_h / 1000
    lam = np.asarray(prof(req.price_eur_per_mwh, n, "price_eur_per_mwh"))
    lam_vpp = np.asarray(prof(req.internal_price_eur_per_mwh, n, "internal_price_eur_per_mwh"))
    lam_dr = np.asarray(prof(req.dr_price_eur_per_mwh, n, "dr_price_eur_per_mwh"))
    opts = Options(firm=False, derate=False, membership=False, use_initial_state=True, load_flex_price=lam_dr)
    loads = [a for a in p.assets if isinstance(a, FlexibleLoad)]
    base = (
        np.sum([w.slice(expand(a.baseline_kw, N, f"assets.{a.name}.baseline_kw")) for a in loads], axis=0)
        if loads
        else np.zeros(n)
    )
    rbar = np.sum([load_down_cap(a, w, N) for a in loads], axis=0) if loads else np.zeros(n)
    # R_min never makes the plan infeasible on its own: delta_t = 0 switches DR off in that period
    m = Model()
    avs = build_assets(m, p, w, opts)
    for av in avs:  # consumers pay lambda^VPP for what they consume: reduction loses it, increase earns it
        if "dn" in av.cols:
            m.add_cost(av.cols["dn"], lam_vpp * e)
            m.add_cost(av.cols["up"], -lam_vpp * e)
    m.offset -= float(np.sum(lam_vpp * base)) * e
    bid = m.add_vars(n, -INF, INF, cost=-lam * e)
    inj = [t for av in avs for t in av.injection]
    m.add_rows("energy balance", [*inj, (bid, -1.0)], lo=base, hi=base)
    if req.max_export_kw is not None or req.max_import_kw is not None:
        hi = w.slice(expand(req.max_export_kw, N, "max_export_kw")) if req.max_export_kw is not None else INF
        lo = -w.slice(expand(req.max_import_kw, N, "max_import_kw")) if req.max_import_kw is not None else -INF
        m.add_rows("delivery (export/import limit)", [(bid, 1.0)], lo=lo, hi=hi)
    red = [(av.cols["dn"], 1.0) for av in avs if "dn" in av.cols]
    delta = m.add_binaries(n)
    if red:
        m.add_rows("minimum DR reduction", [*red, (delta, -req.min_reduction_kw)], lo=0.0)
        m.add_rows("minimum DR reduction", [*red, (delta, -rbar)], hi=0.0)
    t0 = time.perf_counter()
    sol = m.solve(time_limit_s=time_limit_s)
    if not sol.has_solution:
        if sol.status == "no_solution":
            raise Infeasible("time limit", f"no feasible day-ahead plan within {time_limit_s} s")
        groups = m.groups()
        first = [g for g in ("delivery (export/import limit)", "minimum DR reduction") if g in groups]
        binding = diagnose_infeasible(m, first + [g for g in groups if g not in first])
        raise Infeasible(
            binding or "several constraint groups together", "HiGHS reports the day-ahead model infeasible"
        )
    schedules = extract(sol.x, avs)
    for s in schedules:
        s.member = True
    bids = sol.x[bid]
    red_kw = np.sum([sol.x[c] for c, _ in red], axis=0) if red else np.zeros(n)
    up_kw = np.sum([sol.x[av.cols["up"]] for av in avs if "up" in av.cols], axis=0) if loads else np.zeros(n)
    consumed = base - red_kw + up_kw
    gen_cost = sum(schedule_cost(p, w, opts, s) for s in schedules if s.kind == "generator")
    dr_pay = float(np.sum(lam_dr * red_kw)) * e
    other = sum(schedule_cost(p, w, opts, s) for s in schedules if s.kind != "generator") - dr_pay
    market = float(np.sum(lam * bids)) * e
    internal = float(np.sum(lam_vpp * consumed)) * e
    profit = market + internal - gen_cost - dr_pay - other
    times = [p.start + timedelta(minutes=p.period_min * (w.t0 + t)) for t in range(n)]
    return DayAheadResult(
        times,
        p.period_min,
        bids,
        lam,
        red_kw,
        np.round(sol.x[delta]) * (red_kw > 1e-9),
        consumed,
        schedules,
        profit,
        market,
        internal,
        gen_cost,
        dr_pay,
        other,
        sol.status,
        sol.mip_gap,
        time.perf_counter() - t0,
    )
