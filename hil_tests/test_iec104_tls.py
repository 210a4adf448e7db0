"""The gateway over IEC 104 with TLS (IEC 62351-3 style) against the TLS simulator and Redis.

A throw-away PKI is made in the test's temporary directory; no key is ever committed. The
gateway reaches TLS through its loopback bridge (c104 2.2.1's own TLS client cannot finish a
handshake: see gateway/protocols/iec104/tls.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hilkit import DEVICE, FAST_TIMERS, REAL_CONFIG, Lab, eventually, reported_up, start_lab

from gateway.config import Direction, LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import DeviceLink, RedisStore, StoredValue

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(bool(REAL_CONFIG), reason="needs the TLS simulator and its throw-away PKI"),
]


@pytest.fixture
def pki(tmp_path: Path) -> LabPki:
    return make_lab_pki(tmp_path / "pki")


def tls_lab(base: LabConfig, pki: LabPki) -> LabConfig:
    """The lab with the device served over TLS, client certificates checked against the lab CA."""
    sim = {
        **base.devices[DEVICE].simulator.model_dump(),
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "tls_ca_file": str(pki.ca),
    }
    return base.with_device(DEVICE, tls={"enabled": True, "ca_file": str(pki.ca)}, simulator=sim)


def gateway_tls(pki: LabPki, *, rogue: bool = False) -> dict[str, object]:
    client = pki.rogue_client if rogue else pki.client
    return {"enabled": True, "ca_file": str(pki.ca), "cert_file": str(client.cert), "key_file": str(client.key)}


@pytest.fixture
async def tls_sim(base_config: LabConfig, pki: LabPki) -> AsyncIterator[Iec104Outstation]:
    o = Iec104Outstation(tls_lab(base_config, pki), DEVICE, host="127.0.0.1", port=0, seed=11)
    await o.start()
    try:
        yield o
    finally:
        await o.close()


async def test_values_reach_redis_over_tls(
    base_config: LabConfig, pki: LabPki, tls_sim: Iec104Outstation, redis_server: RedisServer
) -> None:
    lab: Lab = await start_lab(tls_lab(base_config, pki), redis_server, tls_sim, tls=gateway_tls(pki))
    try:
        names = [p.name for p in lab.config.points if p.direction is Direction.MONITOR]

        async def all_values() -> dict[str, StoredValue] | None:
            values = await lab.reader.latest_all()
            return values if all(n in values for n in names) else None

        await eventually(all_values, 5, "every monitor point in Redis over TLS")
        sent = tls_sim.set_value("feeder.voltage.l1", 244.5)

        async def arrived() -> StoredValue | None:
            v = await lab.reader.latest("feeder.voltage.l1")
            return v if v is not None and v.value == pytest.approx(244.5) else None

        v = await eventually(arrived, 3, "spontaneous value over TLS in Redis")
        assert v.cause == "spontaneous" and v.store_ts >= sent
        await reported_up(lab.reader, DEVICE)
        outcome = await lab.gateway.execute("feeder.breaker.command", "open", requested_by="hil-tls")
        assert outcome.result == "confirmed", outcome.reason
        st = tls_sim.stats()
        assert st.connections_accepted == 1 and st.tls_refused == 0
    finally:
        await lab.shutdown()
        await lab.reader.aclose()


async def test_untrusted_client_certificate_keeps_the_link_down_with_a_reason(
    base_config: LabConfig, pki: LabPki, tls_sim: Iec104Outstation, redis_server: RedisServer
) -> None:
    cfg = tls_lab(base_config, pki).with_device(
        DEVICE,
        port=tls_sim.port,
        timers=FAST_TIMERS,
        reconnect={"initial_s": 0.1, "max_s": 0.3},
        tls=gateway_tls(pki, rogue=True),
    )
    store = RedisStore.from_url(cfg, redis_server.client_url())
    reader = RedisStore.from_url(cfg, redis_server.client_url())
    gw = Gateway(cfg, store)
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run(stop), name="gateway")
    try:

        async def refused_down() -> DeviceLink | None:
            link = await reader.link(DEVICE)
            return link if link is not None and link.state == "down" and "certificate" in link.reason else None

        link = await eventually(refused_down, 10, "link down in Redis with a TLS reason")
        assert "refuse our certificate" in link.reason, link.reason

        async def retried() -> bool:
            return tls_sim.stats().tls_refused >= 3

        await eventually(retried, 10, "the gateway keeps retrying")
        assert not task.done(), "the gateway runs on"
        assert tls_sim.stats().connections_accepted == 0
        v = await reader.latest("feeder.voltage.l1")  # nothing got through: at most "link lost"
        assert v is None or (v.value is None and v.cause == "link_lost"), v
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)
        await reader.aclose()


async def test_stalled_tls_device_is_detected_and_the_link_comes_back(
    base_config: LabConfig, pki: LabPki, tls_sim: Iec104Outstation, redis_server: RedisServer
) -> None:
    """Link supervision (t1 after TESTFR at t3) works through the TLS relay, and so do reconnects."""
    lab: Lab = await start_lab(tls_lab(base_config, pki), redis_server, tls_sim, tls=gateway_tls(pki))
    try:
        timers = lab.config.devices[DEVICE].timers

        async def value(cause: str | None = None, stale: bool = False) -> StoredValue | None:
            v = await lab.reader.latest("feeder.frequency")
            if v is None or (cause is not None and v.cause != cause):
                return None
            return v if (v.quality != 0) == stale else None

        await eventually(lambda: value(), 5, "initial value")
        tls_sim.stall()  # TCP and TLS stay up; only IEC 104 goes silent
        t0 = asyncio.get_running_loop().time()
        await eventually(lambda: value("link_lost", stale=True), timers.t1_s + timers.t3_s + 2, "flagged stale")
        assert asyncio.get_running_loop().time() - t0 <= timers.t1_s + timers.t3_s + 1.5
        tls_sim.resume()
        await eventually(lambda: value("interrogated"), 10, "good again after reconnect over TLS")
        tls_sim.drop()  # the device closes the TLS connection
        await eventually(lambda: value("link_lost", stale=True), 5, "flagged after drop")
        await eventually(lambda: value("interrogated"), 10, "good again after the drop")
        await reported_up(lab.reader, DEVICE, reconnects=2)
        assert tls_sim.stats().tls_refused == 0
    finally:
        await lab.shutdown()
        await lab.reader.aclose()
