"""Property tests: every schedule the solver or the heuristic returns respects every asset limit
(power bounds, ramp, start-up logic, SoC bounds and dynamics), the energy balance and the service.

Example counts are bounded so the file runs in a few seconds.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ams.vpp.assets import Options, Window, check_schedule
from ams.vpp.coalition import SERVICE_GROUP, options_for, solve_heuristic, solve_milp
from ams.vpp.dayahead import plan_day_ahead
from ams.vpp.errors import Infeasible
from ams.vpp.portfolio import FlexibleLoad, Portfolio, expand, portfolio_from_mapping
from ams.vpp.services import dayahead_from_mapping, service_from_mapping

START = "2026-01-01T00:00:00Z"
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
TOL = 1e-4


@st.composite
def portfolios(draw: st.DrawFn) -> Portfolio:
    n = draw(st.integers(2, 6))
    kw = st.floats(0, 100, allow_nan=False).map(lambda x: round(x, 2))
    prof = st.lists(kw, min_size=n, max_size=n).map(tuple)
    assets: list[dict[str, Any]] = []
    for i in range(draw(st.integers(1, 2))):
        lo = draw(st.floats(0, 50).map(lambda x: round(x, 1)))
        hi = lo + draw(st.floats(1, 100).map(lambda x: round(x, 1)))
        on = draw(st.booleans())
        assets.append(
            {
                "kind": "generator",
                "name": f"g{i}",
                "min_kw": lo,
                "max_kw": hi,
                "ramp_kw_per_h": draw(st.none() | st.floats(5, 100).map(lambda x: round(x, 1))),
                "start_cost_eur": draw(st.floats(0, 20)),
                "cost_linear_eur_per_mwh": draw(st.floats(0, 150)),
                "cost_quadratic_eur_per_mw2h": draw(st.floats(0, 3000)),
                "initial_on": on,
                "initial_kw": draw(st.floats(lo, hi)) if on else 0.0,
                "participation_cost_eur": draw(st.floats(0, 5)),
                "reliability": draw(st.floats(0.5, 1)),
            }
        )
    f = draw(prof)
    assets.append({"kind": "renewable", "name": "pv", "forecast_kw": f, "band_low_kw": tuple(0.8 * x for x in f)})
    cap = draw(st.floats(10, 200))
    dod = draw(st.floats(0.2, 1))
    s0 = draw(st.floats((1 - dod) * cap, cap))
    assets.append(
        {
            "kind": "storage",
            "name": "bat",
            "capacity_kwh": cap,
            "depth_of_discharge": dod,
            "max_charge_kw": draw(st.floats(1, 80)),
            "max_discharge_kw": draw(st.floats(1, 80)),
            "charge_efficiency": draw(st.floats(0.7, 1)),
            "discharge_efficiency": draw(st.floats(0.7, 1)),
            "initial_soc_kwh": s0,
            "final_soc_min_kwh": draw(st.none() | st.floats((1 - dod) * cap, s0)),
            "discharge_cost_eur_per_mwh": draw(st.floats(0, 20)),
            "reliability": draw(st.floats(0.5, 1)),
        }
    )
    assets.append(
        {
            "kind": "load",
            "name": "load",
            "baseline_kw": draw(prof),
            "flex_down_kw": draw(st.floats(0, 50)),
            "flex_up_kw": draw(st.floats(0, 50)),
            "price_elasticity": draw(st.none() | st.floats(0, 1)),
            "flex_cost_eur_per_mwh": draw(st.floats(0, 100)),
        }
    )
    for a in assets:
        a["microgrid"] = draw(st.sampled_from(["mg1", "mg2"]))
    return portfolio_from_mapping({"start": START, "periods": n, "assets": assets})


prices = st.floats(-20, 300, allow_nan=False)


def assert_limits(p: Portfolio, w: Window, opts: Options, schedules: list[Any]) -> None:
    for s in schedules:
        assert check_schedule(p, w, opts, s) == [], s.name


@SETTINGS
@given(portfolios(), st.data())
def test_day_ahead_plan_respects_limits_and_balance(p: Portfolio, data: st.DataObject) -> None:
    n = p.periods
    r = dayahead_from_mapping(
        {
            "start": START,
            "periods": n,
            "price_eur_per_mwh": data.draw(st.lists(prices, min_size=n, max_size=n)),
            "internal_price_eur_per_mwh": data.draw(st.floats(0, 150)),
            "dr_price_eur_per_mwh": data.draw(st.floats(0, 100)),
            "min_reduction_kw": data.draw(st.floats(0, 20)),
        }
    )
    res = plan_day_ahead(p, r, time_limit_s=10)
    w = Window(0, n, p.dt_h)
    opts = Options(firm=False, derate=False, membership=False, use_initial_state=True)
    assert_limits(p, w, opts, res.schedules)
    base = sum(np.asarray(expand(a.baseline_kw, n)) for a in p.assets if isinstance(a, FlexibleLoad))
    injected = np.sum([s.power_kw for s in res.schedules], axis=0)
    assert np.allclose(injected - res.bid_kw, base, atol=TOL * 100)
    red = res.reduction_kw
    assert np.all((red < 1e-6) | (red >= r.min_reduction_kw - 1e-6))


@SETTINGS
@given(portfolios(), st.data())
def test_trading_coalition_respects_limits(p: Portfolio, data: st.DataObject) -> None:
    n = p.periods
    r = service_from_mapping(
        {
            "service": "energy_trading",
            "start": START,
            "periods": n,
            "price_eur_per_mwh": data.draw(st.lists(prices, min_size=n, max_size=n)),
        }
    )
    w = r.window(p)
    res = solve_milp(p, r, time_limit_s=10)
    assert res.violations == []
    assert_limits(p, w, options_for(r), res.schedules)
    heur = solve_heuristic(p, r)
    assert_limits(p, w, options_for(r), heur.schedules)
    assert heur.value_eur <= res.value_eur + 1e-6 * max(1.0, abs(res.value_eur))


@SETTINGS
@given(portfolios(), st.data())
def test_capacity_and_dr_coalitions_respect_limits(p: Portfolio, data: st.DataObject) -> None:
    n = p.periods
    service = data.draw(st.sampled_from(["capacity", "demand_response"]))
    profile = data.draw(st.lists(st.floats(0, 150), min_size=n, max_size=n))
    body: dict[str, Any] = {"service": service, "start": START, "periods": n}
    if service == "capacity":
        body |= {"target_kw": profile, "tolerance_kw": data.draw(st.floats(0, 20))}
    else:
        body |= {"dso_demand_kw": profile}
    r = service_from_mapping(body)
    w = r.window(p)
    try:
        res = solve_milp(p, r, time_limit_s=10)
    except Infeasible as exc:
        assert exc.constraint in (
            *SERVICE_GROUP.values(),
            "storage energy balance",
            "generator ramp",
            "generator start-up",
            "membership",
            "generator max power",
        )
        return
    assert res.violations == []
    assert_limits(p, w, options_for(r), res.schedules)
    heur = solve_heuristic(p, r)
    assert_limits(p, w, options_for(r), heur.schedules)  # the service may be missed, asset limits never
    if heur.status != "infeasible":
        assert heur.value_eur <= res.value_eur + 1e-6 * max(1.0, abs(res.value_eur))
