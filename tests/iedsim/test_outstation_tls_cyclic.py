"""The outstation's cyclic (COT periodic) transmission and its TLS server side.

No ``from __future__ import annotations``: see conftest (c104 callback annotations).

Cyclic data is checked with c104 (the gateway's client library) and frame by frame with our
codec. TLS is checked with Python's ``ssl`` as the client: c104 2.2.1's own TLS client
cannot complete a handshake at all (see gateway/protocols/iec104/tls.py), which
``test_c104_native_tls_client_still_cannot_connect`` keeps measuring.
"""

import asyncio
import contextlib
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import c104
import pytest

from gateway.config import LabConfig
from gateway.errors import ConfigError
from gateway.iedsim.cli import main
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.protocols.iec104.codec import (
    Asdu,
    Cot,
    FrameDecoder,
    IFrame,
    InfoObject,
    Interrogation,
    SFrame,
    TypeId,
    UFrame,
    UFunction,
    decode_asdu,
    encode_asdu,
    encode_frame,
)

pytestmark = pytest.mark.timeout(30)

StationFactory = Callable[..., Awaitable[Iec104Outstation]]
ProbeFactory = Callable[..., Awaitable[Any]]


def measured_names(o: Iec104Outstation) -> set[str]:
    return {p.name for p in o.points if p.direction.value == "monitor" and p.address.kind == "measured"}


# ---------------------------------------------------------------------------------------
# cyclic transmission


async def test_cyclic_sends_every_measured_point_with_cot_periodic(
    config_factory: Callable[..., LabConfig], stations: StationFactory, probes: ProbeFactory
) -> None:
    o = await stations(config_factory(cyclic_period_s=0.2))  # the feeder itself stays still
    probe = await probes(o)
    want = measured_names(o)
    arrivals: dict[str, list[float]] = {name: [] for name in want}
    others: list[str] = []
    async with asyncio.timeout(5):
        while min(len(v) for v in arrivals.values()) < 3:
            item = await probe.values.get()
            if item.cot != "PERIODIC":
                continue
            if item.name in arrivals:
                arrivals[item.name].append(item.at)
                expected = o.values()[item.name].raw
                assert item.value == pytest.approx(expected, rel=1e-6), item.name
            else:
                others.append(item.name)
    assert not others, f"only measured points are cyclic, got {others}"
    for name, times in arrivals.items():
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert all(0.1 < g < 0.4 for g in gaps), (name, gaps)
    # spontaneous reporting goes on beside it
    o.set_value("feeder.voltage.l1", 239.5)
    item = await probe.next_value("feeder.voltage.l1", where=lambda r: r.cot == "SPONTANEOUS")
    assert item.value == pytest.approx(239.5)
    nxt = await probe.next_value("feeder.voltage.l1", where=lambda r: r.cot == "PERIODIC")
    assert nxt.value == pytest.approx(239.5), "the next cycle carries the new value"
    assert o.stats().periodic_objects >= 3 * len(want)


async def test_cyclic_asdus_are_packed(
    config_factory: Callable[..., LabConfig], stations: StationFactory, raw_connect: Any
) -> None:
    o = await stations(config_factory(cyclic_period_s=0.1))
    client = await raw_connect(o)
    cycle: list[Asdu] = []
    async with asyncio.timeout(3):
        while sum(len(a.objects) for a in cycle) < len(measured_names(o)):
            asdu = await client.recv_asdu()
            client.ack()
            if asdu.cot is Cot.PERIODIC:
                cycle.append(asdu)
    # one ASDU per type in the feeder: many objects each, never one ASDU per point
    types = {TypeId[p.address.type] for p in o.points if p.name in measured_names(o)}
    assert {a.type_id for a in cycle} == types
    assert len(cycle) == len(types)
    ioas = [obj.ioa for a in cycle for obj in a.objects]
    assert len(ioas) == len(set(ioas)) == len(measured_names(o))


async def test_no_cyclic_by_default_nor_while_stalled(
    config_factory: Callable[..., LabConfig], stations: StationFactory, raw_connect: Any
) -> None:
    quiet = await stations(config_factory())
    client = await raw_connect(quiet)
    assert await client.silent(0.4)
    assert quiet.stats().periodic_objects == 0
    cyclic = await stations(config_factory(cyclic_period_s=0.1))
    cyclic.stall()
    await asyncio.sleep(0.35)
    assert cyclic.stats().periodic_objects == 0  # stalled: no cycle goes out
    other = await raw_connect(cyclic, start=False)
    other.send(UFrame(UFunction.STARTDT_ACT))
    assert await other.silent(0.3)  # stalled: not even STARTDT is answered
    cyclic.resume()
    assert await other.recv() == UFrame(UFunction.STARTDT_CON)
    asdu = await other.recv_asdu(1.0)
    assert asdu.cot is Cot.PERIODIC


# ---------------------------------------------------------------------------------------
# TLS server side


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


def tls_config(base: LabConfig, pki: LabPki, *, client_ca: bool = True) -> LabConfig:
    dev = base.devices["ref615"]
    sim = {
        **dev.simulator.model_dump(),
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "tls_ca_file": str(pki.ca) if client_ca else None,
    }
    return base.with_device("ref615", tls={"enabled": True, "ca_file": str(pki.ca)}, simulator=sim)


