"""A throw-away messaging lab on loopback: keys, PKI, a TLS mosquitto with ACLs, settings.

Why it exists: the demo, the end-to-end HIL test and the latency benchmark all need the same
scaffolding around an MGMS and an AMS - a key pair per participant with each one trusting
the other's public key, certificates for TLS, a broker with per-participant credentials and
ACLs following the topic layout, and an HTTPS listener per participant - and none of it may
be committed (secrets are made at run time). One place builds it, so the three cannot drift.

Usage::

    with DsoSandbox(tmp_dir, mgms=["mgms-multipower"]) as box:   # starts mosquitto
        mgms_settings = box.messaging("mgms-multipower", transport="mqtt", security="encrypted")
        ams_settings = box.messaging("ams", transport="mqtt", security="encrypted")
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

from gateway.config import FlexAction, FlexibilitySettings, FlexResource, MessagingSettings, ReceiptSettings
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.semantic import write_key_pair
from gateway.services import MosquittoServer, MqttAcl, MqttTls, free_port, participant_acl

__all__ = ["DsoSandbox", "feeder_flexibility"]

Transport = Literal["mqtt", "https", "both"]


@dataclass
class DsoSandbox:
    """Keys, PKI, broker and ports for one AMS and some MGMS participants (see module doc)."""

    directory: Path
    mgms: list[str]
    ams: str = "ams"
    start_broker: bool = True
    pki: LabPki = field(init=False)
    broker: MosquittoServer | None = field(init=False, default=None)
    passwords: dict[str, str] = field(init=False, default_factory=dict)
    https_ports: dict[str, int] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        everyone = [self.ams, *self.mgms]
        self.pki = make_lab_pki(self.directory / "pki", client_names=tuple(everyone))
        keys = self.directory / "keys"
        for name in everyone:
            write_key_pair(name, keys / name)
        # The AMS trusts every MGMS; each MGMS trusts the AMS.
        for name in everyone:
            peers = keys / name / "peers"
            peers.mkdir(exist_ok=True)
            for other in [m for m in self.mgms if m != name] if name == self.ams else [self.ams]:
                (peers / f"{other}.pub").write_bytes((keys / other / f"{other}.pub").read_bytes())
        self.passwords = {name: secrets.token_urlsafe(16) for name in everyone}
        self.https_ports = {name: free_port() for name in everyone}

    # ------------------------------------------------------------------ broker

    def acl(self) -> list[MqttAcl]:
        return [rule for name in [self.ams, *self.mgms] for rule in participant_acl(name)]

    def start(self) -> None:
        if self.start_broker and self.broker is None:
            self.broker = MosquittoServer(
                data_dir=self.directory / "mosquitto",
                tls=MqttTls(self.pki.server.cert, self.pki.server.key, self.pki.ca),
                users=self.passwords,
                acl=self.acl(),
                autosave_changes=1,  # a kill -9 in the HIL tests must not lose sessions
            )
            self.broker.start()

    def close(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------------ settings

    def mqtt_block(self, participant: str, **overrides: Any) -> dict[str, Any]:
        if self.broker is None:
            raise RuntimeError("the broker is not started")
        return {
            "host": "127.0.0.1",
            "port": self.broker.port,
            "client_id": f"{participant}-{secrets.token_hex(3)}" if overrides.pop("unique_id", False) else participant,
            "username": participant,
            "password": self.passwords[participant],
            "ca_file": str(self.pki.ca),
            "connect_timeout_s": 5.0,
            "ack_timeout_s": 5.0,
            "reconnect_min_s": 0.1,
            "reconnect_max_s": 1.0,
            **overrides,
        }

    def https_block(self, participant: str, **overrides: Any) -> dict[str, Any]:
        cert = self.pki.clients[participant]
        peers = [self.ams] if participant != self.ams else self.mgms
        return {
            "listen_host": "127.0.0.1",
            "listen_port": self.https_ports[participant],
            "server_cert_file": str(self.pki.server.cert),
            "server_key_file": str(self.pki.server.key),
            "client_ca_file": str(self.pki.ca),
            "client_auth": "certificate",
            "cert_file": str(cert.cert),
            "key_file": str(cert.key),
            "peers": {
                p: {"url": f"https://127.0.0.1:{self.https_ports[p]}", "ca_file": str(self.pki.ca)} for p in peers
            },
            "request_timeout_s": 5.0,
            **overrides,
        }

    def messaging(
        self,
        participant: str,
        *,
        transport: Transport = "mqtt",
        security: Literal["encrypted", "signed"] = "encrypted",
        mqtt: dict[str, Any] | None = None,
        receipts: ReceiptSettings | None = None,
    ) -> MessagingSettings:
        """The ``messaging`` block for ``participant``; ``both`` routes MGMS -> AMS over HTTPS
        and AMS -> MGMS over MQTT (each direction on the transport HEILA measured it on).
        ``receipts``: the end-to-end receipt settings (default: the config's defaults)."""
        transports: dict[str, dict[str, Any]] = {}
        if transport in ("mqtt", "both"):
            transports["mqtt"] = self.mqtt_block(participant, **(mqtt or {}))
        if transport in ("https", "both"):
            transports["https"] = self.https_block(participant)
        keys = self.directory / "keys" / participant
        return MessagingSettings(
            participant=participant,
            identity_file=str(keys / f"{participant}.key"),
            peers_dir=str(keys / "peers"),
            security=security,
            accept_signed_only=security == "signed",
            transports=transports,
            default_transport="https" if transport == "both" and participant != self.ams else next(iter(transports)),
            routes={},
            receipts=receipts or ReceiptSettings(),
        )


def feeder_flexibility(
    aggregator: str = "ams",
    *,
    power_point: str = "feeder.p",
    breaker: str = "feeder.breaker.command",
    window_s: float = 900.0,
    step_s: int = 1,
) -> FlexibilitySettings:
    """The MultiPower use case: shed the whole feeder (open its breaker) as upward flexibility."""
    return FlexibilitySettings(
        aggregator=aggregator,
        period_s=0,
        window_s=window_s,
        verification_step_s=step_s,
        resources=(
            FlexResource(
                name="feeder",
                flexibility_type="upward",
                power_point=power_point,
                activate=(FlexAction(point=breaker, value="open"),),
                restore=(FlexAction(point=breaker, value="close"),),
            ),
        ),
    )
