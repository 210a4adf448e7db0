"""The fault-injection channel, many stations in one loop, and the ``iedsim`` command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gateway.config import LabConfig
from gateway.iedsim.cli import main
from gateway.iedsim.iec104 import ControlChannel, Iec104Outstation, serve_many
from gateway.points import Quality
from gateway.protocols.iec104.codec import Cot, FloatInfo, TypeId, UFrame, UFunction

pytestmark = pytest.mark.timeout(20)

SIM_CONFIG = Path(__file__).resolve().parents[2] / "lab_configs" / "multipower-sim.yaml"
RawConnect = Callable[..., Awaitable[Any]]


class Line:
    """A control-channel client: one command, one answer line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def ask(self, command: str) -> str:
        self.writer.write(command.encode() + b"\n")
        async with asyncio.timeout(2):
            return (await self.reader.readline()).decode().strip()


@pytest.fixture
async def control(outstation: Iec104Outstation) -> AsyncIterator[Line]:
    async with ControlChannel([outstation]) as channel:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel.port)
        try:
            yield Line(reader, writer)
        finally:
            writer.close()
            await writer.wait_closed()


async def test_set_sends_value_and_answers_send_time(
    outstation: Iec104Outstation, control: Line, raw_client: Any
) -> None:
    answer = await control.ask("set feeder.voltage.l3 244.25")
    assert re.fullmatch(r"ok \d+\.\d{6}", answer)
    asdu = await raw_client.recv_asdu()
    assert (asdu.type_id, asdu.cot) == (TypeId.M_ME_TF_1, Cot.SPONTANEOUS)
    assert asdu.objects[0].element == FloatInfo(244.25)
    assert asdu.objects[0].time is not None
    assert abs(asdu.objects[0].time.timestamp() - float(answer.split()[1])) < 0.002
    assert (await control.ask("set feeder.voltage.l3 230 0x80")).startswith("ok ")
    assert (await raw_client.recv_asdu()).objects[0].element == FloatInfo(230.0, Quality.INVALID)
    assert await control.ask("release feeder.voltage.l3") == "ok"


async def test_fault_commands(outstation: Iec104Outstation, control: Line, raw_client: Any) -> None:
    assert await control.ask("refuse on") == "ok"
    assert outstation._refuse
    assert await control.ask("refuse off") == "ok"
    assert await control.ask("refuse-clock on") == "ok"
    assert outstation._refuse_clock
    assert await control.ask("refuse-clock off") == "ok"
    assert await control.ask("clock -90.5") == "ok -90.500000"
    assert outstation.clock_error_s == -90.5
    assert await control.ask("clock") == "ok -90.500000"  # without argument: what it is now
    assert await control.ask("travel 0.5") == "ok"
    assert outstation._breaker_travel_s == 0.5
    assert await control.ask("stall") == "ok"
    assert outstation.stalled
    raw_client.send(UFrame(UFunction.TESTFR_ACT))
    assert await raw_client.silent(0.2)
    assert await control.ask("resume") == "ok"
    assert await raw_client.recv() == UFrame(UFunction.TESTFR_CON)
    assert await control.ask("drop") == "ok"
    assert await raw_client.closed_by_peer()


async def test_stats_and_errors(control: Line) -> None:
    answer = await control.ask("stats")
    assert answer.startswith("ok ")
    (row,) = json.loads(answer[3:])
    assert row["station"] == "ref615"
    assert {"frames_in", "frames_out", "commands", "negative_confirmations", "drops"} <= set(row)
    assert (await control.ask("set no.such.point 1")).startswith("err ")
    assert (await control.ask("set feeder.p abc")).startswith("err ")
    assert (await control.ask("refuse maybe")).startswith("err ")
    assert (await control.ask("travel -1")).startswith("err ")
    assert (await control.ask("clock soon")).startswith("err ")
    assert (await control.ask("clock nan")).startswith("err ")
    assert "2000..2099" in await control.ask("clock 3e9")
    assert (await control.ask("explode")).startswith("err ")
    assert await control.ask("quit") == "ok bye"
    assert await control.reader.read() == b""


async def test_serve_many_on_free_ports(config: LabConfig, no_leaked_tasks: None, raw_connect: RawConnect) -> None:
    stations = await serve_many(config, "ref615", 0, 3, host="127.0.0.1", seed=5)
    try:
        assert len({o.port for o in stations}) == 3
        for o in stations:
            client = await raw_connect(o)
            o.set_value("feeder.frequency", 50.5)
            assert (await client.recv_asdu()).objects[0].element == FloatInfo(50.5)
        # seeds differ per station, so the feeders differ
        assert len({o.values()["feeder.voltage.l1"].value for o in stations}) == 3
    finally:
        for o in stations:
            await o.close()


# -- command line ----------------------------------------------------------------------------


async def _run_cli(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", "iec104",
        "--config", str(SIM_CONFIG), "--host", "127.0.0.1", "--port", "0", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_cli_serves_until_sigterm(raw_connect: RawConnect) -> None:
    proc = await _run_cli("--control-port", "0", "--seed", "3")
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(10):
            ready = (await proc.stdout.readline()).decode()
            control_line = (await proc.stdout.readline()).decode()
        m = re.fullmatch(r"iec104 simulator ref615 listening on 127\.0\.0\.1:(\d+) \(17 points\)\n", ready)
        assert m, ready
        assert re.fullmatch(r"control channel listening on 127\.0\.0\.1:\d+\n", control_line)
        port = int(m.group(1))
        client = await raw_connect(SimpleNamespace(port=port))
        client.send(UFrame(UFunction.TESTFR_ACT))
        assert await client.recv() == UFrame(UFunction.TESTFR_CON)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(5):
            assert await proc.wait() == 0
        assert await client.closed_by_peer()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_cli_stops_after_duration_with_many_stations() -> None:
    proc = await _run_cli("--stations", "3", "--duration-s", "0.5")
    async with asyncio.timeout(10):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    assert len(lines) == 3
    assert all(re.fullmatch(r"iec104 simulator ref615 listening on 127\.0\.0\.1:\d+ \(17 points\)", x) for x in lines)


def test_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("lab: {name: x}\ndevices: {}\npoints: []\nbogus: 1\n")
    assert main(["iec104", "--config", str(bad)]) == 2
    assert "bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no device"):
        main(["iec104", "--config", str(SIM_CONFIG), "--device", "nope"])
    with pytest.raises(SystemExit):
        main([])


async def test_cli_exits_with_its_parent(tmp_path: Path) -> None:
    """--parent-pid: a parent that dies without stopping its simulator (a native abort
    in a benchmark) leaves none behind. The parent here is a shell that starts the simulator
    in the background, prints its pid and exits."""
    cmd = (
        f"{sys.executable} -m gateway.iedsim.cli --log-level WARNING iec104 --config {SIM_CONFIG} "
        f"--host 127.0.0.1 --port 0 --parent-pid $$ > {tmp_path / 'sim.out'} 2>&1 & echo $!"
    )
    shell = await asyncio.create_subprocess_shell(cmd, stdout=asyncio.subprocess.PIPE)
    out, _ = await shell.communicate()
    pid = int(out.decode().strip())

    def alive() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

    try:
        async with asyncio.timeout(15):
            while alive():  # noqa: ASYNC110 - another process's state, no event to wait on
                await asyncio.sleep(0.1)
    finally:
        if alive():
            os.kill(pid, signal.SIGKILL)