def client_context(pki: LabPki, *, cert: str = "client") -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert == "client":
        ctx.load_cert_chain(pki.client.cert, pki.client.key)
    elif cert == "rogue":
        ctx.load_cert_chain(pki.rogue_client.cert, pki.rogue_client.key)
    return ctx


class TlsClient:
    """Just enough of a controlling station over TLS: STARTDT, GI, read I-frames, S-acks."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.decoder = FrameDecoder()
        self.frames: list[Any] = []
        self.vs = self.vr = 0

    async def recv(self, timeout_s: float = 2.0) -> Any:
        async with asyncio.timeout(timeout_s):
            while not self.frames:
                data = await self.reader.read(4096)
                if not data:
                    raise ConnectionResetError("closed by outstation")
                self.frames.extend(self.decoder.feed(data))
        frame = self.frames.pop(0)
        if isinstance(frame, IFrame):
            self.vr = (self.vr + 1) % 32768
            self.writer.write(encode_frame(SFrame(self.vr)))
        return frame

    def send_asdu(self, asdu: Asdu) -> None:
        self.writer.write(encode_frame(IFrame(self.vs, self.vr, encode_asdu(asdu))))
        self.vs += 1

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


@pytest.fixture
async def tls_clients() -> AsyncIterator[Callable[..., Awaitable[TlsClient]]]:
    opened: list[TlsClient] = []

    async def connect(o: Iec104Outstation, ctx: ssl.SSLContext | None) -> TlsClient:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", o.port, ssl=ctx, server_hostname="127.0.0.1" if ctx else None
        )
        c = TlsClient(reader, writer)
        opened.append(c)
        return c

    try:
        yield connect
    finally:
        for c in opened:
            await c.close()


async def refused(o: Iec104Outstation, timeout_s: float = 2.0) -> None:
    """Wait until the outstation has counted a failed TLS handshake."""
    deadline = time.monotonic() + timeout_s
    while o.stats().tls_refused < 1:
        assert time.monotonic() < deadline, "no TLS refusal counted"
        await asyncio.sleep(0.01)


async def closed_without_data(c: TlsClient, timeout_s: float = 2.0) -> bool:
    """True when the outstation ends the connection (EOF, reset or TLS alert) and sends nothing."""
    try:
        async with asyncio.timeout(timeout_s):
            data = await c.reader.read(4096)
    except (ConnectionError, ssl.SSLError):
        return True
    return data == b""


async def test_tls_outstation_serves_iec104_to_a_trusted_client(
    config: LabConfig, pki: LabPki, stations: StationFactory, tls_clients: Any
) -> None:
    o = await stations(tls_config(config, pki))
    assert o.tls
    c = await tls_clients(o, client_context(pki))
    tls = c.writer.get_extra_info("ssl_object")
    assert tls is not None and tls.version() in ("TLSv1.2", "TLSv1.3")
    assert tls.getpeercert()["subject"][-1][0][1] == "simulated device"
    c.writer.write(encode_frame(UFrame(UFunction.STARTDT_ACT)))
    assert await c.recv() == UFrame(UFunction.STARTDT_CON)
    c.send_asdu(Asdu(TypeId.C_IC_NA_1, Cot.ACTIVATION, 1, (InfoObject(0, Interrogation(20)),)))
    seen: set[int] = set()
    while True:
        frame = await c.recv()
        asdu = decode_asdu(frame.asdu)
        if asdu.cot is Cot.ACTIVATION_TERMINATION:
            break
        if asdu.cot is Cot.INTERROGATED_BY_STATION:
            seen.update(obj.ioa for obj in asdu.objects)
    assert seen == {p.address.ioa for p in o.points if p.direction.value == "monitor"}
    st = o.stats()
    assert (st.connections_accepted, st.tls_refused, st.active_connections) == (1, 0, 1)
    # a spontaneous value leaves over TLS like over TCP
    t_sent = o.set_value("feeder.frequency", 50.25)
    frame = await c.recv()
    assert decode_asdu(frame.asdu).cot is Cot.SPONTANEOUS
    assert time.time() - t_sent < 0.5


@pytest.mark.parametrize("cert", ["rogue", "none"])
async def test_tls_outstation_refuses_a_client_the_ca_did_not_sign(
    config: LabConfig, pki: LabPki, stations: StationFactory, tls_clients: Any, cert: str
) -> None:
    o = await stations(tls_config(config, pki))
    try:
        c = await tls_clients(o, client_context(pki, cert=cert))
    except (ConnectionError, ssl.SSLError):
        pass  # TLS 1.2 refuses inside the handshake
    else:  # TLS 1.3: our handshake is done before the server has checked us; it closes at once
        c.writer.write(encode_frame(UFrame(UFunction.STARTDT_ACT)))
        assert await closed_without_data(c)
    await refused(o)
    st = o.stats()
    assert st.connections_accepted == 0 and st.frames_in == 0


async def test_plain_tcp_client_gets_nothing_from_a_tls_outstation(
    config: LabConfig, pki: LabPki, stations: StationFactory, tls_clients: Any
) -> None:
    o = await stations(tls_config(config, pki))
    c = await tls_clients(o, None)  # plain TCP
    c.writer.write(encode_frame(UFrame(UFunction.STARTDT_ACT)))  # not a TLS record
    assert await closed_without_data(c)
    await refused(o)
    assert o.stats().frames_in == 0


async def test_without_tls_ca_file_any_client_may_connect(
    config: LabConfig, pki: LabPki, stations: StationFactory, tls_clients: Any
) -> None:
    o = await stations(tls_config(config, pki, client_ca=False))
    c = await tls_clients(o, client_context(pki, cert="none"))
    c.writer.write(encode_frame(UFrame(UFunction.STARTDT_ACT)))
    assert await c.recv() == UFrame(UFunction.STARTDT_CON)


@pytest.mark.parametrize("key", ["tls_cert_file", "tls_key_file", "tls_ca_file"])
def test_missing_simulator_tls_file_is_a_config_error_naming_key_and_file(
    config: LabConfig, pki: LabPki, tmp_path: Path, key: str
) -> None:
    cfg = tls_config(config, pki)
    missing = str(tmp_path / "nowhere.pem")
    cfg = cfg.with_device("ref615", simulator={**cfg.devices["ref615"].simulator.model_dump(), key: missing})
    with pytest.raises(ConfigError) as err:
        Iec104Outstation(cfg, "ref615", host="127.0.0.1", port=0)
    issue = err.value.first
    assert issue.key == f"devices.ref615.simulator.{key}"
    assert issue.file == missing and "cannot read" in issue.reason


def test_tls_without_a_server_certificate_is_a_config_error(config: LabConfig, pki: LabPki) -> None:
    cfg = config.with_device("ref615", tls={"enabled": True, "ca_file": str(pki.ca)})
    with pytest.raises(ConfigError, match=r"simulator\.tls_cert_file: missing"):
        Iec104Outstation(cfg, "ref615", host="127.0.0.1", port=0)


def test_key_that_does_not_fit_the_certificate_is_a_config_error(config: LabConfig, pki: LabPki) -> None:
    cfg = tls_config(config, pki)
    sim = {**cfg.devices["ref615"].simulator.model_dump(), "tls_key_file": str(pki.client.key)}
    with pytest.raises(ConfigError, match="not a usable PEM pair"):
        Iec104Outstation(cfg.with_device("ref615", simulator=sim), "ref615", host="127.0.0.1", port=0)


def lab_file(tmp_path: Path, pki: LabPki, *, sim_cert: Path) -> Path:
    sim_config = Path(__file__).resolve().parents[2] / "lab_configs" / "multipower-sim.yaml"
    path = tmp_path / "tls-lab.yaml"
    path.write_text(
        f"extends: {sim_config}\n"
        "devices:\n"
        "  ref615:\n"
        f"    tls: {{enabled: true, ca_file: {pki.ca}}}\n"
        f"    simulator: {{tls_cert_file: {sim_cert}, tls_key_file: {pki.server.key}, tls_ca_file: {pki.ca}}}\n"
    )
    return path


def test_cli_announces_tls_and_rejects_a_missing_certificate(
    pki: LabPki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = lab_file(tmp_path, pki, sim_cert=pki.server.cert)
    assert main(["--log-level", "WARNING", "iec104", "--config", str(good), "--port", "0", "--duration-s", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "ref615 listening on" in out and "points, TLS)" in out
    bad = lab_file(tmp_path, pki, sim_cert=tmp_path / "gone.crt")
    assert main(["--log-level", "WARNING", "iec104", "--config", str(bad), "--port", "0", "--duration-s", "0.2"]) == 2
    err = capsys.readouterr().err
    assert "devices.ref615.simulator.tls_cert_file" in err and "gone.crt" in err


# ---------------------------------------------------------------------------------------
# c104's own TLS (measured fact, kept as a canary)


async def test_c104_native_tls_client_still_cannot_connect(
    config: LabConfig, pki: LabPki, stations: StationFactory
) -> None:
    """c104 2.2.1: every TLS handshake of its client fails (mbedtls -0x5D80, no host name).

    This is why the adapter does TLS through :mod:`gateway.protocols.iec104.tls`. If this test
    fails, a c104 release can verify a server again: the bridge could give way to
    ``c104.TransportSecurity``.
    """
    o = await stations(tls_config(config, pki))
    tls = c104.TransportSecurity(validate=True, only_known=False)
    tls.set_ca_certificate(cert=str(pki.ca))
    tls.set_certificate(cert=str(pki.client.cert), key=str(pki.client.key))
    client = c104.Client(tick_rate_ms=50, transport_security=tls)
    conn = client.add_connection(ip="127.0.0.1", port=o.port, init=c104.Init.NONE)
    assert conn is not None
    client.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert conn.state not in (c104.ConnectionState.OPEN, c104.ConnectionState.OPEN_MUTED), (
                "c104's TLS client completed a handshake: see gateway/protocols/iec104/tls.py"
            )
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(client.stop)
    assert o.stats().connections_accepted == 0
