"""The feeder model: physically consistent values, breaker and limit effects, unit mapping."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from gateway.config import Iec104Address, LabConfig, Point, SimulatorSettings
from gateway.iedsim.dynamics import FeederModel
from gateway.points import DoublePoint

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
Factory = Callable[..., tuple[FeederModel, dict[str, Point]]]


@pytest.fixture
def model_factory(config_factory: Callable[..., LabConfig]) -> Callable[..., tuple[FeederModel, dict[str, Point]]]:
    return lambda seed=1, **settings: _model(config_factory(**settings), seed)


def _model(cfg: LabConfig, seed: int) -> tuple[FeederModel, dict[str, Point]]:
    points = cfg.points_of("ref615")
    return FeederModel(cfg.devices["ref615"].simulator, points, seed=seed, start_time=T0), {p.name: p for p in points}


def test_values_are_consistent_three_phase(model_factory: Factory) -> None:
    model, _ = model_factory()
    for k in range(200):
        v = model.step(T0 + 37.0 * k)
        p, q, s = v["feeder.p"], v["feeder.q"], v["feeder.s"]  # kW, kvar, kVA
        assert s == pytest.approx(math.hypot(p, q), rel=1e-9)
        assert v["feeder.pf"] == pytest.approx(p / s, rel=1e-9)
        assert v["feeder.pf"] == pytest.approx(0.95, rel=1e-9)
        for ph in ("l1", "l2", "l3"):
            u = v[f"feeder.voltage.{ph}"]
            assert 220 < u < 240
            assert v[f"feeder.current.{ph}"] == pytest.approx(s * 1e3 / (3 * u), rel=1e-9)
        assert 49.9 < v["feeder.frequency"] < 50.1
        assert 20 < p < 100  # around the 60 kW mean


def test_load_follows_the_day(model_factory: Factory) -> None:
    model, _ = model_factory(noise=0.0)
    day = 86_400.0
    midnight = T0 - T0 % day
    peak = model.step(midnight + 15 * 3600)["feeder.p"]
    trough = model.step(midnight + 3 * 3600)["feeder.p"]
    assert peak > 70 > 50 > trough


def test_open_breaker_means_no_current_and_power(model_factory: Factory) -> None:
    model, _ = model_factory()
    model.set_breaker(DoublePoint.OFF)
    v = model.values()
    assert v["feeder.breaker.position"] == DoublePoint.OFF
    for name in ("feeder.p", "feeder.q", "feeder.s", "feeder.current.l1", "feeder.current.l2", "feeder.current.l3"):
        assert v[name] == 0.0
    assert v["feeder.pf"] == 1.0
    assert v["feeder.voltage.l1"] == pytest.approx(230, rel=0.02)  # the bus stays energised
    model.set_breaker(DoublePoint.ON)
    assert model.values()["feeder.p"] > 0


def test_power_limit_caps_p_and_is_read_back(model_factory: Factory) -> None:
    model, points = model_factory(noise=0.0)
    assert model.values()["feeder.p_limit.actual"] == 200.0  # max_value of the set-point
    model.apply_setpoint(points["feeder.p_limit.setpoint"], 25.0)
    v = model.step(T0 + 1)
    assert v["feeder.p_limit.actual"] == pytest.approx(25.0)
    assert v["feeder.p"] == pytest.approx(25.0)
    assert v["feeder.s"] == pytest.approx(25.0 / 0.95)


def test_same_seed_same_values(model_factory: Factory) -> None:
    a, _ = model_factory(seed=42)
    b, _ = model_factory(seed=42)
    c, _ = model_factory(seed=43)
    for k in range(10):
        va, vb, vc = a.step(T0 + k), b.step(T0 + k), c.step(T0 + k)
    assert va == vb
    assert va != vc


def test_pinned_value_holds_until_released(model_factory: Factory) -> None:
    model, _ = model_factory()
    model.set_value("feeder.voltage.l1", 250.0)
    assert model.step(T0 + 5)["feeder.voltage.l1"] == 250.0
    model.release("feeder.voltage.l1")
    assert model.step(T0 + 6)["feeder.voltage.l1"] != 250.0


def test_maps_by_quantity_phase_and_unit() -> None:
    settings = SimulatorSettings(noise=0.0, mean_load_kw=100, power_factor=1.0)

    def pt(name: str, quantity: str, unit: str, phase: str | None = None, kind: str = "M_ME_NC_1") -> Point:
        return Point(
            name=name,
            device="d",
            quantity=quantity,
            unit=unit,
            phase=phase,  # type: ignore[arg-type]
            address=Iec104Address(ioa=len(name), type=kind),
        )

    points = [
        pt("p_mw", "active_power", "MW", "total"),
        pt("p_l1_w", "active_power", "W", "L1"),
        pt("u12_kv", "voltage", "kV", "L1L2"),
        pt("i_n", "current", "A", "N"),
        pt("temp_k", "temperature", "K"),
        pt("sw", "switch_state", "1", kind="M_DP_NA_1"),
        pt("e", "active_energy", "kWh", "total"),
    ]
    model = FeederModel(settings, points, start_time=T0)
    v = model.step(T0)
    assert v["p_l1_w"] == pytest.approx(v["p_mw"] * 1e6 / 3)
    assert v["u12_kv"] == pytest.approx(0.4, rel=0.02)
    assert v["i_n"] == 0.0
    assert v["temp_k"] == pytest.approx(298.15)
    assert v["sw"] == DoublePoint.ON
    model.step(T0 + 3600)
    assert model.values()["e"] == pytest.approx(v["p_mw"] * 1e3, rel=1e-9)  # one hour at P


def test_energy_registers_go_on_from_the_initial_reading() -> None:
    """A meter starting at 1000 kWh / 50 kvarh at P=p, Q=q for one hour reads 1000 + p, 50 + q."""
    settings = SimulatorSettings(mean_load_kw=30, noise=0, initial_energy_kwh=1000, initial_reactive_energy_kvarh=50)
    points = [
        Point(name="e", device="m", quantity="active_energy", unit="kWh",
              address=Iec104Address(ioa=1, type="M_ME_NC_1")),
        Point(name="eq", device="m", quantity="reactive_energy", unit="kvarh",
              address=Iec104Address(ioa=2, type="M_ME_NC_1")),
    ]  # fmt: skip
    model = FeederModel(settings, points, start_time=T0)
    start = model.values()
    assert start["e"] == pytest.approx(1000.0) and start["eq"] == pytest.approx(50.0)
    p_kw, q_kvar = model.state.p_w / 1e3, model.state.q_var / 1e3
    model.step(T0 + 3600)
    assert model.values()["e"] == pytest.approx(1000.0 + p_kw, rel=1e-9)
    assert model.values()["eq"] == pytest.approx(50.0 + q_kvar, rel=1e-9)
