"""Service requests a coalition answers (eDREAM Table 1) and the day-ahead / balancing inputs.

Every request covers ``periods`` steps from ``start`` on the portfolio's time axis (same
``period_min``). Profiles are one number or one number per period of the request.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from ams.vpp.assets import Window
from ams.vpp.errors import BadInput
from ams.vpp.portfolio import Finite, NonNeg, Portfolio, Profile, _format_validation, _Model

PriceProfile = Finite | tuple[Finite, ...]


def request_window(start: datetime, periods: int, p: Portfolio) -> Window:
    """A request's periods on the portfolio axis (BadInput when they do not fit)."""
    if start.tzinfo is None:
        raise BadInput("start: must carry a time zone (UTC)")
    off = (start - p.start) / timedelta(minutes=p.period_min)
    if off != int(off):
        raise BadInput(f"start: {start} is not on the portfolio's {p.period_min}-minute grid from {p.start}")
    t0 = int(off)
    if t0 < 0 or t0 + periods > p.periods:
        raise BadInput(
            f"start/periods: request covers periods {t0}..{t0 + periods - 1}, "
            f"the portfolio horizon is 0..{p.periods - 1}"
        )
    return Window(t0, periods, p.dt_h)


class _Request(_Model):
    start: datetime
    periods: Annotated[int, Field(gt=0, le=10_000)]
    risk_cost_eur_per_mwh: NonNeg = 0.0  # charged on (1 - reliability) of upward energy
    use_reliability: bool = True  # derate upward power by reliability

    def window(self, p: Portfolio) -> Window:
        return request_window(self.start, self.periods, p)


class EnergyTrading(_Request):
    """Sell surplus when prices are high, buy (store, shift load) when low: maximise profit."""

    service: Literal["energy_trading"] = "energy_trading"
    price_eur_per_mwh: PriceProfile
    max_export_kw: Profile | None = None
    max_import_kw: Profile | None = None


class Capacity(_Request):
    """Replacement capacity: deliver at least ``target_kw`` (at most target + tolerance) each period."""

    service: Literal["capacity"] = "capacity"
    target_kw: Profile
    tolerance_kw: NonNeg = 0.0
    compensation_eur_per_mwh: NonNeg = 0.0


class DemandResponse(_Request):
    """Follow the DSO's demand profile (kW of extra supply / reduction; negative = consume more)."""

    service: Literal["demand_response"] = "demand_response"
    dso_demand_kw: PriceProfile
    deviation_penalty_eur_per_mwh: NonNeg = 1000.0
    max_deviation_kw: NonNeg | None = None
    reward_eur_per_mwh: NonNeg = 0.0


class ReactivePower(_Request):
    """Bring the grid's power factor to ``target_power_factor`` by injecting reactive power."""

    service: Literal["reactive_power"] = "reactive_power"
    grid_active_kw: Profile
    grid_reactive_kvar: PriceProfile  # drawn by the grid area, positive = inductive load
    target_power_factor: Annotated[float, Field(gt=0, le=1)]
    shortfall_penalty_eur_per_mvarh: NonNeg = 1000.0
    hard: bool = False
    reward_eur: NonNeg = 0.0


ServiceRequest = Annotated[EnergyTrading | Capacity | DemandResponse | ReactivePower, Field(discriminator="service")]
_service_adapter: TypeAdapter[EnergyTrading | Capacity | DemandResponse | ReactivePower] = TypeAdapter(ServiceRequest)


def service_from_mapping(data: dict[str, Any]) -> EnergyTrading | Capacity | DemandResponse | ReactivePower:
    raw = data.get("request", data)
    kinds = "energy_trading, capacity, demand_response, reactive_power"
    if not isinstance(raw, dict) or "service" not in raw:
        raise BadInput(f"service: missing (one of {kinds})")
    if raw["service"] not in kinds.split(", "):
        raise BadInput(f"service: {raw['service']!r} is not one of {kinds}")
    try:
        return _service_adapter.validate_python(raw)
    except ValidationError as exc:
        raise BadInput(_format_validation(exc, raw)) from exc


class DayAheadRequest(_Model):
    """Inputs of the Romanian day-ahead model (vpp-optimal-management-dr.txt, section II).

    ``price_eur_per_mwh`` = lambda^ISO_t (day-ahead market), ``internal_price_eur_per_mwh`` =
    lambda^VPP_t (contracted price the VPP's consumers pay, LCOE), ``dr_price_eur_per_mwh`` =
    lambda^DR_t paid per MWh of reduction, ``min_reduction_kw`` = R_min (aggregate reduction is
    either 0 or at least R_min in a period), export/import limits = delivery constraints.
    """

    start: datetime
    periods: Annotated[int, Field(gt=0, le=10_000)] = 24
    price_eur_per_mwh: PriceProfile
    internal_price_eur_per_mwh: PriceProfile = 0.0
    dr_price_eur_per_mwh: PriceProfile = 0.0
    min_reduction_kw: NonNeg = 0.0
    max_export_kw: Profile | None = None
    max_import_kw: Profile | None = None

    def window(self, p: Portfolio) -> Window:
        return request_window(self.start, self.periods, p)


class Realisation(_Model):
    """Real-time inputs of the balancing stage (vpp-mechanism-design.txt, section 2).

    Realised renewable output and demand per period; balancing prices lambda^UP (buy from the
    balancing market, >= day-ahead) and lambda^DN (sell, <= day-ahead). ``thermal_balancing_kw``
    is the balancing capacity R1 of each thermal unit (eq. 1d). Transfer rates lambda^{T+},
    lambda^{T-} per unit are optional: by default the unit bids its marginal cost at the edge of
    its balancing range, floored/capped by the day-ahead price (the participation condition).
    """

    renewable_kw: dict[str, PriceProfile]
    demand_kw: dict[str, PriceProfile] = Field(default_factory=dict)
    up_price_eur_per_mwh: PriceProfile
    down_price_eur_per_mwh: PriceProfile
    thermal_balancing_kw: dict[str, NonNeg] = Field(default_factory=dict)
    thermal_up_rate_eur_per_mwh: dict[str, PriceProfile] = Field(default_factory=dict)
    thermal_down_rate_eur_per_mwh: dict[str, PriceProfile] = Field(default_factory=dict)
    private_generators: tuple[str, ...] = ()  # generators the VPP does not own (paid by transfers)


class BalanceRequest(_Model):
    day_ahead: DayAheadRequest
    realised: Realisation


def _validate(model: type[_Model], data: dict[str, Any], key: str) -> Any:
    raw = data.get(key, data)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(_format_validation(exc, raw)) from exc


def dayahead_from_mapping(data: dict[str, Any]) -> DayAheadRequest:
    result: DayAheadRequest = _validate(DayAheadRequest, data, "day_ahead")
    return result


def balance_from_mapping(data: dict[str, Any]) -> BalanceRequest:
    result: BalanceRequest = _validate(BalanceRequest, data, "balance")
    return result


def prof(x: PriceProfile, n: int, key: str) -> tuple[float, ...]:
    """A (possibly negative) profile as ``n`` values; BadInput names ``key``."""
    if isinstance(x, tuple):
        if len(x) != n:
            raise BadInput(f"{key}: {len(x)} values, the request has {n} periods")
        return x
    return (float(x),) * n
