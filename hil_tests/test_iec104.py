"""The gateway against the REF615/COM600 IEC 104 simulator and a real redis-server."""

from __future__ import annotations

import asyncio
import time

import pytest
from hilkit import (
    DEVICE,
    Lab,
    eventually,
    need_commands,
    need_sim,
    reported_up,
    start_lab,
)

from gateway.config import Direction, Iec104Address, LabConfig
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.points import DoublePoint, Quality
from gateway.protocols.iec104.codec import TypeId
from gateway.protocols.iec104.kinds import is_time_tagged, untagged_type
from gateway.services import RedisServer
from gateway.store import StoredValue

pytestmark = pytest.mark.timeout(60)

STALE = Quality.NOT_TOPICAL | Quality.INVALID
#: The generic gateway behaviour on both IEC 104 client engines (c104 threads, asyncio).
BOTH_ENGINES = pytest.mark.parametrize("lab", ["c104", "asyncio"], indirect=True)


def monitor_names(cfg: LabConfig) -> list[str]:
    return [p.name for p in cfg.points if p.direction is Direction.MONITOR]


async def all_values(lab: Lab) -> dict[str, StoredValue] | None:
    values = await lab.reader.latest_all()
    return values if all(n in values for n in monitor_names(lab.config)) else None


@BOTH_ENGINES
async def test_every_point_reaches_redis_with_times_and_quality(lab: Lab) -> None:
    values = await eventually(lambda: all_values(lab), 5, "every monitor point in Redis")
    for name in monitor_names(lab.config):
        v = values[name]
        assert v.quality == Quality.GOOD, name
        assert v.source_ts is not None and abs(v.source_ts - time.time()) < 60, name
        assert v.recv_ts <= v.store_ts <= time.time() + 0.01, name
        assert v.device == DEVICE
    first = monitor_names(lab.config)[0]
    assert await lab.reader.history(first), "history stream has entries"
    await reported_up(lab.reader, DEVICE)
    if lab.sim is None:
        return  # a real lab: the checks below know the simulator's feeder
    # consistent feeder: S^2 = P^2 + Q^2 within noise, PF = P / S
    p, q, s = (float(values[n].value or 0) for n in ("feeder.p", "feeder.q", "feeder.s"))
    assert s == pytest.approx((p * p + q * q) ** 0.5, rel=0.02)
    assert float(values["feeder.pf"].value or 0) == pytest.approx(p / s, rel=0.02)
    assert 200 < float(values["feeder.voltage.l1"].value or 0) < 260
    assert values["feeder.breaker.position"].value == DoublePoint.ON


