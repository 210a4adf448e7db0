"""Real-time balancing and transfers (vpp-mechanism-design.txt, sections 2-3).

After the day-ahead bid the VPP meets the realised renewable output and demand. It balances
inside first -- thermal adjustment B~T within the balancing capacity R1 (eq. 1d) and the unit's
limits (1c), extra demand reduction, storage re-dispatch, renewable curtailment -- and settles
the rest on the two-price balancing market (eq. 3a): buying at lambda^UP (>= day-ahead) and
selling at lambda^DN (<= day-ahead), subject to supply = demand (3b).

Two versions of the same LP over the day (storage couples the periods):

- **centralised** (eq. 4): the VPP owns the units and sees their true cost pi(B^T + B~T);
- **distributed** (section 3.2): units are privately owned; the VPP pays the heuristic transfers
  M^T(B~T) = lambda^{T+} B~T if B~T >= 0 else lambda^{T-} B~T for thermal adjustment and
  M^R(P - B) = lambda^{R+}(P - B) if P >= B else lambda^{R-}(P - B) to renewables, with
  lambda^{R+} = lambda^DN and lambda^{R-} = lambda^UP (participation at indifference).
  lambda^{T+} >= lambda^DA and lambda^{T-} <= lambda^DA are the unit's submitted rates; by
  default its marginal cost at the edge of its balancing range, bounded by the day-ahead price.

The system cost of the distributed case (eq. 6) is the VPP's cost minus the generators'
utilities, i.e. market cost + true production cost: transfers cancel. Comparing it with the
centralised optimum shows what privacy costs (the paper finds the two close).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ams.vpp.assets import Window, load_down_cap
from ams.vpp.dayahead import DayAheadResult, plan_day_ahead
from ams.vpp.errors import BadInput, Infeasible
from ams.vpp.milp import INF, FloatArray, IntArray, Model, diagnose_infeasible
from ams.vpp.portfolio import FlexibleLoad, Generator, Portfolio, Renewable, Storage, expand
from ams.vpp.services import BalanceRequest, prof


def marginal_cost(g: Generator, p_kw: float) -> float:
    """Slope (EUR/MWh) of the linearised cost curve at ``p_kw``."""
    _c0, pieces = g.pieces()
    lo = g.min_kw
    for w, slope in pieces:
        if p_kw <= lo + w + 1e-9:
            return slope
        lo += w
    return pieces[-1][1] if pieces else 0.0


@dataclass
class BalanceCase:
    """One real-time solution (centralised or distributed)."""

    name: str
    need_kw: FloatArray  # imbalance at the day-ahead schedule: demand side minus supply side
    thermal_adj_kw: FloatArray
    dr_kw: FloatArray
    storage_adj_kw: FloatArray
    curtail_kw: FloatArray
    buy_kw: FloatArray
    sell_kw: FloatArray
    balancing_market_cost_eur: float
    production_cost_eur: float
    dr_cost_eur: float
    storage_cost_eur: float
    vpp_cost_eur: float  # what the VPP pays in real time (transfers instead of production cost when distributed)
    system_cost_eur: float  # real-time market + true production + DR + storage costs
    thermal_transfers_eur: dict[str, float] = field(default_factory=dict)
    renewable_transfers_eur: dict[str, float] = field(default_factory=dict)
    thermal_adj_by_unit_kw: dict[str, FloatArray] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        def r(a: FloatArray) -> list[float]:
            return [round(float(x), 6) for x in a]

        return {
            "name": self.name,
            "need_kw": r(self.need_kw),
            "thermal_adj_kw": r(self.thermal_adj_kw),
            "dr_kw": r(self.dr_kw),
            "storage_adj_kw": r(self.storage_adj_kw),
            "curtail_kw": r(self.curtail_kw),
            "buy_kw": r(self.buy_kw),
            "sell_kw": r(self.sell_kw),
            "balancing_market_cost_eur": round(self.balancing_market_cost_eur, 6),
            "production_cost_eur": round(self.production_cost_eur, 6),
            "dr_cost_eur": round(self.dr_cost_eur, 6),
            "storage_cost_eur": round(self.storage_cost_eur, 6),
            "vpp_cost_eur": round(self.vpp_cost_eur, 6),
            "system_cost_eur": round(self.system_cost_eur, 6),
            "thermal_transfers_eur": {k: round(v, 6) for k, v in self.thermal_transfers_eur.items()},
            "renewable_transfers_eur": {k: round(v, 6) for k, v in self.renewable_transfers_eur.items()},
            "thermal_adj_by_unit_kw": {k: r(v) for k, v in self.thermal_adj_by_unit_kw.items()},
        }


@dataclass
class BalanceResult:
    day_ahead: DayAheadResult
    centralised: BalanceCase
    distributed: BalanceCase

    @property
    def privacy_cost_eur(self) -> float:
        """Distributed minus centralised system cost (>= 0: the centralised VPP is the optimum)."""
        return self.distributed.system_cost_eur - self.centralised.system_cost_eur

    def to_json(self) -> dict[str, object]:
        return {
            "day_ahead": self.day_ahead.to_json(),
            "centralised": self.centralised.to_json(),
            "distributed": self.distributed.to_json(),
            "privacy_cost_eur": round(self.privacy_cost_eur, 6),
        }


def _real_time(p: Portfolio, req: BalanceRequest, da: DayAheadResult, w: Window, centralised: bool) -> BalanceCase:
    rz = req.realised
    n, N, e, dt = w.n, p.periods, w.dt_h / 1000, w.dt_h
    lam_da = da.price_eur_per_mwh
    lam_up = np.asarray(prof(rz.up_price_eur_per_mwh, n, "realised.up_price_eur_per_mwh"))
    lam_dn = np.asarray(prof(rz.down_price_eur_per_mwh, n, "realised.down_price_eur_per_mwh"))
    # an extra reduction costs the DR price and the internal tariff the consumer no longer pays
    lam_dr = np.asarray(prof(req.day_ahead.dr_price_eur_per_mwh, n, "day_ahead.dr_price_eur_per_mwh")) + np.asarray(
        prof(req.day_ahead.internal_price_eur_per_mwh, n, "day_ahead.internal_price_eur_per_mwh")
    )
    sch = {s.name: s for s in da.schedules}
    for key in rz.renewable_kw:
        if not isinstance(p.asset(key), Renewable):
            raise BadInput(f"realised.renewable_kw.{key}: not a renewable asset")
    for key in rz.demand_kw:
        if not isinstance(p.asset(key), FlexibleLoad):
            raise BadInput(f"realised.demand_kw.{key}: not a load asset")
    for key in (*rz.thermal_balancing_kw, *rz.private_generators):
        p.asset(key)
    m = Model()
    supply_terms: list[tuple[IntArray, float]] = []
    const_supply = np.zeros(n)  # DA supply that is not re-dispatched
    demand = np.zeros(n)
    gens: dict[str, tuple[IntArray, IntArray, FloatArray]] = {}
    rates: dict[str, tuple[FloatArray, FloatArray]] = {}
    prod_cost_vars: list[tuple[IntArray, FloatArray]] = []
    prod_const = 0.0
    curtail_vars: list[IntArray] = []
    ren_real: dict[str, FloatArray] = {}
    dr_vars: list[IntArray] = []
    st_vars: list[tuple[Storage, IntArray, IntArray]] = []
    for a in p.assets:
        s = sch[a.name]
        if isinstance(a, Generator):
            g_da = s.power_kw
            on = s.on if s.on is not None else (g_da > 0).astype(np.float64)
            r1 = rz.thermal_balancing_kw.get(a.name, 0.0)
            up_cap = np.minimum(r1, np.maximum(a.max_kw - g_da, 0.0)) * on
            dn_cap = np.minimum(r1, np.maximum(g_da - a.min_kw, 0.0)) * on
            au = m.add_vars(n, 0.0, up_cap)
            ad = m.add_vars(n, 0.0, dn_cap)
            gens[a.name] = (au, ad, g_da)
            supply_terms += [(au, 1.0), (ad, -1.0)]
            const_supply += g_da
            mc_up = np.array([marginal_cost(a, float(g_da[t]) + float(up_cap[t])) for t in range(n)])
            mc_dn = np.array([marginal_cost(a, max(a.min_kw, float(g_da[t]) - float(dn_cap[t]))) for t in range(n)])
            tp = (
                np.asarray(
                    prof(rz.thermal_up_rate_eur_per_mwh[a.name], n, f"realised.thermal_up_rate_eur_per_mwh.{a.name}")
                )
                if a.name in rz.thermal_up_rate_eur_per_mwh
                else np.maximum(lam_da, mc_up)
            )
            tm = (
                np.asarray(
                    prof(
                        rz.thermal_down_rate_eur_per_mwh[a.name], n, f"realised.thermal_down_rate_eur_per_mwh.{a.name}"
                    )
                )
                if a.name in rz.thermal_down_rate_eur_per_mwh
                else np.minimum(lam_da, mc_dn)
            )
            rates[a.name] = (tp, tm)
            # true cost of the adjustment: the increment's / decrement's marginal cost on the linear pieces
            true_up = np.array(
                [
                    (a.pwl_cost_eur_per_h(float(g_da[t]) + float(up_cap[t])) - a.pwl_cost_eur_per_h(float(g_da[t])))
                    / max(float(up_cap[t]) / 1000, 1e-12)
                    if up_cap[t] > 0
                    else 0.0
                    for t in range(n)
                ]
            )
            true_dn = np.array(
                [
                    (a.pwl_cost_eur_per_h(float(g_da[t])) - a.pwl_cost_eur_per_h(float(g_da[t]) - float(dn_cap[t])))
                    / max(float(dn_cap[t]) / 1000, 1e-12)
                    if dn_cap[t] > 0
                    else 0.0
                    for t in range(n)
                ]
            )
            private = not centralised and (not rz.private_generators or a.name in rz.private_generators)
            if not private:
                m.add_cost(au, true_up * e)
                m.add_cost(ad, -true_dn * e)
            else:
                m.add_cost(au, tp * e)
                m.add_cost(ad, -tm * e)
            prod_cost_vars += [(au, true_up * e), (ad, -true_dn * e)]
            prod_const += sum(a.pwl_cost_eur_per_h(float(g_da[t])) * dt for t in range(n) if on[t])
        elif isinstance(a, Renewable):
            real = (
                np.asarray(prof(rz.renewable_kw[a.name], n, f"realised.renewable_kw.{a.name}"))
                if a.name in rz.renewable_kw
                else s.power_kw
            )
            ren_real[a.name] = real
            cur = m.add_vars(n, 0.0, np.maximum(real, 0.0))
            curtail_vars.append(cur)
            supply_terms.append((cur, -1.0))
            const_supply += real
        elif isinstance(a, Storage):
            c = m.add_vars(n, 0.0, w.slice(expand(a.max_charge_kw, N)), cost=a.charge_cost_eur_per_mwh * e)
            d = m.add_vars(n, 0.0, w.slice(expand(a.max_discharge_kw, N)), cost=a.discharge_cost_eur_per_mwh * e)
            lo = np.full(n, a.soc_min_kwh)
            if a.final_soc_min_kwh is not None:
                lo[-1] = max(lo[-1], a.final_soc_min_kwh)
            soc = m.add_vars(n, lo, a.capacity_kwh)
            m.add_rows(
                "storage energy balance",
                [(soc[:1], 1.0), (c[:1], -a.charge_efficiency * dt), (d[:1], dt / a.discharge_efficiency)],
                lo=a.initial_soc_kwh,
                hi=a.initial_soc_kwh,
            )
            m.add_rows(
                "storage energy balance",
                [
                    (soc[1:], 1.0),
                    (soc[:-1], -1.0),
                    (c[1:], -a.charge_efficiency * dt),
                    (d[1:], dt / a.discharge_efficiency),
                ],
                lo=0.0,
                hi=0.0,
            )
            supply_terms += [(d, 1.0), (c, -1.0)]
            st_vars.append((a, c, d))
        else:
            base = (
                np.asarray(prof(rz.demand_kw[a.name], n, f"realised.demand_kw.{a.name}"))
                if a.name in rz.demand_kw
                else w.slice(expand(a.baseline_kw, N))
            )
            red_da = np.maximum(s.power_kw, 0.0)
            up_da = np.maximum(-s.power_kw, 0.0)
            demand += base - red_da + up_da
            extra_cap = np.maximum(np.minimum(load_down_cap(a, w, N) - red_da, base - red_da + up_da), 0.0)
            r = m.add_vars(n, 0.0, extra_cap, cost=lam_dr * e)
            dr_vars.append(r)
            supply_terms.append((r, 1.0))
    buy = m.add_vars(n, 0.0, INF, cost=lam_up * e)
    sell = m.add_vars(n, 0.0, INF, cost=-lam_dn * e)
    # supply + buy - sell = demand + day-ahead bid (3b)
    rhs = demand + da.bid_kw - const_supply
    m.add_rows("real-time balance", [*supply_terms, (buy, 1.0), (sell, -1.0)], lo=rhs, hi=rhs)
    sol = m.solve(time_limit_s=60.0)
    if not sol.has_solution:
        raise Infeasible(diagnose_infeasible(m) or "real-time balance", "real-time balancing model infeasible")
    x = sol.x

    def tot(cols: list[IntArray]) -> FloatArray:
        return np.sum([x[c] for c in cols], axis=0) if cols else np.zeros(n)

    da_storage = np.sum([sch[a.name].power_kw for a, _, _ in st_vars], axis=0) if st_vars else np.zeros(n)
    rt_storage = np.sum([x[d] - x[c] for _, c, d in st_vars], axis=0) if st_vars else np.zeros(n)
    need = demand + da.bid_kw - (const_supply + da_storage)
    th = {k: x[au] - x[ad] for k, (au, ad, _) in gens.items()}
    bm = float(np.sum(lam_up * x[buy] - lam_dn * x[sell])) * e
    prod = prod_const + sum(float(np.sum(c * x[cols])) for cols, c in prod_cost_vars)
    drc = float(np.sum(lam_dr * tot(dr_vars))) * e
    stc = sum(
        float(np.sum(x[c])) * a.charge_cost_eur_per_mwh * e + float(np.sum(x[d])) * a.discharge_cost_eur_per_mwh * e
        for a, c, d in st_vars
    )
    t_tr: dict[str, float] = {}
    r_tr: dict[str, float] = {}
    if not centralised:
        for k, (au, ad, _) in gens.items():
            if rz.private_generators and k not in rz.private_generators:
                continue
            tp, tm = rates[k]
            t_tr[k] = float(np.sum(tp * x[au] - tm * x[ad])) * e
        for (k, real), cur in zip(ren_real.items(), curtail_vars, strict=True):
            if rz.private_generators and k not in rz.private_generators:
                continue
            dev = real - x[cur] - sch[k].power_kw
            r_tr[k] = float(np.sum(np.where(dev >= 0, lam_dn * dev, lam_up * dev))) * e
    adj_cost = sum(float(np.sum(c * x[cols])) for cols, c in prod_cost_vars)
    owned_adj = sum(
        float(np.sum(c * x[cols]))
        for k, (au, ad, _) in gens.items()
        if k not in t_tr
        for cols, c in prod_cost_vars
        if cols is au or cols is ad
    )
    vpp = bm + drc + stc + sum(t_tr.values()) + sum(r_tr.values()) + owned_adj
    return BalanceCase(
        "centralised" if centralised else "distributed",
        need,
        tot([au for au, _, _ in gens.values()]) - tot([ad for _, ad, _ in gens.values()]),
        tot(dr_vars),
        rt_storage - da_storage,
        tot(curtail_vars),
        x[buy],
        x[sell],
        bm,
        prod,
        drc,
        stc,
        vpp,
        bm + adj_cost + drc + stc,
        t_tr,
        r_tr,
        th,
    )


def balance(p: Portfolio, req: BalanceRequest, time_limit_s: float | None = 60.0) -> BalanceResult:
    """Day-ahead plan, then real-time balancing both centralised and with the distributed transfers."""
    da = plan_day_ahead(p, req.day_ahead, time_limit_s)
    w = req.day_ahead.window(p)
    return BalanceResult(da, _real_time(p, req, da, w, True), _real_time(p, req, da, w, False))
