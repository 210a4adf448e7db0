"""Asset variables and constraints shared by the coalition and day-ahead models, plus the
schedule checker and cost evaluator used for the heuristic, the tests and the reports.

Per asset and period t of a window of T periods (dt hours), all powers in kW:

- generator: on u_t, start v_t (binaries), output p_t = min*u_t + sum_k seg_k,t, seg_k in [0, w_k]
  (convex piecewise-linear cost, Romanian model eq. 2 linearised), p_t <= avail_t*u_t (eq. 3),
  ramp with start-up/shut-down allowance (eq. 4), v_t >= u_t - u_{t-1}, v_t <= u_t, v_t <= 1 - u_{t-1} (eq. 5);
- renewable: 0 <= p_t <= band_t (curtailable; band = forecast, or the lower band edge when firm);
- storage: charge c_t, discharge d_t, SoC s_t = s_{t-1} + phi_C*c_t*dt - d_t*dt/phi_D with
  (1-DoD)*cap <= s_t <= cap (eDREAM ESS constraints); injection d_t - c_t;
- flexible load: reduction dn_t <= min(flex_down_t, elasticity*baseline_t), increase up_t <= flex_up_t;
  injection dn_t - up_t (relative to the baseline).

With ``membership`` a binary z_a per asset gates every upward and downward variable (eDREAM's
subset selection); ``reliability`` derates the upward power by the asset's score.
Simultaneous charge and discharge is not excluded by a binary: with losses or a throughput cost
it is never optimal except to burn energy in the losses, which only pays at negative trading
prices (a binary per storage and period would cost many binaries in large portfolios).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ams.vpp.milp import FloatArray, IntArray, Model
from ams.vpp.portfolio import FlexibleLoad, Generator, Portfolio, Renewable, Storage, expand

AnyAsset = Generator | Renewable | Storage | FlexibleLoad
Terms = list[tuple[IntArray, float | FloatArray]]


@dataclass(frozen=True)
class Window:
    """Periods ``t0 .. t0+n-1`` of the portfolio horizon, ``dt_h`` hours each."""

    t0: int
    n: int
    dt_h: float

    def slice(self, profile: tuple[float, ...]) -> FloatArray:
        return np.asarray(profile[self.t0 : self.t0 + self.n], dtype=np.float64)


@dataclass(frozen=True)
class Options:
    """How the assets enter a model.

    ``firm``: renewables count only their lower band edge (capacity / DR must be delivered);
    ``derate``: upward power x reliability; ``risk_cost_eur_per_mwh``: charged on
    (1 - reliability) of upward energy; ``membership``: binary z per asset;
    ``use_initial_state``: generators start from their initial on/off state (day-ahead) rather
    than from off (a coalition dispatches units for the service from a zero baseline);
    ``load_flex_price``: per-period price for load reduction replacing ``flex_cost`` (DR price).
    """

    firm: bool = False
    derate: bool = True
    risk_cost_eur_per_mwh: float = 0.0
    membership: bool = True
    reactive: bool = False
    use_initial_state: bool = False
    load_flex_price: FloatArray | None = None


@dataclass
class AssetVars:
    asset: AnyAsset
    cols: dict[str, IntArray] = field(default_factory=dict)
    pieces: list[IntArray] = field(default_factory=list)
    injection: Terms = field(default_factory=list)  # kW contribution per period
    reactive: Terms = field(default_factory=list)  # kvar per period


def upward_caps(a: AnyAsset, w: Window, n_total: int, opts: Options) -> FloatArray:
    """Largest upward contribution per period (kW) the asset can give under ``opts`` (pre-checks, heuristic)."""
    r = a.reliability if opts.derate else 1.0
    if isinstance(a, Generator):
        avail = (
            np.minimum(a.max_kw, w.slice(expand(a.available_kw, n_total, "available_kw")))
            if a.available_kw is not None
            else np.full(w.n, a.max_kw)
        )
        return np.asarray(avail * r, dtype=np.float64)
    if isinstance(a, Renewable):
        return band(a, w, n_total, opts.firm) * r
    if isinstance(a, Storage):
        dmax = w.slice(expand(a.max_discharge_kw, n_total, "max_discharge_kw")) * r
        energy = max(0.0, a.initial_soc_kwh - max(a.soc_min_kwh, a.final_soc_min_kwh or 0.0))
        return np.asarray(np.minimum(dmax, energy * a.discharge_efficiency / w.dt_h), dtype=np.float64)
    return load_down_cap(a, w, n_total) * r


def band(a: Renewable, w: Window, n_total: int, firm: bool) -> FloatArray:
    f = w.slice(expand(a.forecast_kw, n_total, "forecast_kw"))
    if firm and a.band_low_kw is not None:
        f = np.minimum(f, w.slice(expand(a.band_low_kw, n_total, "band_low_kw")))
    if a.max_kw is not None:
        f = np.minimum(f, a.max_kw)
    return f


def load_down_cap(a: FlexibleLoad, w: Window, n_total: int) -> FloatArray:
    base = w.slice(expand(a.baseline_kw, n_total, "baseline_kw"))
    cap = np.minimum(w.slice(expand(a.flex_down_kw, n_total, "flex_down_kw")), base)
    if a.price_elasticity is not None:
        cap = np.minimum(cap, a.price_elasticity * base)
    return cap


def load_up_cap(a: FlexibleLoad, w: Window, n_total: int) -> FloatArray:
    base = w.slice(expand(a.baseline_kw, n_total, "baseline_kw"))
    cap = w.slice(expand(a.flex_up_kw, n_total, "flex_up_kw"))
    if a.max_kw is not None:
        cap = np.minimum(cap, np.maximum(0.0, a.max_kw - base))
    return cap


def ramp_params(g: Generator, dt_h: float) -> tuple[float, float]:
    """(ramp per period, start-up/shut-down allowance) in kW."""
    if g.ramp_kw_per_h is None:
        return g.max_kw, g.max_kw
    r = g.ramp_kw_per_h * dt_h
    return r, max(g.min_kw, r)


def build_assets(
    m: Model, p: Portfolio, w: Window, opts: Options, only: list[AnyAsset] | None = None
) -> list[AssetVars]:
    """Add every asset's columns and rows to ``m``; returns handles for the service rows and extraction."""
    out = []
    n, dt, N = w.n, w.dt_h, p.periods
    e = dt / 1000  # kW over one period -> MWh
    for a in only if only is not None else p.assets:
        av = AssetVars(a)
        r = a.reliability if opts.derate else 1.0
        risk = opts.risk_cost_eur_per_mwh * (1 - a.reliability) * e
        z: IntArray | None = None
        if opts.membership:
            z = m.add_binaries(1, cost=a.participation_cost_eur)
            av.cols["z"] = z
        zt = np.repeat(z, n) if z is not None else None

        def gate(group: str, cols: IntArray, cap: FloatArray, zt: IntArray | None = zt) -> None:
            if zt is not None:
                m.add_rows(group, [(cols, 1.0), (zt, -cap)], hi=0.0)

        if isinstance(a, Generator):
            avail = upward_caps(a, w, N, opts)
            # 1e-6 EUR/h breaks the tie between 'on at 0 kW' and 'off' when min_kw and no-load cost are 0
            u = m.add_binaries(n, cost=a.pieces()[0] * dt + 1e-6 * dt)
            v = m.add_binaries(n, cost=a.start_cost_eur)
            pp = m.add_vars(n, 0.0, np.maximum(avail, 0.0), cost=risk)
            pieces = a.pieces()[1]
            segs = [m.add_vars(n, 0.0, wk, cost=slope * e) for wk, slope in pieces]
            av.pieces = segs
            av.cols.update(u=u, v=v, p=pp)
            m.add_rows("generator output", [(pp, 1.0), (u, -a.min_kw), *[(s, -1.0) for s in segs]], lo=0.0, hi=0.0)
            m.add_rows("generator max power", [(pp, 1.0), (u, -avail)], hi=0.0)
            if zt is not None:
                m.add_rows("membership", [(u, 1.0), (zt, -1.0)], hi=0.0)
            u_init = 1.0 if (opts.use_initial_state and a.initial_on) else 0.0
            p_init = a.initial_kw if opts.use_initial_state else 0.0
            # v_t >= u_t - u_{t-1};  v_t <= u_t;  v_t <= 1 - u_{t-1}
            m.add_rows("generator start-up", [(v[:1], 1.0), (u[:1], -1.0)], lo=-u_init)
            m.add_rows("generator start-up", [(v[1:], 1.0), (u[1:], -1.0), (u[:-1], 1.0)], lo=0.0)
            m.add_rows("generator start-up", [(v, 1.0), (u, -1.0)], hi=0.0)
            m.add_rows("generator start-up", [(v[:1], 1.0)], hi=1.0 - u_init)
            m.add_rows("generator start-up", [(v[1:], 1.0), (u[:-1], 1.0)], hi=1.0)
            if a.ramp_kw_per_h is not None:
                R, SU = ramp_params(a, dt)
                m.add_rows("generator ramp", [(pp[:1], 1.0), (v[:1], -SU)], hi=p_init + R * u_init)
                m.add_rows("generator ramp", [(pp[1:], 1.0), (pp[:-1], -1.0), (u[:-1], -R), (v[1:], -SU)], hi=0.0)
                m.add_rows("generator ramp", [(pp[:1], -1.0), (u[:1], SU - R)], hi=-p_init + SU * u_init)
                m.add_rows("generator ramp", [(pp[:-1], 1.0), (pp[1:], -1.0), (u[1:], SU - R), (u[:-1], -SU)], hi=0.0)
            av.injection = [(pp, 1.0)]
        elif isinstance(a, Renewable):
            b = band(a, w, N, opts.firm) * r
            cost = a.cost_eur_per_mwh * e + risk
            pp = m.add_vars(n, 0.0, b, cost=cost)
            gate("membership", pp, b)
            av.cols["p"] = pp
            av.injection = [(pp, 1.0)]
        elif isinstance(a, Storage):
            cmax = w.slice(expand(a.max_charge_kw, N, "max_charge_kw"))
            dmax = w.slice(expand(a.max_discharge_kw, N, "max_discharge_kw")) * r
            c = m.add_vars(n, 0.0, cmax, cost=a.charge_cost_eur_per_mwh * e)
            d = m.add_vars(n, 0.0, dmax, cost=a.discharge_cost_eur_per_mwh * e + risk)
            s_ub = np.full(n, a.capacity_kwh)
            s_lb = np.full(n, a.soc_min_kwh)
            if a.final_soc_min_kwh is not None:
                s_lb[-1] = max(s_lb[-1], a.final_soc_min_kwh)
            s = m.add_vars(n, s_lb, s_ub)
            m.add_rows(
                "storage energy balance",
                [(s[:1], 1.0), (c[:1], -a.charge_efficiency * dt), (d[:1], dt / a.discharge_efficiency)],
                lo=a.initial_soc_kwh,
                hi=a.initial_soc_kwh,
            )
            m.add_rows(
                "storage energy balance",
                [
                    (s[1:], 1.0),
                    (s[:-1], -1.0),
                    (c[1:], -a.charge_efficiency * dt),
                    (d[1:], dt / a.discharge_efficiency),
                ],
                lo=0.0,
                hi=0.0,
            )
            gate("membership", c, cmax)
            gate("membership", d, dmax)
            av.cols.update(c=c, d=d, s=s)
            av.injection = [(d, 1.0), (c, -1.0)]
        else:
            dn_cap = load_down_cap(a, w, N) * r
            up_cap = load_up_cap(a, w, N)
            price = opts.load_flex_price if opts.load_flex_price is not None else np.full(n, a.flex_cost_eur_per_mwh)
            dn = m.add_vars(n, 0.0, dn_cap, cost=price * e + risk)
            up = m.add_vars(n, 0.0, up_cap, cost=a.flex_cost_eur_per_mwh * e)
            gate("membership", dn, dn_cap)
            gate("membership", up, up_cap)
            av.cols.update(dn=dn, up=up)
            av.injection = [(dn, 1.0), (up, -1.0)]
        if opts.reactive and a.max_kvar > 0 and not isinstance(a, FlexibleLoad):
            qc = a.reactive_cost_eur_per_mvarh * e
            qp = m.add_vars(n, 0.0, a.max_kvar, cost=qc)
            qn = m.add_vars(n, 0.0, a.max_kvar, cost=qc)
            if zt is not None:
                m.add_rows("membership", [(qp, 1.0), (qn, 1.0), (zt, -a.max_kvar)], hi=0.0)
            av.cols.update(qp=qp, qn=qn)
            av.reactive = [(qp, 1.0), (qn, -1.0)]
        out.append(av)
    return out


