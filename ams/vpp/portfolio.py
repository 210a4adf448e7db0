"""The VPP portfolio: the assets the aggregator may coalise, each tied to a microgrid (its MGMS).

Asset parameters follow the eDREAM VPP model (edream-vpp-coalitions.txt, section 2.1): generators
(forecast, uncertainty band U_L/U_H, max generation, cost), storage (MAX^Load capacity, DoD, initial
state, MAX^Charge/MAX^Discharge, loss factors phi_C/phi_D, charge/discharge cost) and flexible
demand assets (baseline, flexibility below/above the baseline, max consumption). Dispatchable units
add what the Romanian day-ahead model needs (vpp-optimal-management-dr.txt, eqs. 2-5: quadratic
cost, G_min/G_max, ramp, start cost) and loads the price elasticity of its DR constraints.

Units are in the field names. Powers are kW, positive = injection into the grid for generators
and storage (discharge), positive = consumption for loads. A *profile* is either one number (the
same every period) or one number per period of the portfolio horizon.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ams.vpp.errors import BadInput
from gateway.semantic.messages import Flexibility, FlexibilityType

Name = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
NonNeg = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Profile = NonNeg | tuple[NonNeg, ...]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def expand(profile: Profile, n: int, key: str = "profile") -> tuple[float, ...]:
    """A profile as exactly ``n`` values (a scalar is broadcast); the error names ``key``."""
    if isinstance(profile, tuple):
        if len(profile) != n:
            raise BadInput(f"{key}: {len(profile)} values, the horizon has {n} periods")
        return profile
    return (float(profile),) * n


class _Asset(_Model):
    name: Name
    microgrid: Name  # the MGMS participant that owns the asset and receives its activations
    reliability: Fraction = 1.0  # share of requested power the asset delivered so far (eDREAM risk)
    participation_cost_eur: NonNeg = 0.0  # fixed cost of taking the asset into a coalition
    max_kvar: NonNeg = 0.0  # reactive capability of the inverter / exciter (reactive power service)
    reactive_cost_eur_per_mvarh: NonNeg = 0.0


class CostSegment(_Model):
    """One piece of a convex piecewise-linear cost curve: marginal cost up to ``up_to_kw``."""

    up_to_kw: NonNeg
    eur_per_mwh: Finite


class Generator(_Asset):
    """A dispatchable unit (CHP, diesel, micro-turbine).

    Cost per hour: ``no_load_eur_per_h + linear * P + quadratic * P^2`` with P in MW (the Romanian
    model's square cost function, eq. 2), or ``cost_segments`` (piecewise-linear, convex). The
    quadratic is linearised with ``cost_pieces`` equal-width pieces between min and max.
    """

    kind: Literal["generator"] = "generator"
    min_kw: NonNeg = 0.0
    max_kw: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    available_kw: Profile | None = None  # cap per period (outages, MGMS Flexibility)
    ramp_kw_per_h: NonNeg | None = None
    start_cost_eur: NonNeg = 0.0
    no_load_eur_per_h: NonNeg = 0.0
    cost_linear_eur_per_mwh: Finite = 0.0
    cost_quadratic_eur_per_mw2h: NonNeg = 0.0
    cost_segments: tuple[CostSegment, ...] = ()
    cost_pieces: Annotated[int, Field(ge=1, le=20)] = 4
    initial_on: bool = False
    initial_kw: NonNeg = 0.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.min_kw > self.max_kw:
            raise ValueError("min_kw must not exceed max_kw")
        if self.initial_on and not (self.min_kw <= self.initial_kw <= self.max_kw):
            raise ValueError("initial_kw must lie in [min_kw, max_kw] when initial_on")
        if not self.initial_on and self.initial_kw:
            raise ValueError("initial_kw must be 0 when the unit is initially off")
        if self.cost_segments:
            ups = [s.up_to_kw for s in self.cost_segments]
            slopes = [s.eur_per_mwh for s in self.cost_segments]
            if ups != sorted(ups) or ups[-1] < self.max_kw:
                raise ValueError("cost_segments: up_to_kw must increase and reach max_kw")
            if slopes != sorted(slopes):
                raise ValueError("cost_segments: marginal costs must not decrease (convex cost)")
        return self

    def cost_eur_per_h(self, p_kw: float) -> float:
        """Exact hourly running cost at ``p_kw`` while on (for reports and checks)."""
        if self.cost_segments:
            c, lo = self.no_load_eur_per_h, 0.0
            for s in self.cost_segments:
                w = max(0.0, min(p_kw, s.up_to_kw) - lo)
                c += w / 1000 * s.eur_per_mwh
                lo = s.up_to_kw
            return c
        p = p_kw / 1000
        return self.no_load_eur_per_h + self.cost_linear_eur_per_mwh * p + self.cost_quadratic_eur_per_mw2h * p * p

    def pieces(self) -> tuple[float, list[tuple[float, float]]]:
        """(cost at min_kw per hour, [(width_kw, marginal eur_per_mwh)]) of the linearised curve above min_kw.

        Convex, so the pieces fill cheapest first without binaries.
        """
        if self.cost_segments:
            out, lo = [], self.min_kw
            for s in self.cost_segments:
                hi = min(s.up_to_kw, self.max_kw)
                if hi > lo:
                    out.append((hi - lo, s.eur_per_mwh))
                    lo = hi
            return self.cost_eur_per_h(self.min_kw), out
        span = self.max_kw - self.min_kw
        k = self.cost_pieces if span > 0 else 0
        out = []
        for i in range(k):
            a = self.min_kw + span * i / k
            b = self.min_kw + span * (i + 1) / k
            out.append((b - a, (self.cost_eur_per_h(b) - self.cost_eur_per_h(a)) / ((b - a) / 1000)))
        return self.cost_eur_per_h(self.min_kw), out

    def pwl_cost_eur_per_h(self, p_kw: float) -> float:
        """Hourly cost on the linearised curve (what the optimiser sees)."""
        c0, pieces = self.pieces()
        c, rest = c0, max(0.0, p_kw - self.min_kw)
        for w, slope in pieces:
            used = min(w, rest)
            c += used / 1000 * slope
            rest -= used
        return c


class Renewable(_Asset):
    """PV or wind: forecast with an uncertainty band (eDREAM E_K, U_L, U_H); curtailable."""

    kind: Literal["renewable"] = "renewable"
    forecast_kw: Profile
    band_low_kw: Profile | None = None  # lower edge of the forecast band (firm output); default forecast
    band_high_kw: Profile | None = None
    max_kw: NonNeg | None = None
    cost_eur_per_mwh: Finite = 0.0


class Storage(_Asset):
    """Battery / UPS (eDREAM ESS): usable energy between ``(1 - depth_of_discharge) * capacity`` and capacity."""

    kind: Literal["storage"] = "storage"
    capacity_kwh: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    depth_of_discharge: Fraction = 0.8
    max_charge_kw: Profile
    max_discharge_kw: Profile
    charge_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.95
    discharge_efficiency: Annotated[float, Field(gt=0, le=1)] = 0.95
    initial_soc_kwh: NonNeg
    final_soc_min_kwh: NonNeg | None = None  # e.g. back to the initial state at the end of the horizon
    charge_cost_eur_per_mwh: NonNeg = 0.0
    discharge_cost_eur_per_mwh: NonNeg = 0.0

    @property
    def soc_min_kwh(self) -> float:
        return (1.0 - self.depth_of_discharge) * self.capacity_kwh

    @model_validator(mode="after")
    def _check(self) -> Self:
        if not (self.soc_min_kwh - 1e-9 <= self.initial_soc_kwh <= self.capacity_kwh + 1e-9):
            raise ValueError(
                "initial_soc_kwh must lie between (1 - depth_of_discharge) * capacity_kwh and capacity_kwh"
            )
        if self.final_soc_min_kwh is not None and self.final_soc_min_kwh > self.capacity_kwh:
            raise ValueError("final_soc_min_kwh exceeds capacity_kwh")
        return self


class FlexibleLoad(_Asset):
    """A flexible demand asset: baseline with flexibility below (reduction) and above (increase).

    ``price_elasticity`` bounds the reduction the DR price can buy: R_t <= elasticity * baseline_t
    (the elasticity factor of the Romanian model's DR constraints, eqs. 10-11; reconstructed, the
    equations were lost in the text extraction).
    """

    kind: Literal["load"] = "load"
    baseline_kw: Profile
    flex_down_kw: Profile = 0.0  # reduction below the baseline available (= upward flexibility)
    flex_up_kw: Profile = 0.0  # increase above the baseline available (= downward flexibility)
    max_kw: NonNeg | None = None
    price_elasticity: Fraction | None = None
    flex_cost_eur_per_mwh: NonNeg = 0.0  # compensation per MWh shifted


Asset = Annotated[Generator | Renewable | Storage | FlexibleLoad, Field(discriminator="kind")]


class Portfolio(_Model):
    """Assets on one time axis: ``periods`` steps of ``period_min`` minutes from ``start``."""

    name: Name = "vpp"
    start: datetime
    period_min: Annotated[int, Field(gt=0, le=1440)] = 60
    periods: Annotated[int, Field(gt=0, le=10_000)] = 24
    assets: tuple[Asset, ...]

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.start.tzinfo is None:
            raise ValueError("start must carry a time zone (UTC)")
        seen: set[str] = set()
        for a in self.assets:
            if a.name in seen:
                raise ValueError(f"asset name {a.name!r} is used twice")
            seen.add(a.name)
            for key, val in a:
                if isinstance(val, tuple) and val and isinstance(val[0], float) and len(val) != self.periods:
                    raise ValueError(
                        f"assets.{a.name}.{key}: {len(val)} values, the horizon has {self.periods} periods"
                    )
        return self

    @property
    def dt_h(self) -> float:
        return self.period_min / 60

    def asset(self, name: str) -> Generator | Renewable | Storage | FlexibleLoad:
        for a in self.assets:
            if a.name == name:
                return a
        raise BadInput(f"no asset {name!r} in portfolio {self.name!r}")

    def replace(self, asset: Generator | Renewable | Storage | FlexibleLoad) -> Portfolio:
        """A copy with ``asset`` in place of the asset of the same name."""
        self.asset(asset.name)
        return self.model_copy(update={"assets": tuple(asset if a.name == asset.name else a for a in self.assets)})

    def microgrids(self) -> list[str]:
        return list(dict.fromkeys(a.microgrid for a in self.assets))

    def times(self) -> list[datetime]:
        return [self.start + timedelta(minutes=self.period_min * t) for t in range(self.periods)]


def _format_validation(err: ValidationError, raw: Any) -> str:
    """Name the offending key with asset names instead of list indices."""
    msgs = []
    for e in err.errors():
        loc: list[str] = []
        node = raw
        for part in e["loc"]:
            if isinstance(part, int) and isinstance(node, list) and part < len(node):
                item = node[part]
                loc.append(str(item.get("name", part)) if isinstance(item, dict) else str(part))
                node = item
            else:
                loc.append(str(part))
                node = node.get(part) if isinstance(node, dict) else None
        msgs.append(f"{'.'.join(loc) or '(top)'}: {e['msg']}")
    return "; ".join(msgs)


def read_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file as a mapping (BadInput names the file on any error)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise BadInput(f"{p}: {exc.strerror}") from exc
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise BadInput(f"{p}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadInput(f"{p}: expected a mapping at the top level")
    return data


def _lists_to_tuples(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_lists_to_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _lists_to_tuples(v) for k, v in x.items()}
    return x


def portfolio_from_mapping(data: dict[str, Any]) -> Portfolio:
    """Validate a portfolio mapping; errors name the key (``assets.chp1.max_kw: ...``)."""
    raw = data.get("portfolio", data)
    try:
        return Portfolio.model_validate(raw)
    except ValidationError as exc:
        raise BadInput(_format_validation(exc, raw)) from exc


def load_portfolio(path: str | Path) -> Portfolio:
    """Read a portfolio from YAML or JSON (top level, or under a ``portfolio:`` key)."""
    return portfolio_from_mapping(read_mapping(path))


# --- keeping the portfolio current from the message flow ---------------------------------------


def _window(portfolio: Portfolio, start: datetime, stop: datetime) -> list[int]:
    step = timedelta(minutes=portfolio.period_min)
    out = []
    for t, ts in enumerate(portfolio.times()):
        if ts < stop and ts + step > start:
            out.append(t)
    return out


def _set_window(profile: Profile | None, default: float, n: int, window: list[int], value: float) -> tuple[float, ...]:
    base = list(expand(profile if profile is not None else default, n))
    for t in window:
        base[t] = value
    return tuple(base)


def apply_flexibility(portfolio: Portfolio, asset_name: str, flex: Flexibility) -> Portfolio:
    """Update an asset from a Flexibility its MGMS sent (power_kw over [start, stop), up or down).

    A Flexibility states what the asset can do in the window relative to its baseline (zero for
    generators and storage, ``baseline_kw`` for loads). UPWARD = more generation / less
    consumption, DOWNWARD = less generation / more consumption. It overwrites, for the periods the
    window touches:

    - load: UPWARD -> ``flex_down_kw``, DOWNWARD -> ``flex_up_kw``;
    - storage: UPWARD -> ``max_discharge_kw``, DOWNWARD -> ``max_charge_kw``;
    - generator: UPWARD -> ``available_kw`` (capped at ``max_kw``); DOWNWARD is not representable;
    - renewable: UPWARD -> ``forecast_kw`` (the MGMS's newer forecast); DOWNWARD is not representable
      (a renewable is always curtailable here).
    """
    a = portfolio.asset(asset_name)
    window = _window(portfolio, flex.start, flex.stop)
    if not window:
        raise BadInput(
            f"flexibility {flex.identifier}: window {flex.start}..{flex.stop} is outside the portfolio horizon"
        )
    n, p, up = portfolio.periods, flex.power_kw, flex.flexibility_type is FlexibilityType.UPWARD
    new: Generator | Renewable | Storage | FlexibleLoad
    if isinstance(a, FlexibleLoad):
        key = "flex_down_kw" if up else "flex_up_kw"
        new = a.model_copy(update={key: _set_window(getattr(a, key), 0.0, n, window, p)})
    elif isinstance(a, Storage):
        key = "max_discharge_kw" if up else "max_charge_kw"
        new = a.model_copy(update={key: _set_window(getattr(a, key), 0.0, n, window, p)})
    elif isinstance(a, Generator):
        if not up:
            raise BadInput(
                f"flexibility {flex.identifier}: a generator has no downward flexibility from a zero baseline"
            )
        new = a.model_copy(update={"available_kw": _set_window(a.available_kw, a.max_kw, n, window, min(p, a.max_kw))})
    else:
        if not up:
            raise BadInput(
                f"flexibility {flex.identifier}: renewable curtailment is always available, DOWNWARD is not stored"
            )
        new = a.model_copy(update={"forecast_kw": _set_window(a.forecast_kw, 0.0, n, window, p)})
    # validate again (model_copy does not), so a bad update cannot slip in
    return portfolio.replace(type(new).model_validate(new.model_dump()))


def update_reliability(
    portfolio: Portfolio, asset_name: str, delivered_kw: float, requested_kw: float, weight: float = 0.3
) -> Portfolio:
    """Fold one verified delivery into the asset's reliability (exponential moving average).

    ``reliability <- (1 - weight) * reliability + weight * min(1, delivered / requested)``. The
    coalition uses it twice: an asset's usable upward power is derated by it, and the request's
    ``risk_cost_eur_per_mwh`` is charged on ``(1 - reliability)`` of its energy (the eDREAM smart
    contracts rank offers by price x risk, section 3.1).
    """
    if requested_kw <= 0:
        raise BadInput("requested_kw must be positive")
    if delivered_kw < 0:
        raise BadInput("delivered_kw must not be negative")
    if not 0 < weight <= 1:
        raise BadInput("weight must be in (0, 1]")
    a = portfolio.asset(asset_name)
    score = min(1.0, delivered_kw / requested_kw)
    new = (1 - weight) * a.reliability + weight * score
    return portfolio.replace(a.model_copy(update={"reliability": round(new, 12)}))


def utc(ts: str) -> datetime:
    """Parse an ISO time, assuming UTC when no zone is given (for tests and examples)."""
    d = datetime.fromisoformat(ts)
    return d if d.tzinfo else d.replace(tzinfo=UTC)
