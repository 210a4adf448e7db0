"""From a VPP coalition to activations: ``ams dispatch`` and the reliability feedback.

Why separate from :mod:`ams.vpp`: the optimisation is pure (portfolio in, schedules out) and
runs anywhere; this module connects it to a running AMS - it folds the reliability the AMS
has measured per asset (from verified deliveries) into the portfolio before solving, and
queues the chosen blocks for the AMS workers, which send the Activation Notifications to the
MGMS that own the assets (:meth:`ams.service.AmsService.dispatch`).
"""

from __future__ import annotations

from typing import cast

import redis.asyncio as aioredis

from ams.service import AmsKeys
from ams.vpp.portfolio import Portfolio

__all__ = ["portfolio_with_reliability"]


async def portfolio_with_reliability(portfolio: Portfolio, redis: aioredis.Redis, participant: str) -> Portfolio:
    """The portfolio with each asset's reliability replaced by what the AMS measured."""
    stored = cast(dict[str, str], await redis.hgetall(AmsKeys(participant).asset_reliability))
    names = {a.name for a in portfolio.assets}
    for name, value in stored.items():
        if name in names:
            asset = portfolio.asset(name)
            portfolio = portfolio.replace(asset.model_copy(update={"reliability": float(value)}))
    return portfolio
