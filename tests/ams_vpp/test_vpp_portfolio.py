"""Portfolio loading (errors name the key), Flexibility updates and reliability records."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ams.vpp.errors import BadInput
from ams.vpp.portfolio import (
    FlexibleLoad,
    Generator,
    Portfolio,
    Storage,
    apply_flexibility,
    load_portfolio,
    portfolio_from_mapping,
    update_reliability,
)
from gateway.semantic.messages import Flexibility, FlexibilityType

EXAMPLE = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp" / "portfolio.yaml"


def test_example_portfolio_loads() -> None:
    p = load_portfolio(EXAMPLE)
    assert p.periods == 24
    assert set(p.microgrids()) == {"multipower", "campus", "harbour"}
    assert isinstance(p.asset("chp1"), Generator)


@pytest.mark.parametrize(
    ("asset", "needle"),
    [
        ({"kind": "generator", "name": "g1", "max_kw": -5}, "assets.g1.generator.max_kw"),
        ({"kind": "generator", "name": "g1", "max_kw": 5, "colour": "red"}, "assets.g1.generator.colour"),
        (
            {
                "kind": "storage",
                "name": "b1",
                "capacity_kwh": 10,
                "max_charge_kw": 1,
                "max_discharge_kw": 1,
                "initial_soc_kwh": 1,
                "depth_of_discharge": 0.5,
            },
            "initial_soc_kwh must lie",
        ),
        ({"kind": "load", "name": "l1", "baseline_kw": [1, 2, 3]}, "assets.l1.baseline_kw: 3 values"),
        ({"kind": "windmill", "name": "w"}, "assets.w"),
    ],
)
def test_bad_portfolio_names_the_key(asset: dict[str, object], needle: str) -> None:
    with pytest.raises(BadInput, match=needle.replace(".", r"\.")):
        portfolio_from_mapping({"start": "2026-01-01T00:00:00Z", "periods": 2, "assets": [{"microgrid": "m", **asset}]})


def test_duplicate_asset_and_missing_file(tmp_path: Path) -> None:
    a = {"kind": "generator", "name": "g", "microgrid": "m", "max_kw": 1}
    with pytest.raises(BadInput, match="used twice"):
        portfolio_from_mapping({"start": "2026-01-01T00:00:00Z", "periods": 2, "assets": [a, a]})
    with pytest.raises(BadInput, match=r"nope\.yaml"):
        load_portfolio(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(BadInput, match="mapping"):
        load_portfolio(tmp_path / "bad.yaml")


def _flex(kind: FlexibilityType, kw: float, h0: int, h1: int) -> Flexibility:
    return Flexibility(
        identifier="f1",
        flexibility_type=kind,
        power_kw=kw,
        start=datetime(2026, 1, 1, h0, tzinfo=UTC),
        stop=datetime(2026, 1, 1, h1, tzinfo=UTC),
    )


def test_apply_flexibility_updates_the_window_only(mk: Callable[..., Portfolio]) -> None:
    p = mk(
        [
            {"kind": "load", "name": "l", "baseline_kw": 50, "flex_down_kw": 5},
            {
                "kind": "storage",
                "name": "b",
                "capacity_kwh": 10,
                "max_charge_kw": 2,
                "max_discharge_kw": 2,
                "initial_soc_kwh": 5,
            },
            {"kind": "generator", "name": "g", "max_kw": 100},
        ],
        periods=4,
    )
    p2 = apply_flexibility(p, "l", _flex(FlexibilityType.UPWARD, 12.0, 1, 3))
    load = p2.asset("l")
    assert isinstance(load, FlexibleLoad)
    assert load.flex_down_kw == (5.0, 12.0, 12.0, 5.0)
    p3 = apply_flexibility(p2, "b", _flex(FlexibilityType.DOWNWARD, 1.5, 0, 1))
    st = p3.asset("b")
    assert isinstance(st, Storage)
    assert st.max_charge_kw == (1.5, 2.0, 2.0, 2.0)
    p4 = apply_flexibility(p3, "g", _flex(FlexibilityType.UPWARD, 500.0, 2, 4))
    gen = p4.asset("g")
    assert isinstance(gen, Generator)
    assert gen.available_kw == (100.0, 100.0, 100.0, 100.0)  # capped at max_kw
    with pytest.raises(BadInput, match="no downward flexibility"):
        apply_flexibility(p, "g", _flex(FlexibilityType.DOWNWARD, 1.0, 0, 1))
    with pytest.raises(BadInput, match="outside the portfolio horizon"):
        apply_flexibility(p, "l", _flex(FlexibilityType.UPWARD, 1.0, 5, 6))
    assert p.asset("l") == load.model_copy(update={"flex_down_kw": 5.0})  # the original is unchanged


def test_update_reliability_moving_average(mk: Callable[..., Portfolio]) -> None:
    """0.3 weight: 1.0 -> 0.7*1 + 0.3*0.5 = 0.85 -> 0.7*0.85 + 0.3*1 = 0.895 (over-delivery caps at 1)."""
    p = mk([{"kind": "generator", "name": "g", "max_kw": 10}], periods=1)
    p = update_reliability(p, "g", delivered_kw=5, requested_kw=10)
    assert p.asset("g").reliability == pytest.approx(0.85)
    p = update_reliability(p, "g", delivered_kw=12, requested_kw=10)
    assert p.asset("g").reliability == pytest.approx(0.895)
    with pytest.raises(BadInput):
        update_reliability(p, "g", delivered_kw=1, requested_kw=0)
    with pytest.raises(BadInput, match="no asset"):
        update_reliability(p, "zz", delivered_kw=1, requested_kw=1)
