"""Day-ahead plan (Romanian VPP model) and real-time balancing (mechanism-design VPP), by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ams.vpp.balancing import balance
from ams.vpp.dayahead import plan_day_ahead
from ams.vpp.errors import Infeasible
from ams.vpp.portfolio import Portfolio
from ams.vpp.services import balance_from_mapping, dayahead_from_mapping

START = "2026-01-01T00:00:00Z"


def da(**kw: Any) -> Any:
    return dayahead_from_mapping({"start": START, **kw})


def dr_portfolio(mk: Callable[..., Portfolio]) -> Portfolio:
    return mk(
        [
            {"kind": "generator", "name": "g", "max_kw": 100, "cost_linear_eur_per_mwh": 50},
            {"kind": "load", "name": "l", "baseline_kw": 40, "flex_down_kw": 20, "price_elasticity": 0.25},
        ],
        periods=2,
    )


def test_plan_with_demand_response(mk: Callable[..., Portfolio]) -> None:
    """Prices 40 then 200 EUR/MWh; unit 0..100 kW at 50 EUR/MWh; load 40 kW paying 80 EUR/MWh inside
    the VPP; DR price 30; elasticity 0.25 caps the reduction at 10 kW; R_min 5 kW.

    Hour 0: 40 < 50, the unit stays off and the VPP buys 40 kW (bid -40); a reduction would save
    40 but lose 80 + 30: none. Hour 1: the unit runs at 100 kW; a reduction sells at 200 and loses
    80 + 30 = 110: gain 90/MWh -> R = 10 kW; bid = 100 - 40 + 10 = 70 kW.
    Profit = market (-40*0.04 + 70*0.2 = 12.4) + internal (80 * 70 kWh = 5.6) - unit (5.0) - DR (0.3) = 12.7 EUR.
    """
    res = plan_day_ahead(
        dr_portfolio(mk),
        da(
            periods=2,
            price_eur_per_mwh=[40, 200],
            internal_price_eur_per_mwh=80,
            dr_price_eur_per_mwh=30,
            min_reduction_kw=5,
        ),
    )
    assert list(res.bid_kw) == pytest.approx([-40, 70])
    assert list(res.reduction_kw) == pytest.approx([0, 10])
    assert res.profit_eur == pytest.approx(12.7)
    gen = next(s for s in res.schedules if s.name == "g")
    assert gen.on is not None and list(gen.on) == [0, 1]


def test_plan_minimum_reduction_switches_dr_off(mk: Callable[..., Portfolio]) -> None:
    """R_min = 15 kW exceeds the 10 kW the elasticity allows: no reduction at all (eq. 12).
    Hour 1 bid 60 kW; profit -1.6 + 12 + 80 * 80 kWh (6.4) - 5 = 11.8 EUR."""
    res = plan_day_ahead(
        dr_portfolio(mk),
        da(
            periods=2,
            price_eur_per_mwh=[40, 200],
            internal_price_eur_per_mwh=80,
            dr_price_eur_per_mwh=30,
            min_reduction_kw=15,
        ),
    )
    assert list(res.reduction_kw) == pytest.approx([0, 0])
    assert res.profit_eur == pytest.approx(11.8)


def test_plan_start_up_and_min_up(mk: Callable[..., Portfolio]) -> None:
    """Unit 50..100 kW at 20 EUR/MWh with a 10 EUR start; price 200 in hours 0 and 2, 0 in hour 1.
    Full output earns (200 - 20) * 0.1 = 18 EUR/h. Staying on at 50 kW in hour 1 loses 50 * 0.02 = 1 EUR,
    a second start costs 10: it stays on (one start). Profit = 2 * 18 - 1 - 10 = 25 EUR (vs 16 restarting)."""
    p = mk(
        [
            {
                "kind": "generator",
                "name": "g",
                "min_kw": 50,
                "max_kw": 100,
                "cost_linear_eur_per_mwh": 20,
                "start_cost_eur": 10,
            }
        ],
        periods=3,
    )
    res = plan_day_ahead(p, da(periods=3, price_eur_per_mwh=[200, 0, 200]))
    gen = res.schedules[0]
    assert list(gen.power_kw) == pytest.approx([100, 50, 100])
    assert gen.start is not None and sum(gen.start) == 1
    assert res.profit_eur == pytest.approx(25.0)


def test_plan_infeasible_delivery_is_named(mk: Callable[..., Portfolio]) -> None:
    p = mk([{"kind": "load", "name": "l", "baseline_kw": 40}], periods=1)
    with pytest.raises(Infeasible) as exc:
        plan_day_ahead(p, da(periods=1, price_eur_per_mwh=50, max_import_kw=10))
    assert exc.value.constraint == "delivery (export/import limit)"


def balance_case(mk: Callable[..., Portfolio], **realised: Any) -> Any:
    p = mk(
        [
            {"kind": "generator", "name": "th", "max_kw": 8000, "cost_linear_eur_per_mwh": 20},
            {"kind": "renewable", "name": "wind", "forecast_kw": 1000},
            {"kind": "load", "name": "load", "baseline_kw": 5000},
        ],
        periods=1,
    )
    r = balance_from_mapping(
        {
            "day_ahead": {
                "start": START,
                "periods": 1,
                "price_eur_per_mwh": 25,
                "internal_price_eur_per_mwh": 30,
                "max_export_kw": 1000,
            },
            "realised": {
                "renewable_kw": {"wind": 800},
                "demand_kw": {"load": 5500},
                "up_price_eur_per_mwh": 40,
                "down_price_eur_per_mwh": 20,
                "thermal_balancing_kw": {"th": 300},
                "private_generators": ["th", "wind"],
                **realised,
            },
        }
    )
    return balance(p, r)


def test_balancing_centralised_and_transfers(mk: Callable[..., Portfolio]) -> None:
    """Day ahead: price 25 > unit cost 20, export capped at 1000 kW: wind 1000 + unit 5000 - load 5000.
    Real time: wind 800 (-200), load 5500 (+500): 700 kW short. Inside first: the unit's balancing
    capacity R1 = 300 kW (true cost 20, transfer rate max(25, 20) = 25 < balancing-up 40); the rest
    400 kW bought at 40. System cost 300 * 0.020 + 400 * 0.040 = 6 + 16 = 22 EUR in both cases.
    Transfers: unit 300 * 0.025 = 7.5 EUR; wind under-delivered 200 kWh at lambda^UP: -8 EUR."""
    res = balance_case(mk)
    assert list(res.day_ahead.bid_kw) == pytest.approx([1000])
    c, d = res.centralised, res.distributed
    assert c.need_kw[0] == pytest.approx(700)
    assert c.thermal_adj_kw[0] == pytest.approx(300) and c.buy_kw[0] == pytest.approx(400)
    assert c.system_cost_eur == pytest.approx(22.0)
    assert d.system_cost_eur == pytest.approx(22.0)
    assert d.thermal_transfers_eur["th"] == pytest.approx(7.5)
    assert d.renewable_transfers_eur["wind"] == pytest.approx(-8.0)
    assert res.privacy_cost_eur == pytest.approx(0.0)


def test_balancing_expensive_transfer_rate_costs_the_system(mk: Callable[..., Portfolio]) -> None:
    """The unit asks 50 EUR/MWh for balancing up (> lambda^UP 40): the distributed VPP buys all 700 kW
    at 40 = 28 EUR, against 22 EUR centralised: privacy costs 6 EUR."""
    res = balance_case(mk, thermal_up_rate_eur_per_mwh={"th": 50})
    assert res.distributed.buy_kw[0] == pytest.approx(700)
    assert res.distributed.system_cost_eur == pytest.approx(28.0)
    assert res.privacy_cost_eur == pytest.approx(6.0)
