"""IEC 104 over TLS: the gateway's adapter against the TLS simulator, in one event loop.

A throw-away PKI is made per module (gateway.iedsim.pki); no key is ever committed. Covered:
values over TLS, a client certificate the device's CA did not sign, a device certificate our
CA did not sign, host name checking, the bridge refusing other processes, and bad files
giving a ConfigError that names the key and the file (at load and at adapter start).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, load_config
from gateway.errors import ConfigError
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.points import CommandRequest, UpdateCause
from gateway.protocols.base import LinkState, LinkStateChange
from gateway.protocols.iec104.adapter import Iec104Adapter
from gateway.protocols.iec104.tls import TlsBridge, client_tls_context

#: c104 runs here (the TLS bridge is for that engine): each test in a forked child, so a
#: SIGSEGV in c104's threads fails one test instead of ending the suite
pytestmark = [pytest.mark.timeout(40), pytest.mark.forked]

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def base() -> LabConfig:
    return load_config(SIM_CONFIG)


def sim_config(base: LabConfig, pki: LabPki, **simulator: Any) -> LabConfig:
    """The lab with its device served over TLS (client certificates checked against pki.ca)."""
    dev = base.devices[DEVICE]
    sim = {
        **dev.simulator.model_dump(),
        "period_s": 3600.0,
        "seed": 3,
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "tls_ca_file": str(pki.ca),
        **simulator,
    }
    return base.with_device(DEVICE, tls={"enabled": True, "ca_file": str(pki.ca)}, simulator=sim)


def gateway_config(cfg: LabConfig, port: int, **tls: Any) -> LabConfig:
    return cfg.with_device(
        DEVICE,
        port=port,
        timers=FAST,
        reconnect={"initial_s": 0.1, "max_s": 0.3},
        gi_period_s=0,
        tls={"enabled": True, **tls},
    )


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


def adapter_for(cfg: LabConfig) -> Iec104Adapter:
    return Iec104Adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE))


def downs_at_least(w: Watched, n: int) -> list[LinkStateChange] | None:
    downs = [c for c in w.links if c.state is LinkState.DOWN]
    return downs if len(downs) >= n else None


# ---------------------------------------------------------------------------------------
# working link


async def test_adapter_receives_values_over_tls(base: LabConfig, pki: LabPki, running: Starter) -> None:
    sim: Iec104Outstation = await running(sim_config(base, pki))
    cfg = gateway_config(base, sim.port, ca_file=str(pki.ca), cert_file=str(pki.client.cert),
                         key_file=str(pki.client.key))
    w: Watched = await running(adapter_for(cfg))
    await w.adapter.wait_connected(5)
    monitors = {p.name for p in cfg.points_of(DEVICE) if p.direction.value == "monitor"}
    await until(lambda: monitors <= {v.point for v in w.values if v.cause is UpdateCause.INTERROGATED}, 5,
                "general interrogation over TLS")
    sent = sim.set_value("feeder.voltage.l3", 236.75)
    upd = await until(
        lambda: next((v for v in w.values if v.point == "feeder.voltage.l3" and v.value == 236.75), None), 3,
        "spontaneous value over TLS",
    )
    assert upd.cause is UpdateCause.SPONTANEOUS
    assert upd.receive_time - sent < 0.5
    # a command goes through the bridge too (ACTCON read from the relayed raw frames)
    ack = await w.adapter.command(CommandRequest("feeder.breaker.command", 1, select_before_operate=True))
    assert ack >= sent
    st = sim.stats()
    assert st.tls_refused == 0 and st.connections_accepted == 1
    assert w.adapter.link_state is LinkState.UP
    bridge = w.adapter._tls_bridge
    assert bridge is not None and bridge.connects == 1 and bridge.failures == 0


# ---------------------------------------------------------------------------------------
# refused links: down with a reason, retried, nothing crashes


async def test_client_certificate_from_another_ca_is_refused_and_retried(
    base: LabConfig, pki: LabPki, running: Starter
) -> None:
    sim: Iec104Outstation = await running(sim_config(base, pki))
    cfg = gateway_config(base, sim.port, ca_file=str(pki.ca), cert_file=str(pki.rogue_client.cert),
                         key_file=str(pki.rogue_client.key))
    w: Watched = await running(adapter_for(cfg))
    downs = await until(lambda: downs_at_least(w, 3), 10, "three refused connects")
    assert all("refuse our certificate" in c.reason for c in downs), [c.reason for c in downs]
    assert sim.stats().tls_refused >= 3 and sim.stats().connections_accepted == 0
    assert w.adapter.stats()["reconnect_attempts"] >= 3  # still trying, with backoff
    assert not [v for v in w.values if v.cause is not UpdateCause.LINK_LOST]
    with pytest.raises(Exception, match="not connected"):
        await w.adapter.wait_connected(0.2)


async def test_device_certificate_from_another_ca_is_refused_with_the_reason(
    base: LabConfig, pki: LabPki, running: Starter
) -> None:
    sim: Iec104Outstation = await running(sim_config(base, pki))
    cfg = gateway_config(base, sim.port, ca_file=str(pki.rogue_ca), cert_file=str(pki.client.cert),
                         key_file=str(pki.client.key))
    w: Watched = await running(adapter_for(cfg))
    downs = await until(lambda: downs_at_least(w, 2), 10, "two refused connects")
    for c in downs:
        assert c.reason.startswith("connect failed: TLS: device certificate refused"), c.reason
    assert sim.stats().connections_accepted == 0


async def test_host_name_is_checked_unless_switched_off(
    base: LabConfig, tmp_path: Path, running: Starter
) -> None:
    other = make_lab_pki(tmp_path / "pki", server_hosts=("device.example",))  # does not name 127.0.0.1
    sim: Iec104Outstation = await running(sim_config(base, other))
    files = {"ca_file": str(other.ca), "cert_file": str(other.client.cert), "key_file": str(other.client.key)}
    strict: Watched = await running(adapter_for(gateway_config(base, sim.port, **files)))
    down = await until(lambda: next((c for c in strict.links if c.state is LinkState.DOWN), None), 10, "refusal")
    assert "mismatch" in down.reason, down.reason  # "IP address mismatch, certificate is not valid for ..."
    await strict.close()
    lax: Watched = await running(adapter_for(gateway_config(base, sim.port, check_hostname=False, **files)))
    await lax.adapter.wait_connected(5)


async def test_link_comes_up_once_the_device_is_reachable(base: LabConfig, pki: LabPki, running: Starter) -> None:
    # Nothing listens yet: TCP refused, retried; then the device starts on that port.
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    cfg = gateway_config(base, port, ca_file=str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key))
    w: Watched = await running(adapter_for(cfg))
    down = await until(lambda: next((c for c in w.links if c.state is LinkState.DOWN), None), 10, "refused")
    assert "TCP connect for TLS failed" in down.reason, down.reason
    sim = Iec104Outstation(sim_config(base, pki), DEVICE, host="127.0.0.1", port=port)
    await sim.start()
    try:
        await w.adapter.wait_connected(10)
    finally:
        await w.close()
        await sim.close()


# ---------------------------------------------------------------------------------------
# the loopback bridge


async def test_bridge_refuses_connections_from_other_processes(base: LabConfig, pki: LabPki) -> None:
    cfg = gateway_config(base, 9, ca_file=str(pki.ca))  # the device is never reached
    bridge = TlsBridge(cfg.devices[DEVICE], client_tls_context(cfg.devices[DEVICE]), asyncio.get_running_loop())
    host, port = bridge.open()
    try:
        code = (
            "import socket,sys\n"
            f"s=socket.create_connection(({host!r},{port}),timeout=5)\n"
            "s.settimeout(5)\n"
            "sys.exit(0 if s.recv(1)==b'' else 1)\n"
        )
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # closed without a byte
        assert bridge.refused_foreign == 1 and bridge.connects == 0 and bridge.failures == 0
    finally:
        await bridge.aclose()
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)  # stopped listening


# ---------------------------------------------------------------------------------------
# configuration errors


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
async def test_missing_file_at_adapter_start_names_key_and_file(
    base: LabConfig, pki: LabPki, tmp_path: Path, key: str
) -> None:
    files = {"ca_file": str(pki.ca), "cert_file": str(pki.client.cert), "key_file": str(pki.client.key)}
    files[key] = str(tmp_path / "removed.pem")
    adapter = adapter_for(gateway_config(base, 2404, **files))
    with pytest.raises(ConfigError) as err:
        await adapter.start()
    issue = err.value.first
    assert (issue.key, issue.file) == (f"devices.{DEVICE}.tls.{key}", files[key])
    assert "cannot read (No such file or directory)" in str(err.value)
    assert adapter._tls_bridge is None and adapter._client is None  # nothing half-built
    await adapter.close()


async def test_garbage_pem_is_a_config_error(base: LabConfig, pki: LabPki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    for files, key in (
        ({"ca_file": str(junk)}, "ca_file"),
        ({"ca_file": str(pki.ca), "cert_file": str(junk), "key_file": str(pki.client.key)}, "cert_file"),
        ({"ca_file": str(pki.ca), "cert_file": str(pki.client.cert), "key_file": str(pki.server.key)}, "cert_file"),
    ):
        with pytest.raises(ConfigError) as err:
            client_tls_context(gateway_config(base, 2404, **files).devices[DEVICE])
        assert err.value.first.key == f"devices.{DEVICE}.tls.{key}", str(err.value)


def write_lab(tmp_path: Path, tls: str) -> Path:
    path = tmp_path / "lab.yaml"
    path.write_text(f"extends: {SIM_CONFIG}\ndevices:\n  ref615:\n    tls: {tls}\n")
    return path


def test_load_config_checks_tls_files_and_names_the_key(pki: LabPki, tmp_path: Path) -> None:
    ok = load_config(write_lab(tmp_path, f"{{enabled: true, ca_file: {pki.ca}}}"))
    assert ok.devices[DEVICE].tls.enabled and ok.devices[DEVICE].tls.check_hostname
    gone = tmp_path / "gone.key"
    with pytest.raises(ConfigError) as err:
        load_config(
            write_lab(tmp_path, f"{{enabled: true, ca_file: {pki.ca}, cert_file: {pki.client.cert}, key_file: {gone}}}")
        )
    [issue] = err.value.issues
    assert issue.key == "devices.ref615.tls.key_file" and issue.reason == f"file not found: {gone}"
    assert issue.line == 4  # the tls line of the profile file
    with pytest.raises(ConfigError, match=r"devices\.ref615\.tls\.ca_file: needed to verify the device"):
        load_config(write_lab(tmp_path, "{enabled: true}"))
    # verify off needs no CA; disabled TLS checks nothing
    assert load_config(write_lab(tmp_path, "{enabled: true, verify: false}")).devices[DEVICE].tls.verify is False
    assert not load_config(write_lab(tmp_path, f"{{enabled: false, ca_file: {gone}}}")).devices[DEVICE].tls.enabled


def test_simulator_certificate_and_key_go_together(pki: LabPki, tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    sim = f"{{tls_cert_file: {pki.server.cert}}}"
    path.write_text(f"extends: {SIM_CONFIG}\ndevices:\n  ref615:\n    simulator: {sim}\n")
    with pytest.raises(ConfigError, match="tls_cert_file and tls_key_file go together"):
        load_config(path)


def test_verify_off_still_encrypts(base: LabConfig) -> None:
    ctx = client_tls_context(gateway_config(base, 2404, verify=False).devices[DEVICE])
    assert ctx.verify_mode is ssl.CERT_NONE and not ctx.check_hostname
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
