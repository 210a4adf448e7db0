"""AmsService decisions against a real Redis, without transports (offline view + crafted inbox items)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from ams.market import DsoRequest
from ams.sandbox import DsoSandbox
from ams.service import AmsService, AmsSettings, MarketSettings, NotRegistered
from gateway.audit import AuditLog, audit_key, read_stream, render, verify
from gateway.messaging import Received, build_messenger
from gateway.semantic import Envelope, Flexibility, FlexibilityType, Payload, VerificationNotification
from gateway.services import RedisServer
from gateway.transport.base import topic_for

pytestmark = pytest.mark.timeout(30)
T0 = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5)
H = timedelta(hours=1)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def svc(redis_server: RedisServer) -> AsyncIterator[AmsService]:
    client = aioredis.Redis.from_url(redis_server.client_url("ams"), decode_responses=True)
    # no auto clearing and no messenger: the decisions are inspected without sending anything
    yield AmsService(AmsSettings(market=MarketSettings(auto_clear=False)), client, "ams")
    await client.aclose()


def item(payload: Payload, sender: str) -> Received:
    env = Envelope.create(payload, sender=sender, recipient="ams", topic=topic_for("ams", sender, payload.message_type))
    return Received("0-1", env, "test", sender, 1, 2)


def flex(ident: str, kw: float) -> Flexibility:
    return Flexibility(identifier=ident, flexibility_type=FlexibilityType.UPWARD, power_kw=kw, start=T0, stop=T0 + H)


async def test_unregistered_microgrid_is_refused(svc: AmsService) -> None:
    with pytest.raises(NotRegistered):
        await svc.handle(item(flex("f1", 10), "stranger"))
    assert svc.counters["unregistered"] == 1
    assert await svc.open_offers() == []


async def test_offers_are_priced_ranked_and_listed_per_location(svc: AmsService) -> None:
    await svc.register("mg-a", "north")
    await svc.register("mg-b", "north")
    await svc.register("mg-c", "south")
    # make mg-a unreliable: 80 + 0.05*10 = 80.5, ranked + (1-0.5)*50 = 105.5
    rec = json.loads(await svc.redis.hget(svc.keys.microgrids, "mg-a") or "{}")
    await svc.redis.hset(svc.keys.microgrids, "mg-a", json.dumps(rec | {"reliability": 0.5}))
    await svc.handle(item(flex("f1", 10), "mg-a"))
    await svc.handle(item(flex("f2", 30), "mg-b"))  # 80 + 1.5 = 81.5, rank 81.5
    await svc.handle(item(flex("f3", 5), "mg-c"))
    await svc.handle(item(flex("f1", 10), "mg-a"))  # redelivered: no second offer
    north = await svc.open_offers("north")
    assert sorted(o.offer_id for o in north) == ["offer:mg-a:f1", "offer:mg-b:f2"]
    by_id = {o.offer_id: o for o in north}
    assert by_id["offer:mg-a:f1"].price_eur_per_mwh == pytest.approx(80.5)
    assert by_id["offer:mg-a:f1"].rank_eur_per_mwh == pytest.approx(105.5)
    offer_list = await svc.offer_list("north")
    assert [o.identifier for o in offer_list.offers] == ["offer:mg-a:f1", "offer:mg-b:f2"]  # by price
    assert svc.counters["offers"] == 3


async def test_verification_checks_owner_and_activation_and_settles_once(svc: AmsService) -> None:
    await svc.register("mg-a", "north")
    act_key = svc.keys.activation("act:x")
    await svc.redis.hset(act_key, mapping={"offer": "offer:x", "microgrid": "mg-a", "power_kw": "10.0",
                                           "price": "100.0", "state": "activated"})  # fmt: skip
    ver = VerificationNotification(identifier="v1", activation_ref="act:x", start=T0, stop=T0 + timedelta(seconds=4),
                                   time_step_s=1, power_series_kw=(10.0, 10.2, 9.9, 10.0))  # fmt: skip
    with pytest.raises(ValueError, match="belongs to mg-a"):
        await svc.handle(item(ver, "mg-b"))
    unknown = ver.model_copy(update={"activation_ref": "act:nope"})
    with pytest.raises(ValueError, match="unknown activation"):
        await svc.handle(item(unknown, "mg-a"))
    await svc.handle(item(ver, "mg-a"))
    await svc.handle(item(ver.model_copy(update={"identifier": "v2"}), "mg-a"))  # a duplicate: ignored
    s = await svc.settlement("act:x")
    assert s["state"] == "settled" and s["delivered"] == "True"
    assert await svc.redis.xlen(svc.keys.settlements) == 1
    rec = json.loads(await svc.redis.hget(svc.keys.microgrids, "mg-a") or "{}")
    assert rec["delivered"] == 1 and rec["reliability"] == pytest.approx(1.0)


async def test_dso_request_is_queued_for_a_worker(svc: AmsService) -> None:
    req = DsoRequest(request_id="r1", flexibility_type=FlexibilityType.UPWARD, power_kw=5, start=T0, stop=T0 + H)
    assert await svc.submit_request(req) == "r1"
    (_, fields), = await svc.redis.xrange(svc.keys.requests)
    assert DsoRequest.model_validate_json(fields["request"]) == req


async def test_auto_clear_queues_reserve_and_activation_and_records_them_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The auto-clear path writes its outcome in one transaction after queueing both
    notifications; a redelivered flexibility sends nothing again and records nothing twice."""
    client = aioredis.Redis.from_url(redis_server.client_url("ams"), decode_responses=True)
    box = DsoSandbox(tmp_path / "dso", mgms=["mg-a"], start_broker=False)
    with box:
        messenger = build_messenger(box.messaging("ams", transport="https"), client, prefix="t:ams")  # not started
        svc = AmsService(AmsSettings(), client, "ams", messenger=messenger)
        try:
            await svc.register("mg-a", "north")
            await svc.handle(item(flex("f1", 10), "mg-a"))
            await svc.handle(item(flex("f1", 10), "mg-a"))  # redelivered
            queued = [f["topic"].rsplit("/", 1)[1] for _, f in await client.xrange(messenger.keys.outbox("https"))]
            assert queued == ["ReserveNotification", "ActivationNotification"]
            offer = await client.hgetall(svc.keys.offer("offer:mg-a:f1"))
            assert offer["state"] == "activated" and offer["reserved_kw"] == "10.0"
            assert await client.zcard(svc.keys.offers("north")) == 0  # no longer open
            act = await client.hgetall(svc.keys.activation("act:offer:mg-a:f1"))
            assert act["state"] == "activated" and act["microgrid"] == "mg-a" and act["power_kw"] == "10.0"
            events = [f["event"] for _, f in await client.xrange(svc.keys.events)]
            assert events == ["registered", "offer", "cleared", "reserved", "activated", "cleared"]  # 2nd: nothing
            assert svc.counters["offers"] == 1 and svc.counters["reserves"] == 1 and svc.counters["activations"] == 1
            assert svc.counters["flexibilities"] == 1
        finally:
            await messenger.close()
            await client.aclose()