async def test_spontaneous_value_reaches_redis(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    sent = sim.set_value("feeder.voltage.l2", 247.25)

    async def arrived() -> StoredValue | None:
        v = await lab.reader.latest("feeder.voltage.l2")
        return v if v is not None and v.value == pytest.approx(247.25, abs=1e-3) else None

    v = await eventually(arrived, 3, "spontaneous value in Redis")
    assert v.cause == "spontaneous"
    assert v.store_ts >= sent
    changes = await lab.reader.redis.xrevrange(lab.reader.keys.changes, count=200)
    assert any(f.get("point") == "feeder.voltage.l2" and float(f["v"]) == pytest.approx(247.25) for _, f in changes)


@BOTH_ENGINES
async def test_breaker_open_close_confirmed_by_status(lab: Lab) -> None:
    need_commands()
    await eventually(lambda: all_values(lab), 5, "initial values")
    for word, state in (("open", DoublePoint.OFF), ("close", DoublePoint.ON)):
        outcome = await lab.gateway.execute("feeder.breaker.command", word, requested_by="hil")
        assert outcome.result == "confirmed", outcome.reason
        assert outcome.sent_ts is not None and outcome.ack_ts is not None and outcome.confirm_ts is not None
        assert outcome.sent_ts <= outcome.ack_ts <= outcome.confirm_ts
        pos = await eventually(
            lambda s=state: _value_is(lab, "feeder.breaker.position", s), 2, f"position {state.name} in Redis"
        )
        assert pos.quality == Quality.GOOD
    # the breaker travelled through the intermediate state, and history kept it
    hist = await lab.reader.history("feeder.breaker.position", count=50)
    assert DoublePoint.INTERMEDIATE in [h.value for h in hist]


async def _value_is(lab: Lab, point: str, value: object) -> StoredValue | None:
    v = await lab.reader.latest(point)
    return v if v is not None and v.value == value else None


async def test_command_through_redis_request_stream_is_logged(lab: Lab) -> None:
    need_commands()
    await eventually(lambda: all_values(lab), 5, "initial values")
    rid = await lab.reader.submit_command("feeder.breaker.command", "open", by="operator-anna")
    reply = await lab.reader.wait_reply(rid, 10)
    assert reply is not None and reply.result == "confirmed", reply
    assert reply.requested_by == "operator-anna" and reply.point == "feeder.breaker.command"
    assert reply.duration_ms is not None and reply.duration_ms > 0
    log = await lab.reader.command_log(10)
    assert [r.request_id for r in log][-1] == rid
    pending = await lab.reader.redis.xpending(lab.reader.keys.cmd_requests, "mgms")
    assert pending["pending"] == 0, "request acknowledged once logged"
    rid2 = await lab.reader.submit_command("feeder.breaker.command", "close", by="operator-anna")
    reply2 = await lab.reader.wait_reply(rid2, 10)
    assert reply2 is not None and reply2.result == "confirmed"


async def test_select_before_operate_and_direct(lab: Lab, base_config: LabConfig, redis_server: RedisServer) -> None:
    sim = need_sim(lab.sim)
    assert lab.config.point("feeder.breaker.command").select_before_operate
    before = sim.stats().as_dict()
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "confirmed", out.reason
    after = sim.stats().as_dict()
    assert after["selects"] == before["selects"] + 1
    assert after["commands"] > before["commands"]
    # the same point, configured direct: no select is sent
    await lab.shutdown()
    direct_cfg = base_config.model_copy(
        update={
            "points": tuple(
                p.model_copy(update={"select_before_operate": False}) if p.name == "feeder.breaker.command" else p
                for p in base_config.points
            )
        }
    )
    # a device configured for direct operate (it refuses an execute without select otherwise)
    sim2 = Iec104Outstation(direct_cfg, DEVICE, host="127.0.0.1", port=0, seed=5)
    await sim2.start()
    lab2 = await start_lab(direct_cfg, redis_server, sim2)
    try:
        out = await lab2.gateway.execute("feeder.breaker.command", "open")
        assert out.result == "confirmed", out.reason
        stats = sim2.stats().as_dict()
        assert stats["selects"] == 0 and stats["commands"] == 1
    finally:
        await lab2.shutdown()
        await lab2.reader.aclose()
        await sim2.close()


async def test_setpoint_confirmed_by_readback(lab: Lab) -> None:
    need_commands()
    out = await lab.gateway.execute("feeder.p_limit.setpoint", "45.5")
    assert out.result == "confirmed", out.reason
    v = await eventually(lambda: _value_is(lab, "feeder.p_limit.actual", pytest.approx(45.5, abs=0.01)), 2, "read-back")
    assert v.unit == "kW"


async def test_single_command_direct(lab: Lab) -> None:
    need_commands()
    for word, expected in (("off", False), ("on", True)):
        out = await lab.gateway.execute("feeder.autoreclose.command", word)
        assert out.result == "confirmed", out.reason
        v = await eventually(lambda e=expected: _value_is(lab, "feeder.autoreclose.enabled", e), 2, "single point")
        assert v.quality == Quality.GOOD


async def test_invalid_commands_are_refused_before_the_device(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    before = sim.stats().as_dict()["commands"]
    for point, value, why in (
        ("feeder.breaker.command", "sideways", "not a double command"),
        ("feeder.voltage.l1", "1", "not a control point"),
        ("no.such.point", "1", "no such point"),
        ("feeder.p_limit.setpoint", "500", "above the maximum"),
    ):
        out = await lab.gateway.execute(point, value)
        assert out.result == "invalid" and why in out.reason, (point, out.reason)
    assert sim.stats().as_dict()["commands"] == before
    # through Redis too: logged as invalid and acknowledged
    rid = await lab.reader.submit_command("feeder.breaker.command", "sideways")
    reply = await lab.reader.wait_reply(rid, 5)
    assert reply is not None and reply.result == "invalid"


@BOTH_ENGINES
async def test_negative_confirmation_is_rejected(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    sim.refuse_commands(True)
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "rejected", out.reason
    assert "negative" in out.reason
    sim.refuse_commands(False)
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "confirmed", out.reason


async def test_unknown_address_is_rejected(base_config: LabConfig, redis_server: RedisServer,
                                           sim: Iec104Outstation | None) -> None:
    real_sim = need_sim(sim)
    # the gateway knows a control point the device does not have
    breaker = base_config.point("feeder.breaker.command")
    ghost = breaker.model_copy(
        update={"name": "feeder.ghost.command", "address": breaker.address.model_copy(update={"ioa": 3999})}
    )
    cfg = base_config.model_copy(update={"points": (*base_config.points, ghost)})
    lab = await start_lab(cfg, redis_server, real_sim)
    try:
        out = await lab.gateway.execute("feeder.ghost.command", "open")
        assert out.result == "rejected"
        assert "unknown information object address" in out.reason or "negative" in out.reason
    finally:
        await lab.shutdown()
        await lab.reader.aclose()


async def test_status_that_does_not_follow_times_out(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    sim.set_breaker_travel(3.0)  # longer than the command's confirm_timeout_s (2 s)
    t0 = time.monotonic()
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "timeout" and "did not reach" in out.reason
    assert 1.9 < time.monotonic() - t0 < 3.5
    assert out.ack_ts is not None and out.confirm_ts is None


@BOTH_ENGINES
async def test_stalled_device_times_out_and_is_flagged_within_t1_t3(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    timers = lab.config.devices[DEVICE].timers
    sim.stall()
    t0 = time.monotonic()
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result in ("timeout", "failed"), out
    assert "ACTCON" in out.reason or "link" in out.reason

    async def all_stale() -> dict[str, StoredValue] | None:
        vals = await lab.reader.latest_all()
        ok = all(STALE in vals[n].quality for n in monitor_names(lab.config))
        return vals if ok else None

    vals = await eventually(all_stale, timers.t1_s + timers.t3_s + 2, "every point flagged NT|IV")
    assert time.monotonic() - t0 <= timers.t1_s + timers.t3_s + 1.5
    assert vals["feeder.voltage.l1"].value is not None, "last value kept"
    assert vals["feeder.voltage.l1"].cause == "link_lost"
    sim.resume()
    await eventually(lambda: _good(lab, "feeder.voltage.l1"), 10, "recovery after resume")


async def _good(lab: Lab, point: str) -> StoredValue | None:
    v = await lab.reader.latest(point)
    return v if v is not None and v.quality == Quality.GOOD else None


@BOTH_ENGINES
async def test_gi_after_reconnect_restores_good_values(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    before = sim.stats().as_dict()["interrogations"]
    sim.drop()
    await eventually(lambda: _stale(lab, "feeder.frequency"), 5, "flagged after drop")
    v = await eventually(lambda: _good_cause(lab, "feeder.frequency", "interrogated"), 10, "GI after reconnect")
    assert v.quality == Quality.GOOD
    assert sim.stats().as_dict()["interrogations"] > before
    await reported_up(lab.reader, DEVICE, reconnects=1)


async def _stale(lab: Lab, point: str) -> StoredValue | None:
    v = await lab.reader.latest(point)
    return v if v is not None and STALE in v.quality else None


async def _good_cause(lab: Lab, point: str, cause: str) -> StoredValue | None:
    v = await lab.reader.latest(point)
    return v if v is not None and v.quality == Quality.GOOD and v.cause == cause else None


async def test_simulator_killed_and_restarted(base_config: LabConfig, redis_server: RedisServer) -> None:
    if lab_is_real():
        pytest.skip("kills the simulator")
    sim = Iec104Outstation(base_config, DEVICE, host="127.0.0.1", port=0, seed=3)
    await sim.start()
    port = sim.port
    lab = await start_lab(base_config, redis_server, sim)
    try:
        await eventually(lambda: all_values(lab), 5, "initial values")
        await sim.close()
        await eventually(lambda: _stale(lab, "feeder.p"), 5, "flagged after the simulator died")
        link = await lab.reader.link(DEVICE)
        assert link is not None and link.state in ("down", "connecting")
        await asyncio.sleep(1.0)  # a few failed reconnect attempts
        sim2 = Iec104Outstation(base_config, DEVICE, host="127.0.0.1", port=port, seed=4)
        await sim2.start()
        try:
            await eventually(lambda: _good(lab, "feeder.p"), 10, "recovered after restart")
            out = await lab.gateway.execute("feeder.breaker.command", "open")
            assert out.result == "confirmed"
        finally:
            await lab.shutdown()
            await sim2.close()
    finally:
        await lab.reader.aclose()
        if not lab.task.done():
            await lab.shutdown()


def lab_is_real() -> bool:
    from hilkit import REAL_CONFIG

    return bool(REAL_CONFIG)


async def test_redis_restart_loses_nothing_acknowledged(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    await lab.store.flush(5)
    before = await lab.reader.latest("feeder.voltage.l3")
    assert before is not None
    hist_before = await lab.reader.history("feeder.voltage.l3", count=10_000)
    # Redis goes away hard (SIGKILL: only what AOF has survives); values keep coming meanwhile
    await asyncio.to_thread(lab.redis.stop, hard=True)
    sim.set_value("feeder.voltage.l3", 239.75)
    await asyncio.sleep(0.5)
    await asyncio.to_thread(lab.redis.start)
    v = await eventually(lambda: _value_is(lab, "feeder.voltage.l3", pytest.approx(239.75, abs=1e-3)), 10,
                         "value produced during the outage written after Redis came back")
    assert v.quality == Quality.GOOD
    hist_after = await lab.reader.history("feeder.voltage.l3", count=10_000)
    ids_after = {h.id for h in hist_after}
    assert all(h.id in ids_after for h in hist_before), "history acknowledged before the crash survived"
    stats = lab.store.stats()
    assert stats.get("updates_dropped", 0) == 0
    # and commands still work
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "confirmed"
    rid = await lab.reader.submit_command("feeder.breaker.command", "close")
    reply = await lab.reader.wait_reply(rid, 10)
    assert reply is not None and reply.result == "confirmed"


async def test_gateway_restart_resumes_pending_requests(base_config: LabConfig, redis_server: RedisServer,
                                                        sim: Iec104Outstation | None) -> None:
    real_sim = need_sim(sim)
    lab = await start_lab(base_config, redis_server, real_sim)
    await lab.shutdown()
    # a request arrives while no gateway runs
    rid = await lab.reader.submit_command("feeder.breaker.command", "open", by="night-shift")
    await lab.reader.aclose()
    lab2 = await start_lab(base_config, redis_server, real_sim)
    try:
        reply = await lab2.reader.wait_reply(rid, 10)
        assert reply is not None and reply.result == "confirmed" and reply.requested_by == "night-shift"
        # the latest values written by the first run are still there
        assert await lab2.reader.latest("feeder.voltage.l1") is not None
    finally:
        await lab2.shutdown()
        await lab2.reader.aclose()


@BOTH_ENGINES
async def test_quality_bits_from_the_device_are_kept(lab: Lab) -> None:
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    sim.set_value("feeder.current.l2", 61.5, Quality.SUBSTITUTED | Quality.BLOCKED)

    async def flagged() -> StoredValue | None:
        v = await lab.reader.latest("feeder.current.l2")
        return v if v is not None and v.quality == Quality.SUBSTITUTED | Quality.BLOCKED else None

    v = await eventually(flagged, 3, "quality bits in Redis")
    assert v.value == pytest.approx(61.5, abs=1e-3)
    assert set(v.flags) == {"substituted", "blocked"}
    hist = await lab.reader.history("feeder.current.l2", count=5)
    assert hist[-1].quality == Quality.SUBSTITUTED | Quality.BLOCKED


async def test_periodic_general_interrogation(base_config: LabConfig, redis_server: RedisServer,
                                              sim: Iec104Outstation | None) -> None:
    real_sim = need_sim(sim)
    lab = await start_lab(base_config, redis_server, real_sim, gi_period_s=0.5)
    try:
        first = real_sim.stats().as_dict()["interrogations"]

        async def more() -> bool:
            return real_sim.stats().as_dict()["interrogations"] >= first + 2

        await eventually(more, 5, "two more general interrogations")
        assert lab.gateway.adapters[DEVICE].stats()["interrogations"] >= 2
    finally:
        await lab.shutdown()
        await lab.reader.aclose()


@BOTH_ENGINES
async def test_read_one_point_on_request(lab: Lab) -> None:
    need_sim(lab.sim)
    upd = await lab.gateway.adapters[DEVICE].read("feeder.frequency")
    assert upd.point == "feeder.frequency" and 49.0 < float(upd.value or 0) < 51.0
    assert upd.cause == "requested" and upd.quality == Quality.GOOD


@BOTH_ENGINES
async def test_adapter_counters_reach_the_device_hash(lab: Lab) -> None:
    need_commands()
    out = await lab.gateway.execute("feeder.breaker.command", "open")
    assert out.result == "confirmed"

    async def counted() -> dict[str, str] | None:
        h = await lab.reader.redis.hgetall(lab.reader.keys.device(DEVICE))
        return h if int(h.get("stat.commands", "0")) >= 1 else None

    h = await eventually(counted, 3, "adapter stats in the device hash")
    assert int(h["stat.connects"]) >= 1 and int(h["stat.values"]) > 0
    assert h["state"] == "up"


async def test_a_nan_from_the_device_is_invalid_and_later_values_flow(lab: Lab) -> None:
    # An IEEE 754 NaN is a legal M_ME_TF_1 bit pattern (a failed sensor, an RTU's division by
    # zero): the gateway must flag it invalid, count it, and store what follows.
    sim = need_sim(lab.sim)
    await eventually(lambda: all_values(lab), 5, "initial values")
    point = "feeder.voltage.l3"
    sim.set_value(point, float("nan"))
    bad = await eventually(lambda: _nan_stored(lab, point), 3, "the NaN in Redis")
    assert Quality.INVALID in bad.quality and "invalid" in bad.quality.flags()
    assert lab.gateway.counters["non_finite_values"] >= 1
    for v in (231.5, 233.5, 235.5):
        sim.set_value(point, v)
        good = await eventually(lambda v=v: _value_is(lab, point, v), 3, f"{v} V after the NaN")
        assert good.quality == Quality.GOOD
    hist = [h.value for h in await lab.reader.history(point, count=10)]
    assert hist[-3:] == [231.5, 233.5, 235.5]


async def _nan_stored(lab: Lab, point: str) -> StoredValue | None:
    v = await lab.reader.latest(point)
    return v if v is not None and isinstance(v.value, float) and v.value != v.value else None


@pytest.mark.parametrize("engine", [pytest.param("c104", marks=pytest.mark.forked), "asyncio"])
async def test_field_like_gi_and_changes_all_stored_and_back_within_one_gi(
    engine: str, base_config: LabConfig, redis_server: RedisServer
) -> None:
    """The simulator answers GI untagged and sends changes time-tagged, as a COM600 does, and
    the lab config's points are time-tagged: on each engine every GI answer is stored (its
    receive time as source_ts, ``source_ts_from: receive``), every change with its value and
    exact time tag (``device``), and after the outstation is killed and restarted every point
    is good again after one GI. (The c104 engine stored none of the GI answers before it
    decoded the raw frames: the breaker stayed ``not_topical,invalid`` after a restart.)"""
    if lab_is_real():
        pytest.skip("kills the simulator")
    still = _still_feeder(base_config)  # only the test's changes are sent spontaneously
    sim = Iec104Outstation(still, DEVICE, host="127.0.0.1", port=0, seed=3)
    await sim.start()
    port = sim.port
    lab = await start_lab(base_config, redis_server, sim, iec104_engine=engine, gi_period_s=0)
    names = monitor_names(lab.config)
    try:
        values = await eventually(lambda: all_values(lab), 5, "every GI answer in Redis")
        for name in names:
            v = values[name]
            assert v.cause == "interrogated" and v.quality == Quality.GOOD, name
            assert v.time_substituted and v.source_ts == v.recv_ts, name
        changes = [(n, 150.0 + i) for i, n in enumerate(n for n in names if n.startswith("feeder.voltage"))]
        sent = {n: sim.set_value(n, value) for n, value in changes}

        async def changed() -> dict[str, StoredValue] | None:
            got = await lab.reader.latest_all()
            ok = all(got[n].value == pytest.approx(value) for n, value in changes)
            return got if ok else None

        got = await eventually(changed, 3, "every change in Redis")
        for n, _ in changes:
            assert got[n].source_ts_from == "device" and not got[n].time_substituted, n
            assert int((got[n].source_ts or 0) * 1000) == int(sent[n] * 1000), n  # CP56Time2a: ms
            hist = await lab.reader.history(n)
            assert any(not e.time_substituted and e.source_ts == got[n].source_ts for e in hist), n
        await sim.close()
        await eventually(lambda: _stale(lab, "feeder.breaker.position"), 5, "flagged after the simulator died")
        back = time.time()
        sim2 = Iec104Outstation(still, DEVICE, host="127.0.0.1", port=port, seed=4)
        await sim2.start()
        try:

            async def all_good() -> dict[str, StoredValue] | None:
                got = await lab.reader.latest_all()
                fresh = all(n in got and got[n].quality == Quality.GOOD and got[n].recv_ts >= back for n in names)
                return got if fresh else None

            await eventually(all_good, 10, "every point good after the restart")
            assert sim2.stats().interrogations == 1
        finally:
            await lab.shutdown()
            await sim2.close()
    finally:
        await lab.reader.aclose()
        if not lab.task.done():
            await lab.shutdown()


def _still_feeder(cfg: LabConfig) -> LabConfig:
    """The simulator's feeder steps once an hour: no spontaneous value but the test's own."""
    return cfg.with_device(DEVICE, simulator={**cfg.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0})


def _configured_untagged(cfg: LabConfig) -> LabConfig:
    """The lab with its 104 monitor points configured in the untagged types (M_ME_NC_1, ...)."""
    points = []
    for p in cfg.points:
        addr = p.address
        if isinstance(addr, Iec104Address) and not addr.is_control and is_time_tagged(addr.type):
            untagged = TypeId(untagged_type(addr.type)).name
            p = p.model_copy(update={"address": addr.model_copy(update={"type": untagged})})
        points.append(p)
    return cfg.model_copy(update={"points": tuple(points)})


@pytest.mark.parametrize("engine", [pytest.param("c104", marks=pytest.mark.forked), "asyncio"])
async def test_points_configured_untagged_take_tagged_changes_and_confirm_commands(
    engine: str, base_config: LabConfig, redis_server: RedisServer
) -> None:
    """The other way round: the gateway's points configured untagged, the outstation sending
    changes time-tagged. Each change is stored with the device's time tag and a breaker move
    is confirmed by its (tagged) position on both engines; the c104 engine dropped those
    changes and the command ended ``timeout`` before it decoded the raw frames."""
    if lab_is_real():
        pytest.skip("needs the simulator's lab config beside an altered one")
    need_commands()
    sim = Iec104Outstation(_still_feeder(base_config), DEVICE, host="127.0.0.1", port=0, seed=3)
    await sim.start()
    lab = await start_lab(_configured_untagged(base_config), redis_server, sim, iec104_engine=engine)
    try:
        values = await eventually(lambda: all_values(lab), 5, "every GI answer in Redis")
        assert all(v.time_substituted for v in values.values())  # GI untagged, as configured
        sent = sim.set_value("feeder.frequency", 50.125)
        v = await eventually(lambda: _value_is(lab, "feeder.frequency", 50.125), 3, "tagged change in Redis")
        assert v.source_ts_from == "device" and int((v.source_ts or 0) * 1000) == int(sent * 1000)
        for word, state in (("open", DoublePoint.OFF), ("close", DoublePoint.ON)):
            outcome = await lab.gateway.execute("feeder.breaker.command", word, requested_by="hil")
            assert outcome.result == "confirmed", outcome.reason
            pos = await eventually(lambda s=state: _value_is(lab, "feeder.breaker.position", s), 2, "position")
            assert pos.source_ts_from == "device" and pos.quality == Quality.GOOD
        assert lab.gateway.adapters[DEVICE].stats().get("type_mismatch", 0) == 0
    finally:
        await lab.shutdown()
        await lab.reader.aclose()
        await sim.close()