# --- schedules extracted from a solution (or produced by the heuristic) -----------------------


@dataclass
class AssetSchedule:
    """One asset's schedule over the window; ``power_kw`` is its injection relative to its baseline."""

    name: str
    microgrid: str
    kind: str
    member: bool
    power_kw: FloatArray
    on: FloatArray | None = None
    start: FloatArray | None = None
    soc_kwh: FloatArray | None = None
    charge_kw: FloatArray | None = None
    discharge_kw: FloatArray | None = None
    reactive_kvar: FloatArray | None = None

    def to_json(self) -> dict[str, object]:
        d: dict[str, object] = {
            "name": self.name,
            "microgrid": self.microgrid,
            "kind": self.kind,
            "member": self.member,
        }
        for k in ("power_kw", "on", "start", "soc_kwh", "charge_kw", "discharge_kw", "reactive_kvar"):
            v = getattr(self, k)
            if v is not None:
                d[k] = [round(float(x), 6) for x in v]
        return d


def extract(x: FloatArray, avs: list[AssetVars]) -> list[AssetSchedule]:
    out = []
    for av in avs:
        a = av.asset
        c = av.cols

        def val(key: str, c: dict[str, IntArray] = c) -> FloatArray | None:
            return np.asarray(x[c[key]], dtype=np.float64) if key in c else None

        power = np.zeros(len(av.injection[0][0]))
        for cols, coef in av.injection:
            power = power + np.asarray(coef) * x[cols]
        q = None
        if av.reactive:
            q = x[c["qp"]] - x[c["qn"]]
        on = val("u")
        active = bool(np.any(np.abs(power) > 1e-7)) or (q is not None and bool(np.any(np.abs(q) > 1e-7)))
        # z = 1 without any activity is a tie (no participation cost): report it as not chosen
        member = (bool(round(float(x[c["z"][0]]))) if "z" in c else True) and active
        out.append(
            AssetSchedule(
                a.name,
                a.microgrid,
                a.kind,
                member,
                power,
                on=np.round(on) * member if on is not None else None,
                start=np.round(x[c["v"]]) if "v" in c else None,
                soc_kwh=val("s"),
                charge_kw=val("c"),
                discharge_kw=val("d"),
                reactive_kvar=q,
            )
        )
    return out


