"""Fixtures for the VPP tests: a portfolio builder on a UTC 1-hour grid."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ams.vpp.portfolio import Portfolio, portfolio_from_mapping

START = "2026-01-01T00:00:00Z"


def build(assets: list[dict[str, Any]], periods: int, period_min: int = 60) -> Portfolio:
    for a in assets:
        a.setdefault("microgrid", "mg1")
    return portfolio_from_mapping({"start": START, "periods": periods, "period_min": period_min, "assets": assets})


@pytest.fixture
def mk() -> Callable[..., Portfolio]:
    return build
