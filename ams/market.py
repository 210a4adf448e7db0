"""The aggregator's market logic, free of I/O: pricing, merit order, clearance, verification.

Why apart from the service: these are the rules an aggregator operator tunes and a reviewer
checks by hand (a price, a ranking, which offers a request takes, whether a delivery counts),
so they are pure functions over typed values, tested with hand-computed cases; the service
(:mod:`ams.service`) only moves their inputs and outputs between Redis and messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from gateway.semantic import FlexibilityType

__all__ = [
    "Clearance",
    "CostModel",
    "DsoRequest",
    "OfferRecord",
    "Verdict",
    "VerificationPolicy",
    "clear",
    "merit_order",
    "verify_delivery",
]


class CostModel(BaseModel):
    """How the AMS prices a microgrid's flexibility (EUR/MWh).

    ``price = base[type] + per_kw * power_kw + location_adder[location]``: a fixed part per
    direction, a part that grows with the size of the product (bigger curtailments cost the
    microgrid more), and a location part (a congested area is worth more to the DSO). The
    merit order ranks by price plus a risk premium ``(1 - reliability) * reliability_weight``
    so an unreliable microgrid only wins when it is clearly cheaper.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_eur_per_mwh: Mapping[FlexibilityType, float] = Field(
        default_factory=lambda: {FlexibilityType.UPWARD: 80.0, FlexibilityType.DOWNWARD: 40.0}
    )
    per_kw_eur_per_mwh: float = Field(default=0.05, ge=0)
    location_adder_eur_per_mwh: Mapping[str, float] = Field(default_factory=dict)
    reliability_weight_eur_per_mwh: float = Field(default=50.0, ge=0)

    def price(self, flexibility_type: FlexibilityType, power_kw: float, location: str) -> float:
        base = self.base_eur_per_mwh.get(flexibility_type, 0.0)
        return round(base + self.per_kw_eur_per_mwh * power_kw + self.location_adder_eur_per_mwh.get(location, 0.0), 4)

    def rank_key(self, price_eur_per_mwh: float, reliability: float) -> float:
        return price_eur_per_mwh + (1.0 - reliability) * self.reliability_weight_eur_per_mwh


class VerificationPolicy(BaseModel):
    """When a delivery counts: mean delivered power within ``tolerance_pct`` of the activated
    power, and at least ``min_step_share`` of the time steps within the tolerance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tolerance_pct: float = Field(default=10.0, ge=0, le=100)
    min_step_share: float = Field(default=0.8, ge=0, le=1)
    penalty_eur_per_mwh: float = Field(default=100.0, ge=0)


@dataclass(frozen=True, slots=True)
class OfferRecord:
    """An offer as the AMS keeps it: what the message says plus who owns it and its rank."""

    offer_id: str
    microgrid: str
    location: str
    flexibility_type: FlexibilityType
    power_kw: float
    start: datetime
    stop: datetime
    price_eur_per_mwh: float
    rank_eur_per_mwh: float


class DsoRequest(BaseModel):
    """What the DSO (simulated market) buys: power of one direction over a window, at most
    ``price_cap`` per MWh (None: any price), at ``location`` (``"*"``: anywhere)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    request_id: str
    location: str = "*"
    flexibility_type: FlexibilityType
    power_kw: float = Field(gt=0)
    start: datetime
    stop: datetime
    price_cap_eur_per_mwh: float | None = None  # None: no cap (JSON has no infinity)


@dataclass(frozen=True, slots=True)
class Clearance:
    """Which offers a request took (with the power taken from each) and what is missing."""

    request_id: str
    taken: tuple[tuple[OfferRecord, float], ...]
    shortfall_kw: float

    @property
    def accepted_kw(self) -> float:
        return sum(kw for _, kw in self.taken)


def merit_order(offers: Iterable[OfferRecord]) -> list[OfferRecord]:
    """Cheapest (risk-adjusted) first; ties by earlier start, then id, so the order is stable."""
    return sorted(offers, key=lambda o: (o.rank_eur_per_mwh, o.start, o.offer_id))


def clear(request: DsoRequest, offers: Iterable[OfferRecord], *, divisible: bool = True) -> Clearance:
    """Take offers in merit order until the request's power is met.

    An offer qualifies if it has the request's direction, lies at the request's location (or
    the request says ``"*"``), covers the whole request window, and costs no more than the
    cap. With ``divisible`` the last offer is taken partly; otherwise whole offers only (the
    total may then exceed the request, never fall short while offers remain).
    """
    remaining = request.power_kw
    taken: list[tuple[OfferRecord, float]] = []
    for offer in merit_order(offers):
        if remaining <= 1e-9:
            break
        if (
            offer.flexibility_type is not request.flexibility_type
            or (request.location != "*" and offer.location != request.location)
            or offer.start > request.start
            or offer.stop < request.stop
            or (request.price_cap_eur_per_mwh is not None and offer.price_eur_per_mwh > request.price_cap_eur_per_mwh)
        ):
            continue
        kw = min(offer.power_kw, remaining) if divisible else offer.power_kw
        taken.append((offer, kw))
        remaining -= kw
    return Clearance(request.request_id, tuple(taken), max(0.0, round(remaining, 6)))


@dataclass(frozen=True, slots=True)
class Verdict:
    """Result of checking a Verification Notification against its activation."""

    delivered: bool
    mean_kw: float
    step_share: float
    energy_mwh: float
    payment_eur: float
    reason: str


def verify_delivery(
    activated_kw: float,
    price_eur_per_mwh: float,
    series_kw: Sequence[float],
    time_step_s: float,
    policy: VerificationPolicy,
) -> Verdict:
    """Judge a delivery and settle it.

    Paid: the delivered energy (each step capped at the activated power, so over-delivery
    earns nothing) at the offer price. Under-delivery beyond the tolerance is penalised on
    the missing energy at ``penalty_eur_per_mwh``.
    """
    if not series_kw:
        return Verdict(False, 0.0, 0.0, 0.0, 0.0, "empty power series")
    tol = activated_kw * policy.tolerance_pct / 100.0
    mean_kw = sum(series_kw) / len(series_kw)
    within = sum(1 for p in series_kw if abs(p - activated_kw) <= tol or p >= activated_kw)
    share = within / len(series_kw)
    hours = time_step_s / 3600.0
    energy_mwh = sum(min(max(p, 0.0), activated_kw) for p in series_kw) * hours / 1000.0
    missing_mwh = max(0.0, activated_kw * len(series_kw) * hours / 1000.0 - energy_mwh)
    ok_mean = mean_kw >= activated_kw - tol
    delivered = ok_mean and share >= policy.min_step_share
    payment = energy_mwh * price_eur_per_mwh
    if not delivered:
        payment -= missing_mwh * policy.penalty_eur_per_mwh
        reason = (
            f"mean {mean_kw:.2f} kW below {activated_kw - tol:.2f} kW"
            if not ok_mean
            else f"only {share:.0%} of steps within {policy.tolerance_pct:g}%"
        )
    else:
        reason = "delivered"
    return Verdict(delivered, round(mean_kw, 4), round(share, 4), round(energy_mwh, 9), round(payment, 6), reason)
