"""What the message probes cost at the receiving end: ``Messenger.deliver`` with probes on/off.

The inbound pipeline (open: decrypt + verify, then the accept script that claims the id and
appends the inbox entry) is run for N sealed messages against a local redis-server, once
with probes on (transport clock read, ``received_ns`` field, Redis ``TIME`` + ``stored_ns``)
and once off, alternately. Prints the time and CPU per message and the inbox bytes per entry
(``MEMORY USAGE``). The transport is left out: it only moves bytes, and its share of the
probes is the one clock read that ``received_clock`` stands for here.

    python bench/inbox_probes.py                 # 2,000 messages, 3 rounds of on/off
    python bench/inbox_probes.py --messages 5000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis.asyncio as aioredis

from gateway.messaging import Messenger
from gateway.semantic import (
    Envelope,
    Flexibility,
    FlexibilityType,
    Keystore,
    KeystoreSettings,
    MemoryNonceStore,
    Opener,
    Sealer,
    write_key_pair,
)
from gateway.services import RedisServer
from gateway.transport.base import Delivery, MessageHandler, MessageTransport, Outgoing, received_clock, topic_for

MGMS, AMS = "mgms", "ams"


class _Idle(MessageTransport):
    """A transport that is never used: the bench calls the inbound pipeline directly."""

    name = "bench"

    async def start(self, handler: MessageHandler) -> None:
        return None

    async def send(self, message: Outgoing) -> None:
        raise RuntimeError("the bench sends nothing")

    async def close(self) -> None:
        return None

    def stats(self) -> Mapping[str, int]:
        return {}


def keystores(d: Path) -> dict[str, Keystore]:
    for name in (MGMS, AMS):
        write_key_pair(name, d / name)
    for name, peer in ((MGMS, AMS), (AMS, MGMS)):
        (d / name / "peers").mkdir()
        (d / name / "peers" / f"{peer}.pub").write_bytes((d / peer / f"{peer}.pub").read_bytes())
    return {
        n: Keystore.load(KeystoreSettings(identity=d / n / f"{n}.key", peers_dir=d / n / "peers")) for n in (MGMS, AMS)
    }


def sealed(keys: dict[str, Keystore], n: int) -> list[bytes]:
    sealer = Sealer(keys[MGMS])
    t0 = datetime.now(UTC).replace(microsecond=0)
    topic = topic_for(AMS, MGMS, "Flexibility")
    out = []
    for i in range(n):
        flex = Flexibility(identifier=f"feeder-{i}", flexibility_type=FlexibilityType.UPWARD, power_kw=10.0 + i,
                           start=t0, stop=t0 + timedelta(hours=1))  # fmt: skip
        out.append(sealer.seal(Envelope.create(flex, sender=MGMS, recipient=AMS, topic=topic, ttl_s=3600)))
    return out


async def one_run(url: str, keys: dict[str, Keystore], data: list[bytes], probes: bool, run: int) -> str:
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        messenger = Messenger(
            Sealer(keys[AMS]),
            Opener(keys[AMS], MemoryNonceStore(), replay_window_s=3600),
            client,
            {"bench": _Idle()},
            prefix=f"bench:{run}",
            probes=probes,
        )
        stamp = received_clock(probes)
        topic = topic_for(AMS, MGMS, "Flexibility")
        t0, cpu0 = time.perf_counter(), time.process_time()
        for d in data:
            await messenger.deliver(Delivery(d, topic, "bench", peer=MGMS, received_ns=stamp()))
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        n = len(data)
        stored = await client.xlen(messenger.keys.inbox)
        usage = int(await client.memory_usage(messenger.keys.inbox, samples=0) or 0)
        await client.delete(messenger.keys.inbox)
        return (
            f"probes {'on' if probes else 'off'}: {n} messages, {elapsed * 1e6 / n:.0f} us/message, "
            f"cpu {cpu * 1e6 / n:.0f} us/message (this process), inbox {usage / n:.0f} B/entry, "
            f"stored {stored} -> {'OK' if stored == n else 'LOSS'}"
        )
    finally:
        await client.aclose()


async def main_async(url: str, messages: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keys = keystores(Path(tmp))
        data = sealed(keys, messages)
        run = 0
        for _ in range(rounds):
            for probes in (True, False):
                run += 1
                print(await one_run(url, keys, data, probes, run), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=2_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fsync", choices=("always", "everysec", "no"), default="always")
    args = ap.parse_args(argv)
    with RedisServer(appendfsync=args.fsync) as server:
        print(f"embedded redis-server {server.url}, AOF appendfsync {args.fsync}", file=sys.stderr)
        asyncio.run(main_async(server.client_url(), args.messages, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
