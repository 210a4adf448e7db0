"""HIL fixtures: a real redis-server, the IEC 104 simulator and the gateway, all on loopback.

See hilkit.py for running the suites against a real lab (MGMS_HIL_CONFIG).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from dsokit import MGMS
from hilkit import DEVICE, REAL_CONFIG, SIM_CONFIG, Lab, start_lab

from ams.sandbox import DsoSandbox
from gateway.config import LabConfig, load_config
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.services import RedisServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(Path(__file__).parent):
            item.add_marker(pytest.mark.hil)
            # c104 2.2.1 can SIGSEGV in its native threads (docs/protocol-notes.md): a test on
            # that engine runs in a forked child, so a crash fails that test, not the suite,
            # and no c104 client outlives it in the runner's process.
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("lab") == "c104":
                item.add_marker(pytest.mark.forked)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(data_dir=tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def base_config() -> LabConfig:
    if REAL_CONFIG:
        return load_config(REAL_CONFIG)
    return load_config(SIM_CONFIG)


@pytest.fixture
async def sim(base_config: LabConfig) -> AsyncIterator[Iec104Outstation | None]:
    if REAL_CONFIG:
        yield None
        return
    outstation = Iec104Outstation(base_config, DEVICE, host="127.0.0.1", port=0, seed=7)
    await outstation.start()
    try:
        yield outstation
    finally:
        await outstation.close()


@pytest.fixture
async def lab(
    request: pytest.FixtureRequest, base_config: LabConfig, redis_server: RedisServer, sim: Iec104Outstation | None
) -> AsyncIterator[Lab]:
    """The gateway on the simulator; ``@pytest.mark.parametrize("lab", ["asyncio"], indirect=True)``
    runs a test on that IEC 104 engine (default: the lab config's, asyncio)."""
    engine: str | None = getattr(request, "param", None)
    changes = {"iec104_engine": engine} if engine is not None else {}
    running = await start_lab(base_config, redis_server, sim, **changes)
    try:
        yield running
    finally:
        await running.shutdown()
        await running.reader.aclose()


@pytest.fixture
def box(tmp_path: Path) -> Iterator[DsoSandbox]:
    with DsoSandbox(tmp_path / "dso", mgms=[MGMS]) as sandbox:
        yield sandbox


@pytest.fixture
def ams_redis(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(data_dir=tmp_path / "ams-redis") as server:
        yield server
