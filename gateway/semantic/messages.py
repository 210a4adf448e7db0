"""Typed models of the HEILA information objects (Table 2 of the Multipower gateway paper).

Each payload model is frozen, forbids unknown fields, carries its unit in every numeric
field name (``power_kw``, ``price_eur_per_mwh``) and takes only timezone-aware times, which
it normalises to UTC. The same field name always means the same thing in every message, so
one JSON-LD context (``contexts/heila-v1.jsonld``) maps each name to exactly one IRI.

Sign convention for active power: positive is power delivered to the grid (generation or a
reduced load), negative is power taken from it. A :class:`Flexibility` gives the magnitude in
``power_kw`` and the direction in ``flexibility_type``.

Time series (:class:`OperationPlan`, :class:`WeatherForecast`, :class:`VerificationNotification`,
:class:`FlexibilityMarketPriceForecast`) cover ``[start, stop)`` in equal steps of
``time_step_s``; the models check that the number of values fits the interval, so a receiver
never has to guess which slot a value belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "MESSAGE_TYPES",
    "ActivationNotification",
    "Bid",
    "BreakerCommand",
    "ControlSignal",
    "ControlSignals",
    "Flexibility",
    "FlexibilityMarketPriceForecast",
    "FlexibilityType",
    "Measurements",
    "Offer",
    "OfferList",
    "OperationPlan",
    "Payload",
    "Reading",
    "Receipt",
    "ReserveNotification",
    "VerificationNotification",
    "WeatherForecast",
]


def _to_utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_to_utc)]
"""A timezone-aware time, stored in UTC so equal instants compare and serialise equal."""

Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^\S(.*\S)?$")]
"""An identifier or name: non-empty, bounded, no leading/trailing blanks."""

MessageRef = Annotated[str, Field(pattern=r"^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")]
"""A message id (the envelope's ``id``, a UUID URN): what a :class:`Receipt` refers to."""

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
"""A SHA-256 digest as 64 lower-case hex digits."""

Finite = Annotated[float, Field(allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]

MAX_SERIES_LEN = 10_000
"""Upper bound on values in one series (a week at one-minute steps fits), against memory abuse."""


class FlexibilityType(StrEnum):
    """Direction of a flexibility product (the "flexibility type" of Table 2)."""

    UPWARD = "upward"  # more generation or less consumption
    DOWNWARD = "downward"  # less generation or more consumption


class BreakerCommand(StrEnum):
    """Switching commands a control signal may carry."""

    OPEN = "open"
    CLOSE = "close"
    ON = "on"
    OFF = "off"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=False, allow_inf_nan=False)


class Payload(_Model):
    """Base of every information object; ``message_type`` is its name on the wire."""

    message_type: ClassVar[str]


class _Interval(Payload):
    """A payload that concerns ``[start, stop)``."""

    start: UtcDatetime
    stop: UtcDatetime

    @model_validator(mode="after")
    def _stop_after_start(self) -> Self:
        if self.stop <= self.start:
            raise ValueError("stop must be after start")
        return self


def _check_series(start: datetime, stop: datetime, step_s: int, n: int, field: str) -> None:
    span_s = (stop - start).total_seconds()
    if span_s % step_s:
        raise ValueError(f"interval of {span_s:g} s is not a whole number of {step_s} s steps")
    if n != span_s // step_s:
        raise ValueError(f"{field} has {n} values, the interval holds {int(span_s // step_s)} steps of {step_s} s")


# --- Measurements and control -------------------------------------------------------------


class Reading(_Model):
    """What one measuring point reported at one time; only the quantities it measures are set."""

    point: Name
    measured_at: UtcDatetime
    voltage_v: Finite | None = None
    current_a: Finite | None = None
    power_kw: Finite | None = None
    reactive_power_kvar: Finite | None = None
    apparent_power_kva: NonNegative | None = None
    power_factor: Annotated[float, Field(ge=-1, le=1)] | None = None
    breaker_closed: bool | None = None

    @model_validator(mode="after")
    def _has_a_value(self) -> Self:
        quantities = set(type(self).model_fields) - {"point", "measured_at"}
        if all(getattr(self, q) is None for q in quantities):
            raise ValueError("a reading needs at least one measured quantity")
        return self


class Measurements(Payload):
    """Current, voltage, powers, power factor and breaker states of one microgrid."""

    message_type: ClassVar[str] = "Measurements"

    source: Name
    readings: tuple[Reading, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)


class ControlSignal(_Model):
    """One control signal (switching command) or setpoint for one target."""

    target: Name
    command: BreakerCommand | None = None
    power_kw: Finite | None = None
    reactive_power_kvar: Finite | None = None

    @model_validator(mode="after")
    def _exactly_one_action(self) -> Self:
        n = sum(v is not None for v in (self.command, self.power_kw, self.reactive_power_kvar))
        if n != 1:
            raise ValueError("a control signal carries exactly one of command, power_kw, reactive_power_kvar")
        return self


class ControlSignals(Payload):
    """Control signals and setpoints, executed in the order given."""

    message_type: ClassVar[str] = "ControlSignals"

    signals: tuple[ControlSignal, ...] = Field(min_length=1, max_length=1000)


# --- Plans and forecasts -------------------------------------------------------------------


class OperationPlan(_Interval):
    """Load/generation schedule of one resource for ``[start, stop)``."""

    message_type: ClassVar[str] = "OperationPlan"

    identifier: Name
    resource: Name
    time_step_s: int = Field(gt=0, le=86_400)
    power_series_kw: tuple[Finite, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)

    @model_validator(mode="after")
    def _series_fits(self) -> Self:
        _check_series(self.start, self.stop, self.time_step_s, len(self.power_series_kw), "power_series_kw")
        return self


class WeatherForecast(_Interval):
    """Weather forecast for a location: temperature, global irradiance, wind speed per step."""

    message_type: ClassVar[str] = "WeatherForecast"

    location: Name
    time_step_s: int = Field(gt=0, le=86_400)
    temperature_series_c: tuple[Finite, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)
    irradiance_series_w_per_m2: tuple[NonNegative, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)
    wind_speed_series_m_per_s: tuple[NonNegative, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)

    @model_validator(mode="after")
    def _series_fit(self) -> Self:
        for name in ("temperature_series_c", "irradiance_series_w_per_m2", "wind_speed_series_m_per_s"):
            _check_series(self.start, self.stop, self.time_step_s, len(getattr(self, name)), name)
        return self


class FlexibilityMarketPriceForecast(_Interval):
    """Forecast flexibility market price per step for a market area."""

    message_type: ClassVar[str] = "FlexibilityMarketPriceForecast"

    location: Name
    time_step_s: int = Field(gt=0, le=86_400)
    price_series_eur_per_mwh: tuple[Finite, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)

    @model_validator(mode="after")
    def _series_fits(self) -> Self:
        _check_series(self.start, self.stop, self.time_step_s, len(self.price_series_eur_per_mwh),
                      "price_series_eur_per_mwh")  # fmt: skip
        return self


# --- Flexibility market ----------------------------------------------------------------------


class Flexibility(_Interval):
    """Flexibility a microgrid can provide: id, type, power, start and stop time."""

    message_type: ClassVar[str] = "Flexibility"

    identifier: Name
    flexibility_type: FlexibilityType
    power_kw: float = Field(gt=0, allow_inf_nan=False)


class Offer(Flexibility):
    """A flexibility offered on the market at a price; ``flexibility_ref`` names its source."""

    message_type: ClassVar[str] = "Offer"

    flexibility_ref: Name | None = None
    price_eur_per_mwh: Finite


class OfferList(Payload):
    """Offers for one location, cheapest first (the order a merit-order market takes them)."""

    message_type: ClassVar[str] = "OfferList"

    location: Name
    offers: tuple[Offer, ...] = Field(max_length=MAX_SERIES_LEN)

    @model_validator(mode="after")
    def _price_order(self) -> Self:
        prices = [o.price_eur_per_mwh for o in self.offers]
        if prices != sorted(prices):
            raise ValueError("offers must be sorted by price_eur_per_mwh, cheapest first")
        return self


class Bid(_Interval):
    """A bid on the flexibility market: id, type, power, start and stop time, price."""

    message_type: ClassVar[str] = "Bid"

    identifier: Name
    flexibility_type: FlexibilityType
    power_kw: float = Field(gt=0, allow_inf_nan=False)
    price_eur_per_mwh: Finite


class ReserveNotification(_Interval):
    """After market clearance: this offer is reserved at this price."""

    message_type: ClassVar[str] = "ReserveNotification"

    identifier: Name
    offer_ref: Name | None = None
    flexibility_type: FlexibilityType
    power_kw: float = Field(gt=0, allow_inf_nan=False)
    price_eur_per_mwh: Finite


class ActivationNotification(_Interval):
    """The DSO activates a reserved product: deliver this power in ``[start, stop)``."""

    message_type: ClassVar[str] = "ActivationNotification"

    identifier: Name
    reserve_ref: Name | None = None
    flexibility_type: FlexibilityType
    power_kw: float = Field(gt=0, allow_inf_nan=False)


class VerificationNotification(_Interval):
    """Measured active power during an activation, one value per ``time_step_s``."""

    message_type: ClassVar[str] = "VerificationNotification"

    identifier: Name
    activation_ref: Name | None = None
    time_step_s: int = Field(gt=0, le=86_400)
    power_series_kw: tuple[Finite, ...] = Field(min_length=1, max_length=MAX_SERIES_LEN)

    @model_validator(mode="after")
    def _series_fits(self) -> Self:
        _check_series(self.start, self.stop, self.time_step_s, len(self.power_series_kw), "power_series_kw")
        return self


# --- Delivery ---------------------------------------------------------------------------------


class Receipt(Payload):
    """The receiver's proof that it stored a message: which one, which bytes, when.

    Not one of HEILA's Table 2 objects: it exists because a transport's acknowledgement
    (MQTT PUBACK, HTTP 202) only says that the *next hop* took the bytes, and a broker can
    acknowledge and then lose them (mosquitto writes its store after the PUBACK). The
    receiver sends a Receipt after its inbox holds the message, signed like every message, and
    the sender keeps resending the message until one comes back (``gateway.messaging``).

    ``digest_sha256`` is the SHA-256 of the sealed bytes exactly as received, so the sender can
    tell that the receiver stored *this* copy; ``stored_at`` is when the receiver first stored
    it (a duplicate is answered with the first time). A Receipt is never itself receipted.
    """

    message_type: ClassVar[str] = "Receipt"

    message_ref: MessageRef
    digest_sha256: Sha256Hex
    stored_at: UtcDatetime


MESSAGE_TYPES: Mapping[str, type[Payload]] = MappingProxyType(
    {
        cls.message_type: cls
        for cls in (
            Measurements,
            ControlSignals,
            OperationPlan,
            Flexibility,
            Offer,
            OfferList,
            Bid,
            WeatherForecast,
            ReserveNotification,
            ActivationNotification,
            VerificationNotification,
            FlexibilityMarketPriceForecast,
            Receipt,
        )
    }
)
"""Wire name -> payload model, read-only: the set of types is fixed per schema version."""
