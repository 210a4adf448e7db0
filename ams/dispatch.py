"""From a VPP coalition to activations: ``ams dispatch`` and the reliability feedback.

Why separate from :mod:`ams.vpp`: the optimisation is pure (portfolio in, schedules out) and
runs anywhere; this module connects it to a running AMS - it folds the reliability the AMS
has measured per asset (from verified deliveries) into the portfolio before solving, and
queues the chosen blocks for the AMS workers, which send the Activation Notifications to the
MGMS that own the assets (:meth:`ams.service.AmsService.dispatch`).
"""

from __future__ import annotations

import logging
from typing import cast

import redis.asyncio as aioredis

from ams.service import AmsKeys
from ams.vpp.errors import BadInput
from ams.vpp.portfolio import Portfolio, apply_flexibility
from gateway.semantic import Flexibility

__all__ = ["portfolio_as_known", "portfolio_with_flexibility", "portfolio_with_reliability"]

log = logging.getLogger(__name__)


async def portfolio_with_reliability(portfolio: Portfolio, redis: aioredis.Redis, participant: str) -> Portfolio:
    """The portfolio with each asset's reliability replaced by what the AMS measured."""
    stored = cast(dict[str, str], await redis.hgetall(AmsKeys(participant).asset_reliability))
    names = {a.name for a in portfolio.assets}
    for name, value in stored.items():
        if name in names:
            asset = portfolio.asset(name)
            portfolio = portfolio.replace(asset.model_copy(update={"reliability": float(value)}))
    return portfolio


async def portfolio_with_flexibility(portfolio: Portfolio, redis: aioredis.Redis, participant: str) -> Portfolio:
    """The portfolio updated with each asset's latest Flexibility received from its microgrid.

    An MGMS names its flexibilities ``<resource>-<ns>`` (gateway.flexibility); a resource whose
    name is an asset of that microgrid in the portfolio updates that asset
    (:func:`ams.vpp.portfolio.apply_flexibility`), the newest per asset winning. One outside the
    portfolio's horizon or not representable for the asset is skipped and logged.

    Newest means created last by its MGMS (``created_ns``, from the signed envelope and
    written whether probes are on or off); a late resend of an older one arriving after a
    newer one must not win. Hashes without it (written by hand) fall back to ``stored_ns``.
    """
    keys = AmsKeys(participant)
    latest: dict[str, tuple[int, Flexibility]] = {}
    for asset in portfolio.assets:
        async for key in redis.scan_iter(match=keys.flex(asset.microgrid, f"{asset.name}-*"), count=500):
            h = cast(dict[str, str], await redis.hgetall(key))
            if "doc" not in h:
                continue
            created = int(h.get("created_ns") or h.get("stored_ns") or 0)
            if asset.name not in latest or created > latest[asset.name][0]:
                latest[asset.name] = (created, Flexibility.model_validate_json(h["doc"]))
    for name, (_, flex) in latest.items():
        try:
            portfolio = apply_flexibility(portfolio, name, flex)
        except BadInput as exc:
            log.info("flexibility %s not applied to %s: %s", flex.identifier, name, exc)
    return portfolio


async def portfolio_as_known(portfolio: Portfolio, redis: aioredis.Redis, participant: str) -> Portfolio:
    """Both updates, as ``ams dispatch`` solves with: received flexibility, measured reliability."""
    portfolio = await portfolio_with_flexibility(portfolio, redis, participant)
    return await portfolio_with_reliability(portfolio, redis, participant)