def check_schedule(p: Portfolio, w: Window, opts: Options, sch: AssetSchedule, tol: float = 1e-5) -> list[str]:
    """Every asset limit the schedule breaks (empty = feasible); used by tests and the heuristic."""
    a = p.asset(sch.name)
    bad: list[str] = []
    N, n = p.periods, w.n
    pw = sch.power_kw
    t_ = tol * max(1.0, float(np.max(np.abs(pw))) if n else 1.0)
    if not sch.member and np.any(np.abs(pw) > t_):
        bad.append(f"{a.name}: not a member but scheduled")
    if isinstance(a, Generator):
        on = sch.on if sch.on is not None else (pw > t_).astype(np.float64)
        avail = upward_caps(a, w, N, opts)
        if np.any(pw < a.min_kw * on - t_) or np.any(pw > avail * on + t_):
            bad.append(f"{a.name}: output outside [min_kw, available] while on / nonzero while off")
        if a.ramp_kw_per_h is not None:
            R, SU = ramp_params(a, w.dt_h)
            u_prev = 1.0 if (opts.use_initial_state and a.initial_on) else 0.0
            p_prev = a.initial_kw if opts.use_initial_state else 0.0
            for t in range(n):
                lim_up = R if u_prev and on[t] else (SU if on[t] else 0.0)
                lim_dn = R if u_prev and on[t] else (SU if u_prev else 0.0)
                if (
                    pw[t] - p_prev > lim_up + t_
                    or (p_prev - pw[t] > lim_dn + t_ and on[t])
                    or (u_prev and not on[t] and p_prev > SU + t_)
                ):
                    bad.append(f"{a.name}: ramp broken at period {t}")
                    break
                u_prev, p_prev = on[t], pw[t]
    elif isinstance(a, Renewable):
        b = band(a, w, N, opts.firm) * (a.reliability if opts.derate else 1.0)
        if np.any(pw < -t_) or np.any(pw > b + t_):
            bad.append(f"{a.name}: output outside [0, band]")
    elif isinstance(a, Storage):
        r = a.reliability if opts.derate else 1.0
        c = sch.charge_kw if sch.charge_kw is not None else np.maximum(-pw, 0)
        d = sch.discharge_kw if sch.discharge_kw is not None else np.maximum(pw, 0)
        if np.any(c < -t_) or np.any(c > w.slice(expand(a.max_charge_kw, N)) + t_):
            bad.append(f"{a.name}: charge power outside limits")
        if np.any(d < -t_) or np.any(d > w.slice(expand(a.max_discharge_kw, N)) * r + t_):
            bad.append(f"{a.name}: discharge power outside limits")
        soc = a.initial_soc_kwh + np.cumsum(a.charge_efficiency * c * w.dt_h - d * w.dt_h / a.discharge_efficiency)
        if np.any(soc < a.soc_min_kwh - 1e-4) or np.any(soc > a.capacity_kwh + 1e-4):
            bad.append(f"{a.name}: state of charge outside [(1-DoD)*capacity, capacity]")
        if a.final_soc_min_kwh is not None and n and soc[-1] < a.final_soc_min_kwh - 1e-4:
            bad.append(f"{a.name}: final state of charge below final_soc_min_kwh")
        if sch.soc_kwh is not None and np.any(np.abs(soc - sch.soc_kwh) > 1e-3 * max(1.0, a.capacity_kwh)):
            bad.append(f"{a.name}: reported state of charge inconsistent with charge/discharge")
    else:
        r = a.reliability if opts.derate else 1.0
        if np.any(pw > load_down_cap(a, w, N) * r + t_) or np.any(-pw > load_up_cap(a, w, N) + t_):
            bad.append(f"{a.name}: flexibility outside [-flex_up, flex_down]")
    if sch.reactive_kvar is not None and np.any(np.abs(sch.reactive_kvar) > a.max_kvar + t_):
        bad.append(f"{a.name}: reactive power beyond max_kvar")
    return bad


