"""The clock offset: the on-wire formula and the hop correction with hand-made timestamps, then
a known offset (+25 ms injected into the server's clock) recovered within its bound over a
real loopback HTTPS exchange and a real mosquitto."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from gateway.bench.clock import (
    ClockOffset,
    MqttClockResponder,
    MqttEcho,
    clock_acl,
    clock_app,
    correction,
    estimate_offset,
    estimate_offset_mqtt,
    offset_from,
)
from gateway.bench.report import RouteSpec, apply_clock, build_report
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.services import MosquittoServer, MqttAcl, MqttTls, free_port
from gateway.transport.base import Delivery, inbox_filter
from gateway.transport.mqtt import MqttSettings, MqttTransport

pytestmark = pytest.mark.timeout(30)

MS = 1_000_000
SHIFT_NS = 25 * MS  # the "AMS" clock runs 25 ms ahead of ours


def shifted() -> int:
    return time.time_ns() + SHIFT_NS


def offset_of(ms: float, bound_ms: float = 0.2) -> ClockOffset:
    return ClockOffset(ms, bound_ms, "test", "nowhere", 2 * bound_ms, 2 * bound_ms, 1)


# ---------------------------------------------------------------------------- formula


def test_on_wire_formula_with_asymmetric_path() -> None:
    """Server 25 ms ahead; request 1 ms, answer 3 ms, server busy 0.5 ms."""
    t1 = 1_000 * MS
    t2 = t1 + 1 * MS + SHIFT_NS  # arrives after 1 ms, stamped by the server's clock
    t3 = t2 + MS // 2
    t4 = t3 - SHIFT_NS + 3 * MS  # back in our clock, after 3 ms
    off, delay = offset_from(t1, t2, t3, t4)
    assert delay == 4 * MS  # the network's share: 1 + 3
    assert off == 24 * MS  # 25 + (1 - 3) / 2: the asymmetry moves it ...
    assert abs(off - SHIFT_NS) <= delay / 2  # ... but never out of +- delay / 2


def test_symmetric_path_recovers_the_offset_exactly() -> None:
    t1 = 0
    t2 = 2 * MS - 7 * MS  # server 7 ms behind
    t3 = t2 + 100
    t4 = t3 + 7 * MS + 2 * MS
    off, delay = offset_from(t1, t2, t3, t4)
    assert (off, delay) == (-7 * MS, 4 * MS)


# ---------------------------------------------------------------------------- correction


def test_sign_convention_mgms_to_ams_and_back() -> None:
    """AMS clock 25 ms ahead: a 5 ms hop MGMS -> AMS reads 30 ms, AMS -> MGMS reads -20 ms."""
    off = offset_of(25.0, 0.3)
    there = correction("mgms", "ams", off, ams_remote=True)
    back = correction("ams", "mgms", off, ams_remote=True)
    assert there.apply([30.0]) == [5.0] and there.applied_ms == 25.0
    assert back.apply([-20.0]) == [5.0] and back.applied_ms == -25.0
    assert there.cross_host and back.cross_host
    assert there.uncertainty_ms == back.uncertainty_ms == 0.3
    same = correction("ams", "ams", off, ams_remote=True)
    assert not same.cross_host and same.apply([3.0]) == [3.0] and same.uncertainty_ms == 0.0


def test_one_host_reports_but_does_not_correct() -> None:
    c = correction("mgms", "ams", offset_of(0.01), ams_remote=False)
    assert not c.cross_host and c.apply([4.0]) == [4.0] and c.as_dict()["offset_applied_ms"] == 0.0


def test_remote_without_an_offset_is_refused() -> None:
    with pytest.raises(ValueError, match="no clock offset"):
        correction("mgms", "ams", None, ams_remote=True)


def test_report_routes_carry_the_correction() -> None:
    specs = (
        RouteSpec("flex", "flexibility", "MQTT", "MGMS -> AMS", start_host="mgms", end_host="ams"),
        RouteSpec("act", "activation", "MQTT", "AMS -> MGMS", start_host="ams", end_host="mgms"),
        RouteSpec("v", "voltage", "IEC 104", "monitoring"),
    )
    raw = {"flex": [30.0, 31.0], "act": [-20.0, -19.0], "v": [1.0], "hop_flex_x_created_to_received": [29.0]}
    hosts = {"hop_flex_x_created_to_received": ("mgms", "ams")}
    series, corrections = apply_clock(specs, raw, hosts, offset_of(25.0, 0.4), ams_remote=True)  # type: ignore[arg-type]
    assert series["flex"] == [5.0, 6.0] and series["act"] == [5.0, 6.0] and series["v"] == [1.0]
    assert series["hop_flex_x_created_to_received"] == [4.0]
    r = build_report(specs, series, {}, corrections)
    by = {x["key"]: x for x in r["routes"]}
    assert by["flex"]["cross_host"] and by["flex"]["offset_applied_ms"] == 25.0
    assert by["flex"]["offset_uncertainty_ms"] == 0.4 and by["flex"]["clock_hosts"] == "mgms->ams"
    assert by["act"]["offset_applied_ms"] == -25.0
    assert not by["v"]["cross_host"] and by["v"]["offset_uncertainty_ms"] == 0.0
    assert r["hop_clock_corrections"]["hop_flex_x_created_to_received"]["offset_applied_ms"] == 25.0


# ---------------------------------------------------------------------------- HTTPS, real TLS


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki", client_names=("mgms", "ams"))


async def test_https_exchange_recovers_an_injected_offset(pki: LabPki) -> None:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    runner = web.AppRunner(clock_app(clock=shifted), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_tls).start()
    try:
        est = await estimate_offset(
            f"https://127.0.0.1:{port}/clock", ssl.create_default_context(cafile=str(pki.ca)), 20
        )
    finally:
        await runner.cleanup()
    assert est.method == "https" and est.exchanges == 20
    assert abs(est.offset_ms - 25.0) <= est.uncertainty_ms, est
    assert 0 < est.uncertainty_ms < 5  # loopback: well under a ms unless the machine is very busy


# ---------------------------------------------------------------------------- MQTT, real mosquitto

USERS = {"mgms": "pw-mgms", "ams": "pw-ams"}


def layout_acl(*participants: str) -> list[MqttAcl]:
    out: list[MqttAcl] = []
    for p in participants:
        out += [MqttAcl(p, "write", f"heila/v1/to/+/from/{p}/#"), MqttAcl(p, "read", inbox_filter(p))]
    return out


@pytest.fixture
def broker(tmp_path: Path, pki: LabPki) -> Iterator[MosquittoServer]:
    with MosquittoServer(
        data_dir=tmp_path / "mosquitto",
        tls=MqttTls(pki.server.cert, pki.server.key, pki.ca),
        users=USERS,
        acl=[*layout_acl("mgms", "ams"), *clock_acl(["mgms", "ams"])],
    ) as server:
        yield server


def settings(broker: MosquittoServer, pki: LabPki, participant: str) -> MqttSettings:
    return MqttSettings(
        participant=participant,
        host=broker.host,
        port=broker.port,
        password=USERS[participant],  # type: ignore[arg-type]  # pydantic takes str for SecretStr
        ca_file=pki.ca,
        connect_timeout_s=3.0,
        ack_timeout_s=3.0,
    )


async def test_mqtt_exchange_recovers_an_injected_offset_and_stays_out_of_the_inbox(
    broker: MosquittoServer, pki: LabPki
) -> None:
    seen: list[Delivery] = []

    async def inbox(d: Delivery) -> None:
        seen.append(d)

    # what a running AMS Messenger subscribes to: it must not see the clock traffic
    ams_inbox = MqttTransport(settings(broker, pki, "ams").model_copy(update={"client_id": "ams-inbox"}))
    await ams_inbox.start(inbox)
    responder = MqttClockResponder(settings(broker, pki, "ams"), clock=shifted)
    await responder.start()
    try:
        est = await estimate_offset_mqtt(settings(broker, pki, "mgms"), "ams", n=20)
        async with MqttEcho(settings(broker, pki, "mgms")) as echo:
            floor = [await echo.one() for _ in range(5)]
        await asyncio.sleep(0.2)
    finally:
        await responder.close()
        await ams_inbox.close()
    assert est.method == "mqtt" and est.exchanges == 20 and est.peer.endswith("/ams")
    assert abs(est.offset_ms - 25.0) <= est.uncertainty_ms, est
    assert 0 < est.uncertainty_ms < 10
    assert responder.answered == 23  # with the warm-up
    assert seen == []
    assert all(0 < f < 1000 for f in floor)


async def test_mqtt_exchange_without_the_clock_acl_is_refused(tmp_path: Path, pki: LabPki) -> None:
    from gateway.errors import TransportRefused

    with (
        MosquittoServer(
            data_dir=tmp_path / "bare",
            tls=MqttTls(pki.server.cert, pki.server.key, pki.ca),
            users=USERS,
            acl=layout_acl("mgms", "ams"),
        ) as server,
        pytest.raises(TransportRefused),
    ):
        await estimate_offset_mqtt(settings(server, pki, "mgms"), "ams", n=1)
