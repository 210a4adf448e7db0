"""The JSON-LD context that makes every message self-describing, and how to get at it.

The context ships inside the package (``contexts/heila-v1.jsonld``) so the gateway can serve
it and tests can expand messages without a network. Messages refer to it by
:data:`CONTEXT_IRI`; the version is part of the IRI, so a changed meaning is a new file and a
new IRI, never an edit of the old one.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["CONTEXT_FILE", "CONTEXT_IRI", "SCHEMA_VERSION", "context_bytes", "context_document", "document_loader"]

SCHEMA_VERSION = "1"
"""Version of the message schema; goes into every envelope's ``version``."""

CONTEXT_IRI = "https://mgms.example.org/contexts/heila-v1.jsonld"
"""Where the context is published; placeholder host until the HTTPS transport fixes the public name."""

CONTEXT_FILE = "heila-v1.jsonld"
"""The context's file name: in the package under ``contexts/`` and as the last path segment served."""


@cache
def context_bytes() -> bytes:
    """The context file exactly as shipped (bytes are immutable, so caching them is safe)."""
    return resources.files("gateway.semantic").joinpath("contexts", CONTEXT_FILE).read_bytes()


def context_document() -> dict[str, Any]:
    """The context as a fresh JSON object (``{"@context": {...}}``): the caller may modify it."""
    doc: dict[str, Any] = json.loads(context_bytes())
    return doc


def document_loader(url: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """A pyld document loader that knows our context and refuses to go on the network.

    Raises ``LookupError`` for any other IRI: a message that names some other context is not
    one of ours.
    """
    if url != CONTEXT_IRI:
        raise LookupError(f"unknown JSON-LD context {url!r}")
    return {"contextUrl": None, "documentUrl": url, "document": context_document()}
