"""Coalition formation for a service request (eDREAM VPP model, edream-vpp-coalitions.txt §2.1).

eDREAM states the problem as a constraint problem over a subset of prosumers (binary
membership y) and their real-valued schedules x (Figure 2: min f(x, y) s.t. c_i(x, y) <= d,
bounds), with one objective per service (Table 1). Here it is a MILP solved by HiGHS:

- **energy trading**: max  sum_t price_t * E_t * dt  - operating costs  (Table 1 row 1;
  E_t = net VPP injection, storage revenue R_ESS included through the storage schedule);
- **capacity**: target_t <= E_t <= target_t + tolerance, max compensation - cost (row 2; the
  quadratic distance to the target of Table 1 becomes a hard band: the capacity must be there);
- **demand response**: min sum_t |E_t - DSO_t| * penalty + cost (row 4; the Euclidean distance
  of Table 1 is replaced by the L1 distance so the model stays linear);
- **reactive power**: Q_grid_t - sum_a q_a,t must lie within +-P_grid_t * tan(acos(PF*)), a
  shortfall is penalised (row 3; *linearised*: the active power at the connection point is held
  at its measured value, and each asset's reactive capability is the box |q| <= max_kvar
  instead of the circle p^2 + q^2 <= s^2).

Membership costs (``participation_cost_eur``) make the subset choice non-trivial; reliability
derates upward power and adds a risk cost (eDREAM §3.1 ranks offers by price x risk).
The fast heuristic is the merit order of eDREAM's smart-contract coalition (§3.1, Figure 21-22):
sort by unit price (times risk), take offers until the quantity is covered, dispatch in order.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np

from ams.vpp.assets import (
    AnyAsset,
    AssetSchedule,
    AssetVars,
    Options,
    Terms,
    Window,
    build_assets,
    check_schedule,
    extract,
    load_up_cap,
    ramp_params,
    schedule_cost,
    upward_caps,
)
from ams.vpp.errors import Infeasible
from ams.vpp.milp import INF, FloatArray, IntArray, Model, diagnose_infeasible
from ams.vpp.portfolio import FlexibleLoad, Generator, Portfolio, Renewable, Storage, expand
from ams.vpp.services import Capacity, DemandResponse, EnergyTrading, ReactivePower, prof

Service = EnergyTrading | Capacity | DemandResponse | ReactivePower
SERVICE_GROUP = {
    "energy_trading": "grid export/import limit",
    "capacity": "capacity target",
    "demand_response": "demand response max deviation",
    "reactive_power": "reactive power target",
}


@dataclass
class CoalitionResult:
    """A coalition and its schedules; ``value_eur`` is the objective (maximised) on the true request."""

    service: str
    method: str
    status: str
    value_eur: float
    cost_eur: float
    revenue_eur: float
    penalty_eur: float
    schedules: list[AssetSchedule]
    times: list[datetime]
    period_min: int
    vpp_kw: FloatArray
    target_kw: FloatArray | None
    vpp_kvar: FloatArray | None = None
    mip_gap: float = 0.0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)
    prices_eur_per_mwh: FloatArray | None = None
    asset_cost_eur: dict[str, float] = field(default_factory=dict)

    @property
    def members(self) -> list[AssetSchedule]:
        return [s for s in self.schedules if s.member]

    def to_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "method": self.method,
            "status": self.status,
            "value_eur": round(self.value_eur, 6),
            "cost_eur": round(self.cost_eur, 6),
            "revenue_eur": round(self.revenue_eur, 6),
            "penalty_eur": round(self.penalty_eur, 6),
            "mip_gap": self.mip_gap if math.isfinite(self.mip_gap) else None,
            "seconds": round(self.seconds, 4),
            "times": [t.isoformat() for t in self.times],
            "period_min": self.period_min,
            "vpp_kw": [round(float(v), 6) for v in self.vpp_kw],
            "target_kw": None if self.target_kw is None else [round(float(v), 6) for v in self.target_kw],
            "vpp_kvar": None if self.vpp_kvar is None else [round(float(v), 6) for v in self.vpp_kvar],
            "members": [s.name for s in self.members],
            "violations": self.violations,
            "schedules": [s.to_json() for s in self.schedules if s.member],
        }


def options_for(req: Service) -> Options:
    """Firm (lower band) renewables where delivery is promised; forecast for trading."""
    return Options(
        firm=not isinstance(req, EnergyTrading),
        derate=req.use_reliability,
        risk_cost_eur_per_mwh=req.risk_cost_eur_per_mwh,
        membership=True,
        reactive=isinstance(req, ReactivePower),
    )


def reactive_need(req: ReactivePower, n: int) -> tuple[FloatArray, FloatArray]:
    """(min, max) reactive injection per period bringing |Q_grid - q| within P_grid * tan(acos(PF*))."""
    p = np.asarray(prof(req.grid_active_kw, n, "grid_active_kw"))
    q = np.asarray(prof(req.grid_reactive_kvar, n, "grid_reactive_kvar"))
    allow = p * math.tan(math.acos(req.target_power_factor))
    return q - allow, q + allow


def service_target(req: Service, n: int) -> FloatArray | None:
    if isinstance(req, Capacity):
        return np.asarray(prof(req.target_kw, n, "target_kw"))
    if isinstance(req, DemandResponse):
        return np.asarray(prof(req.dso_demand_kw, n, "dso_demand_kw"))
    if isinstance(req, ReactivePower):
        lo, _ = reactive_need(req, n)
        return np.maximum(lo, 0.0)
    return None


# --- evaluation shared by every method -----------------------------------------------------------


def evaluate(
    p: Portfolio,
    req: Service,
    w: Window,
    schedules: list[AssetSchedule],
    method: str,
    status: str,
    mip_gap: float = 0.0,
    seconds: float = 0.0,
) -> CoalitionResult:
    """Cost, revenue, penalty and service violations of given schedules (the MILP's objective, recomputed)."""
    opts = options_for(req)
    n, e = w.n, w.dt_h / 1000
    E = np.sum([s.power_kw for s in schedules], axis=0) if schedules else np.zeros(n)
    Q = None
    asset_cost = {s.name: schedule_cost(p, w, opts, s) for s in schedules}
    cost = sum(asset_cost.values())
    revenue = penalty = 0.0
    viol: list[str] = []
    for s in schedules:
        viol += check_schedule(p, w, opts, s)
    target = service_target(req, n)
    prices = None
    tol = 1e-4 * max(1.0, float(np.max(np.abs(E))) if n else 1.0)
    if isinstance(req, EnergyTrading):
        prices = np.asarray(prof(req.price_eur_per_mwh, n, "price_eur_per_mwh"))
        revenue = float(np.sum(prices * E)) * e
        if req.max_export_kw is not None and np.any(w.slice(expand(req.max_export_kw, p.periods)) + tol < E):
            viol.append("grid export/import limit: export above max_export_kw")
        if req.max_import_kw is not None and np.any(w.slice(expand(req.max_import_kw, p.periods)) + tol < -E):
            viol.append("grid export/import limit: import above max_import_kw")
    elif isinstance(req, Capacity):
        assert target is not None
        revenue = req.compensation_eur_per_mwh * float(np.sum(target)) * e
        for t in range(n):
            if E[t] < target[t] - tol or E[t] > target[t] + req.tolerance_kw + tol:
                viol.append(
                    f"capacity target: period {t} delivers {E[t]:.3f} kW, "
                    f"band {target[t]:g}..{target[t] + req.tolerance_kw:g}"
                )
                break
    elif isinstance(req, DemandResponse):
        assert target is not None
        dev = np.abs(E - target)
        revenue = req.reward_eur_per_mwh * float(np.sum(np.abs(target))) * e
        penalty = req.deviation_penalty_eur_per_mwh * float(np.sum(dev)) * e
        if req.max_deviation_kw is not None and np.any(dev > req.max_deviation_kw + tol):
            viol.append("demand response max deviation: exceeded")
    else:
        lo, hi = reactive_need(req, n)
        Q = (
            np.sum([s.reactive_kvar for s in schedules if s.reactive_kvar is not None], axis=0)
            if schedules
            else np.zeros(n)
        )
        Q = np.asarray(Q if np.ndim(Q) else np.zeros(n), dtype=np.float64)
        short = np.maximum(lo - Q, 0.0)
        revenue = req.reward_eur
        penalty = req.shortfall_penalty_eur_per_mvarh * float(np.sum(short)) * e
        if np.any(hi + tol < Q) or (req.hard and np.any(short > tol)):
            viol.append("reactive power target: power factor not reached")
    if viol and status == "optimal":
        status = "violates"
    times = [p.start + timedelta(minutes=p.period_min * (w.t0 + t)) for t in range(n)]
    return CoalitionResult(
        req.service,
        method,
        status if not viol else ("infeasible" if method == "heuristic" else status),
        revenue - cost - penalty,
        cost,
        revenue,
        penalty,
        schedules,
        times,
        p.period_min,
        E,
        target,
        Q,
        mip_gap,
        seconds,
        viol,
        prices,
        asset_cost,
    )


# --- MILP ----------------------------------------------------------------------------------------


def _add_service(m: Model, req: Service, w: Window, n_total: int, inj: Terms, q: Terms) -> dict[str, IntArray]:
    """The service rows on the VPP injection sum_a inj_a,t (and reactive sum_a q_a,t); returns the service columns."""
    cols: dict[str, IntArray] = {}
    n, e = w.n, w.dt_h / 1000
    neg = [(cols, -np.asarray(c)) for cols, c in inj]
    if isinstance(req, EnergyTrading):
        price = np.asarray(prof(req.price_eur_per_mwh, n, "price_eur_per_mwh"))
        E = m.add_vars(n, -INF, INF, cost=-price * e)
        cols["E"] = E
        m.add_rows("VPP energy balance", [(E, 1.0), *neg], lo=0.0, hi=0.0)
        hi = w.slice(expand(req.max_export_kw, n_total, "max_export_kw")) if req.max_export_kw is not None else INF
        lo = -w.slice(expand(req.max_import_kw, n_total, "max_import_kw")) if req.max_import_kw is not None else -INF
        if req.max_export_kw is not None or req.max_import_kw is not None:
            m.add_rows(SERVICE_GROUP[req.service], [(E, 1.0)], lo=lo, hi=hi)
    elif isinstance(req, Capacity):
        tgt = np.asarray(prof(req.target_kw, n, "target_kw"))
        m.offset -= req.compensation_eur_per_mwh * float(np.sum(tgt)) * e
        m.add_rows("capacity target", inj, lo=tgt, hi=tgt + req.tolerance_kw)
    elif isinstance(req, DemandResponse):
        d = np.asarray(prof(req.dso_demand_kw, n, "dso_demand_kw"))
        m.offset -= req.reward_eur_per_mwh * float(np.sum(np.abs(d))) * e
        dp = m.add_vars(n, 0.0, INF, cost=req.deviation_penalty_eur_per_mwh * e)
        dn = m.add_vars(n, 0.0, INF, cost=req.deviation_penalty_eur_per_mwh * e)
        cols |= {"dev_plus": dp, "dev_minus": dn}
        m.add_rows("demand response tracking", [*inj, (dp, -1.0), (dn, 1.0)], lo=d, hi=d)
        if req.max_deviation_kw is not None:
            m.add_rows("demand response max deviation", [(dp, 1.0), (dn, 1.0)], hi=req.max_deviation_kw)
    else:
        lo, hi = reactive_need(req, n)
        m.offset -= req.reward_eur
        terms: Terms = list(q)
        if not req.hard:
            sh = m.add_vars(n, 0.0, INF, cost=req.shortfall_penalty_eur_per_mvarh * e)
            cols["short"] = sh
            terms.append((sh, 1.0))
        if not q and req.hard:
            terms = [(m.add_vars(n, 0.0, 0.0), 1.0)]
        m.add_rows("reactive power target", terms, lo=lo)
        if q:
            m.add_rows("reactive power target", list(q), hi=hi)
    return cols


def start_vector(
    m: Model, req: Service, avs: list[AssetVars], svc: dict[str, IntArray], res: CoalitionResult
) -> FloatArray:
    """A full column vector from a heuristic coalition: HiGHS's MIP start (an incumbent from t = 0)."""
    x = np.zeros(m.n_cols)
    by = {s.name: s for s in res.schedules}
    for av in avs:
        s = by[av.asset.name]
        c = av.cols
        if "z" in c:
            x[c["z"]] = 1.0 if s.member else 0.0
        pw = s.power_kw
        a = av.asset
        if isinstance(a, Generator):
            on = s.on if s.on is not None else (pw > 0).astype(np.float64)
            x[c["u"]] = on
            prev = np.concatenate([[0.0], on[:-1]])
            x[c["v"]] = np.maximum(on - prev, 0.0)
            x[c["p"]] = pw
            rest = np.maximum(pw - a.min_kw * on, 0.0)
            for seg, (wk, _slope) in zip(av.pieces, a.pieces()[1], strict=True):
                used = np.minimum(rest, wk)
                x[seg] = used
                rest = rest - used
        elif isinstance(a, Renewable):
            x[c["p"]] = pw
        elif isinstance(a, Storage):
            ch = s.charge_kw if s.charge_kw is not None else np.maximum(-pw, 0.0)
            dis = s.discharge_kw if s.discharge_kw is not None else np.maximum(pw, 0.0)
            x[c["c"]], x[c["d"]] = ch, dis
            x[c["s"]] = a.initial_soc_kwh + np.cumsum(
                a.charge_efficiency * ch * res_dt(res) - dis * res_dt(res) / a.discharge_efficiency
            )
        else:
            x[c["dn"]], x[c["up"]] = np.maximum(pw, 0.0), np.maximum(-pw, 0.0)
        if "qp" in c and s.reactive_kvar is not None:
            x[c["qp"]], x[c["qn"]] = np.maximum(s.reactive_kvar, 0.0), np.maximum(-s.reactive_kvar, 0.0)
    if "E" in svc:
        x[svc["E"]] = res.vpp_kw
    if "dev_plus" in svc and res.target_kw is not None:
        x[svc["dev_plus"]] = np.maximum(res.vpp_kw - res.target_kw, 0.0)
        x[svc["dev_minus"]] = np.maximum(res.target_kw - res.vpp_kw, 0.0)
    if "short" in svc and isinstance(req, ReactivePower):
        lo, _ = reactive_need(req, len(res.vpp_kw))
        q = res.vpp_kvar if res.vpp_kvar is not None else np.zeros(len(lo))
        x[svc["short"]] = np.maximum(lo - q, 0.0)
    return x


def res_dt(res: CoalitionResult) -> float:
    return res.period_min / 60


DEFINITIONS = ("VPP energy balance", "demand response tracking", "generator output")


def diagnosis_order(groups: list[str]) -> list[str]:
    """Service limits first (what the requester can change), asset limits next, and the rows that
    only define a variable (with a free slack they are never the real cause) last."""
    svc = [g for g in groups if g in SERVICE_GROUP.values()]
    tail = [g for g in groups if g in DEFINITIONS]
    return svc + [g for g in groups if g not in svc and g not in tail] + tail


def precheck(p: Portfolio, req: Service, w: Window) -> None:
    """Cheap bound checks before solving: name the first period the whole portfolio cannot cover."""
    opts = options_for(req)
    n = w.n
    up = np.sum([upward_caps(a, w, p.periods, opts) for a in p.assets], axis=0) if p.assets else np.zeros(n)
    dn = np.zeros(n)
    for a in p.assets:
        if isinstance(a, Storage):
            dn = dn + w.slice(expand(a.max_charge_kw, p.periods))
        elif isinstance(a, FlexibleLoad):
            dn = dn + load_up_cap(a, w, p.periods)
    times = [p.start + timedelta(minutes=p.period_min * (w.t0 + t)) for t in range(n)]
    if isinstance(req, Capacity):
        tgt = np.asarray(prof(req.target_kw, n, "target_kw"))
        for t in range(n):
            if tgt[t] > up[t] + 1e-9:
                raise Infeasible(
                    "capacity target",
                    f"period {t} ({times[t]:%Y-%m-%d %H:%M}) needs {tgt[t]:g} kW, "
                    f"the portfolio can give at most {up[t]:.3f} kW",
                )
    elif isinstance(req, DemandResponse) and req.max_deviation_kw is not None:
        d = np.asarray(prof(req.dso_demand_kw, n, "dso_demand_kw"))
        for t in range(n):
            if d[t] - req.max_deviation_kw > up[t] + 1e-9 or -(d[t] + req.max_deviation_kw) > dn[t] + 1e-9:
                raise Infeasible(
                    "demand response max deviation",
                    f"period {t} ({times[t]:%Y-%m-%d %H:%M}) asks "
                    f"{d[t]:g} +- {req.max_deviation_kw:g} kW, the portfolio spans {-dn[t]:.3f}..{up[t]:.3f} kW",
                )
    elif isinstance(req, ReactivePower) and req.hard:
        lo, _ = reactive_need(req, n)
        qmax = sum(a.max_kvar for a in p.assets if not isinstance(a, FlexibleLoad))
        for t in range(n):
            if lo[t] > qmax + 1e-9:
                raise Infeasible(
                    "reactive power target", f"period {t} needs {lo[t]:.3f} kvar, the portfolio has {qmax:g} kvar"
                )


def solve_milp(
    p: Portfolio,
    req: Service,
    time_limit_s: float | None = 60.0,
    mip_rel_gap: float = 1e-6,
    only: list[AnyAsset] | None = None,
    warm_start: CoalitionResult | None = None,
) -> CoalitionResult:
    """Optimal coalition by HiGHS; raises Infeasible naming the binding constraint group.

    ``warm_start``: a (heuristic) coalition handed to HiGHS as its first incumbent, so a time
    limit still yields a schedule and a MIP gap on very large portfolios.
    """
    w = req.window(p)
    if only is None:
        precheck(p, req, w)
    opts = options_for(req)
    m = Model()
    avs = build_assets(m, p, w, opts, only)
    inj: Terms = [term for av in avs for term in av.injection]
    q: Terms = [term for av in avs for term in av.reactive]
    svc = _add_service(m, req, w, p.periods, inj, q)
    t0 = time.perf_counter()
    start = None
    if warm_start is not None and not warm_start.violations:
        start = start_vector(m, req, avs, svc, warm_start)
    sol = m.solve(time_limit_s=time_limit_s, mip_rel_gap=mip_rel_gap, start=start)
    if not sol.has_solution:
        if sol.status == "no_solution":
            raise Infeasible("time limit", f"no feasible coalition found within {time_limit_s} s")
        binding = diagnose_infeasible(m, diagnosis_order(m.groups()))
        raise Infeasible(binding or "several constraint groups together", "HiGHS reports the model infeasible")
    schedules = extract(sol.x, avs)
    res = evaluate(p, req, w, schedules, "milp", sol.status, sol.mip_gap, time.perf_counter() - t0)
    res.seconds = sol.seconds
    return res


# --- merit-order heuristic -------------------------------------------------------------------------


def unit_cost_eur_per_mwh(a: AnyAsset, w: Window, n_total: int, opts: Options) -> float:
    """Average cost of an asset's upward energy at full use, fixed costs spread over it (merit order key)."""
    caps = upward_caps(a, w, n_total, opts)
    energy_mwh = float(np.sum(caps)) * w.dt_h / 1000
    risk = opts.risk_cost_eur_per_mwh * (1 - a.reliability)
    fixed = a.participation_cost_eur
    if isinstance(a, Generator):
        pmax = float(np.max(caps)) if len(caps) else 0.0
        var = a.pwl_cost_eur_per_h(pmax) / (pmax / 1000) if pmax > 0 else INF
        fixed += a.start_cost_eur
    elif isinstance(a, Renewable):
        var = a.cost_eur_per_mwh
    elif isinstance(a, Storage):
        var = a.discharge_cost_eur_per_mwh
    else:
        var = a.flex_cost_eur_per_mwh
    if energy_mwh <= 0:
        return INF
    return float(var + risk + fixed / energy_mwh)


@dataclass
class _GenState:
    on: float
    p: float


class _Dispatcher:
    """Per-period merit-order dispatch of selected assets, keeping ramp and SoC state."""

    def __init__(
        self, p: Portfolio, w: Window, opts: Options, assets: list[AnyAsset], spread_periods: int | None = None
    ) -> None:
        self.p, self.w, self.opts, self.assets = p, w, opts, assets
        # storage keeps energy for later periods: at most its usable energy / spread_periods per period
        self.spread = {
            a.name: max(0.0, a.initial_soc_kwh - max(a.soc_min_kwh, a.final_soc_min_kwh or 0.0))
            * a.discharge_efficiency
            / w.dt_h
            / spread_periods
            for a in assets
            if isinstance(a, Storage) and spread_periods
        }
        n = w.n
        self.power = {a.name: np.zeros(n) for a in assets}
        self.on = {a.name: np.zeros(n) for a in assets if isinstance(a, Generator)}
        self.charge = {a.name: np.zeros(n) for a in assets if isinstance(a, Storage)}
        self.discharge = {a.name: np.zeros(n) for a in assets if isinstance(a, Storage)}
        self.soc = {a.name: a.initial_soc_kwh for a in assets if isinstance(a, Storage)}
        self.soc_path = {a.name: np.zeros(n) for a in assets if isinstance(a, Storage)}
        self.gen = {a.name: _GenState(0.0, 0.0) for a in assets if isinstance(a, Generator)}
        self.caps = {a.name: upward_caps(a, w, p.periods, opts) for a in assets}

    def gen_range(self, g: Generator, t: int) -> tuple[float, float, bool]:
        """(lo, hi) if on in period t, and whether off is allowed."""
        st = self.gen[g.name]
        R, SU = ramp_params(g, self.w.dt_h)
        avail = float(self.caps[g.name][t])
        if st.on:
            lo, hi = max(g.min_kw, st.p - R), min(avail, st.p + R)
            off_ok = st.p <= SU + 1e-9
        else:
            lo, hi, off_ok = g.min_kw, min(avail, SU), True
        return lo, hi, off_ok

    def set_gen(self, g: Generator, t: int, pw: float) -> None:
        self.gen[g.name] = _GenState(1.0 if pw > 0 else 0.0, pw)
        self.power[g.name][t] = pw
        self.on[g.name][t] = self.gen[g.name].on

    def step(self, t: int, need: float, over_ok: float) -> float:
        """Dispatch ``need`` kW (negative = absorb) in period t; returns what was delivered.

        Two passes: (1) commitment -- units that cannot shut down (ramp) stay on at their lowest
        reachable output, further units are switched on in merit order while the on-units plus
        every flexible asset cannot cover the need; (2) the remainder above the committed
        minimum is filled in merit order across generator headroom and flexible assets.
        ``over_ok``: how far minimum load may overshoot the need (capacity tolerance); negative
        means overshoot is as bad as shortfall (demand response: switch on if it halves the gap).
        """
        dt = self.w.dt_h
        N = self.p.periods
        flex_cap = 0.0
        ranges: dict[str, tuple[float, float, bool]] = {}
        for a in self.assets:
            if isinstance(a, Generator):
                ranges[a.name] = self.gen_range(a, t)
            elif isinstance(a, Storage):
                flex_cap += self._dmax(a, t)
            elif need > 0:
                flex_cap += float(self.caps[a.name][t])
        on: dict[str, bool] = {}
        for a in self.assets:  # pass 1: commitment
            if isinstance(a, Generator):
                lo, hi, off_ok = ranges[a.name]
                on[a.name] = (not off_ok) or False
        for a in self.assets:
            if not isinstance(a, Generator) or on[a.name]:
                continue
            lo, hi, off_ok = ranges[a.name]
            if hi < lo - 1e-9 or need <= 0:
                continue
            committed_lo = sum(ranges[g][0] for g, v in on.items() if v)
            committed_hi = sum(ranges[g][1] for g, v in on.items() if v)
            short = need - committed_hi - flex_cap
            if short <= 1e-9:
                continue
            over = committed_lo + lo - need
            limit = over_ok if over_ok >= 0 else short
            if over <= limit + 1e-9:
                on[a.name] = True
        got = sum(ranges[g][0] for g, v in on.items() if v)
        for a in self.assets:  # pass 2: merit-order fill
            rest = need - got
            if isinstance(a, Generator):
                lo, hi, _ = ranges[a.name]
                if not on[a.name]:
                    self.set_gen(a, t, 0.0)
                    continue
                inc = min(max(rest, 0.0), max(0.0, hi - lo))
                self.set_gen(a, t, lo + inc)
                got += inc
            elif isinstance(a, Renewable):
                pw = min(max(rest, 0.0), float(self.caps[a.name][t]))
                self.power[a.name][t] = pw
                got += pw
            elif isinstance(a, Storage):
                s = self.soc[a.name]
                if rest > 1e-9:
                    d = min(rest, self._dmax(a, t))
                    self.discharge[a.name][t] = d
                    s -= d * dt / a.discharge_efficiency
                    got += d
                    self.power[a.name][t] = d
                elif rest < -1e-9:
                    cmax = float(expand(a.max_charge_kw, N)[self.w.t0 + t])
                    c = max(0.0, min(-rest, cmax, (a.capacity_kwh - s) / (a.charge_efficiency * dt)))
                    self.charge[a.name][t] = c
                    s += c * a.charge_efficiency * dt
                    got -= c
                    self.power[a.name][t] = -c
                self.soc[a.name] = s
                self.soc_path[a.name][t] = s
            else:
                if rest > 1e-9:
                    pw = min(rest, float(self.caps[a.name][t]))
                elif rest < -1e-9:
                    pw = -min(-rest, float(load_up_cap(a, self.w, N)[t]))
                else:
                    pw = 0.0
                self.power[a.name][t] = pw
                got += pw
        return got

    def _dmax(self, a: Storage, t: int) -> float:
        """Discharge power available in period t from the current SoC (keeping the final reserve)."""
        floor = max(a.soc_min_kwh, a.final_soc_min_kwh or 0.0)
        r = a.reliability if self.opts.derate else 1.0
        dmax = float(expand(a.max_discharge_kw, self.p.periods)[self.w.t0 + t]) * r
        dmax = min(dmax, self.spread.get(a.name, dmax))
        return max(0.0, min(dmax, (self.soc[a.name] - floor) * a.discharge_efficiency / self.w.dt_h))

    def schedules(self, members: set[str]) -> list[AssetSchedule]:
        out = []
        for a in self.p.assets:
            n = self.w.n
            if a.name not in self.power:
                out.append(AssetSchedule(a.name, a.microgrid, a.kind, False, np.zeros(n)))
                continue
            pw = self.power[a.name]
            member = a.name in members and bool(np.any(np.abs(pw) > 1e-9))
            if not member:
                pw = np.zeros(n)
            sch = AssetSchedule(a.name, a.microgrid, a.kind, member, pw)
            if isinstance(a, Generator):
                sch.on = self.on[a.name] if member else np.zeros(n)
                prev = np.concatenate([[0.0], sch.on[:-1]])
                sch.start = np.maximum(sch.on - prev, 0.0)
            if isinstance(a, Storage):
                sch.charge_kw = self.charge[a.name] if member else np.zeros(n)
                sch.discharge_kw = self.discharge[a.name] if member else np.zeros(n)
                sch.soc_kwh = self.soc_path[a.name] if member else np.full(n, a.initial_soc_kwh)
            out.append(sch)
        return out


def _trading_schedule(p: Portfolio, req: EnergyTrading, w: Window, opts: Options) -> list[AssetSchedule]:
    """Price-taker heuristic: each asset follows the price on its own; loss-making assets drop out."""
    n, e = w.n, w.dt_h / 1000
    price = np.asarray(prof(req.price_eur_per_mwh, n, "price_eur_per_mwh"))
    out = []
    for a in p.assets:
        d = _Dispatcher(p, w, opts, [a])
        if isinstance(a, Generator):
            _c0, pieces = a.pieces()
            for t in range(n):
                lo, hi, off_ok = d.gen_range(a, t)
                best, best_v = (0.0, 0.0) if off_ok else (lo, -INF)
                cands = [lo, hi] + [
                    min(hi, max(lo, a.min_kw + sum(wk for wk, _ in pieces[:k]))) for k in range(len(pieces) + 1)
                ]
                if hi >= lo - 1e-9:
                    for c in cands:
                        v = price[t] * c * e - a.pwl_cost_eur_per_h(c) * w.dt_h
                        if v > best_v:
                            best, best_v = c, v
                d.set_gen(a, t, best)
        elif isinstance(a, Renewable):
            caps = d.caps[a.name]
            d.power[a.name] = np.where(
                price > a.cost_eur_per_mwh + opts.risk_cost_eur_per_mwh * (1 - a.reliability), caps, 0.0
            )
        elif isinstance(a, Storage):
            spread_ok = (
                price.max() * a.charge_efficiency * a.discharge_efficiency
                > price.min() + a.charge_cost_eur_per_mwh + a.discharge_cost_eur_per_mwh
            )
            lo_q, hi_q = np.quantile(price, 0.3), np.quantile(price, 0.7)
            for t in range(n):
                need = 0.0
                if spread_ok and price[t] >= hi_q and price[t] > a.discharge_cost_eur_per_mwh:
                    need = INF
                elif spread_ok and price[t] <= lo_q:
                    need = -INF
                d.step(t, need, 0.0)
        else:
            dn_ok = price > a.flex_cost_eur_per_mwh + opts.risk_cost_eur_per_mwh * (1 - a.reliability)
            d.power[a.name] = np.where(
                dn_ok, d.caps[a.name], np.where(-price > a.flex_cost_eur_per_mwh, -load_up_cap(a, w, p.periods), 0.0)
            )
        sch = d.schedules({a.name})[p.assets.index(a)]
        gain = float(np.sum(price * sch.power_kw)) * e - schedule_cost(p, w, opts, sch)
        out.append(sch if gain > 0 else AssetSchedule(a.name, a.microgrid, a.kind, False, np.zeros(n)))
    return out


def solve_heuristic(p: Portfolio, req: Service) -> CoalitionResult:
    """Merit-order coalition (eDREAM §3.1): cheapest offers first until the request is covered."""
    t_start = time.perf_counter()
    w = req.window(p)
    opts = options_for(req)
    n, N = w.n, p.periods
    if isinstance(req, EnergyTrading):
        schedules = _trading_schedule(p, req, w, opts)
        return evaluate(p, req, w, schedules, "heuristic", "heuristic", seconds=time.perf_counter() - t_start)
    if isinstance(req, ReactivePower):
        lo, _hi = reactive_need(req, n)
        cands: list[AnyAsset] = sorted(
            (a for a in p.assets if a.max_kvar > 0 and not isinstance(a, FlexibleLoad)),
            key=lambda a: (
                a.reactive_cost_eur_per_mvarh + a.participation_cost_eur / max(1e-9, a.max_kvar * n * w.dt_h / 1000)
            ),
        )
        need = np.maximum(lo, 0.0)
        chosen_q: list[AnyAsset] = []
        covered_q = 0.0
        for a in cands:
            if covered_q >= float(np.max(need, initial=0.0)) - 1e-9:
                break
            unit = a.reactive_cost_eur_per_mvarh + a.participation_cost_eur / max(
                1e-9, a.max_kvar * float(np.sum(need > 0)) * w.dt_h / 1000
            )
            if not req.hard and unit >= req.shortfall_penalty_eur_per_mvarh:
                break
            chosen_q.append(a)
            covered_q += a.max_kvar
        qs = {a.name: np.zeros(n) for a in chosen_q}
        for t in range(n):
            rest = need[t]
            for aq in chosen_q:
                q = min(rest, aq.max_kvar)
                qs[aq.name][t] = q
                rest -= q
        schedules = []
        for a in p.assets:
            if a.name in qs and np.any(qs[a.name] > 0):
                schedules.append(
                    AssetSchedule(
                        a.name,
                        a.microgrid,
                        a.kind,
                        True,
                        np.zeros(n),
                        reactive_kvar=qs[a.name],
                        on=np.zeros(n) if isinstance(a, Generator) else None,
                    )
                )
            else:
                schedules.append(AssetSchedule(a.name, a.microgrid, a.kind, False, np.zeros(n)))
        return evaluate(p, req, w, schedules, "heuristic", "heuristic", seconds=time.perf_counter() - t_start)
    target = service_target(req, n)
    assert target is not None
    penalty = req.deviation_penalty_eur_per_mwh if isinstance(req, DemandResponse) else INF
    tol = req.tolerance_kw if isinstance(req, Capacity) else -1.0  # -1: overshoot costs like undershoot (DR)
    order = sorted(p.assets, key=lambda a: unit_cost_eur_per_mwh(a, w, N, opts))
    up_need = np.maximum(target, 0.0)
    covered = np.zeros(n)
    chosen: list[AnyAsset] = []
    busy = max(1, int(np.sum(up_need > 0)))
    for a in order:
        if np.all(covered >= up_need - 1e-9):
            break
        uc = unit_cost_eur_per_mwh(a, w, N, opts)
        if uc >= penalty or not math.isfinite(uc):
            break
        chosen.append(a)
        caps = upward_caps(a, w, N, opts)
        if isinstance(a, Storage):  # its energy spread over the periods that need it
            caps = np.minimum(caps, float(np.max(caps, initial=0.0)) / busy)
        covered = covered + caps
    if np.any(target < 0):  # absorbing side: cheapest storage charging and load increase
        absorb = sorted(
            (a for a in p.assets if isinstance(a, Storage | FlexibleLoad) and a not in chosen),
            key=lambda a: a.charge_cost_eur_per_mwh if isinstance(a, Storage) else a.flex_cost_eur_per_mwh,
        )
        chosen += absorb
    # dispatch; while some period falls short, add the next assets in merit order and redo (cheap: O(assets x T))
    spare = [a for a in order if a not in chosen]
    for _round in range(50):
        d = _Dispatcher(p, w, opts, chosen, spread_periods=busy)
        short = np.zeros(n)
        for t in range(n):
            short[t] = max(0.0, float(up_need[t]) - d.step(t, float(target[t]), tol))
        if not np.any(short > 1e-6) or not spare:
            break
        added = np.zeros(n)
        while spare and np.any(added < short - 1e-9):
            a = spare.pop(0)
            uc = unit_cost_eur_per_mwh(a, w, N, opts)
            if uc >= penalty or not math.isfinite(uc):
                spare = []
                break
            chosen.append(a)
            added = added + upward_caps(a, w, N, opts)
    schedules = d.schedules({a.name for a in chosen})
    return evaluate(p, req, w, schedules, "heuristic", "heuristic", seconds=time.perf_counter() - t_start)


@dataclass(frozen=True)
class GapReport:
    """Heuristic vs solver on the same request.

    ``gap`` = (solver value - heuristic value) / |solver value|: >= 0 when the solver is optimal.
    """

    solver: CoalitionResult
    heuristic: CoalitionResult
    gap_eur: float
    gap: float

    def to_json(self) -> dict[str, object]:
        return {
            "solver_value_eur": self.solver.value_eur,
            "heuristic_value_eur": self.heuristic.value_eur,
            "heuristic_status": self.heuristic.status,
            "gap_eur": self.gap_eur,
            "gap": self.gap if math.isfinite(self.gap) else None,
            "solver_seconds": self.solver.seconds,
            "heuristic_seconds": self.heuristic.seconds,
            "solver_mip_gap": self.solver.mip_gap,
        }


def compare(p: Portfolio, req: Service, time_limit_s: float | None = 60.0) -> GapReport:
    """Run both (the heuristic first: it warm-starts the solver); an infeasible heuristic has an infinite gap."""
    h = solve_heuristic(p, req)
    s = solve_milp(p, req, time_limit_s, warm_start=h)
    if h.status == "infeasible":
        return GapReport(s, h, INF, INF)
    g = s.value_eur - h.value_eur
    return GapReport(s, h, g, g / max(abs(s.value_eur), 1e-6))


# --- hierarchical coalitions (a VPP of VPPs, one per microgrid) ------------------------------------


def solve_hierarchical(p: Portfolio, req: Service, time_limit_s: float | None = 60.0) -> CoalitionResult:
    """Two-level coalition (eDREAM §3, hierarchical VPPs; Figure 25: root VPP over microgrid VPPs).

    1. Aggregate: each microgrid becomes an equivalent with, per period, merit-order blocks
       (one per asset: its firm upward power at its unit cost; storage charging and load increase
       as absorbing blocks) -- the microgrid's aggregated supply curve.
    2. Upper level: the same service model solved over the equivalents (an LP: no binaries).
    3. Disaggregate: each microgrid's own coalition MILP follows its allocated profile as a
       demand-response request with a stiff penalty; the schedules are joined and evaluated on
       the original request. Min-load, ramp, start costs and SoC dynamics are seen only at the
       lower level, so the result can be worse than the flat optimum (never better).
    """
    t_start = time.perf_counter()
    w = req.window(p)
    precheck(p, req, w)
    opts = options_for(req)
    n, N, e = w.n, p.periods, w.dt_h / 1000
    m = Model()
    alloc_terms: dict[str, Terms] = {}
    q_alloc: dict[str, Terms] = {}
    for mg in p.microgrids():
        assets = [a for a in p.assets if a.microgrid == mg]
        terms: Terms = []
        qterms: Terms = []
        stores = [a for a in assets if isinstance(a, Storage)]
        for a in assets:
            if isinstance(a, Storage):
                continue
            caps = upward_caps(a, w, N, opts)
            uc = unit_cost_eur_per_mwh(a, w, N, opts)
            if np.any(caps > 0) and math.isfinite(uc):
                terms.append((m.add_vars(n, 0.0, caps, cost=uc * e), 1.0))
            if isinstance(a, FlexibleLoad):
                terms.append((m.add_vars(n, 0.0, load_up_cap(a, w, N), cost=a.flex_cost_eur_per_mwh * e), -1.0))
            if isinstance(req, ReactivePower) and a.max_kvar > 0 and not isinstance(a, FlexibleLoad):
                qterms.append((m.add_vars(n, 0.0, a.max_kvar, cost=a.reactive_cost_eur_per_mvarh * e), 1.0))
        if stores:  # one equivalent battery per microgrid: summed energy and power, worst efficiencies
            dmax = np.sum(
                [w.slice(expand(a.max_discharge_kw, N)) * (a.reliability if opts.derate else 1.0) for a in stores],
                axis=0,
            )
            cmax = np.sum([w.slice(expand(a.max_charge_kw, N)) for a in stores], axis=0)
            eta_c = min(a.charge_efficiency for a in stores)
            eta_d = min(a.discharge_efficiency for a in stores)
            dcost = max(a.discharge_cost_eur_per_mwh + opts.risk_cost_eur_per_mwh * (1 - a.reliability) for a in stores)
            ccost = max(a.charge_cost_eur_per_mwh for a in stores)
            c = m.add_vars(n, 0.0, cmax, cost=ccost * e)
            d = m.add_vars(n, 0.0, dmax, cost=dcost * e)
            lo = np.full(n, sum(a.soc_min_kwh for a in stores))
            lo[-1] = sum(max(a.soc_min_kwh, a.final_soc_min_kwh or 0.0) for a in stores)
            soc = m.add_vars(n, lo, sum(a.capacity_kwh for a in stores))
            s0 = sum(a.initial_soc_kwh for a in stores)
            m.add_rows(
                "storage energy balance",
                [(soc[:1], 1.0), (c[:1], -eta_c * w.dt_h), (d[:1], w.dt_h / eta_d)],
                lo=s0,
                hi=s0,
            )
            m.add_rows(
                "storage energy balance",
                [(soc[1:], 1.0), (soc[:-1], -1.0), (c[1:], -eta_c * w.dt_h), (d[1:], w.dt_h / eta_d)],
                lo=0.0,
                hi=0.0,
            )
            terms += [(d, 1.0), (c, -1.0)]
            for a in stores:
                if isinstance(req, ReactivePower) and a.max_kvar > 0:
                    qterms.append((m.add_vars(n, 0.0, a.max_kvar, cost=a.reactive_cost_eur_per_mvarh * e), 1.0))
        alloc_terms[mg] = terms
        q_alloc[mg] = qterms
    _add_service(
        m, req, w, N, [t for ts in alloc_terms.values() for t in ts], [t for ts in q_alloc.values() for t in ts]
    )
    sol = m.solve(time_limit_s=time_limit_s)
    if not sol.has_solution:
        binding = diagnose_infeasible(m)
        raise Infeasible(binding or "upper level", "hierarchical upper level infeasible")
    schedules: list[AssetSchedule] = []
    for mg in p.microgrids():
        share = (
            np.sum([np.asarray(c) * sol.x[cols] for cols, c in alloc_terms[mg]], axis=0)
            if alloc_terms[mg]
            else np.zeros(n)
        )
        qshare = np.sum([sol.x[cols] for cols, _ in q_alloc[mg]], axis=0) if q_alloc[mg] else np.zeros(n)
        assets = [a for a in p.assets if a.microgrid == mg]
        if np.all(np.abs(share) < 1e-6) and np.all(np.abs(qshare) < 1e-6):
            schedules += [AssetSchedule(a.name, a.microgrid, a.kind, False, np.zeros(n)) for a in assets]
            continue
        sub: Service
        if isinstance(req, ReactivePower):
            sub = req.model_copy(
                update={
                    "grid_active_kw": 0.0,
                    "grid_reactive_kvar": tuple(float(x) for x in qshare),
                    "reward_eur": 0.0,
                    "hard": False,
                    "shortfall_penalty_eur_per_mvarh": max(1e4, req.shortfall_penalty_eur_per_mvarh),
                }
            )
        else:
            sub = DemandResponse(
                start=req.start,
                periods=n,
                dso_demand_kw=tuple(float(x) for x in share),
                deviation_penalty_eur_per_mwh=1e4,
                risk_cost_eur_per_mwh=req.risk_cost_eur_per_mwh,
                use_reliability=req.use_reliability,
            )
        if isinstance(req, EnergyTrading) and isinstance(sub, DemandResponse):
            lower = _solve_unfirm(p, sub, assets, time_limit_s)
        else:
            lower = solve_milp(p, sub, time_limit_s, only=assets)
        schedules += lower.schedules
    order = {a.name: i for i, a in enumerate(p.assets)}
    schedules.sort(key=lambda s: order[s.name])
    return evaluate(p, req, w, schedules, "hierarchical", "optimal", seconds=time.perf_counter() - t_start)


def _solve_unfirm(
    p: Portfolio, sub: DemandResponse, assets: list[AnyAsset], time_limit_s: float | None
) -> CoalitionResult:
    """Lower level of a trading hierarchy: renewables at their forecast, not their firm band."""
    w = sub.window(p)
    opts = Options(firm=False, derate=sub.use_reliability, risk_cost_eur_per_mwh=sub.risk_cost_eur_per_mwh)
    m = Model()
    avs: list[AssetVars] = build_assets(m, p, w, opts, assets)
    _add_service(m, sub, w, p.periods, [t for av in avs for t in av.injection], [])
    sol = m.solve(time_limit_s=time_limit_s)
    if not sol.has_solution:
        raise Infeasible(diagnose_infeasible(m) or "lower level", "hierarchical lower level infeasible")
    return CoalitionResult(
        "demand_response",
        "milp",
        sol.status,
        0.0,
        0.0,
        0.0,
        0.0,
        extract(sol.x, avs),
        [],
        p.period_min,
        np.zeros(w.n),
        None,
    )