def schedule_cost(p: Portfolio, w: Window, opts: Options, sch: AssetSchedule) -> float:
    """Operating cost (EUR) of one schedule, on the same linearised curves the MILP uses."""
    if not sch.member:
        return 0.0
    a = p.asset(sch.name)
    e = w.dt_h / 1000
    risk = opts.risk_cost_eur_per_mwh * (1 - a.reliability) * e
    cost = a.participation_cost_eur if opts.membership else 0.0
    pw = sch.power_kw
    if isinstance(a, Generator):
        on = sch.on if sch.on is not None else (pw > 1e-9).astype(np.float64)
        prev = 1.0 if (opts.use_initial_state and a.initial_on) else 0.0
        for t in range(w.n):
            if on[t]:
                cost += a.pwl_cost_eur_per_h(float(pw[t])) * w.dt_h + risk * pw[t]
                if not prev:
                    cost += a.start_cost_eur
            prev = on[t]
    elif isinstance(a, Renewable):
        cost += float(np.sum(pw)) * (a.cost_eur_per_mwh * e + risk)
    elif isinstance(a, Storage):
        c = sch.charge_kw if sch.charge_kw is not None else np.maximum(-pw, 0)
        d = sch.discharge_kw if sch.discharge_kw is not None else np.maximum(pw, 0)
        cost += float(np.sum(c)) * a.charge_cost_eur_per_mwh * e + float(np.sum(d)) * (
            a.discharge_cost_eur_per_mwh * e + risk
        )
    else:
        dn, up = np.maximum(pw, 0), np.maximum(-pw, 0)
        price = opts.load_flex_price if opts.load_flex_price is not None else np.full(w.n, a.flex_cost_eur_per_mwh)
        cost += float(np.sum(dn * (price * e + risk))) + float(np.sum(up)) * a.flex_cost_eur_per_mwh * e
    if sch.reactive_kvar is not None:
        cost += float(np.sum(np.abs(sch.reactive_kvar))) * a.reactive_cost_eur_per_mvarh * e
    return float(cost)
