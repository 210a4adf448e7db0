"""Messages with ``probes`` off carry no hop times and everything still works; on, the hops are
there. Real transports: the sandbox's TLS mosquitto (AMS -> MGMS) and mutual-TLS HTTPS
(MGMS -> AMS), each participant on its own redis-server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest
import redis.asyncio as aioredis

from ams.sandbox import DsoSandbox, feeder_flexibility
from ams.service import AmsService, AmsSettings
from gateway.commands import CommandOutcome
from gateway.config import Device, Direction, Iec104Address, LabConfig, LabInfo, Point, ProbeSettings
from gateway.flexibility import FlexAgent
from gateway.messaging import Messenger, build_messenger
from gateway.points import Quality, now
from gateway.semantic import Flexibility, FlexibilityType, ReserveNotification
from gateway.services import RedisServer
from gateway.store import stream_entries

pytestmark = pytest.mark.timeout(60)

MGMS, AMS = "mgms-probes", "ams"
MGMS_PREFIX, AMS_PREFIX = "mgms:probes", "ams:ams"
INBOX_HOPS = {"received_ns", "stored_ns"}


@pytest.fixture(params=[False, True], ids=["probes-off", "probes-on"])
def probes(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@dataclass
class Pair:
    mgms: Messenger
    ams: Messenger
    mgms_redis: aioredis.Redis
    ams_redis: aioredis.Redis


@pytest.fixture
def box(tmp_path: Path) -> Iterator[DsoSandbox]:
    with DsoSandbox(tmp_path / "box", mgms=[MGMS], ams=AMS) as sandbox:
        yield sandbox


@pytest.fixture
async def pair(box: DsoSandbox, probes: bool) -> AsyncIterator[Pair]:
    with RedisServer() as mgms_server, RedisServer() as ams_server:
        mgms_redis = aioredis.Redis.from_url(mgms_server.client_url(), decode_responses=True)
        ams_redis = aioredis.Redis.from_url(ams_server.client_url("ams"), decode_responses=True)
        # "both": MGMS -> AMS over HTTPS, AMS -> MGMS over MQTT
        mgms = build_messenger(box.messaging(MGMS, transport="both"), mgms_redis, prefix=MGMS_PREFIX, probes=probes)
        ams = build_messenger(box.messaging(AMS, transport="both"), ams_redis, prefix=AMS_PREFIX, probes=probes)
        try:
            async with mgms, ams:
                yield Pair(mgms, ams, mgms_redis, ams_redis)
        finally:
            await mgms_redis.aclose()
            await ams_redis.aclose()


async def inbox_fields(m: Messenger) -> dict[str, str]:
    """The one inbox entry as stored, read before any consumer takes it."""
    deadline = asyncio.get_running_loop().time() + 15
    while not (entries := stream_entries(await m.redis.xrange(m.keys.inbox))):
        assert asyncio.get_running_loop().time() < deadline, "nothing reached the inbox"
        await asyncio.sleep(0.02)
    ((_, fields),) = entries
    return fields


async def test_round_trip_over_https_and_mqtt_with_and_without_hops(pair: Pair, probes: bool) -> None:
    t0 = datetime.now(UTC).replace(microsecond=0)
    flex = Flexibility(identifier="feeder-1", flexibility_type=FlexibilityType.UPWARD, power_kw=12.5,
                       start=t0, stop=t0 + timedelta(hours=1))  # fmt: skip
    sent = await pair.mgms.send(flex, AMS)  # HTTPS
    raw = await inbox_fields(pair.ams)
    assert (raw.keys() >= INBOX_HOPS) if probes else not (INBOX_HOPS & raw.keys())
    (got,) = await pair.ams.read("svc", "w1", block_ms=2000)
    assert got.envelope == sent and got.transport == "https" and got.peer == MGMS
    assert got.created_ns > 0  # from the envelope: data, not a probe
    if probes:
        assert got.created_ns <= got.received_ns <= got.stored_ns + 1_000_000
    else:
        assert got.received_ns == got.stored_ns == 0
    await pair.ams.ack("svc", got.entry_id)

    reserve = ReserveNotification(identifier="res-1", flexibility_type=FlexibilityType.UPWARD, power_kw=12.5,
                                  start=t0, stop=t0 + timedelta(hours=1), price_eur_per_mwh=80.0)  # fmt: skip
    back = await pair.ams.send(reserve, MGMS)  # MQTT
    raw = await inbox_fields(pair.mgms)
    assert (raw.keys() >= INBOX_HOPS) if probes else not (INBOX_HOPS & raw.keys())
    (got,) = await pair.mgms.read("svc", "w1", block_ms=2000)
    assert got.envelope == back and got.transport == "mqtt"
    assert (got.received_ns > 0) is probes and (got.stored_ns > 0) is probes
    await pair.mgms.ack("svc", got.entry_id)
    assert await pair.mgms.outbox_length() == await pair.ams.outbox_length() == 0


# ---------------------------------------------------------------------------------------
# The DSO loop: flexibility -> offer -> reserve + activation -> breaker -> verification -> settled


def feeder_lab(probes: bool) -> LabConfig:
    dev = Device(name="relay", protocol="iec104", host="127.0.0.1", port=2404)
    points = (
        Point(name="feeder.p", device="relay", quantity="active_power", unit="kW",
              address=Iec104Address(ioa=1021, type="M_ME_TF_1")),
        Point(name="feeder.breaker.position", device="relay", quantity="breaker_position", unit="1",
              address=Iec104Address(ioa=2001, type="M_DP_TB_1")),
        Point(name="feeder.breaker.command", device="relay", quantity="breaker_command", unit="1",
              direction=Direction.CONTROL, address=Iec104Address(ioa=3001, type="C_DC_NA_1"),
              status_point="feeder.breaker.position"),
    )  # fmt: skip
    return LabConfig(
        lab=LabInfo(name="probes"),
        devices={"relay": dev},
        points=points,
        probes=ProbeSettings(enabled=probes),
        source="tests/messaging/test_probes_messaging.py",
    )


class Feeder:
    """The gateway as the FlexAgent sees it (its GatewayLike interface): a feeder drawing
    40 kW whose breaker opens and closes at once, each command confirmed."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.open = False
        self.commands: list[tuple[str, str, str]] = []

    def latest_value(self, name: str) -> tuple[float | int | bool | None, int] | None:
        if name != "feeder.p":
            return None
        return (0.0 if self.open else 40.0), int(Quality.GOOD)

    async def execute_logged(
        self, point: str, value: str | float | int | bool, requested_by: str = "operator", request_id: str = ""
    ) -> CommandOutcome:
        sent = now()
        self.open = value == "open"
        self.commands.append((point, str(value), requested_by))
        return CommandOutcome(request_id=CommandOutcome.new_id(), point=point, value=int(self.open) + 1,
                              requested_by=requested_by, result="confirmed", sent_ts=sent, ack_ts=now(),
                              confirm_ts=now())  # fmt: skip


