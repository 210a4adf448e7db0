"""HTTPS message transport: sealed messages as ``POST /heila/v1/to/<r>/from/<s>/<Type>``.

See :mod:`gateway.transport.https.transport` for the wire contract and
:mod:`gateway.transport.base` for the interface and its acknowledgement semantics.
"""

from gateway.transport.https.settings import ClientAuth, HttpsPeer, HttpsSettings
from gateway.transport.https.transport import CONTENT_TYPE, HttpsTransport, PeerUnavailable, context_paths, preflight

__all__ = [
    "CONTENT_TYPE",
    "ClientAuth",
    "HttpsPeer",
    "HttpsSettings",
    "HttpsTransport",
    "PeerUnavailable",
    "context_paths",
    "preflight",
]
