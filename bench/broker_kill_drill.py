"""Broker crash drill (issue 13 item 1): mosquitto kill -9 during DSO flows over MQTT.

Run:  python bench/broker_kill_drill.py --flows 40 --kills 20            # ~4 minutes
      python bench/broker_kill_drill.py --flows 40 --kills 20 --no-receipts   # the old behaviour

What runs, all on loopback: a :class:`~ams.sandbox.DsoSandbox` (keys, PKI, a TLS mosquitto
with ACLs, saving on every change as the tests' and the demo's broker does), the IEC 104
relay simulator, the gateway (its own redis-server) with the feeder's flexibility, and an
AMS worker (its own redis-server). Each flow: the MGMS offers the feeder (window starting
``--lead-s`` ahead), the AMS auto-clears, reserves and activates, the MGMS opens the breaker,
samples, closes it and verifies, the AMS settles. ``--kills`` of the flows get a SIGKILL of
the broker right after it acknowledged a message (the window in which mosquitto 2.0.11 has
sent the PUBACK but not yet written its store): the flexibility, the reserve, the activation
or the verification, chosen at random. The broker is started again ``--down-s`` later.

What is counted, per flow: the activation's final state at the AMS (settled, failed,
undelivered) or none (the flexibility never reached the AMS, or the activation is still
``activated`` after the wait: a lost message). "Lost" is flows without a final state; with
receipts every message must end receipted or given up with a reason, so lost must be 0.
The messaging counters of both sides (resent, duplicates dropped, receipts) say how much
the receipts had to do. ``--json`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ams.sandbox import DsoSandbox, feeder_flexibility
from ams.service import AmsService, AmsSettings, MicrogridEntry
from gateway.config import Iec104Timers, ReceiptSettings, load_config
from gateway.iedsim.iec104.server import Iec104Outstation
from gateway.messaging import build_messenger
from gateway.runtime import Gateway
from gateway.services import RedisServer
from gateway.store import RedisStore

ROOT = Path(__file__).resolve().parents[1]
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
DEVICE = "ref615"
MGMS = "mgms-multipower"
LOCATION = "FI-Vaasa/feeder-4"
FINAL = ("settled", "failed", "undelivered")


@dataclass
class DrillResult:
    flows: int
    kills: int
    receipts: bool
    seconds: float = 0.0
    states: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    lost_flows: list[str] = field(default_factory=list)
    mgms: dict[str, int] = field(default_factory=dict)
    ams: dict[str, int] = field(default_factory=dict)
    left_unsent: int = 0
    left_awaiting: int = 0


_COUNTERS = ("sent", "received", "duplicates", "receipted", "resent", "receipts_sent", "receipts_repeated",
             "unreceipted", "send_errors", "rejected_expired")  # fmt: skip


async def run_drill(
    workdir: Path,
    *,
    flows: int,
    kills: int,
    receipts: bool = True,
    seed: int = 1,
    lead_s: float = 2.0,
    window_s: float = 1.0,
    down_s: float = 0.3,
    flow_timeout_s: float = 30.0,
) -> DrillResult:
    """The drill as described in the module docstring; returns its counts."""
    rng = random.Random(seed)
    killed = set(rng.sample(range(flows), min(kills, flows)))
    receipt_settings = ReceiptSettings(enabled=receipts, resend_initial_s=0.5, resend_max_s=2.0)
    result = DrillResult(flows=flows, kills=len(killed), receipts=receipts)
    t0 = time.monotonic()
    base = load_config(SIM_CONFIG)
    with contextlib.ExitStack() as stack:
        box = stack.enter_context(DsoSandbox(workdir / "dso", mgms=[MGMS]))
        gw_redis = stack.enter_context(RedisServer(data_dir=workdir / "redis"))
        ams_redis = stack.enter_context(RedisServer(data_dir=workdir / "ams-redis"))
        assert box.broker is not None
        sim = Iec104Outstation(base, DEVICE, host="127.0.0.1", port=0, seed=7)
        await sim.start()
        ams_client = ams_redis.client("ams")
        ams_messenger = build_messenger(box.messaging("ams", receipts=receipt_settings), ams_client, prefix="ams:ams")
        await ams_messenger.start()
        svc = AmsService(AmsSettings(microgrids=(MicrogridEntry(participant=MGMS, location=LOCATION),)), ams_client,
                         "ams", messenger=ams_messenger)  # fmt: skip
        ams_stop = asyncio.Event()
        ams_task = asyncio.create_task(svc.run(ams_stop), name="ams")
        cfg = base.model_copy(
            update={
                "messaging": box.messaging(MGMS, receipts=receipt_settings),
                "flexibility": feeder_flexibility(window_s=window_s, step_s=1),
            }
        ).only(DEVICE)
        cfg = cfg.with_device(DEVICE, port=sim.port, timers=Iec104Timers(t0_s=2, t1_s=2, t2_s=1, t3_s=1, k=12, w=8),
                              reconnect={"initial_s": 0.1, "max_s": 0.5})  # fmt: skip
        store = RedisStore.from_url(cfg, gw_redis.client_url())
        gw = Gateway(cfg, store, stats_period_s=0.5)
        gw_stop = asyncio.Event()
        gw_task = asyncio.create_task(gw.run(gw_stop), name="gateway")
        try:
            await gw.wait_connected(10)
            agent = gw.flex_agent
            assert agent is not None and gw.messenger is not None
            await _until(lambda: _has(gw.latest_value("feeder.p")), 10)
            acts: list[str] = []
            for i in range(flows):
                await _until(lambda: _idle(agent), 30)  # the feeder is offered once it is free
                # the kill lands right after a PUBACK (mosquitto acks before it writes): the
                # first or second message of the flow one side's next hop acknowledges -
                # MGMS: flexibility, verification; AMS: reserve, activation
                side = rng.choice((gw.messenger, ams_messenger))
                nth = rng.choice((1, 2))
                acked_before = side.counters["sent"]
                start = datetime.now(UTC) + timedelta(seconds=lead_s)
                sent = await agent.publish(start=start, window_s=window_s)
                if not sent:
                    result.lost_flows.append(f"flow {i}: nothing offered")
                    continue
                act_id = f"act:offer:{MGMS}:{sent[0].identifier}"
                acts.append(act_id)
                if i in killed:
                    acked = lambda s=side, n=acked_before + nth: s.counters["sent"] >= n  # noqa: E731
                    await _until(acked, lead_s + window_s + 2.0, quiet=True, poll_s=0.0005)
                    box.broker.stop(hard=True)  # kill -9
                    await asyncio.sleep(down_s)
                    await asyncio.to_thread(box.broker.start)
                # the flow is over when the AMS has a final state for it (or the wait ends)
                await _until(lambda a=act_id: _final(svc, a), flow_timeout_s, quiet=True)  # type: ignore[misc]
            # let the last receipts and resends settle, then count
            await _until(lambda: _drained(gw, svc), 20, quiet=True)
            states: Counter[str] = Counter()
            for act_id in acts:
                state = await ams_client.hget(svc.keys.activation(act_id), "state")
                if state in FINAL:
                    states[state] += 1
                else:
                    states[state or "none"] += 1
                    result.lost_flows.append(f"{act_id}: {state or 'never activated'}")
            result.states = dict(states)
            result.lost = flows - sum(states[s] for s in FINAL)
            result.mgms = {k: int(gw.messenger.stats().get(k, 0)) for k in _COUNTERS}
            result.ams = {k: int(ams_messenger.stats().get(k, 0)) for k in _COUNTERS}
            mgms_status = await gw.messenger.outbox_status()
            ams_status = await ams_messenger.outbox_status()
            result.left_unsent = mgms_status.unsent + ams_status.unsent
            result.left_awaiting = mgms_status.awaiting_receipt + ams_status.awaiting_receipt
        finally:
            gw_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(gw_task, 20)
            ams_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ams_task, 10)
            await ams_messenger.close()
            await ams_client.aclose()
            await sim.close()
    result.seconds = round(time.monotonic() - t0, 1)
    return result


def _has(latest: object) -> bool:
    return latest is not None


def _idle(agent: Any) -> bool:
    return not agent._busy_resources()  # the same check publish() makes


async def _final(svc: AmsService, act_id: str) -> bool:
    return await svc.redis.hget(svc.keys.activation(act_id), "state") in FINAL


async def _drained(gw: Gateway, svc: AmsService) -> bool:
    assert gw.messenger is not None
    a, b = await gw.messenger.outbox_status(), await svc.messenger.outbox_status()
    return a.unsent + a.awaiting_receipt + b.unsent + b.awaiting_receipt == 0


async def _until(probe: Any, timeout_s: float, *, quiet: bool = False, poll_s: float = 0.02) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        got = probe()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            if quiet:
                return
            raise TimeoutError(f"not within {timeout_s:g} s")
        await asyncio.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=40)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--no-receipts", action="store_true", help="receipts off: done at the PUBACK (the old behaviour)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--lead-s", type=float, default=2.0, help="activation window starts this long after the offer")
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--down-s", type=float, default=0.3, help="broker down this long after each kill")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the kills make every component complain; counts say it all
    with tempfile.TemporaryDirectory(prefix="broker-drill-") as d:
        result = asyncio.run(
            run_drill(Path(d), flows=args.flows, kills=args.kills, receipts=not args.no_receipts, seed=args.seed,
                      lead_s=args.lead_s, window_s=args.window_s, down_s=args.down_s)
        )  # fmt: skip
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        mode = "on" if result.receipts else "off"
        print(f"{result.flows} flows, {result.kills} broker kills (kill -9), receipts {mode}, {result.seconds:g} s")
        print(f"activations: {result.states}; lost (no final state): {result.lost}")
        for line in result.lost_flows:
            print(f"  lost: {line}")
        print(f"MGMS messaging: {result.mgms}")
        print(f"AMS messaging:  {result.ams}")
        print(f"left in the outboxes: {result.left_unsent} unsent, {result.left_awaiting} awaiting a receipt")
    return 1 if result.lost else 0


if __name__ == "__main__":
    sys.exit(main())