async def test_dso_loop_runs_and_writes_hops_only_with_probes(pair: Pair, probes: bool) -> None:
    feeder = Feeder(feeder_lab(probes))
    agent = FlexAgent(feeder, pair.mgms, feeder_flexibility(AMS, window_s=2, step_s=1), prefix=MGMS_PREFIX)
    svc = AmsService(AmsSettings(), pair.ams_redis, AMS, messenger=pair.ams, probes=probes)
    await svc.register(MGMS, "feeder-4")
    stop = asyncio.Event()
    tasks = [asyncio.create_task(svc.run(stop), name="ams"), asyncio.create_task(agent.run(stop), name="flex")]
    try:
        start = datetime.now(UTC) + timedelta(seconds=1)  # time for the messages to get there first
        (flex,) = await agent.publish(start=start, window_s=2)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"
        settlement: dict[str, str] = {}
        async with asyncio.timeout(30):
            while not settlement:
                settlement = await svc.settlement(act_id)
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await asyncio.gather(*tasks)

    assert settlement["state"] == "settled", settlement
    assert [c[:2] for c in feeder.commands] == [("feeder.breaker.command", "open"), ("feeder.breaker.command", "close")]
    mg_act = cast(dict[str, str], await pair.mgms_redis.hgetall(f"{MGMS_PREFIX}:flex:act:{act_id}"))
    ams_flex = cast(dict[str, str], await pair.ams_redis.hgetall(svc.keys.flex(MGMS, flex.identifier)))
    ams_act = cast(dict[str, str], await pair.ams_redis.hgetall(svc.keys.activation(act_id)))
    reserve_key = f"{MGMS_PREFIX}:flex:reserve:res:offer:{MGMS}:{flex.identifier}"
    reserve = cast(dict[str, str], await pair.mgms_redis.hgetall(reserve_key))
    assert mg_act["state"] == "verified" and json.loads(mg_act["series_kw"]) == [40.0, 40.0]
    assert "doc" in reserve and "doc" in ams_flex and ams_act["state"] == "settled"
    # kept whatever the setting: the flexibility's creation time, from its signed envelope
    # (ams.dispatch picks the newest flexibility per asset by it), and each command's duration
    assert int(ams_flex["created_ns"]) > 0
    commands = json.loads(mg_act["commands"]) + json.loads(mg_act["restore"])
    assert all(c["result"] == "confirmed" and c["ms"] is not None for c in commands)

    hops = {
        "MGMS activation": (mg_act, {"created_ns", "received_ns", "stored_ns", "handled_ns", "verified_ns"}),
        "MGMS reserve": (reserve, {"received_ns"}),
        "AMS flexibility": (ams_flex, {"received_ns", "stored_ns"}),
        "AMS activation": (ams_act, {"sent_ns"}),
        "AMS settlement": (settlement, {"created_ns", "received_ns", "stored_ns"}),
    }
    for what, (h, fields) in hops.items():
        if probes:
            assert fields <= h.keys() and all(int(h[f]) > 0 for f in fields), what
        else:
            assert not fields & h.keys(), (what, fields & h.keys())
    for c in commands:
        assert ({"sent_ts", "confirm_ts"} <= c.keys()) if probes else not ({"sent_ts", "confirm_ts"} & c.keys())


