"""Coalition formation: optima computed by hand, infeasible requests, heuristic gap, hierarchy, offers."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ams.vpp.coalition import compare, solve_heuristic, solve_hierarchical, solve_milp
from ams.vpp.errors import Infeasible
from ams.vpp.offers import offers_from_coalition
from ams.vpp.portfolio import Portfolio, load_portfolio, update_reliability
from ams.vpp.services import service_from_mapping
from gateway.semantic.messages import FlexibilityType, Offer

START = "2026-01-01T00:00:00Z"
LAB = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp"


def req(**kw: Any) -> Any:
    return service_from_mapping({"start": START, **kw})


def merit_assets() -> list[dict[str, Any]]:
    return [
        {"kind": "generator", "name": "A", "max_kw": 40, "cost_linear_eur_per_mwh": 100},
        {"kind": "generator", "name": "B", "max_kw": 30, "cost_linear_eur_per_mwh": 60},
        {"kind": "load", "name": "C", "baseline_kw": 50, "flex_down_kw": 20, "flex_cost_eur_per_mwh": 80},
    ]


def test_capacity_merit_order(mk: Callable[..., Portfolio]) -> None:
    """50 kW for 2 h from A (100 EUR/MWh, 40 kW), B (60, 30 kW), C (80, 20 kW).

    Cheapest first: B 30 kW + C 20 kW = 50 kW. Cost per hour 30*0.060 + 20*0.080 = 3.4 EUR,
    over 2 h 6.8 EUR; compensation 150 EUR/MWh * 0.1 MWh = 15 EUR; value 15 - 6.8 = 8.2 EUR.
    The merit-order heuristic finds the same coalition: gap 0.
    """
    p = mk(merit_assets(), periods=2)
    r = req(service="capacity", periods=2, target_kw=50, compensation_eur_per_mwh=150)
    g = compare(p, r)
    assert g.solver.value_eur == pytest.approx(8.2)
    assert {s.name for s in g.solver.members} == {"B", "C"}
    assert g.heuristic.value_eur == pytest.approx(8.2)
    assert g.gap == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize(("fee", "expected", "members"), [(10.0, -6.8, {"B", "C"}), (1.0, -6.0, {"D"})])
def test_participation_cost_decides_membership(
    mk: Callable[..., Portfolio], fee: float, expected: float, members: set[str]
) -> None:
    """D alone (50 kW at 50 EUR/MWh) costs 2 h * 50 kW * 0.05 = 5 EUR + its fee.

    Fee 10: 15 EUR > 6.8 EUR (B + C as above) -> B + C. Fee 1: 6 EUR < 6.8 EUR -> D alone.
    """
    assets = [
        *merit_assets(),
        {"kind": "generator", "name": "D", "max_kw": 50, "cost_linear_eur_per_mwh": 50, "participation_cost_eur": fee},
    ]
    res = solve_milp(mk(assets, periods=2), req(service="capacity", periods=2, target_kw=50))
    assert res.value_eur == pytest.approx(expected)
    assert {s.name for s in res.members} == members


def test_storage_arbitrage(mk: Callable[..., Portfolio]) -> None:
    """Prices 20 then 100 EUR/MWh; 100 kWh battery, empty, 50 kW, charge efficiency 0.9, discharge 1.

    Every kWh charged earns 0.9 * 0.100 - 0.020 = 0.07 EUR > 0, so charge the 50 kW limit:
    SoC 45 kWh, discharge 45 kW. Profit 45 * 0.100 - 50 * 0.020 = 4.5 - 1.0 = 3.5 EUR.
    """
    p = mk(
        [
            {
                "kind": "storage",
                "name": "b",
                "capacity_kwh": 100,
                "depth_of_discharge": 1.0,
                "max_charge_kw": 50,
                "max_discharge_kw": 50,
                "initial_soc_kwh": 0,
                "charge_efficiency": 0.9,
                "discharge_efficiency": 1.0,
            }
        ],
        periods=2,
    )
    res = solve_milp(p, req(service="energy_trading", periods=2, price_eur_per_mwh=[20, 100]))
    assert res.value_eur == pytest.approx(3.5)
    assert list(res.vpp_kw) == pytest.approx([-50, 45])


@pytest.mark.parametrize(("start_cost", "expected"), [(5.0, 1.0), (7.0, 0.0)])
def test_generator_start_cost(mk: Callable[..., Portfolio], start_cost: float, expected: float) -> None:
    """Price 100 for 3 h, unit 50..100 kW at 80 EUR/MWh: running flat out earns (100-80)*0.1 = 2 EUR/h,
    6 EUR over 3 h. Start 5 EUR -> profit 1 EUR; start 7 EUR -> stay off, 0 EUR."""
    p = mk(
        [
            {
                "kind": "generator",
                "name": "g",
                "min_kw": 50,
                "max_kw": 100,
                "cost_linear_eur_per_mwh": 80,
                "start_cost_eur": start_cost,
            }
        ],
        periods=3,
    )
    res = solve_milp(p, req(service="energy_trading", periods=3, price_eur_per_mwh=100))
    assert res.value_eur == pytest.approx(expected, abs=1e-6)


def test_generator_ramp(mk: Callable[..., Portfolio]) -> None:
    """Ramp 30 kW/h from off (start-up allowance max(min, ramp) = 30): 30, 60, 90 kW.
    Margin (100 - 50) EUR/MWh on 180 kWh = 9 EUR."""
    p = mk(
        [{"kind": "generator", "name": "g", "max_kw": 100, "ramp_kw_per_h": 30, "cost_linear_eur_per_mwh": 50}],
        periods=3,
    )
    res = solve_milp(p, req(service="energy_trading", periods=3, price_eur_per_mwh=100))
    assert list(res.vpp_kw) == pytest.approx([30, 60, 90])
    assert res.value_eur == pytest.approx(9.0)


def test_quadratic_cost_is_piecewise_linearised(mk: Callable[..., Portfolio]) -> None:
    """Cost 2000 EUR/MW^2h * P^2 on 0..100 kW in 4 pieces: slopes 50, 150, 250, 350 EUR/MWh.
    At price 200 the pieces below 200 run: 50 kW. Profit 0.05 MWh * 200 - 2000 * 0.05^2 = 10 - 5 = 5 EUR."""
    p = mk([{"kind": "generator", "name": "g", "max_kw": 100, "cost_quadratic_eur_per_mw2h": 2000}], periods=1)
    res = solve_milp(p, req(service="energy_trading", periods=1, price_eur_per_mwh=200))
    assert res.vpp_kw[0] == pytest.approx(50)
    assert res.value_eur == pytest.approx(5.0)


def test_demand_response_tracking(mk: Callable[..., Portfolio]) -> None:
    """DSO asks 10 then 30 kW; one load can shed 20 kW at 10 EUR/MWh; penalty 1000 EUR/MWh.
    Deliver 10, 20: shortfall 10 kWh -> 10 EUR, shed 30 kWh -> 0.3 EUR; value -10.3 EUR."""
    p = mk(
        [{"kind": "load", "name": "l", "baseline_kw": 50, "flex_down_kw": 20, "flex_cost_eur_per_mwh": 10}], periods=2
    )
    res = solve_milp(p, req(service="demand_response", periods=2, dso_demand_kw=[10, 30]))
    assert list(res.vpp_kw) == pytest.approx([10, 20])
    assert res.value_eur == pytest.approx(-10.3)


def test_reactive_power_linearised(mk: Callable[..., Portfolio]) -> None:
    """P = 1000 kW, Q = 600 kvar, target PF 0.95: allowed Q = 1000 * tan(acos 0.95) = 328.684 kvar,
    so inject 271.316 kvar at 10 EUR/Mvarh for 1 h: 2.713 EUR."""
    p = mk(
        [
            {
                "kind": "storage",
                "name": "inv",
                "capacity_kwh": 10,
                "max_charge_kw": 5,
                "max_discharge_kw": 5,
                "initial_soc_kwh": 5,
                "max_kvar": 300,
                "reactive_cost_eur_per_mvarh": 10,
            }
        ],
        periods=1,
    )
    r = req(
        service="reactive_power",
        periods=1,
        grid_active_kw=1000,
        grid_reactive_kvar=600,
        target_power_factor=0.95,
        hard=True,
    )
    res = solve_milp(p, r)
    need = 600 - 1000 * math.tan(math.acos(0.95))
    assert res.vpp_kvar is not None
    assert res.vpp_kvar[0] == pytest.approx(need)
    assert res.value_eur == pytest.approx(-need * 10 / 1000)
    assert solve_heuristic(p, r).value_eur == pytest.approx(res.value_eur)


def test_reliability_derates_and_prices_risk(mk: Callable[..., Portfolio]) -> None:
    """B (60 EUR/MWh) at reliability 0.5 gives only 15 of its 30 kW and pays a risk cost of
    (1 - 0.5) * 100 = 50 EUR/MWh -> 110 EUR/MWh, now dearer than A (100): C 20 (80) + A 30 kW (100)."""
    p = update_reliability(mk(merit_assets(), periods=1), "B", delivered_kw=0, requested_kw=10, weight=0.5)
    res = solve_milp(p, req(service="capacity", periods=1, target_kw=50, risk_cost_eur_per_mwh=100))
    by = {s.name: s.power_kw[0] for s in res.members}
    assert by == pytest.approx({"A": 30.0, "C": 20.0})


def test_infeasible_capacity_is_named_before_solving(mk: Callable[..., Portfolio]) -> None:
    p = mk(merit_assets(), periods=2)
    with pytest.raises(Infeasible) as exc:
        solve_milp(p, req(service="capacity", periods=2, target_kw=[50, 95]))
    assert exc.value.constraint == "capacity target"
    assert "period 1" in exc.value.detail and "90.000 kW" in exc.value.detail


def test_infeasible_after_solving_names_the_group(mk: Callable[..., Portfolio]) -> None:
    """10 kWh usable covers one period of 10 kW but not two: each period passes the bound check,
    the solver proves infeasibility, dropping the deviation limit restores it."""
    p = mk(
        [
            {
                "kind": "storage",
                "name": "b",
                "capacity_kwh": 10,
                "depth_of_discharge": 1.0,
                "max_charge_kw": 10,
                "max_discharge_kw": 10,
                "initial_soc_kwh": 10,
                "discharge_efficiency": 1.0,
            }
        ],
        periods=2,
    )
    with pytest.raises(Infeasible) as exc:
        solve_milp(p, req(service="demand_response", periods=2, dso_demand_kw=10, max_deviation_kw=0))
    assert exc.value.constraint == "demand response max deviation"


def test_hierarchical_equals_flat_on_linear_case(mk: Callable[..., Portfolio]) -> None:
    """Two microgrids with linear costs and no commitment constraints: the equivalents' merit order is
    exact, so the VPP of VPPs reaches the flat optimum (8.2 EUR as in test_capacity_merit_order)."""
    assets = merit_assets()
    assets[0]["microgrid"] = "north"
    assets[1]["microgrid"] = "south"
    assets[2]["microgrid"] = "south"
    p = mk(assets, periods=2)
    r = req(service="capacity", periods=2, target_kw=50, compensation_eur_per_mwh=150)
    flat, hier = solve_milp(p, r), solve_hierarchical(p, r)
    assert hier.value_eur == pytest.approx(flat.value_eur)
    assert not hier.violations


@pytest.mark.parametrize("name", ["capacity", "trading", "dr", "reactive"])
def test_example_requests_gap_and_hierarchy(name: str) -> None:
    """On the lab example the solver is optimal, so it is never beaten: gap >= 0; the hierarchical
    coalition is feasible or close and never better than the flat optimum."""
    p = load_portfolio(LAB / "portfolio.yaml")
    r = service_from_mapping(__import__("yaml").safe_load((LAB / f"request-{name}.yaml").read_text()))
    g = compare(p, r, time_limit_s=20)
    assert g.solver.status == "optimal" and not g.solver.violations
    assert g.heuristic.status != "infeasible"
    assert g.gap >= -1e-9
    assert g.solver.value_eur >= g.heuristic.value_eur - 1e-6
    h = solve_hierarchical(p, r, time_limit_s=20)
    assert h.value_eur <= g.solver.value_eur + 1e-6


def test_offers_from_coalition(mk: Callable[..., Portfolio]) -> None:
    """B 30 kW and C 20 kW for 2 h become one block each, priced at their cost per MWh, cheapest first."""
    res = solve_milp(mk(merit_assets(), periods=2), req(service="capacity", periods=2, target_kw=50))
    lines = offers_from_coalition(res)
    assert [(o.asset, o.power_kw, o.price_eur_per_mwh) for o in lines] == [("B", 30.0, 60.0), ("C", 20.0, 80.0)]
    assert all(o.flexibility_type is FlexibilityType.UPWARD and o.microgrid == "mg1" for o in lines)
    assert (lines[0].stop - lines[0].start).total_seconds() == 7200
    offer = lines[0].to_offer()
    assert isinstance(offer, Offer) and offer.flexibility_ref == "B"


def test_warm_start_keeps_the_optimum_and_bounds_a_time_limit() -> None:
    """The heuristic coalition as MIP start: same optimum; with a zero time limit HiGHS still
    returns (at least) the heuristic's value instead of nothing."""
    p = load_portfolio(LAB / "portfolio.yaml")
    r = service_from_mapping(__import__("yaml").safe_load((LAB / "request-capacity.yaml").read_text()))
    h = solve_heuristic(p, r)
    cold = solve_milp(p, r)
    warm = solve_milp(p, r, warm_start=h)
    assert warm.value_eur == pytest.approx(cold.value_eur, abs=1e-4)
    quick = solve_milp(p, r, time_limit_s=0.0, warm_start=h)
    assert quick.status in ("time_limit", "optimal")
    assert quick.value_eur >= h.value_eur - 1e-6


def test_offers_carry_direction(mk: Callable[..., Portfolio]) -> None:
    """The arbitrage battery above charges 50 kW (DOWNWARD: more consumption) then discharges 45 kW (UPWARD).
    Its cost is 0, so both lines are priced 0 EUR/MWh and sorted by start."""
    p = mk(
        [
            {
                "kind": "storage",
                "name": "b",
                "capacity_kwh": 100,
                "depth_of_discharge": 1.0,
                "max_charge_kw": 50,
                "max_discharge_kw": 50,
                "initial_soc_kwh": 0,
                "charge_efficiency": 0.9,
                "discharge_efficiency": 1.0,
            }
        ],
        periods=2,
    )
    res = solve_milp(p, req(service="energy_trading", periods=2, price_eur_per_mwh=[20, 100]))
    lines = offers_from_coalition(res)
    assert [o.flexibility_type for o in lines] == [FlexibilityType.DOWNWARD, FlexibilityType.UPWARD]
    assert [o.power_kw for o in lines] == pytest.approx([50.0, 45.0])
    assert lines[0].stop == lines[1].start
