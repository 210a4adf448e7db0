"""Validated settings of one MQTT participant connection (one frozen model, checked at load)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.config import check_host, file_problem, no_pass_phrase, pem_pair_problem
from gateway.errors import ConfigError, ConfigIssue
from gateway.transport.base import inbox_filter

__all__ = ["MqttSettings", "client_ssl_context", "preflight"]

_WILDCARDS = frozenset("+#/")


class MqttSettings(BaseModel):
    """How one participant (an MGMS gateway or an AMS worker) reaches the broker.

    ``participant`` is who we are in the topic layout; it is the default client id, user name
    and inbox filter. Several AMS workers that share the load use distinct ``client_id`` values
    and the same ``share_group``: the broker then hands each message of the inbox to exactly
    one of them (MQTT v5 shared subscription ``$share/<group>/<filter>``).

    The password is either given (``password``, kept out of ``repr``) or read from the
    environment variable named by ``password_env`` when the transport is built, so a config
    file never has to contain it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    participant: str = Field(min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(default=8883, ge=1, le=65535)
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    password_env: str | None = None

    tls: bool = True
    ca_file: Path | None = None
    """CA bundle that signs the broker certificate; None uses the system trust store."""
    cert_file: Path | None = None
    """Client certificate for certificate authentication (mutual TLS); needs ``key_file``."""
    key_file: Path | None = None

    keepalive_s: int = Field(default=30, ge=5, le=65535)
    session_expiry_s: int = Field(default=3600, ge=0)
    """How long the broker keeps our session (subscriptions and queued messages) while we are
    away; sent as the MQTT v5 Session Expiry Interval with every CONNECT."""
    qos: Literal[1, 2] = 1
    """QoS of our publishes; inbound messages are always subscribed at QoS 1 (see transport)."""
    message_expiry_s: int | None = Field(default=None, ge=1)
    """MQTT v5 Message Expiry Interval on every publish; None: messages never expire."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ack_timeout_s: float = Field(default=10.0, gt=0)
    max_inflight: int = Field(default=20, ge=1, le=65535)
    """Outbound QoS>0 publishes in flight at once, and our Receive Maximum for inbound ones."""
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    subscriptions: tuple[str, ...] | None = None
    """Topic filters to receive; None means the participant's inbox (``heila/v1/to/<p>/#``)."""
    share_group: str | None = None

    @field_validator("host")
    @classmethod
    def _valid_host(cls, v: str) -> str:
        return check_host(v)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.password is not None and self.password_env is not None:
            raise ValueError("give password or password_env, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (certificate authentication)")
        if not self.tls and (self.ca_file or self.cert_file):
            raise ValueError("ca_file/cert_file given but tls is off")
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        if self.share_group is not None and (not self.share_group or _WILDCARDS & set(self.share_group)):
            raise ValueError("share_group must be a non-empty name without '/', '+' or '#'")
        if self.subscriptions is not None and not self.subscriptions:
            raise ValueError("subscriptions: give at least one filter, or leave it out for the inbox")
        return self

    @property
    def effective_client_id(self) -> str:
        return self.client_id or self.participant

    @property
    def effective_username(self) -> str | None:
        return self.username if self.username is not None else (None if self.cert_file else self.participant)

    @property
    def topic_filters(self) -> tuple[str, ...]:
        """The filters actually subscribed: the inbox by default, ``$share/<group>/`` prefixed
        when a share group is set."""
        filters = self.subscriptions or (inbox_filter(self.participant),)
        if self.share_group is None:
            return filters
        return tuple(f"$share/{self.share_group}/{f}" for f in filters)

    def resolved_password(self) -> str | None:
        """The password, read from the environment now if ``password_env`` names a variable."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if value is None:
            raise ConfigError(
                [ConfigIssue("<environment>", "mqtt.password_env", f"variable {self.password_env} is not set")]
            )
        return value


def client_ssl_context(settings: MqttSettings) -> ssl.SSLContext:
    """TLS toward the broker: ``ca_file`` (else the system store), our certificate if given."""
    ctx = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file), password=no_pass_phrase)
    return ctx


def preflight(settings: MqttSettings) -> list[tuple[tuple[str, ...], str]]:
    """What the transport reads when it starts, every problem at once: (key, reason).

    The password variable and the PEM files are read only when the transport is built and
    connects; ``check-config`` and the start of ``run`` ask here first.
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    if settings.password_env is not None and os.environ.get(settings.password_env) is None:
        problems.append((("password_env",), f"environment variable {settings.password_env} is not set"))
    if not settings.tls:
        return problems
    files = {"ca_file": settings.ca_file, "cert_file": settings.cert_file, "key_file": settings.key_file}
    missing = [((key,), problem) for key, path in files.items() if path is not None and (problem := file_problem(path))]
    if missing:
        return problems + missing
    try:
        ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    except ssl.SSLError as exc:
        problems.append((("ca_file",), f"not a PEM CA certificate: {settings.ca_file} ({exc.reason or exc})"))
    if settings.cert_file is not None and settings.key_file is not None:
        try:
            ssl.create_default_context().load_cert_chain(
                str(settings.cert_file), str(settings.key_file), password=no_pass_phrase
            )
        except ssl.SSLError as exc:
            problems.append((("cert_file",), pem_pair_problem(settings.cert_file, settings.key_file, exc)))
    return problems
