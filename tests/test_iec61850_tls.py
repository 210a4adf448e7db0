"""IEC 61850 MMS over TLS: the adapter against the TLS simulator, both on libiec61850's mbedtls.

A throw-away PKI per module (gateway.iedsim.pki), no key committed. Covered: values, a
breaker command and a set-point over TLS; a client certificate signed by another CA refused
by the IED; an IED certificate our CA did not sign refused by the gateway; a client without
TLS refused; and the options libiec61850 cannot honour (no verification, host name check)
refused at start with a clear error instead of being silently weakened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import LabConfig, load_config
from gateway.errors import LinkError
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.points import CommandRequest, DoublePoint
from gateway.protocols import create_adapter
from gateway.protocols.iec61850.adapter import Iec61850Adapter
from gateway.services import free_port

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
MMS = "ref615_mms"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki61850"))


def tls_config(pki: LabPki, port: int, **tls: Any) -> LabConfig:
    """The 61850 device over TLS: the IED checks clients against pki.ca, we check the IED."""
    base = load_config(SIM_CONFIG).only(MMS)
    dev = base.devices[MMS]
    sim = {
        **dev.simulator.model_dump(),
        "breaker_travel_s": 0.0,
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "tls_ca_file": str(pki.ca),
    }
    client = {
        "enabled": True,
        "ca_file": str(pki.ca),
        "cert_file": str(pki.client.cert),
        "key_file": str(pki.client.key),
        "check_hostname": False,
        **tls,
    }
    return base.with_device(MMS, port=port, tls=client, simulator=sim,
                            reconnect={"initial_s": 0.05, "max_s": 0.2}, command_timeout_s=3)


@pytest.fixture
async def tls_sim(pki: LabPki) -> AsyncIterator[Iec61850Server]:
    port = free_port()
    sim = Iec61850Server(tls_config(pki, port), MMS, host="127.0.0.1", port=port, seed=4)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.close()


async def _adapter(cfg: LabConfig) -> Iec61850Adapter:
    a = create_adapter(cfg.devices[MMS], cfg.points)
    assert isinstance(a, Iec61850Adapter)
    return a


async def test_values_and_commands_over_tls(pki: LabPki, tls_sim: Iec61850Server) -> None:
    a = await _adapter(tls_config(pki, tls_sim.port))
    await a.start()
    try:
        await a.wait_connected(10)
        assert a.missing_points == frozenset() and a.stats()["reports"] >= 2
        tls_sim.set_value("mms.feeder.frequency", 49.875)
        assert (await a.read("mms.feeder.frequency")).value == pytest.approx(49.875)
        await a.command(CommandRequest("mms.feeder.breaker.command", DoublePoint.OFF))
        await a.command(CommandRequest("mms.feeder.p_limit.setpoint", 90_000.0))
        assert tls_sim.operations == 1 and tls_sim.setpoints == 1
        assert (await a.read("mms.feeder.p_limit.actual")).value == pytest.approx(90.0)
    finally:
        await a.close()


async def _refused(cfg: LabConfig) -> dict[str, int]:
    a = await _adapter(cfg)
    await a.start()
    try:
        with pytest.raises(LinkError, match="not connected"):
            await a.wait_connected(1.5)
        return a.stats()
    finally:
        await a.close()


async def test_client_certificate_of_another_ca_refused_by_the_ied(pki: LabPki, tls_sim: Iec61850Server) -> None:
    stats = await _refused(
        tls_config(pki, tls_sim.port, cert_file=str(pki.rogue_client.cert), key_file=str(pki.rogue_client.key))
    )
    assert stats.get("connects", 0) == 0 and stats.get("reconnect_attempts", 0) >= 1


async def test_ied_certificate_our_ca_did_not_sign_refused(pki: LabPki, tls_sim: Iec61850Server) -> None:
    stats = await _refused(tls_config(pki, tls_sim.port, ca_file=str(pki.rogue_ca)))
    assert stats.get("connects", 0) == 0


async def test_client_without_tls_refused(pki: LabPki, tls_sim: Iec61850Server) -> None:
    cfg = tls_config(pki, tls_sim.port).with_device(MMS, tls={"enabled": False})
    stats = await _refused(cfg)
    assert stats.get("connects", 0) == 0


@pytest.mark.parametrize(
    ("tls", "reason"),
    [
        ({"check_hostname": True}, "does not compare the server certificate with the host name"),
        ({"verify": False}, "tls.verify: false is not possible"),
        ({"ca_file": None}, "tls.ca_file is needed"),
        ({"cert_file": "/nonexistent/client.pem"}, "file not found: /nonexistent/client.pem"),
    ],
)
async def test_what_libiec61850_cannot_do_is_refused_at_start(pki: LabPki, tls: dict[str, Any], reason: str) -> None:
    a = await _adapter(tls_config(pki, free_port(), **tls))
    try:
        with pytest.raises(LinkError, match=reason):
            await a.start()
    finally:
        await a.close()