async def test_registration_activation_and_settlement_are_in_a_verified_trail(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    client = aioredis.Redis.from_url(redis_server.client_url("ams"), decode_responses=True)
    box = DsoSandbox(tmp_path / "dso", mgms=["mg-a"], start_broker=False)
    with box:
        settings = box.messaging("ams", transport="https")
        messenger = build_messenger(settings, client, prefix="ams:ams")  # not started
        cfg_file = tmp_path / "ams.yaml"
        doc = {"messaging": settings.model_dump(mode="json"), "microgrids": [{"participant": "mg-a", "location": "L"}]}
        cfg_file.write_text(json.dumps(doc))  # YAML is a superset of JSON
        identity = messenger.sealer.keystore.own
        audit = AuditLog(client, prefix="ams:ams", identity=identity)
        await audit.start()
        svc = AmsService(AmsSettings(), client, "ams", messenger=messenger, audit=audit)
        try:
            await svc.register("mg-a", "north")
            await svc.handle(item(flex("f1", 10), "mg-a"))  # auto-cleared: reserved and activated
            act_id = "act:offer:mg-a:f1"
            ver = VerificationNotification(identifier="v1", activation_ref=act_id, start=T0,
                                           stop=T0 + timedelta(seconds=4), time_step_s=1,
                                           power_series_kw=(10.0, 10.2, 9.9, 10.0))  # fmt: skip
            await svc.handle(item(ver, "mg-a"))
            await audit.close()
            entries = await read_stream(client, audit_key("ams:ams"))
        finally:
            await messenger.close()
            await client.aclose()
    kinds = [(e.kind, e.actor) for e in entries if e.kind != "checkpoint"]
    assert kinds[1:] == [("activation", "ams"), ("settlement", "mg-a")]
    assert kinds[0][0] == "registration" and entries[0].data["microgrid"] == "mg-a"
    assert entries[1].data["activation"] == act_id and entries[1].data["phase"] == "sent"
    assert entries[2].data["state"] == "settled"
    assert entries[-1].kind == "checkpoint"
    assert verify(entries, identity.public).ok

    # the same through the CLI, on the live stream and on an export
    from ams.cli import main

    export = tmp_path / "ams-audit.csv"
    export.write_text(render(entries, "csv"))
    common = ["-c", str(cfg_file), "--redis-url", redis_server.url, "--redis-user", "viewer"]
    common += ["--redis-secret-file", str(redis_server.secrets_dir / "redis-viewer.secret")]

    def run(*argv: str) -> tuple[int, str]:
        code = main(list(argv))
        return code, capsys.readouterr().out

    # the public key: ams.pub next to the config's identity file (as `mgms keys` writes them)
    code, text = await asyncio.to_thread(run, "audit", "verify", *common)
    assert code == 0 and "ams:ams:audit: 4 entries (seq 0..3), 1 checkpoint(s) verified by ams" in text, text
    lines = export.read_text().splitlines()
    lines[2] = lines[2].replace("ams", "mallory", 1)  # the activation's actor
    export.write_text("\n".join(lines) + "\n")
    code, text = await asyncio.to_thread(run, "audit", "verify", str(export), *common)
    assert code == 1 and "entry #1 (seq 1" in text and "changed" in text, text
