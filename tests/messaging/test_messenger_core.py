"""The messaging core with a real Redis: outbox, inbox, duplicates, refusals, restarts.

The transport here is an in-process pipe (this file tests the core, not MQTT or HTTPS; the
real transports have their own tests and the end-to-end HIL test uses them).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.errors import TransportError, TransportRefused
from gateway.messaging import Messenger, Received
from gateway.semantic import (
    Flexibility,
    Keystore,
    KeystoreSettings,
    Malformed,
    MemoryNonceStore,
    Opener,
    Reason,
    Replayed,
    Sealer,
    UnknownSender,
    write_key_pair,
)
from gateway.services import RedisServer
from gateway.transport.base import Delivery, MessageHandler, MessageTransport, Outgoing

pytestmark = pytest.mark.timeout(30)


class Pipe(MessageTransport):
    """Delivers to the handler of the transport registered under the recipient's name."""

    name = "pipe"

    def __init__(self, network: dict[str, Pipe], me: str) -> None:
        self.network = network
        self.me = me
        self.handler: MessageHandler | None = None
        self.up = True
        self.refuse = False
        self.sent = 0

    async def start(self, handler: MessageHandler) -> None:
        self.handler = handler
        self.network[self.me] = self

    async def send(self, message: Outgoing) -> None:
        if not self.up:
            raise TransportError("pipe", "down")
        if self.refuse:
            raise TransportRefused("pipe", "not authorised")
        peer = self.network[message.recipient]
        assert peer.handler is not None
        await peer.handler(Delivery(message.data, message.topic, "pipe", peer=self.me))
        self.sent += 1

    async def close(self) -> None:
        self.network.pop(self.me, None)

    def stats(self) -> Mapping[str, int]:
        return {"sent": self.sent}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Keystore]:
    d: Path = tmp_path_factory.mktemp("keys")
    for name in ("mgms", "ams"):
        write_key_pair(name, d / name)
    for name in ("mgms", "ams"):
        peer = "ams" if name == "mgms" else "mgms"
        (d / name / "peers").mkdir()
        (d / name / "peers" / f"{peer}.pub").write_bytes((d / peer / f"{peer}.pub").read_bytes())
    return {
        n: Keystore.load(KeystoreSettings(identity=d / n / f"{n}.key", peers_dir=d / n / "peers"))
        for n in ("mgms", "ams")
    }


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
async def rc(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_server.client_url(), decode_responses=True)
    yield c
    await c.aclose()


def messenger(name: str, keys: dict[str, Keystore], rc: aioredis.Redis, net: dict[str, Pipe]) -> Messenger:
    return Messenger(
        Sealer(keys[name]),
        Opener(keys[name], MemoryNonceStore()),
        rc,
        {"pipe": Pipe(net, name)},
        prefix=f"t:{name}",
    )


def flex(i: int = 1) -> Flexibility:
    t0 = datetime.now(UTC).replace(microsecond=0)
    return Flexibility(
        identifier=f"flex-{i}", flexibility_type="downward", power_kw=10.0 + i, start=t0, stop=t0 + timedelta(hours=1)
    )


