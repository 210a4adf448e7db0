"""The DSO flow when things go wrong: unregistered microgrid, AMS restart in the middle,
a duplicated activation, a breaker that refuses, forged traffic on the broker."""

from __future__ import annotations

import asyncio
import json
import ssl

import paho.mqtt.client as mqtt
import pytest
from dsokit import MGMS, dso_lab, start_ams
from hilkit import REAL_CONFIG, Lab, eventually
from paho.mqtt.enums import CallbackAPIVersion

from ams.sandbox import DsoSandbox
from gateway.config import LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.semantic import ActivationNotification, Flexibility
from gateway.services import RedisServer
from gateway.transport.base import topic_for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(bool(REAL_CONFIG), reason="fault injection needs the simulators"),
]


async def _power(lab: Lab) -> float | None:
    latest = lab.gateway.latest_value("feeder.p")
    return None if latest is None else float(latest[0] or 0)


async def _offer(lab: Lab, window_s: float = 2) -> Flexibility:
    agent = lab.gateway.flex_agent
    assert agent is not None
    await eventually(lambda: _power(lab), 5, "a feeder power value")
    return (await agent.publish(window_s=window_s))[0]


async def test_flexibility_from_an_unregistered_microgrid_is_refused_and_counted(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted", register=False) as (
        lab,
        ams,
    ):
        flex = await _offer(lab)

        async def refused() -> int | None:
            return ams.service.counters["unregistered"] or None

        await eventually(refused, 10, "the refusal")
        dead = await ams.client.xrange(ams.messenger.keys.dead)
        assert any("not registered" in f["reason"] for _, f in dead), dead
        assert not await ams.client.exists(ams.service.keys.offer(f"offer:{MGMS}:{flex.identifier}"))
        events = [f for _, f in await ams.client.xrange(ams.service.keys.events)]
        assert any(e["event"] == "refused" and e["sender"] == MGMS for e in events)


