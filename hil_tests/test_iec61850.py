"""HIL: the gateway against the REF615-class IEC 61850 simulator and a real redis-server.

The 61850 view of the relay (device ``ref615_mms`` of multipower-sim.yaml) alone: values by
buffered reports into Redis with quality and source time, breaker direct and SBO confirmed
by the position, the APC power-limit set-point confirmed by its read-back, a misspelt
reference reported, an interlocked operation rejected, and a simulator restart seen as link
down (points flagged) then resynchronised.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from hilkit import SIM_CONFIG, eventually

from gateway.config import LabConfig, Point, load_config
from gateway.iedsim.iec61850 import Iec61850Server
from gateway.points import Quality
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import RedisStore

MMS = "ref615_mms"
FAST = {"reconnect": {"initial_s": 0.1, "max_s": 0.5}, "command_timeout_s": 3}


@pytest.fixture
def mms_config() -> LabConfig:
    return load_config(SIM_CONFIG).only(MMS)


@pytest.fixture
async def mms_sim(mms_config: LabConfig) -> AsyncIterator[Iec61850Server]:
    server = Iec61850Server(mms_config, MMS, host="127.0.0.1", port=0, seed=7)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class MmsLab:
    def __init__(self, config: LabConfig, redis: RedisServer, sim: Iec61850Server | int) -> None:
        port = sim if isinstance(sim, int) else sim.port
        self.config = config.with_device(MMS, port=port, **FAST)
        self.store = RedisStore.from_url(self.config, redis.client_url())
        self.reader = RedisStore.from_url(self.config, redis.client_url())
        self.gateway = Gateway(self.config, self.store)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> MmsLab:
        self.task = asyncio.create_task(self.gateway.run(self.stop), name="gateway")
        await self.gateway.wait_connected(10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 15)
        await self.reader.aclose()


def _monitor(cfg: LabConfig) -> list[Point]:
    return [p for p in cfg.points if p.direction.value == "monitor"]


async def test_values_reach_redis_by_report_with_quality_and_time(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server
) -> None:
    async with MmsLab(mms_config, redis_server, mms_sim) as lab:
        names = {p.name for p in _monitor(lab.config)}

        async def all_there() -> bool:
            return names <= (await lab.reader.latest_all()).keys()

        await eventually(all_there, 5, "every 61850 point in Redis")
        v = await lab.reader.latest("mms.feeder.voltage.l1")
        assert v is not None and v.quality == Quality.GOOD and v.source_ts is not None
        assert 200 < float(v.value) < 260  # type: ignore[arg-type]
        # a change in the IED arrives by report (no polling: the simulator period is 1 s)
        sent = time.time()
        mms_sim.set_value("mms.feeder.voltage.l1", 241.5)

        async def changed() -> bool:
            got = await lab.reader.latest("mms.feeder.voltage.l1")
            return got is not None and abs(float(got.value) - 241.5) < 1e-3  # type: ignore[arg-type]

        await eventually(changed, 2, "reported change stored")
        got = await lab.reader.latest("mms.feeder.voltage.l1")
        assert got is not None and got.source_ts is not None and abs(got.source_ts - sent) < 1.0
        stats = lab.gateway.adapters[MMS].stats()
        assert stats.get("reports", 0) > 0 and stats.get("missing_references", 0) == 0
        mms_sim.set_quality("mms.feeder.frequency", invalid=True)

        async def flagged() -> bool:
            got = await lab.reader.latest("mms.feeder.frequency")
            return got is not None and Quality.INVALID in got.quality

        await eventually(flagged, 2, "invalid quality reported")
        # a read on request still works next to the reports
        read = await lab.gateway.adapters[MMS].read("mms.feeder.voltage.l1")
        assert read.value == pytest.approx(241.5) and read.cause.value == "requested"
        await lab.gateway.adapters[MMS].interrogate()


@pytest.mark.parametrize("point", ["mms.feeder.breaker.command", "mms.feeder.breaker.command_sbo"])
async def test_breaker_direct_and_sbo_confirmed(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server, point: str
) -> None:
    async with MmsLab(mms_config, redis_server, mms_sim) as lab:
        for word, state in (("open", 1), ("close", 2)):
            out = await lab.gateway.execute(point, word, requested_by="hil")
            assert out.result == "confirmed", out.reason


            async def stored(state: int = state) -> bool:
                pos = await lab.reader.latest("mms.feeder.breaker.position")
                return pos is not None and pos.value == state

            await eventually(stored, 2, f"position {state} in Redis")
        assert mms_sim.operations == 2


async def test_power_limit_setpoint_confirmed_by_readback(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server
) -> None:
    """APC DWMX1.WMaxSpt: operate in W, confirmed by the core from the mxVal read-back in kW."""
    async with MmsLab(mms_config, redis_server, mms_sim) as lab:
        for kw in (120.0, 42.5):
            out = await lab.gateway.execute("mms.feeder.p_limit.setpoint", kw, requested_by="hil")
            assert out.result == "confirmed", out.reason

            async def stored(kw: float = kw) -> bool:
                got = await lab.reader.latest("mms.feeder.p_limit.actual")
                return got is not None and abs(float(got.value) - kw) < 0.01  # type: ignore[arg-type]

            await eventually(stored, 2, f"read-back {kw} kW in Redis")
        assert mms_sim.setpoints == 2
        assert mms_sim.model.p_limit_w == pytest.approx(42_500.0)
        # outside min/max: refused by the core, never sent
        out = await lab.gateway.execute("mms.feeder.p_limit.setpoint", 250, requested_by="hil")
        assert out.result == "invalid" and "maximum" in out.reason
        assert mms_sim.setpoints == 2


async def test_interlocked_operation_rejected(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server
) -> None:
    async with MmsLab(mms_config, redis_server, mms_sim) as lab:
        mms_sim.interlocked = True
        for point in ("mms.feeder.breaker.command", "mms.feeder.breaker.command_sbo"):
            out = await lab.gateway.execute(point, "open", requested_by="hil")
            assert out.result == "rejected"
            assert "interlocking" in out.reason
        assert mms_sim.operations == 0


async def test_misspelt_reference_is_reported(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server, caplog: pytest.LogCaptureFixture
) -> None:
    bad = mms_config.point("mms.feeder.voltage.l3")
    addr = bad.address.model_copy(update={"ref": "LD0/MMXU1.PhV.phsX"})
    points = tuple(p.model_copy(update={"address": addr}) if p.name == bad.name else p for p in mms_config.points)
    cfg = mms_config.model_copy(update={"points": points})
    async with MmsLab(cfg, redis_server, mms_sim) as lab:
        assert lab.gateway.adapters[MMS].stats()["missing_references"] == 1
        assert "LD0/MMXU1.PhV.phsX" in caplog.text

        async def invalid() -> bool:
            got = await lab.reader.latest("mms.feeder.voltage.l3")
            return got is not None and Quality.INVALID in got.quality

        await eventually(invalid, 3, "missing point written invalid")
        good = await lab.reader.latest("mms.feeder.voltage.l1")
        assert good is not None and good.quality == Quality.GOOD


async def test_simulator_restart_link_down_flagged_and_resync(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server
) -> None:
    async with MmsLab(mms_config, redis_server, mms_sim) as lab:
        await eventually(lambda: lab.reader.latest("mms.feeder.frequency"), 5, "first value")
        await mms_sim.stop()

        async def down() -> bool:
            link = await lab.reader.link(MMS)
            return link is not None and link.state == "down"

        await eventually(down, 5, "link down")

        async def stale() -> bool:
            got = await lab.reader.latest("mms.feeder.frequency")
            return got is not None and Quality.NOT_TOPICAL in got.quality

        await eventually(stale, 3, "points flagged")
        await mms_sim.start()
        await lab.gateway.wait_connected(10)

        async def fresh() -> bool:
            got = await lab.reader.latest("mms.feeder.frequency")
            return got is not None and got.quality == Quality.GOOD

        await eventually(fresh, 5, "values good again after resync")
        out = await lab.gateway.execute("mms.feeder.breaker.command", "open", requested_by="hil")
        assert out.result == "confirmed", out.reason


class _CuttableLink:
    """A loopback TCP relay the test can cut: the gateway loses the link while the IED keeps running."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {w, tw}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(r, tw), pipe(tr, w))

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in self._writers:
            w.close()
        self._writers.clear()


