"""Sample payloads, one per HEILA information object (and the Receipt), and keystores for three participants."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.semantic import (
    ActivationNotification,
    Bid,
    ControlSignal,
    ControlSignals,
    Flexibility,
    FlexibilityMarketPriceForecast,
    Keystore,
    KeystoreSettings,
    Measurements,
    Offer,
    OfferList,
    OperationPlan,
    Payload,
    Reading,
    Receipt,
    ReserveNotification,
    VerificationNotification,
    WeatherForecast,
    write_key_pair,
)

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)


def make_samples() -> dict[str, Payload]:
    """One realistic instance of every message type, keyed by wire type name."""
    offer_a = Offer(
        identifier="offer-1",
        flexibility_ref="flex-1",
        flexibility_type="upward",
        power_kw=40.0,
        start=T0,
        stop=T0 + H,
        price_eur_per_mwh=55.5,
    )
    offer_b = Offer(
        identifier="offer-2", flexibility_type="downward", power_kw=12.5, start=T0, stop=T0 + H, price_eur_per_mwh=80.0
    )
    samples: list[Payload] = [
        Measurements(source="multipower", readings=(
            Reading(point="feeder.voltage.l1", measured_at=T0, voltage_v=231.4),
            Reading(point="feeder.current.l1", measured_at=T0, current_a=-12.25),
            Reading(point="feeder.p", measured_at=T0, power_kw=-3.5, reactive_power_kvar=1.25,
                    apparent_power_kva=3.72, power_factor=-0.94),
            Reading(point="feeder.breaker.position", measured_at=T0, breaker_closed=True),
        )),
        ControlSignals(signals=(
            ControlSignal(target="feeder.breaker.command", command="open"),
            ControlSignal(target="bess.setpoint.p", power_kw=-20.0),
            ControlSignal(target="bess.setpoint.q", reactive_power_kvar=5.0),
        )),
        OperationPlan(identifier="plan-7", resource="bess", start=T0, stop=T0 + H, time_step_s=900,
                      power_series_kw=(10.0, 12.5, -4.0, 0.0)),
        Flexibility(identifier="flex-1", flexibility_type="upward", power_kw=40.0, start=T0, stop=T0 + H),
        offer_a,
        OfferList(location="FI-SE1/feeder-4", offers=(offer_a, offer_b)),
        Bid(identifier="bid-3", flexibility_type="upward", power_kw=100.0, start=T0, stop=T0 + H,
            price_eur_per_mwh=60.0),
        WeatherForecast(location="Vaasa", start=T0, stop=T0 + 2 * H, time_step_s=3600,
                        temperature_series_c=(-3.5, -2.0), irradiance_series_w_per_m2=(120.0, 310.5),
                        wind_speed_series_m_per_s=(4.2, 5.0)),
        ReserveNotification(identifier="res-1", offer_ref="offer-1", flexibility_type="upward", power_kw=40.0,
                            start=T0, stop=T0 + H, price_eur_per_mwh=55.5),
        ActivationNotification(identifier="act-1", reserve_ref="res-1", flexibility_type="upward", power_kw=40.0,
                               start=T0, stop=T0 + H),
        VerificationNotification(identifier="ver-1", activation_ref="act-1", start=T0, stop=T0 + H,
                                 time_step_s=1200, power_series_kw=(39.5, 40.25, 41.0)),
        FlexibilityMarketPriceForecast(location="FI", start=T0, stop=T0 + 3 * H, time_step_s=3600,
                                       price_series_eur_per_mwh=(40.0, -5.5, 120.0)),
        Receipt(message_ref="urn:uuid:3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", digest_sha256="ab" * 32,
                stored_at=T0 + timedelta(milliseconds=3)),
    ]  # fmt: skip
    return {p.message_type: p for p in samples}


@pytest.fixture
def samples() -> dict[str, Payload]:
    return make_samples()


@pytest.fixture(scope="session")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs for mgms, ams and eve (an outsider whom nobody trusts), made once per run."""
    d = tmp_path_factory.mktemp("keys")
    for name in ("mgms", "ams", "eve"):
        (d / name).mkdir()
        write_key_pair(name, d / name)
    # Trust: mgms and ams know each other; eve knows both but is known by neither.
    for me, peers in {"mgms": ["ams"], "ams": ["mgms"], "eve": ["mgms", "ams"]}.items():
        (d / me / "peers").mkdir()
        for peer in peers:
            (d / me / "peers" / f"{peer}.pub").write_bytes((d / peer / f"{peer}.pub").read_bytes())
    return d


def keystore_of(key_dir: Path, name: str) -> Keystore:
    return Keystore.load(KeystoreSettings(identity=key_dir / name / f"{name}.key", peers_dir=key_dir / name / "peers"))


@pytest.fixture(scope="session")
def keystores(key_dir: Path) -> dict[str, Keystore]:
    return {name: keystore_of(key_dir, name) for name in ("mgms", "ams", "eve")}
