"""Message model: every HEILA type round-trips, and bad input is refused with a reason, never a crash."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from gateway.semantic import (
    CONTEXT_IRI,
    MESSAGE_TYPES,
    ControlSignal,
    Envelope,
    Flexibility,
    Malformed,
    Measurements,
    MessageRejected,
    Offer,
    OfferList,
    OperationPlan,
    Payload,
    Reading,
    Reason,
    RejectionCounter,
    UnsupportedVersion,
    VerificationNotification,
    parse,
    serialise,
)
from gateway.semantic.envelope import MAX_MESSAGE_BYTES

T0 = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
H = timedelta(hours=1)
TYPES = sorted(MESSAGE_TYPES)


def envelope(payload: Payload) -> Envelope:
    return Envelope.create(payload, sender="mgms", recipient="ams", topic="heila/v1/mgms/ams", now=T0)


def doc_of(payload: Payload) -> dict[str, object]:
    result: dict[str, object] = json.loads(serialise(envelope(payload)))
    return result


def test_all_twelve_table2_information_objects_and_the_receipt_have_a_model_and_a_sample(
    samples: dict[str, Payload],
) -> None:
    assert len(MESSAGE_TYPES) == 13  # HEILA's twelve and the delivery Receipt
    assert set(samples) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("name", TYPES)
def test_rule_every_type_round_trips_create_serialise_parse_equal(name: str, samples: dict[str, Payload]) -> None:
    env = envelope(samples[name])
    data = serialise(env)
    back = parse(data)
    assert back == env
    assert type(back.payload) is MESSAGE_TYPES[name]
    assert serialise(back) == data  # canonical: the same message always gives the same bytes


@pytest.mark.parametrize("name", TYPES)
def test_rule_every_type_round_trips_through_its_model_alone(name: str, samples: dict[str, Payload]) -> None:
    payload = samples[name]
    assert type(payload).model_validate_json(payload.model_dump_json()) == payload


def test_envelope_header_fields_on_the_wire(samples: dict[str, Payload]) -> None:
    doc = doc_of(samples["Flexibility"])
    assert doc["@context"] == CONTEXT_IRI
    assert doc["type"] == "Flexibility" and doc["version"] == "1"
    assert doc["created"] == "2026-11-22T12:00:00Z" and doc["expires"] == "2026-11-22T12:05:00Z"
    assert str(doc["id"]).startswith("urn:uuid:")


# --- validation on construction ------------------------------------------------------------


def test_rule_times_must_be_timezone_aware() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Flexibility(identifier="f", flexibility_type="upward", power_kw=1.0,
                    start=datetime(2026, 1, 1), stop=datetime(2026, 1, 1, 1))  # fmt: skip


def test_rule_times_are_normalised_to_utc() -> None:
    helsinki = timezone(timedelta(hours=2))
    start, stop = datetime(2026, 1, 1, 14, tzinfo=helsinki), datetime(2026, 1, 1, 15, tzinfo=helsinki)
    f = Flexibility(identifier="f", flexibility_type="upward", power_kw=1.0, start=start, stop=stop)
    assert f.start == datetime(2026, 1, 1, 12, tzinfo=UTC) and f.start.tzinfo is UTC


def test_rule_stop_after_start() -> None:
    with pytest.raises(ValidationError, match="stop must be after start"):
        Flexibility(identifier="f", flexibility_type="upward", power_kw=1.0, start=T0, stop=T0)


@pytest.mark.parametrize("series", [(1.0, 2.0, 3.0), (1.0,)])
def test_rule_series_length_fits_interval_and_step(series: tuple[float, ...]) -> None:
    with pytest.raises(ValidationError, match="power_series_kw has"):
        OperationPlan(identifier="p", resource="r", start=T0, stop=T0 + H, time_step_s=1800, power_series_kw=series)


def test_rule_interval_is_whole_number_of_steps() -> None:
    with pytest.raises(ValidationError, match="whole number"):
        VerificationNotification(identifier="v", start=T0, stop=T0 + H, time_step_s=7 * 60, power_series_kw=(1.0,))


def test_rule_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        Flexibility.model_validate({"identifier": "f", "flexibility_type": "upward", "power_kw": 1.0,
                                    "start": T0, "stop": T0 + H, "power_mw": 1})  # fmt: skip


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_rule_flexibility_power_is_a_finite_positive_magnitude(value: float) -> None:
    with pytest.raises(ValidationError):
        Flexibility(identifier="f", flexibility_type="upward", power_kw=value, start=T0, stop=T0 + H)


def test_rule_offer_list_is_cheapest_first() -> None:
    cheap = Offer(identifier="a", flexibility_type="upward", power_kw=1, start=T0, stop=T0 + H, price_eur_per_mwh=1)
    dear = cheap.model_copy(update={"identifier": "b", "price_eur_per_mwh": 9.0})
    OfferList(location="x", offers=(cheap, dear))
    with pytest.raises(ValidationError, match="cheapest first"):
        OfferList(location="x", offers=(dear, cheap))


def test_rule_a_reading_measures_something() -> None:
    with pytest.raises(ValidationError, match="at least one"):
        Reading(point="p", measured_at=T0)


def test_rule_a_control_signal_carries_exactly_one_action() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        ControlSignal(target="t", command="open", power_kw=1.0)
    with pytest.raises(ValidationError, match="exactly one"):
        ControlSignal(target="t")


def test_rule_models_are_immutable(samples: dict[str, Payload]) -> None:
    with pytest.raises(ValidationError, match="frozen"):
        samples["Flexibility"].power_kw = 2.0  # type: ignore[attr-defined]


def test_rule_envelope_expires_after_created(samples: dict[str, Payload]) -> None:
    with pytest.raises(ValidationError, match="expires must be after created"):
        Envelope.create(samples["Bid"], sender="a", recipient="b", topic="t", ttl_s=0, now=T0)


def test_rule_outbound_validation_catches_a_model_built_without_validation() -> None:
    bogus = Flexibility.model_construct(identifier="f", flexibility_type="upward", power_kw=-5.0, start=T0, stop=T0 + H)
    env = Envelope.model_construct(id="urn:uuid:00000000-0000-4000-8000-000000000000", type="Flexibility",
                                   version="1", sender="a", recipient="b", created=T0, expires=T0 + H,
                                   topic="t", payload=bogus)  # fmt: skip
    with pytest.raises(Malformed, match="outbound Flexibility"):
        serialise(env)


# --- rejection on parse --------------------------------------------------------------------


def _mutated(samples: dict[str, Payload], **changes: object) -> bytes:
    doc = doc_of(samples["Flexibility"])
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason", "match"),
    [
        (b"not json", Reason.MALFORMED, "not JSON"),
        (b"[1, 2]", Reason.MALFORMED, "JSON object"),
        (b'{"a": 1, "a": 2}', Reason.MALFORMED, "duplicate key"),
        (b'{"x": NaN}', Reason.MALFORMED, "NaN"),
        (b"\xff\xfe", Reason.MALFORMED, "not JSON"),
        (b"[" * 100_000, Reason.MALFORMED, "not JSON"),
        (b" " * (MAX_MESSAGE_BYTES + 1), Reason.MALFORMED, "exceeds"),
        (b"{}", Reason.MALFORMED, "no @context"),
    ],
)
def test_rule_garbage_is_rejected_as_malformed(data: bytes, reason: Reason, match: str) -> None:
    with pytest.raises(MessageRejected, match=match) as info:
        parse(data)
    assert info.value.reason is reason


@pytest.mark.parametrize(
    ("changes", "exc", "match"),
    [
        ({"@context": "https://example.org/other.jsonld"}, UnsupportedVersion, "unknown @context"),
        ({"version": "2"}, UnsupportedVersion, "unsupported version"),
        ({"type": "Teleport"}, Malformed, "unknown message type"),
        ({"type": "Bid"}, Malformed, "Bid: price_eur_per_mwh"),
        ({"id": "42"}, Malformed, "header: id"),
        ({"sender": ""}, Malformed, "header: sender"),
        ({"created": "2026-11-22T12:00:00"}, Malformed, "header: created"),
        ({"extra": 1}, Malformed, "unexpected fields"),
        ({"payload": {"identifier": "f"}}, Malformed, "flexibility_type: Field required"),
        ({"payload": [1]}, Malformed, "Flexibility"),
    ],
)
def test_rule_bad_envelope_is_rejected_with_a_reason(
    samples: dict[str, Payload], changes: dict[str, object], exc: type[MessageRejected], match: str
) -> None:
    with pytest.raises(exc, match=match):
        parse(_mutated(samples, **changes))


def test_missing_payload_is_malformed(samples: dict[str, Payload]) -> None:
    doc = doc_of(samples["Flexibility"])
    del doc["payload"]
    with pytest.raises(Malformed, match="no payload"):
        parse(json.dumps(doc).encode())


def test_rule_rejections_are_counted_by_reason() -> None:
    counter = RejectionCounter()
    assert counter.snapshot() == {r.value: 0 for r in Reason}
    for data in (b"x", b"{}", b'{"@context": "other"}'):
        try:
            parse(data)
        except MessageRejected as exc:
            counter.record(exc)
    assert counter[Reason.MALFORMED] == 2 and counter["unsupported_version"] == 1 and counter.total == 3


def test_rule_a_worker_never_crashes_on_mutated_input(samples: dict[str, Payload]) -> None:
    """Random byte flips, cuts and insertions: parse returns an Envelope or raises MessageRejected."""
    rng = random.Random(4)
    base = serialise(envelope(samples["Measurements"]))
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(data))
            op = rng.randrange(3)
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i : i + rng.randint(1, 20)]
            else:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 5)))
        try:
            parse(bytes(data))
            outcomes["ok"] += 1
        except MessageRejected:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 300


def test_measurements_keep_only_the_quantities_measured(samples: dict[str, Payload]) -> None:
    payload = doc_of(samples["Measurements"])["payload"]
    assert isinstance(payload, dict)
    assert payload["readings"][0] == {"point": "feeder.voltage.l1", "measured_at": "2026-11-22T12:00:00Z",
                                      "voltage_v": 231.4}  # fmt: skip
    assert isinstance(samples["Measurements"], Measurements)
