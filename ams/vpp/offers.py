"""From a coalition to the message flow (issue 6, item 5).

The AMS turns the chosen assets into Offers; an accepted Offer becomes Activation Notifications
to the MGMS owning those assets (``microgrid``); verification feeds settlement and
:func:`ams.vpp.portfolio.update_reliability`, which the next coalition uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from ams.vpp.coalition import CoalitionResult
from gateway.semantic.messages import FlexibilityType, Offer


@dataclass(frozen=True)
class OfferLine:
    """One asset's constant-power block of a coalition: what one MGMS is asked to deliver."""

    microgrid: str
    asset: str
    power_kw: float  # > 0; the direction is in flexibility_type
    start: datetime
    stop: datetime
    price_eur_per_mwh: float  # the asset's average operating cost per MWh in the coalition
    flexibility_type: FlexibilityType

    def to_offer(self, identifier: str | None = None) -> Offer:
        """The gateway ``Offer`` message for this block (``flexibility_ref`` = asset name)."""
        return Offer(
            identifier=identifier or f"{self.asset}-{self.start:%Y%m%dT%H%MZ}",
            flexibility_type=self.flexibility_type,
            power_kw=self.power_kw,
            start=self.start,
            stop=self.stop,
            flexibility_ref=self.asset,
            price_eur_per_mwh=self.price_eur_per_mwh,
        )


def offers_from_coalition(result: CoalitionResult, resolution_kw: float = 1e-3) -> list[OfferLine]:
    """Member schedules as blocks of constant power, cheapest first.

    Consecutive periods whose power differs by less than ``resolution_kw`` are merged. Positive
    power (injection / reduction) is UPWARD flexibility, negative is DOWNWARD. Reactive-only
    contributions have no active power and produce no line (Flexibility carries no kvar).
    """
    step = timedelta(minutes=result.period_min)
    lines: list[OfferLine] = []
    for s in result.members:
        energy_mwh = float(sum(abs(v) for v in s.power_kw)) * result.period_min / 60 / 1000
        price = result.asset_cost_eur.get(s.name, 0.0) / energy_mwh if energy_mwh > 0 else 0.0
        t = 0
        n = len(s.power_kw)
        while t < n:
            v = float(s.power_kw[t])
            u = t + 1
            while u < n and abs(float(s.power_kw[u]) - v) < resolution_kw:
                u += 1
            if abs(v) >= resolution_kw:
                lines.append(
                    OfferLine(
                        s.microgrid,
                        s.name,
                        round(abs(v), 6),
                        result.times[t],
                        result.times[t] + step * (u - t) if u == n else result.times[u],
                        round(price, 6),
                        FlexibilityType.UPWARD if v > 0 else FlexibilityType.DOWNWARD,
                    )
                )
            t = u
    lines.sort(key=lambda o: (o.price_eur_per_mwh, o.start, o.asset))
    return lines
