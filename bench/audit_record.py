"""What the audit trail costs a command: ``AuditLog.record`` and its writer, on a real Redis.

Run:  python bench/audit_record.py [--n 20000] [--commands 2000] [--json FILE]

A command makes five audit records (request, decision, sent, ACTCON, outcome). Measured:

* ``record_us``: one ``record()`` call (what ``Gateway.execute`` itself pays, five times per
  command): median and p99 over ``--n`` calls;
* ``stored_per_s``: entries the writer task chains, hashes and appends (one Lua script per
  batch) per second, checkpoints (Ed25519) included;
* ``command_ms`` with and without audit, in alternating blocks of 50: a stand-in for the command route's own Redis work
  (intent HSET, 2 ms for the device, the log MULTI; Redis with ``appendfsync always`` as
  the embedded one), with the five records made where ``Gateway.execute`` makes them, so
  the writer runs beside it on the same event loop and the same Redis; against the same
  loop with records off, before and after. The difference of the medians is what audit adds
  to a command's median. (Why the writer lingers: each append is an fsync, and an fsync
  delays every other client's reply in that Redis round.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from gateway.audit import AuditKind, AuditLog, audit_key, read_stream, verify
from gateway.semantic.security import PrivateIdentity
from gateway.services import RedisServer

BLOCK = 50
"""Commands per block; blocks alternate audit off / on."""


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


async def _commands(client: aioredis.Redis, audit: AuditLog | None, n: int) -> list[float]:
    """``n`` stand-ins of the command route's Redis work, timed (ms), with the audit records
    where ``Gateway.execute`` makes them: request and decision, the intent write (HSET),
    sent, the device (2 ms), ACTCON and outcome, the log MULTI (XADD + HDEL)."""

    def rec(kind: AuditKind, i: int) -> None:
        if audit is not None:
            audit.record(kind, "bench", request_id=f"r{i}", point="feeder.breaker.command", value="open")

    out = []
    for i in range(n):
        t0 = time.perf_counter()
        rec(AuditKind.COMMAND_REQUEST, i)
        rec(AuditKind.COMMAND_DECISION, i)
        await client.hset("bench:cmd:intents", f"r{i}", "intent")
        rec(AuditKind.COMMAND_SENT, i)
        await asyncio.sleep(0.002)  # the device's answer and the status change
        rec(AuditKind.COMMAND_ACK, i)
        rec(AuditKind.COMMAND_OUTCOME, i)
        pipe = client.pipeline(transaction=True)
        pipe.xadd("bench:cmd:log", {"id": f"r{i}", "result": "confirmed"})
        pipe.hdel("bench:cmd:intents", f"r{i}")
        await pipe.execute()
        out.append((time.perf_counter() - t0) * 1000.0)
        await asyncio.sleep(0.01)  # commands come one by one, not in a burst
    return out


async def run(n: int, commands: int, linger_s: float = 0.05) -> dict[str, float]:
    identity = PrivateIdentity.generate("bench")
    with RedisServer() as server:
        client = aioredis.Redis.from_url(server.client_url(), decode_responses=True)
        try:
            audit = AuditLog(client, prefix="bench", identity=identity, buffer_max=n + 10, linger_s=linger_s)
            per_call = []
            for i in range(n):  # not started: record() alone
                t0 = time.perf_counter_ns()
                audit.record(AuditKind.COMMAND_OUTCOME, "bench", request_id=f"r{i}", result="confirmed")
                per_call.append((time.perf_counter_ns() - t0) / 1000.0)
            t0 = time.perf_counter()
            await audit.start()
            assert await audit.flush(120)
            stored_s = time.perf_counter() - t0
            stored = audit.counters["stored"]

            # alternating blocks, so that the load of the machine drifts into both sides alike
            off: list[float] = []
            on: list[float] = []
            for b in range(max(2, commands // BLOCK)):
                if b % 2:
                    on += await _commands(client, audit, BLOCK)
                    await audit.flush(10)  # its last batch not into the next block of the other side
                else:
                    off += await _commands(client, None, BLOCK)
            await audit.close()
            entries = await read_stream(client, audit_key("bench"))
            ok = verify(entries, identity.public).ok
        finally:
            await client.aclose()
    base = statistics.median(off)
    return {
        "record_us_median": statistics.median(per_call),
        "record_us_p99": _pct(per_call, 0.99),
        "stored_per_s": stored / stored_s,
        "command_ms_median_off": base,
        "command_ms_median_on": statistics.median(on),
        "added_ms_median": statistics.median(on) - base,
        "command_ms_p99_off": _pct(off, 0.99),
        "command_ms_p99_on": _pct(on, 0.99),
        "entries": float(len(entries)),
        "chain_verified": float(ok),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="record() calls timed (default 20000)")
    ap.add_argument("--commands", type=int, default=2000, help="command stand-ins (default 2000)")
    ap.add_argument("--linger-s", type=float, default=0.05, help="the writer's linger (AuditLog default 0.05)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    res = asyncio.run(run(args.n, args.commands, args.linger_s))
    for k, v in res.items():
        print(f"{k:28s} {v:12.4f}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0 if res["chain_verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