async def test_buffered_reports_resume_from_last_entry_id(
    mms_config: LabConfig, redis_server: RedisServer, mms_sim: Iec61850Server
) -> None:
    """Link lost while the IED runs: what changed meanwhile arrives from the BRCB buffer."""
    relay = _CuttableLink(mms_sim.port)
    await relay.start()
    try:
        async with MmsLab(mms_config, redis_server, relay.port) as lab:
            await eventually(lambda: lab.reader.latest("mms.feeder.voltage.l1"), 5, "first value")
            await relay.cut()

            async def down() -> bool:
                link = await lab.reader.link(MMS)
                return link is not None and link.state == "down"

            await eventually(down, 5, "link down")
            mms_sim.set_value("mms.feeder.voltage.l1", 241.0)  # buffered by the IED, then overwritten
            await asyncio.sleep(0.05)
            mms_sim.set_value("mms.feeder.voltage.l1", 242.0)
            await relay.start()
            await lab.gateway.wait_connected(10)

            async def replayed() -> bool:
                hist = await lab.reader.history("mms.feeder.voltage.l1", 50)
                return any(abs(float(h.value) - 241.0) < 1e-3 for h in hist)  # type: ignore[arg-type]

            await eventually(replayed, 5, "value from the outage replayed from the buffer")
            assert lab.gateway.adapters[MMS].stats().get("resumed", 0) >= 1
    finally:
        await relay.cut()
