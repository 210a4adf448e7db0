"""The AMS's market rules against hand-computed cases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ams.market import CostModel, DsoRequest, OfferRecord, VerificationPolicy, clear, merit_order, verify_delivery
from gateway.semantic import FlexibilityType

UP = FlexibilityType.UPWARD
T0 = datetime(2026, 11, 22, 12, tzinfo=UTC)
H = timedelta(hours=1)


def offer(oid: str, kw: float, price: float, *, rank: float | None = None, loc: str = "A", start: datetime = T0,
          stop: datetime = T0 + H, kind: FlexibilityType = UP) -> OfferRecord:  # fmt: skip
    return OfferRecord(oid, f"mg-{oid}", loc, kind, kw, start, stop, price, price if rank is None else rank)


def test_price_is_base_plus_size_plus_location() -> None:
    """80 (upward base) + 0.05 * 40 kW + 7 (location A) = 89 EUR/MWh."""
    m = CostModel(location_adder_eur_per_mwh={"A": 7.0})
    assert m.price(UP, 40.0, "A") == pytest.approx(89.0)
    assert m.price(FlexibilityType.DOWNWARD, 40.0, "B") == pytest.approx(42.0)


def test_rank_adds_a_risk_premium_for_unreliable_microgrids() -> None:
    """60 EUR/MWh at reliability 0.8 and weight 50 ranks as 60 + 0.2 * 50 = 70."""
    m = CostModel(reliability_weight_eur_per_mwh=50.0)
    assert m.rank_key(60.0, 0.8) == pytest.approx(70.0)
    cheap_but_unreliable = offer("x", 10, 60.0, rank=70.0)
    dearer_reliable = offer("y", 10, 65.0, rank=65.0)
    assert [o.offer_id for o in merit_order([cheap_but_unreliable, dearer_reliable])] == ["y", "x"]


def test_clear_takes_merit_order_and_splits_the_last_offer() -> None:
    """Need 50 kW: c (40 @ 50) then a (30 @ 60) of which 10 kW; b (70) untouched."""
    offers = [offer("a", 30, 60.0), offer("b", 30, 70.0), offer("c", 40, 50.0)]
    req = DsoRequest(request_id="r", location="A", flexibility_type=UP, power_kw=50, start=T0, stop=T0 + H)
    res = clear(req, offers)
    assert [(o.offer_id, kw) for o, kw in res.taken] == [("c", 40), ("a", 10)]
    assert res.shortfall_kw == 0 and res.accepted_kw == 50


def test_clear_respects_location_window_direction_and_cap() -> None:
    """Only "ok" qualifies (30 kW), so 50 - 30 = 20 kW of the request remain as shortfall."""
    offers = [
        offer("ok", 30, 50.0),
        offer("elsewhere", 30, 40.0, loc="B"),
        offer("late", 30, 40.0, start=T0 + timedelta(minutes=5)),
        offer("short", 30, 40.0, stop=T0 + timedelta(minutes=30)),
        offer("down", 30, 40.0, kind=FlexibilityType.DOWNWARD),
        offer("dear", 30, 999.0),
    ]
    req = DsoRequest(request_id="r", location="A", flexibility_type=UP, power_kw=50, start=T0, stop=T0 + H,
                     price_cap_eur_per_mwh=100.0)  # fmt: skip
    res = clear(req, offers)
    assert [o.offer_id for o, _ in res.taken] == ["ok"]
    assert res.shortfall_kw == pytest.approx(20.0)


def test_indivisible_offers_are_taken_whole() -> None:
    req = DsoRequest(request_id="r", flexibility_type=UP, power_kw=50, start=T0, stop=T0 + H)
    res = clear(req, [offer("a", 40, 50.0), offer("b", 40, 60.0)], divisible=False)
    assert res.accepted_kw == 80 and res.shortfall_kw == 0


def test_verification_pays_delivered_energy_capped_at_activation() -> None:
    """40 kW activated at 100 EUR/MWh, 4 steps of 15 min delivering 40, 42, 38, 40 kW:
    energy = (40 + 40 + 38 + 40) kW * 0.25 h = 39.5 kWh = 0.0395 MWh -> 3.95 EUR."""
    v = verify_delivery(40.0, 100.0, [40.0, 42.0, 38.0, 40.0], 900, VerificationPolicy(tolerance_pct=10))
    assert v.delivered and v.reason == "delivered"
    assert v.energy_mwh == pytest.approx(0.0395)
    assert v.payment_eur == pytest.approx(3.95)
    assert v.mean_kw == pytest.approx(40.0)


def test_under_delivery_is_refused_and_penalised() -> None:
    """40 kW activated, delivered 20 kW for 1 h: energy 0.02 MWh * 100 = 2 EUR paid,
    missing 0.02 MWh * 100 EUR/MWh penalty = 2 EUR -> net 0 EUR."""
    v = verify_delivery(40.0, 100.0, [20.0, 20.0], 1800, VerificationPolicy(tolerance_pct=10, penalty_eur_per_mwh=100))
    assert not v.delivered and "below" in v.reason
    assert v.payment_eur == pytest.approx(0.0)


def test_too_few_good_steps_fail_even_with_a_good_mean() -> None:
    v = verify_delivery(10.0, 50.0, [30.0, 0.0, 0.0, 30.0], 60, VerificationPolicy(tolerance_pct=5, min_step_share=0.8))
    assert not v.delivered and "steps" in v.reason
