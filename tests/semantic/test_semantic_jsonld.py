"""Self-description: a standard JSON-LD processor (pyld) turns every message into triples,
every field mapped to a public vocabulary IRI, every quantity with its unit."""

from __future__ import annotations

import json
import typing
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest
from pydantic import BaseModel
from pyld import jsonld

from gateway.semantic import (
    CONTEXT_IRI,
    MESSAGE_TYPES,
    Envelope,
    Payload,
    Sealer,
    SecurityMode,
    context_bytes,
    context_document,
    document_loader,
    serialise,
)
from gateway.semantic.security import Keystore

TYPES = sorted(MESSAGE_TYPES)
OPTIONS = {"documentLoader": document_loader}
PUBLIC_VOCABULARIES = (
    "https://schema.org/",
    "https://saref.etsi.org/core/",
    "http://qudt.org/vocab/quantitykind/",
    "http://www.w3.org/2006/time#",
    "https://w3id.org/security#",
)
UNIT_SUFFIXES = ("_kw", "_kvar", "_kva", "_v", "_a", "_s", "_c", "_w_per_m2", "_m_per_s", "_eur_per_mwh")


def terms() -> dict[str, Any]:
    ctx: dict[str, Any] = context_document()["@context"]
    return {k: v for k, v in ctx.items() if not k.startswith("@")}


def expand_iri(value: str) -> str:
    prefix, _, rest = value.partition(":")
    ns = terms().get(prefix)
    return ns + rest if isinstance(ns, str) and rest and not rest.startswith("//") else value


def keys_of(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from keys_of(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from keys_of(v)


def model_fields(model: type[BaseModel]) -> Iterator[str]:
    """Every field name of a model and of the models nested in it."""
    for name, info in model.model_fields.items():
        yield name
        stack = [info.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                yield from model_fields(tp)
            stack.extend(typing.get_args(tp))


def envelope(payload: Payload) -> Envelope:
    return Envelope.create(payload, sender="mgms", recipient="ams", topic="heila/v1/mgms/ams")


def test_context_ships_as_package_data_and_is_served_as_a_fresh_copy() -> None:
    shipped = resources.files("gateway.semantic").joinpath("contexts", "heila-v1.jsonld").read_bytes()
    assert context_bytes() == shipped
    doc = context_document()
    doc["@context"].clear()
    assert context_document()["@context"], "callers must not be able to change the served context"
    assert CONTEXT_IRI.endswith("heila-v1.jsonld")


def test_document_loader_refuses_other_contexts() -> None:
    with pytest.raises(LookupError):
        document_loader("https://example.org/evil.jsonld")


@pytest.mark.parametrize("name", TYPES)
def test_rule_every_field_of_every_model_has_a_term(name: str) -> None:
    missing = set(model_fields(MESSAGE_TYPES[name])) - set(terms())
    assert not missing, f"{name}: fields without a JSON-LD term: {sorted(missing)}"


def test_rule_every_field_maps_to_a_public_vocabulary() -> None:
    for term, value in terms().items():
        iri = expand_iri(value if isinstance(value, str) else value["@id"])
        if iri.startswith("@") or iri.endswith(("/", "#")) or term in MESSAGE_TYPES:
            continue  # keywords, prefixes, and the message classes (our own namespace)
        assert iri.startswith(PUBLIC_VOCABULARIES), f"{term} -> {iri} is not in a public vocabulary"


def test_rule_every_quantity_carries_its_unit() -> None:
    for term, value in terms().items():
        if term.endswith(UNIT_SUFFIXES):
            assert isinstance(value, dict) and "@type" in value, f"{term} has no unit datatype"
    assert terms()["power_kw"]["@type"] == "unit:KiloW"
    assert expand_iri(terms()["voltage_v"]["@type"]) == "http://qudt.org/vocab/unit/V"


def test_rule_no_two_terms_share_iri_type_and_container() -> None:
    """Otherwise compaction could not tell them apart and a field would change name."""
    seen: dict[tuple[str, str, str], str] = {}
    for term, value in terms().items():
        if isinstance(value, str):
            value = {"@id": value}
        key = (expand_iri(value["@id"]), value.get("@type", ""), value.get("@container", ""))
        assert key not in seen, f"{term} and {seen[key]} are indistinguishable"
        seen[key] = term


@pytest.mark.parametrize("name", TYPES)
def test_rule_every_message_expands_with_no_unmapped_field(name: str, samples: dict[str, Payload]) -> None:
    doc = json.loads(serialise(envelope(samples[name])))
    expanded = jsonld.expand(doc, OPTIONS)
    for key in keys_of(expanded):
        assert key.startswith("@") or key.startswith(("http://", "https://")), f"{key!r} stayed unmapped"
    # Nothing was dropped: compacting the expansion gives back exactly the message.
    assert jsonld.compact(expanded, CONTEXT_IRI, OPTIONS) == doc
    nquads = jsonld.to_rdf(doc, {**OPTIONS, "format": "application/n-quads"})
    assert "<http://qudt.org/vocab/" in nquads or name in ("Bid", "Receipt")
    assert f"<https://mgms.example.org/ns/heila#{name}>" in nquads


def test_units_appear_as_typed_literals(samples: dict[str, Payload]) -> None:
    doc = json.loads(serialise(envelope(samples["Flexibility"])))
    nquads = jsonld.to_rdf(doc, {**OPTIONS, "format": "application/n-quads"})
    assert '<http://qudt.org/vocab/quantitykind/ActivePower> "40"^^<http://qudt.org/vocab/unit/KiloW> .' in nquads
    assert '"2026-11-22T12:00:00Z"^^<http://www.w3.org/2001/XMLSchema#dateTime>' in nquads


@pytest.mark.parametrize("mode", list(SecurityMode))
def test_rule_sealed_messages_also_expand_with_no_unmapped_field(
    mode: SecurityMode, samples: dict[str, Payload], keystores: dict[str, Keystore]
) -> None:
    doc = json.loads(Sealer(keystores["mgms"], mode=mode).seal(envelope(samples["Offer"])))
    expanded = jsonld.expand(doc, OPTIONS)
    for key in keys_of(expanded):
        assert key.startswith("@") or key.startswith(("http://", "https://")), f"{key!r} stayed unmapped"
    assert jsonld.compact(expanded, CONTEXT_IRI, OPTIONS) == doc