async def wait_for(cond: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_round_trip_reaches_inbox_with_probe_hops(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        sent = await mgms.send(flex(), "ams")
        got = await ams.read("svc", "w1", block_ms=2000)
        assert [r.envelope for r in got] == [sent]
        r = got[0]
        assert r.peer == "mgms" and r.transport == "pipe"
        assert r.created_ns <= r.received_ns <= r.stored_ns + 1_000_000  # Redis clock, same host
        await ams.ack("svc", r.entry_id)
        assert await rc.xlen(ams.keys.inbox) == 0
        # done only when the receipt is back: neither unsent nor awaiting it
        await wait_for(lambda: _eq(mgms.outbox_length(), 0))
        await wait_for(lambda: _eq(mgms.awaiting_length(), 0))
        assert await rc.ttl(ams.keys.seen(sent.id)) > 0


async def test_transport_down_keeps_messages_in_outbox_until_up(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        pipe = mgms.transports["pipe"]
        assert isinstance(pipe, Pipe)
        pipe.up = False
        ids = [(await mgms.send(flex(i), "ams")).id for i in range(20)]
        await asyncio.sleep(0.3)
        assert await mgms.outbox_length() == 20
        pipe.up = True
        await wait_for(lambda: _eq(mgms.outbox_length(), 0))
        got = await ams.read("svc", "w1", count=100)
        # each once; a window of sends runs concurrently, so order is the transport's to keep
        assert sorted(r.envelope.id for r in got) == sorted(ids)
        assert mgms.counters["send_errors"] > 0


async def _eq(coro: object, value: int) -> bool:
    return await coro == value  # type: ignore[misc]


async def test_outbox_survives_a_restart_of_the_sender(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams:
        first = messenger("mgms", keys, rc, net)
        await first.start()
        pipe = first.transports["pipe"]
        assert isinstance(pipe, Pipe)
        pipe.up = False
        sent = await first.send(flex(), "ams")
        await first.close()
        async with messenger("mgms", keys, rc, net):
            got = await ams.read("svc", "w1", block_ms=3000)
        assert [r.envelope.id for r in got] == [sent.id]


async def test_duplicate_delivery_is_stored_once_and_counted(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams:
        envelope = _envelope(keys)
        data = Sealer(keys["mgms"]).seal(envelope)
        topic = _envelope_topic(data)
        await ams.deliver(Delivery(data, topic, "pipe"))
        await ams.deliver(Delivery(data, topic, "pipe"))  # acknowledged, not stored again
        assert await rc.xlen(ams.keys.inbox) == 1
        assert ams.counters["duplicates"] == 1
        assert ams.opener.counter[Reason.REPLAYED] == 0  # a redelivery is not a replay
        # the same id on other bytes (re-sealed: a new encryption) is a replay: refused
        with pytest.raises(Replayed, match="other content"):
            await ams.deliver(Delivery(Sealer(keys["mgms"]).seal(envelope), topic, "pipe"))
        assert ams.opener.counter[Reason.REPLAYED] == 1
        assert await rc.xlen(ams.keys.inbox) == 1


async def test_topic_and_peer_must_match_the_signed_header(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams:
        data = Sealer(keys["mgms"]).seal(_envelope(keys))
        topic = _envelope_topic(data)
        with pytest.raises(Malformed, match="arrived on"):
            await ams.deliver(Delivery(data, "heila/v1/to/ams/from/mgms/Offer", "pipe"))
        with pytest.raises(UnknownSender, match="authenticated as 'eve'"):
            await ams.deliver(Delivery(data, topic, "pipe", peer="eve"))
        assert await rc.xlen(ams.keys.inbox) == 0
        # rejected before the id was claimed: the genuine delivery still gets in
        await ams.deliver(Delivery(data, topic, "pipe", peer="mgms"))
        assert await rc.xlen(ams.keys.inbox) == 1


async def test_redis_down_at_the_receiver_is_not_acknowledged(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=1, decode_responses=True, socket_connect_timeout=0.5)
    try:
        ams = Messenger(
            Sealer(keys["ams"]), Opener(keys["ams"], MemoryNonceStore()), dead, {"pipe": Pipe({}, "ams")}, prefix="x"
        )
        data = Sealer(keys["mgms"]).seal(_envelope(keys))
        with pytest.raises(TransportError, match="not acknowledged"):
            await ams.deliver(Delivery(data, _envelope_topic(data), "pipe"))
    finally:
        await dead.aclose()


async def test_refused_message_goes_to_dead_letters(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net), messenger("mgms", keys, rc, net) as mgms:
        pipe = mgms.transports["pipe"]
        assert isinstance(pipe, Pipe)
        pipe.refuse = True
        sent = await mgms.send(flex(), "ams")
        await wait_for(lambda: _eq(mgms.outbox_length(), 0))
        dead = await rc.xrange(mgms.keys.dead)
        assert dead[0][1]["id"] == sent.id and "not authorised" in dead[0][1]["reason"]
        assert mgms.counters["refused"] == 1


async def test_serve_retries_retryable_errors_and_dead_letters_bugs(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        a = await mgms.send(flex(1), "ams")
        b = await mgms.send(flex(2), "ams")
        seen: list[str] = []
        stop = asyncio.Event()

        async def handle(r: Received) -> None:
            seen.append(r.envelope.id)
            if seen.count(a.id) == 2 and seen.count(b.id) == 1:
                stop.set()  # both judged (the window sends them concurrently: any order)
            if r.envelope.id == a.id and seen.count(a.id) == 1:
                raise TransportError("x", "try again")
            if r.envelope.id == b.id:
                raise ValueError("a bug")

        await asyncio.wait_for(ams.serve("svc", "w1", handle, stop), 10)
        assert seen.count(a.id) == 2 and seen.count(b.id) == 1
        assert ams.counters["handler_errors"] == 1 and ams.counters["handler_retries"] == 1
        assert (await rc.xrange(ams.keys.dead))[0][1]["id"] == b.id
        assert await rc.xlen(ams.keys.inbox) == 0


def _envelope(keys: dict[str, Keystore]):  # type: ignore[no-untyped-def]
    from gateway.semantic import Envelope
    from gateway.transport.base import topic_for

    return Envelope.create(flex(), sender="mgms", recipient="ams", topic=topic_for("ams", "mgms", "Flexibility"))


def _envelope_topic(data: bytes) -> str:
    import json

    return str(json.loads(data)["topic"])


async def test_entries_a_dead_worker_left_pending_are_taken_over(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, Pipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        sent = await mgms.send(flex(), "ams")
        first = await ams.read("svc", "w1", block_ms=2000)  # w1 takes it, then dies unacknowledged
        assert [r.envelope.id for r in first] == [sent.id]
        assert await ams.read("svc", "w2", block_ms=10, claim_idle_ms=60_000) == []  # not idle long enough
        await asyncio.sleep(0.15)
        taken = await ams.read("svc", "w2", block_ms=10, claim_idle_ms=100)
        assert [r.envelope.id for r in taken] == [sent.id] and ams.counters["claimed"] == 1
        await ams.ack("svc", taken[0].entry_id)
        assert await ams.read("svc", "w1", block_ms=10, claim_idle_ms=100) == []  # handled once
