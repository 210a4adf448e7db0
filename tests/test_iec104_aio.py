"""The asyncio IEC 104 engine against the real simulator (and, for garbage, a raw server).

Same event loop for simulator and adapter; no mocks. Covered: values with their types,
quality and CP56Time2a source time; general interrogation; select-before-operate confirmed
by the status point; negative ACTCON, command timeout and read_only as typed errors; the
simulator going away and coming back; garbled frames and ASDUs; acknowledgement (w, t2),
TESTFR (t3) and t1; TLS; engine selection from the config.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from iec104kit import DEVICE, FAST, Starter, Watched, outstations_and_adapters, until

from gateway.config import LabConfig, load_config
from gateway.errors import CommandInvalid, CommandRejected, CommandTimeout, ConfigError, LinkError
from gateway.iedsim.iec104 import Iec104Outstation
from gateway.iedsim.pki import LabPki, make_lab_pki
from gateway.points import CommandRequest, DoublePoint, PointUpdate, Quality, UpdateCause
from gateway.protocols import create_adapter
from gateway.protocols.base import LinkState, LinkStateChange
from gateway.protocols.iec104.aio import AsyncIec104Adapter
from gateway.protocols.iec104.codec import (
    Asdu,
    Cot,
    Cp56Time,
    FloatInfo,
    FrameDecoder,
    IFrame,
    InfoObject,
    TypeId,
    UFrame,
    UFunction,
    encode_asdu,
    encode_frame,
)

pytestmark = pytest.mark.timeout(40)

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"


@pytest.fixture(scope="module")
def base() -> LabConfig:
    lab = load_config(SIM_CONFIG)
    sim = {**lab.devices[DEVICE].simulator.model_dump(), "period_s": 3600.0, "seed": 5}
    return lab.with_device(DEVICE, simulator=sim)


def gateway_config(cfg: LabConfig, port: int, **device: Any) -> LabConfig:
    changes: dict[str, Any] = {
        "port": port,
        "timers": FAST,
        "reconnect": {"initial_s": 0.1, "max_s": 0.3},
        "gi_period_s": 0,
        "iec104_engine": "asyncio",
        **device,
    }
    return cfg.with_device(DEVICE, **changes)


@pytest.fixture
async def running() -> AsyncIterator[Starter]:
    async with outstations_and_adapters() as start:
        yield start


def adapter_for(cfg: LabConfig) -> AsyncIec104Adapter:
    adapter = create_adapter(cfg.devices[DEVICE], cfg.points_of(DEVICE))
    assert isinstance(adapter, AsyncIec104Adapter)
    return adapter


def monitor_names(cfg: LabConfig) -> set[str]:
    return {p.name for p in cfg.points_of(DEVICE) if p.direction.value == "monitor"}


async def connected(base: LabConfig, running: Starter, **device: Any) -> tuple[Iec104Outstation, Watched, LabConfig]:
    sim: Iec104Outstation = await running(base)
    cfg = gateway_config(base, sim.port, **device)
    w: Watched = await running(adapter_for(cfg))
    await w.adapter.wait_connected(5)
    return sim, w, cfg


def interrogated(w: Watched, names: set[str], after: float = 0.0) -> bool:
    got = {v.point for v in w.values if v.cause is UpdateCause.INTERROGATED and v.receive_time >= after}
    return names <= got


# ---------------------------------------------------------------------------------------
# values


async def test_values_arrive_with_types_quality_and_source_time(base: LabConfig, running: Starter) -> None:
    sim, w, cfg = await connected(base, running)
    names = monitor_names(cfg)
    await until(lambda: interrogated(w, names), 5, "general interrogation after connect")
    sim_values = sim.values()
    for name in names:
        upd = w.latest(name)
        assert upd is not None and upd.quality is Quality.GOOD, name
        # the simulator answers GI untagged, as the field does: the receive time stands in
        assert upd.time_substituted and upd.source_time == upd.receive_time, name
    assert isinstance(w.latest("feeder.voltage.l1").value, float)  # type: ignore[union-attr]
    position = w.latest("feeder.breaker.position")
    assert position is not None and type(position.value) is int and position.value == DoublePoint.ON
    ar = w.latest("feeder.autoreclose.enabled")
    assert ar is not None and type(ar.value) is bool
    # scale applies: feeder.p is sent in W, configured in kW
    p = w.latest("feeder.p")
    assert p is not None and p.value == pytest.approx(sim_values["feeder.p"].value, rel=1e-6)

    sent = sim.set_value("feeder.voltage.l2", 241.5, quality=Quality.SUBSTITUTED | Quality.NOT_TOPICAL)
    upd = await until(lambda: w.latest("feeder.voltage.l2", lambda u: u.value == 241.5), 3, "spontaneous value")
    assert upd.cause is UpdateCause.SPONTANEOUS
    assert upd.quality == Quality.SUBSTITUTED | Quality.NOT_TOPICAL
    assert upd.source_time == pytest.approx(sent, abs=0.002) and not upd.time_substituted
    assert sent <= upd.receive_time < sent + 0.5
    stats = w.adapter.stats()
    assert stats["values"] == len(w.values) and stats["connects"] == 1
    assert stats.get("garbled_frames", 0) == 0 and stats.get("unknown_points", 0) == 0


async def test_interrogate_and_read(base: LabConfig, running: Starter) -> None:
    sim, w, cfg = await connected(base, running)
    names = monitor_names(cfg)
    await until(lambda: interrogated(w, names), 5, "first interrogation")
    before = time.time()
    await w.adapter.interrogate()
    await until(lambda: interrogated(w, names, after=before), 5, "second interrogation")
    assert sim.stats().interrogations == 2
    upd = await w.adapter.read("feeder.frequency")
    assert upd.point == "feeder.frequency" and upd.cause is UpdateCause.REQUESTED
    with pytest.raises(CommandInvalid):
        await w.adapter.read("feeder.breaker.command")


# ---------------------------------------------------------------------------------------
# commands


async def test_select_before_operate_double_command_confirmed_by_status(base: LabConfig, running: Starter) -> None:
    sim, w, _ = await connected(base, running)
    await until(lambda: w.latest("feeder.breaker.position"), 5, "breaker position")
    t0 = time.time()
    acked = await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    assert t0 <= acked <= time.time()
    assert sim.stats().selects == 1  # the point says select_before_operate: select, then execute
    await until(
        lambda: w.latest("feeder.breaker.position", lambda u: u.value == DoublePoint.OFF and u.receive_time >= t0),
        3,
        "breaker open reported",
    )
    # a second command on the same point waits for the first one's ACTTERM, then goes through
    await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.ON))
    await until(lambda: w.latest("feeder.breaker.position", lambda u: u.value == DoublePoint.ON), 3, "closed again")
    assert w.adapter.stats()["actterm"] >= 1
    # a set-point and a direct single command
    await w.adapter.command(CommandRequest("feeder.p_limit.setpoint", 50_000.0))
    await until(lambda: w.latest("feeder.p_limit.actual", lambda u: u.value == pytest.approx(50.0)), 3, "read-back")
    await w.adapter.command(CommandRequest("feeder.autoreclose.command", False))
    await until(lambda: w.latest("feeder.autoreclose.enabled", lambda u: u.value is False), 3, "auto-reclose off")


async def test_negative_confirmation_is_command_rejected(base: LabConfig, running: Starter) -> None:
    sim, w, _ = await connected(base, running)
    sim.refuse_commands(True)
    with pytest.raises(CommandRejected, match="negative confirmation of select"):
        await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    with pytest.raises(CommandRejected, match="negative confirmation of execute"):
        await w.adapter.command(CommandRequest("feeder.autoreclose.command", True))
    assert w.adapter.stats()["negative_confirmations"] == 2
    with pytest.raises(CommandInvalid, match="1 \\(off\\) or 2 \\(on\\)"):
        await w.adapter.command(CommandRequest("feeder.breaker.command", 3))
    assert w.adapter.link_state is LinkState.UP


async def test_command_timeout_then_t1_closes_the_link(base: LabConfig, running: Starter) -> None:
    sim, w, _ = await connected(base, running, command_timeout_s=0.5)
    await until(lambda: w.values, 5, "values")
    sim.stall()
    with pytest.raises(CommandTimeout, match=r"no ACTCON of select within 0\.5 s"):
        await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    # the I-frame (and then TESTFR) stays unacknowledged: t1 = 2 s closes the link
    down = await until(lambda: next(iter(w.downs()), None), 5, "link down on t1")
    assert "t1 = 2 s expired" in down.reason, down.reason
    assert w.adapter.stats()["t1_timeouts"] == 1
    sim.resume()
    await w.adapter.wait_connected(5)


async def test_read_only_device_refuses_commands(base: LabConfig, running: Starter) -> None:
    sim, w, _ = await connected(base, running, read_only=True)
    with pytest.raises(CommandInvalid, match="read-only"):
        await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    with pytest.raises(CommandInvalid, match="not a control point"):
        await w.adapter.command(CommandRequest("feeder.voltage.l1", 1.0))
    assert sim.stats().commands == 0


# ---------------------------------------------------------------------------------------
# link loss and protocol supervision


async def test_simulator_killed_and_restarted(base: LabConfig, running: Starter) -> None:
    sim, w, cfg = await connected(base, running)
    names = monitor_names(cfg)
    await until(lambda: interrogated(w, names), 5, "first interrogation")
    port = sim.port
    await sim.close()
    down = await until(lambda: next(iter(w.downs()), None), 5, "link down")
    assert "closed by the device" in down.reason or "connection lost" in down.reason, down.reason
    with pytest.raises(LinkError, match="link is"):
        await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    await until(lambda: len(w.downs()) >= 2, 5, "reconnect refused while the simulator is gone")
    back_at = time.time()
    await running(base, port)
    await w.adapter.wait_connected(5)
    await until(lambda: interrogated(w, names, after=back_at), 5, "interrogation after reconnect")
    assert w.adapter.stats()["connects"] == 2
    assert [c.state for c in w.links][:3] == [LinkState.CONNECTING, LinkState.UP, LinkState.DOWN]


async def test_acknowledges_so_the_device_sends_beyond_k(base: LabConfig, running: Starter) -> None:
    sim, w, _ = await connected(base, running)
    await until(lambda: w.values, 5, "values")
    start = len(w.values)
    for i in range(150):  # 150 I-frames, k = 12: the simulator only goes on if we acknowledge
        sim.set_value("feeder.voltage.l3", 200.0 + i)
        if i % 20 == 0:
            await asyncio.sleep(0)
    await until(lambda: w.latest("feeder.voltage.l3", lambda u: u.value == 349.0), 5, "all 150 values")
    got = [v.value for v in w.values[start:] if v.point == "feeder.voltage.l3"]
    assert got == [200.0 + i for i in range(150)]
    assert sim.stats().drops == 0
    # then a few frames (< w) and silence: t2 acknowledges them before the device's t1 (2 s)
    for i in range(3):
        sim.set_value("feeder.voltage.l3", 100.0 + i)
    s_frames = w.adapter.stats()["s_frames_out"]
    await asyncio.sleep(2.6)
    stats = w.adapter.stats()
    assert stats["s_frames_out"] > s_frames
    assert stats["testfr_sent"] >= 1  # t3 = 1 s idle: TESTFR act, answered (link still up)
    assert not w.downs() and w.adapter.link_state is LinkState.UP


class RawDevice:
    """A tiny IEC 104 'device' that answers STARTDT and then sends whatever the test says."""

    def __init__(self, script: Callable[[int], bytes]) -> None:
        self.script = script
        self.connections = 0
        self.i_frames_in = 0  # I-frames the client sent (never acknowledged by this device)
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        n = self.connections
        decoder = FrameDecoder()
        try:
            async with asyncio.timeout(10):
                while True:
                    data = await reader.read(4096)
                    if not data:
                        return
                    for frame in decoder.feed(data):
                        self.i_frames_in += isinstance(frame, IFrame)
                        if frame == UFrame(UFunction.STARTDT_ACT):
                            writer.write(encode_frame(UFrame(UFunction.STARTDT_CON)) + self.script(n))
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def value_frame(seq: int, value: float) -> bytes:
    obj = InfoObject(1001, FloatInfo(value), Cp56Time.from_timestamp(time.time()))
    return encode_frame(IFrame(seq, 0, encode_asdu(Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, (obj,)))))


async def test_garbled_frame_is_counted_and_the_link_reconnects(base: LabConfig, running: Starter) -> None:
    def script(n: int) -> bytes:
        if n == 1:  # a value, a garbled ASDU (length does not fit), a value, then garbage
            bad_asdu = bytes((36, 2, 3, 0, 1, 0)) + bytes(15)  # says 2 objects, carries 1
            bad = encode_frame(IFrame(1, 0, bad_asdu))
            return value_frame(0, 231.0) + bad + value_frame(2, 232.0) + b"\x68\x02\xff\xff garbage"
        return value_frame(0, 233.0)

    device = RawDevice(script)
    port = await device.start()
    try:
        w: Watched = await running(adapter_for(gateway_config(base, port)))
        await until(lambda: w.latest("feeder.voltage.l1", lambda u: u.value == 233.0), 5, "value after reconnect")
        assert [v.value for v in w.values if v.point == "feeder.voltage.l1"] == [231.0, 232.0, 233.0]
        down = w.downs()[0]
        assert down.reason.startswith("garbled frame: APDU length octet 2"), down.reason
        stats = w.adapter.stats()
        assert stats["garbled_frames"] == 1 and stats["garbled_asdus"] == 1 and stats["connects"] == 2
        assert w.adapter.link_state is LinkState.UP
    finally:
        await device.close()


async def test_sequence_gap_closes_the_link(base: LabConfig, running: Starter) -> None:
    device = RawDevice(lambda n: value_frame(0, 240.0) + value_frame(5, 241.0))
    port = await device.start()
    try:
        w: Watched = await running(adapter_for(gateway_config(base, port)))
        down = await until(lambda: next(iter(w.downs()), None), 5, "link down")
        assert "N(S) 5, expected 1" in down.reason
        assert [v.value for v in w.values if v.point == "feeder.voltage.l1"][:1] == [240.0]
        assert w.adapter.stats()["sequence_errors"] >= 1
    finally:
        await device.close()


async def test_own_i_frames_respect_k(base: LabConfig, running: Starter) -> None:
    device = RawDevice(lambda n: b"")  # answers STARTDT, then acknowledges nothing
    port = await device.start()
    try:
        w: Watched = await running(adapter_for(gateway_config(base, port, command_timeout_s=0.5)))
        await w.adapter.wait_connected(5)
        reads = [asyncio.ensure_future(w.adapter.read("feeder.frequency")) for _ in range(15)]
        done = await asyncio.gather(*reads, return_exceptions=True)
        assert all(isinstance(r, CommandTimeout) for r in done), done
        # the GI after connect and 11 reads fill k = 12; the other 4 reads wait for acknowledgements
        assert device.i_frames_in == 12
        assert w.adapter.stats()["k_window_waits"] == 4
        down = await until(lambda: next(iter(w.downs()), None), 5, "t1 on the unacknowledged I-frames")
        assert "t1 = 2 s expired: I-frame 0 not acknowledged" in down.reason
    finally:
        await device.close()


# ---------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return make_lab_pki(tmp_path_factory.mktemp("pki"))


def tls_sim_config(base: LabConfig, pki: LabPki) -> LabConfig:
    sim = {
        **base.devices[DEVICE].simulator.model_dump(),
        "tls_cert_file": str(pki.server.cert),
        "tls_key_file": str(pki.server.key),
        "tls_ca_file": str(pki.ca),
    }
    return base.with_device(DEVICE, tls={"enabled": True, "ca_file": str(pki.ca)}, simulator=sim)


async def test_tls_values_commands_and_refusals(base: LabConfig, pki: LabPki, running: Starter) -> None:
    sim: Iec104Outstation = await running(tls_sim_config(base, pki))
    files = {"ca_file": str(pki.ca), "cert_file": str(pki.client.cert), "key_file": str(pki.client.key)}
    w: Watched = await running(adapter_for(gateway_config(base, sim.port, tls={"enabled": True, **files})))
    await w.adapter.wait_connected(5)
    await until(lambda: interrogated(w, monitor_names(base)), 5, "interrogation over TLS")
    await w.adapter.command(CommandRequest("feeder.breaker.command", DoublePoint.OFF))
    assert sim.stats().connections_accepted == 1 and sim.stats().tls_refused == 0

    rogue = {**files, "ca_file": str(pki.rogue_ca)}
    bad: Watched = await running(adapter_for(gateway_config(base, sim.port, tls={"enabled": True, **rogue})))
    down = await until(lambda: next(iter(bad.downs()), None), 10, "refused device certificate")
    assert down.reason.startswith("TLS: device certificate refused"), down.reason
    stranger = {**files, "cert_file": str(pki.rogue_client.cert), "key_file": str(pki.rogue_client.key)}
    refused: Watched = await running(adapter_for(gateway_config(base, sim.port, tls={"enabled": True, **stranger})))
    downs = await until(lambda: refused.downs() if len(refused.downs()) >= 2 else None, 10,
                        "our certificate refused, retried")
    assert all("refuse our certificate" in d.reason for d in downs), [d.reason for d in downs]
    assert refused.adapter.link_state is not LinkState.UP


# ---------------------------------------------------------------------------------------
# configuration


def test_engine_is_chosen_by_config_and_only_for_iec104(base: LabConfig, tmp_path: Path) -> None:
    assert base.devices[DEVICE].iec104_engine == "asyncio"  # the default
    assert isinstance(adapter_for(gateway_config(base, 2404)), AsyncIec104Adapter)
    with pytest.raises(ValueError, match="iec104_engine is for protocol iec104 devices, not iec61850"):
        base.with_device("ref615_mms", iec104_engine="c104")
    lab = tmp_path / "lab.yaml"
    lab.write_text(f"extends: {SIM_CONFIG}\ndevices:\n  ref615_mms:\n    iec104_engine: c104\n")
    with pytest.raises(ConfigError) as err:
        load_config(lab)
    [issue] = err.value.issues
    assert (issue.file, issue.line, issue.key) == (str(lab), 4, "devices.ref615_mms.iec104_engine")


async def test_event_queue_drops_the_oldest_and_counts_them() -> None:
    from gateway.protocols.iec104.aio import _EventQueue

    queue = _EventQueue(5)
    ups: list[PointUpdate | LinkStateChange] = [PointUpdate(f"p{i}", float(i)) for i in range(9)]
    queue.put_many(ups[:3])
    queue.put_many(ups[3:7])  # 7 > 5: the two oldest go
    assert queue.dropped == 2 and await queue.get_batch() == ups[2:7]
    queue.put_many(ups[:2])
    queue.put_many(ups[2:9])  # more new ones than fit: the queue keeps the newest 5
    assert queue.dropped == 6 and await queue.get_batch(limit=3) == ups[4:7]
    assert await queue.get_batch() == ups[7:9]
    waiting = asyncio.ensure_future(queue.get_batch())
    await asyncio.sleep(0)
    queue.wake()  # as close() does
    assert await waiting == []  # woken with nothing: the consumer looks at closing