@pytest.mark.parametrize("probes", [False], indirect=True)
async def test_https_redelivery_is_acknowledged_and_a_replayed_id_refused(pair: Pair) -> None:
    # Seen: a replay over HTTPS was answered 202 where docs/transports.md said 422, and
    # rejected_replayed counted benign redeliveries too. Now: the same bytes again (a resend
    # after a lost answer, a broker's redelivery) -> 202, stored once, counted as a duplicate;
    # the id of a stored message on other bytes -> 422 replayed, counted as a replay.
    from gateway.errors import TransportRefused
    from gateway.semantic import Envelope, Reason
    from gateway.transport.base import Outgoing, topic_for

    https = pair.mgms.transports["https"]
    flex = Flexibility(identifier="feeder-9", flexibility_type=FlexibilityType.UPWARD, power_kw=3.5,
                       start=datetime.now(UTC), stop=datetime.now(UTC) + timedelta(minutes=15))  # fmt: skip
    topic = topic_for(AMS, MGMS, flex.message_type)
    envelope = Envelope.create(flex, sender=MGMS, recipient=AMS, topic=topic, ttl_s=300)
    data = pair.mgms.sealer.seal(envelope)
    await https.send(Outgoing(envelope.id, AMS, topic, data))
    await https.send(Outgoing(envelope.id, AMS, topic, data))  # the same bytes: acknowledged again
    assert await pair.ams_redis.xlen(pair.ams.keys.inbox) == 1
    assert pair.ams.counters["duplicates"] == 1
    assert pair.ams.opener.counter[Reason.REPLAYED] == 0
    resealed = pair.mgms.sealer.seal(envelope)  # same id, new encryption: other bytes
    assert resealed != data
    with pytest.raises(TransportRefused, match="422: replayed"):
        await https.send(Outgoing(envelope.id, AMS, topic, resealed))
    assert pair.ams.opener.counter[Reason.REPLAYED] == 1
    assert await pair.ams_redis.xlen(pair.ams.keys.inbox) == 1
