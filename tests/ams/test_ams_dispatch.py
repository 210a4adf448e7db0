"""A VPP coalition drives the message flow: chosen assets -> offers -> activations to their
owners -> verifications -> settlements and per-asset reliability, fed back to the next plan.

The AMS runs for real (Redis, TLS mosquitto with ACLs, encrypted messages); the two MGMS are
scripted participants that answer each activation with a verification at once (the real
MGMS side, with the breaker, is in hil_tests/test_dso_flow.py).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import yaml

from ams.dispatch import portfolio_with_reliability
from ams.sandbox import DsoSandbox
from ams.service import AmsService, AmsSettings, MicrogridEntry
from ams.vpp.coalition import solve_milp
from ams.vpp.offers import offers_from_coalition
from ams.vpp.portfolio import load_portfolio, read_mapping
from ams.vpp.services import service_from_mapping
from gateway.messaging import Messenger, Received, build_messenger
from gateway.semantic import ActivationNotification, VerificationNotification
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(60)
VPP = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp"
DELIVERY = {"multipower": 1.0, "campus": 0.5}  # campus delivers half of what it is asked
# "harbour" owns assets in the portfolio but never registered with this AMS: its blocks are refused


async def scripted_mgms(m: Messenger, stop: asyncio.Event, seen: list[ActivationNotification]) -> None:
    async def handle(item: Received) -> None:
        act = item.envelope.payload
        if isinstance(act, ActivationNotification):
            seen.append(act)
            span = int((act.stop - act.start).total_seconds())
            await m.send(
                VerificationNotification(
                    identifier=f"ver:{act.identifier}", activation_ref=act.identifier, start=act.start,
                    stop=act.stop, time_step_s=span, power_series_kw=(act.power_kw * DELIVERY[m.participant],),
                ),
                "ams",
            )  # fmt: skip

    await m.serve("mgms", "script", handle, stop)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[DsoSandbox, RedisServer]]:
    with DsoSandbox(tmp_path / "dso", mgms=["multipower", "campus", "harbour"]) as box, RedisServer() as rs:
        yield box, rs


@pytest.fixture
async def world(
    sandbox: tuple[DsoSandbox, RedisServer],
) -> AsyncIterator[tuple[AmsService, dict[str, list[ActivationNotification]]]]:
    box, rs = sandbox
    client = aioredis.Redis.from_url(rs.client_url("ams"), decode_responses=True)
    messengers = {
        name: build_messenger(box.messaging(name), client, prefix=f"t:{name}")
        for name in ("ams", "multipower", "campus", "harbour")
    }
    for m in messengers.values():
        await m.start()
    svc = AmsService(
        AmsSettings(microgrids=(MicrogridEntry(participant="multipower", location="A"),
                                MicrogridEntry(participant="campus", location="B"))),
        client, "ams", messenger=messengers["ams"],
    )  # fmt: skip
    stop = asyncio.Event()
    seen: dict[str, list[ActivationNotification]] = {"multipower": [], "campus": [], "harbour": []}
    tasks = [asyncio.create_task(svc.run(stop))] + [
        asyncio.create_task(scripted_mgms(messengers[n], stop, seen[n])) for n in seen
    ]
    try:
        yield svc, seen
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        for m in messengers.values():
            await m.close()
        await client.aclose()


async def test_coalition_activates_owners_settles_and_feeds_reliability_back(
    world: tuple[AmsService, dict[str, list[ActivationNotification]]],
) -> None:
    svc, seen = world
    portfolio = load_portfolio(VPP / "portfolio.yaml")
    req = service_from_mapping(read_mapping(VPP / "request-capacity.yaml"))
    result = solve_milp(portfolio, req, 30)
    every = offers_from_coalition(result)
    lines = [x for x in every if x.microgrid != "harbour"]
    assert lines, "the capacity service should choose some assets"
    await svc.submit_dispatch(every, "d1")

    async def all_settled() -> bool:
        n = await svc.redis.xlen(svc.keys.settlements)
        return n >= len(lines)

    deadline = asyncio.get_running_loop().time() + 45
    while not await all_settled():
        assert asyncio.get_running_loop().time() < deadline, "not every block was settled"
        await asyncio.sleep(0.05)

    # each block went to the microgrid owning the asset, once; the unregistered one got none
    assert sum(len(v) for v in seen.values()) == len(lines) and not seen["harbour"]
    assert svc.counters["unregistered"] == len(every) - len(lines)
    for x in lines:
        assert any(a.power_kw == pytest.approx(x.power_kw) and a.start == x.start for a in seen[x.microgrid])
        assert x.stop - x.start >= timedelta(minutes=60)
    # settlements: full delivery settles, half delivery fails
    states = {f["activation"]: f["state"] for _, f in await svc.redis.xrange(svc.keys.settlements)}
    for x in lines:
        act = f"act:offer:{x.microgrid}:d1:{x.asset}:{x.start:%Y%m%dT%H%M%SZ}"
        assert states[act] == ("settled" if DELIVERY[x.microgrid] == 1.0 else "failed")
    # per-asset reliability measured by the AMS goes into the next coalition's portfolio
    again = await portfolio_with_reliability(portfolio, svc.redis, "ams")
    for x in lines:
        r = again.asset(x.asset).reliability
        assert r == pytest.approx(1.0) if DELIVERY[x.microgrid] == 1.0 else r < portfolio.asset(x.asset).reliability
    # a second submission of the same dispatch does not activate anything again
    await svc.dispatch(every, "d1")
    await asyncio.sleep(0.3)
    assert sum(len(v) for v in seen.values()) == len(lines)


async def ams_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ams.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_ams_dispatch_refuses_unregistered_microgrids_then_status_shows_activations(
    world: tuple[AmsService, dict[str, list[ActivationNotification]]],
    sandbox: tuple[DsoSandbox, RedisServer],
    tmp_path: Path,
) -> None:
    """`ams dispatch` checks the portfolio's owners before queueing (exit 2, nothing queued);
    with them registered it queues, the worker activates, and `ams status` lists the
    activations, `--json` with numbers and booleans typed."""
    svc, _ = world
    box, rs = sandbox
    cfg_file = tmp_path / "ams.yaml"
    cfg_file.write_text(yaml.safe_dump({"messaging": box.messaging("ams").model_dump(mode="json")}))
    cli = ["-c", str(cfg_file), "--redis-url", rs.client_url("ams")]
    request = str(VPP / "request-capacity.yaml")
    deadline = asyncio.get_running_loop().time() + 10
    while await svc.redis.hlen(svc.keys.microgrids) < 2:  # the worker registers its configured microgrids
        assert asyncio.get_running_loop().time() < deadline, "the AMS worker did not register its microgrids"
        await asyncio.sleep(0.05)
    queued = await svc.redis.xlen(svc.keys.requests)

    code, out, err = await ams_cli("dispatch", *cli, str(VPP / "portfolio.yaml"), request)
    assert code == 2, (out, err)
    assert "not registered with AMS ams: harbour (registered: campus, multipower)" in err
    assert await svc.redis.xlen(svc.keys.requests) == queued, "nothing queued for the workers"

    doc = yaml.safe_load((VPP / "portfolio.yaml").read_text())
    doc["assets"] = [a for a in doc["assets"] if a["microgrid"] != "harbour"]
    mine = tmp_path / "portfolio.yaml"
    mine.write_text(yaml.safe_dump(doc))
    code, out, err = await ams_cli("dispatch", *cli, str(mine), request, "--time-limit", "30")
    assert code == 0, (out, err)
    assert "block(s) queued for the AMS workers" in out
    blocks = int(out.split("block(s) queued")[0].rsplit(" ", 2)[-2])

    deadline = asyncio.get_running_loop().time() + 30
    while await svc.redis.xlen(svc.keys.settlements) < blocks:
        assert asyncio.get_running_loop().time() < deadline, "not every block was settled"
        await asyncio.sleep(0.05)

    code, out, err = await ams_cli("status", *cli, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert len(data["activations"]) == blocks
    for a in data["activations"]:
        assert a["activation"].startswith("act:offer:") and a["state"] in ("settled", "failed")
        assert isinstance(a["power_kw"], float) and isinstance(a["price"], float)
    assert data["settlements"] and all(isinstance(x["delivered"], bool) for x in data["settlements"])
    assert {x["delivered"] for x in data["settlements"]} == {True, False}  # campus delivers half
    assert all(isinstance(x["payment_eur"], float) for x in data["settlements"])
    assert isinstance(data["microgrids"]["campus"]["reliability"], float)

    code, out, err = await ams_cli("status", *cli)
    assert code == 0, err
    assert f"activations (newest {blocks}):" in out
    first = data["activations"][0]
    assert first["activation"] in out and first["microgrid"] in out
