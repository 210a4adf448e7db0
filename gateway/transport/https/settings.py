"""Configuration of the HTTPS message transport: frozen, validated once, no secrets inside.

Why no token field that holds a token: configuration files end up in Git, backups and bug
reports. A bearer token is therefore named by the environment variable that holds it
(``*_env``), or, for tokens this participant *accepts*, given only as its SHA-256 hex digest
(what ``printf %s "$TOKEN" | sha256sum`` prints). The transport reads the variables once, when
it is built, and fails with a :class:`~gateway.errors.ConfigError` naming the key if one is
missing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.config import check_host
from gateway.semantic.envelope import MAX_MESSAGE_BYTES

__all__ = ["ClientAuth", "HttpsPeer", "HttpsSettings"]

ClientAuth = Literal["certificate", "token", "both"]
"""How the server authenticates a caller: TLS client certificate, bearer token, or both (the
two must then name the same participant)."""

Participant = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\s/#+]+$")]
"""A participant name as it appears in a topic: no blanks, slashes or MQTT wildcards."""

EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HttpsPeer(_Frozen):
    """Where to reach one participant and how to recognise it.

    ``url`` is the base (``https://host:port``, optionally with a path prefix behind a reverse
    proxy); the message topic is appended. ``ca_file`` is the CA that signed the peer's server
    certificate; ``server_name`` is the name its certificate must carry when it differs from
    the URL's host (e.g. connecting by IP to a certificate issued for a DNS name).
    ``token_env`` overrides :attr:`HttpsSettings.bearer_token_env` for this peer, so that one
    peer never sees the token another peer accepts.
    """

    url: Annotated[str, Field(pattern=r"^https://[^\s/?#]+(/[^\s?#]*)?$")]
    ca_file: Path
    server_name: str | None = None
    token_env: EnvName | None = None

    @field_validator("url")
    @classmethod
    def _url_host(cls, v: str) -> str:
        try:
            parts = urlsplit(v)
            host, _ = parts.hostname, parts.port  # .port raises on a port out of range
        except ValueError as exc:  # e.g. an unclosed IPv6 bracket, port 99999
            raise ValueError(f"{v!r}: {exc}") from None
        if host:
            check_host(host)
        return v


class HttpsSettings(_Frozen):
    """One participant's HTTPS transport: its server (optional) and its client side.

    ``listen_port`` None means client only (e.g. a worker that only sends). The server always
    needs ``server_cert_file``/``server_key_file``; ``client_auth`` decides what else is needed:
    ``client_ca_file`` for certificates, at least one accepted token for tokens.
    ``cert_names`` maps a client certificate's common name to a participant when they differ
    (CN "mgms gateway" -> participant "mgms"); when it is empty the CN *is* the participant.
    """

    participant: Participant
    listen_host: str = "127.0.0.1"
    listen_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    server_cert_file: Path | None = None
    server_key_file: Path | None = None
    client_ca_file: Path | None = None
    client_auth: ClientAuth = "certificate"
    cert_names: dict[str, Participant] = Field(default_factory=dict)
    accept_token_sha256: dict[str, Participant] = Field(default_factory=dict)
    accept_token_env: dict[EnvName, Participant] = Field(default_factory=dict)
    cert_file: Path | None = None
    key_file: Path | None = None
    bearer_token_env: EnvName | None = None
    peers: dict[Participant, HttpsPeer] = Field(default_factory=dict)
    request_timeout_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_body_bytes: Annotated[int, Field(gt=0, le=64 << 20)] = MAX_MESSAGE_BYTES
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 5
    shutdown_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0

    @field_validator("listen_host")
    @classmethod
    def _valid_listen_host(cls, v: str) -> str:
        return check_host(v)

    @field_validator("accept_token_sha256")
    @classmethod
    def _hex_digests(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _SHA256_HEX.match(k)]
        if bad:
            raise ValueError(
                f"keys must be SHA-256 hex digests of tokens (64 lower-case hex digits), not {len(bad)} "
                "other value(s); never put a token itself in the config"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.listen_port is None:
            return self
        if self.server_cert_file is None or self.server_key_file is None:
            raise ValueError("a server (listen_port set) needs server_cert_file and server_key_file")
        if self.client_auth in ("certificate", "both") and self.client_ca_file is None:
            raise ValueError(f"client_auth {self.client_auth!r} needs client_ca_file")
        if self.client_auth in ("token", "both") and not (self.accept_token_sha256 or self.accept_token_env):
            raise ValueError(f"client_auth {self.client_auth!r} needs accept_token_sha256 or accept_token_env")
        return self