async def test_ams_restart_mid_activation_still_settles(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        flex = await _offer(lab, window_s=3)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"

        async def activated() -> str | None:
            return await ams.client.hget(ams.service.keys.activation(act_id), "state")

        await eventually(activated, 10, "the activation")
        await ams.shutdown()  # the AMS goes away while the MGMS executes the activation
        await asyncio.sleep(3.5)  # the verification is sent while it is away (broker queues it)
        again = await start_ams(box, ams_redis, "mqtt", "encrypted")
        try:

            async def settled() -> dict[str, str] | None:
                return (await again.service.settlement(act_id)) or None

            settlement = await eventually(settled, 15, "the settlement by the restarted AMS")
            assert settlement["state"] == "settled"
            assert await again.client.hget(again.service.keys.activation(act_id), "state") == "settled"
        finally:
            await again.shutdown()


async def test_a_duplicated_activation_does_not_switch_twice(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        flex = await _offer(lab)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"

        async def settled() -> dict[str, str] | None:
            return (await ams.service.settlement(act_id)) or None

        await eventually(settled, 15, "the settlement")
        # The same business activation again, in a new message (as a resend after a crash would be).
        await ams.messenger.send(
            ActivationNotification(
                identifier=act_id, flexibility_type=flex.flexibility_type, power_kw=flex.power_kw,
                start=flex.start, stop=flex.stop,
            ),
            MGMS,
        )  # fmt: skip
        agent = lab.gateway.flex_agent
        assert agent is not None

        async def dropped() -> int | None:
            return agent.counters["duplicate_activations"] or None

        await eventually(dropped, 10, "the duplicate to be dropped")
        ours = [r for r in await lab.reader.command_log(50) if r.requested_by == f"ams:{act_id}"]
        assert len(ours) == 2  # one open, one close: not repeated


async def test_refused_breaker_command_settles_as_failed_and_lowers_reliability(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    assert sim is not None
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        sim.refuse_commands(True)  # interlocking: the relay answers with a negative ACTCON
        flex = await _offer(lab)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"

        async def settled() -> dict[str, str] | None:
            return (await ams.service.settlement(act_id)) or None

        settlement = await eventually(settled, 15, "the settlement")
        assert settlement["state"] == "failed" and "below" in settlement["reason"]
        assert float(settlement["payment_eur"]) <= 0
        mg = json.loads(await ams.client.hget(ams.service.keys.microgrids, MGMS) or "{}")
        assert mg["failed"] == 1 and mg["reliability"] < 1.0
        ours = [r for r in await lab.reader.command_log(50) if r.requested_by == f"ams:{act_id}"]
        assert ours and ours[0].result == "rejected"
        state = await lab.store.redis.hget(f"{lab.store.keys.prefix}:flex:act:{act_id}", "state")
        assert state == "failed"


async def test_forged_and_garbled_messages_on_the_broker_are_rejected_and_counted(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    """A participant with broker credentials (the MGMS's, stolen) publishes garbage and a
    message signed with a key the AMS does not trust: both rejected, counted, the flow goes on."""
    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        assert box.broker is not None
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
        client.username_pw_set(MGMS, box.passwords[MGMS])
        client.tls_set_context(ssl.create_default_context(cafile=str(box.pki.ca)))
        client.connect("127.0.0.1", box.broker.port)
        client.loop_start()
        try:
            topic = topic_for("ams", MGMS, "Flexibility")
            client.publish(topic, b"\x00garbage{", qos=1).wait_for_publish(5)
            forged = json.dumps({"@context": "x", "id": "urn:uuid:00000000-0000-4000-8000-000000000000"}).encode()
            client.publish(topic, forged, qos=1).wait_for_publish(5)
        finally:
            client.disconnect()
            client.loop_stop()

        async def counted() -> int | None:
            stats = ams.messenger.stats()
            n = sum(v for k, v in stats.items() if k.startswith("rejected_"))
            return n if n >= 2 else None

        await eventually(counted, 10, "both rejections")
        stats = ams.messenger.stats()
        assert stats["rejected_malformed"] >= 1 and stats["rejected_unsupported_version"] >= 1, stats
        # the genuine flow still works afterwards
        flex = await _offer(lab)

        async def settled() -> dict[str, str] | None:
            return (await ams.service.settlement(f"act:offer:{MGMS}:{flex.identifier}")) or None

        assert (await eventually(settled, 15, "the settlement"))["state"] == "settled"


async def test_gateway_restart_mid_activation_resumes_restores_and_verifies(
    box: DsoSandbox, base_config: LabConfig, redis_server: RedisServer, ams_redis: RedisServer,
    sim: Iec104Outstation | None,
) -> None:  # fmt: skip
    """The gateway stops with the breaker open for an activation; the next run does not open it
    again, closes it at the activation's stop and sends the verification, which settles."""
    from hilkit import start_lab

    from gateway.points import DoublePoint

    async with dso_lab(box, base_config, redis_server, ams_redis, sim, "mqtt", "encrypted") as (lab, ams):
        flex = await _offer(lab, window_s=4)
        act_id = f"act:offer:{MGMS}:{flex.identifier}"
        act_key = f"{lab.store.keys.prefix}:flex:act:{act_id}"

        async def active() -> str | None:
            state = await lab.store.redis.hget(act_key, "state")
            return state if state == "active" else None

        await eventually(active, 10, "the breaker opened for the activation")
        await lab.shutdown()  # mid-activation
        again = await start_lab(lab.config, redis_server, sim)
        try:

            async def settled() -> dict[str, str] | None:
                return (await ams.service.settlement(act_id)) or None

            settlement = await eventually(settled, 20, "the settlement after the gateway restart")
            assert again.gateway.flex_agent is not None and again.gateway.flex_agent.counters["resumed"] == 1
            assert await again.store.redis.hget(act_key, "state") == "verified"
            ours = [r for r in await again.reader.command_log(50) if r.requested_by == f"ams:{act_id}"]
            assert sorted(str(r.value) for r in ours) == ["1", "2"]  # opened once (first run), closed once
            stored = await again.reader.latest("feeder.breaker.position")
            assert stored is not None and stored.value == DoublePoint.ON
            assert settlement["state"] in ("settled", "failed")  # steps missed while down count as 0
        finally:
            await again.shutdown()
            await again.reader.aclose()
