"""End-to-end receipts in the messaging core, with a real Redis and an in-process pipe.

A message leaves the sender only when the receiver's signed Receipt comes back; until then
it is resent, the receiver drops the duplicate and answers the receipt again; bounded, and
given up with a typed reason. The transport is a pipe that can lose messages *after*
acknowledging them, which is what a broker killed right after its PUBACK does.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from gateway.config import ReceiptSettings
from gateway.errors import TransportRefused
from gateway.messaging import Messenger, UnreceiptedReason, outbox_status
from gateway.semantic import (
    Flexibility,
    Keystore,
    KeystoreSettings,
    MemoryNonceStore,
    Opener,
    Receipt,
    Sealer,
    write_key_pair,
)
from gateway.semantic.envelope import load_json
from gateway.services import RedisServer
from gateway.transport.base import Delivery, MessageHandler, MessageTransport, Outgoing

pytestmark = pytest.mark.timeout(30)

FAST = ReceiptSettings(resend_initial_s=0.1, resend_max_s=0.4)


class LossyPipe(MessageTransport):
    """Acknowledges every send; ``lose`` says which to drop after the ack (by message type)."""

    name = "pipe"

    def __init__(self, network: dict[str, LossyPipe], me: str) -> None:
        self.network = network
        self.me = me
        self.handler: MessageHandler | None = None
        self.lose: dict[str, int] = {}  # message type -> how many more to drop
        self.refuse = False
        self.carried: list[Outgoing] = []

    async def start(self, handler: MessageHandler) -> None:
        self.handler = handler
        self.network[self.me] = self

    async def send(self, message: Outgoing) -> None:
        if self.refuse:
            raise TransportRefused("pipe", "not authorised")
        kind = message.topic.rsplit("/", 1)[-1]
        if self.lose.get(kind, 0) > 0:
            self.lose[kind] -= 1
            return  # "acknowledged" and gone: the broker died before writing it
        peer = self.network.get(message.recipient)
        if peer is None or peer.handler is None:
            return  # nobody there: acknowledged by the hop, never delivered
        self.carried.append(message)
        await peer.handler(Delivery(message.data, message.topic, "pipe", peer=self.me))

    async def close(self) -> None:
        self.network.pop(self.me, None)

    def stats(self) -> Mapping[str, int]:
        return {"carried": len(self.carried)}


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


def messenger(
    name: str,
    keys: dict[str, Keystore],
    rc: aioredis.Redis,
    net: dict[str, LossyPipe],
    receipts: ReceiptSettings = FAST,
) -> Messenger:
    return Messenger(
        Sealer(keys[name]),
        Opener(keys[name], MemoryNonceStore()),
        rc,
        {"pipe": LossyPipe(net, name)},
        prefix=f"t:{name}",
        receipts=receipts,
    )


def pipe_of(m: Messenger) -> LossyPipe:
    pipe = m.transports["pipe"]
    assert isinstance(pipe, LossyPipe)
    return pipe


def flex(i: int = 1) -> Flexibility:
    t0 = datetime.now(UTC).replace(microsecond=0)
    return Flexibility(
        identifier=f"flex-{i}", flexibility_type="downward", power_kw=10.0 + i, start=t0, stop=t0 + timedelta(hours=1)
    )


async def until(cond: object, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_receipt_round_trip_signed_by_the_receiver_with_the_digest_of_the_stored_bytes(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        sent = await mgms.send(flex(), "ams")

        async def receipted() -> bool:
            return mgms.counters["receipted"] == 1 and await mgms.awaiting_length() == 0

        await until(receipted)
        assert await mgms.outbox_length() == 0
        assert [r.envelope.id for r in await ams.read("svc", "w1", block_ms=100)] == [sent.id]
        # what went back: a Receipt the sender's own Opener accepts as signed by the AMS
        (msg,) = [m for m in pipe_of(ams).carried if m.topic.endswith("/Receipt")]
        envelope, _ = Opener(keys["mgms"], MemoryNonceStore()).open_unclaimed(msg.data)
        assert envelope.sender == "ams" and envelope.topic == "heila/v1/to/mgms/from/ams/Receipt"
        receipt = envelope.payload
        assert isinstance(receipt, Receipt) and receipt.message_ref == sent.id
        (original,) = [m for m in pipe_of(mgms).carried if m.message_id == sent.id]
        assert receipt.digest_sha256 == hashlib.sha256(original.data).hexdigest()
        assert abs((receipt.stored_at - datetime.now(UTC)).total_seconds()) < 5
        # receipts are not receipted, not stored in the inbox, not counted as received
        assert ams.counters["receipts_sent"] == 1 and mgms.counters["receipts_sent"] == 0
        assert mgms.counters["received"] == 0 and await rc.xlen(mgms.keys.inbox) == 0
        assert mgms.counters["resent"] == 0


async def test_acknowledged_then_lost_message_is_resent_and_stored_once(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        pipe_of(mgms).lose["Flexibility"] = 1  # the hop acknowledged it, then lost it
        sent = await mgms.send(flex(), "ams")
        await until(lambda: _eq(mgms.awaiting_length(), 1))
        assert await rc.xlen(ams.keys.inbox) == 0  # lost: the old code would be done here

        async def receipted() -> bool:
            return mgms.counters["receipted"] == 1 and await mgms.awaiting_length() == 0

        await until(receipted)
        assert mgms.counters["resent"] >= 1
        assert [r.envelope.id for r in await ams.read("svc", "w1", block_ms=100)] == [sent.id]


async def test_lost_receipt_means_resend_duplicate_dropped_and_receipt_answered_again(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("ams", keys, rc, net) as ams, messenger("mgms", keys, rc, net) as mgms:
        pipe_of(ams).lose["Receipt"] = 2  # the first two receipts vanish after their ack
        sent = await mgms.send(flex(), "ams")

        async def receipted() -> bool:
            return mgms.counters["receipted"] == 1 and await mgms.awaiting_length() == 0

        await until(receipted)
        assert mgms.counters["resent"] >= 2
        assert ams.counters["received"] == 1  # stored once
        assert ams.counters["duplicates"] >= 2 and ams.counters["receipts_repeated"] >= 2
        assert ams.opener.counter.snapshot().get("replayed", 0) == 0  # a resend is not a replay
        assert await rc.xlen(ams.keys.inbox) == 1
        assert [r.envelope.id for r in await ams.read("svc", "w1", block_ms=100)] == [sent.id]
        # every resend carried the very same bytes
        copies = {m.data for m in pipe_of(mgms).carried if m.message_id == sent.id}
        assert len(copies) == 1


async def test_no_receipt_before_the_deadline_is_given_up_typed_and_counted(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    # the receiver is not there at all: every send is acknowledged by the hop and goes nowhere
    async with messenger("mgms", keys, rc, net) as mgms:
        deadline = datetime.now(UTC) + timedelta(seconds=0.6)
        sent = await mgms.send(flex(), "ams", deadline=deadline, subject="act:1")

        async def given_up_here() -> bool:
            return mgms.counters["unreceipted"] == 1

        await until(given_up_here)
        assert await mgms.awaiting_length() == 0 and await mgms.outbox_length() == 0
        (given_up,) = await mgms.read_unreceipted("app", "w1", block_ms=100)
        assert given_up.message_id == sent.id and given_up.subject == "act:1"
        assert given_up.reason is UnreceiptedReason.DEADLINE and given_up.type == "Flexibility"
        assert given_up.recipient == "ams" and given_up.sends >= 2  # resent before giving up
        assert given_up.deadline is not None and abs((given_up.deadline - deadline).total_seconds()) < 0.01
        assert mgms.counters["unreceipted"] == 1 and mgms.counters["unreceipted_deadline"] == 1
        dead = [f for _, f in await rc.xrange(mgms.keys.dead)]
        assert dead[-1]["id"] == sent.id and dead[-1]["reason"].startswith("deadline: no receipt")
        await mgms.ack_unreceipted("app", given_up.entry_id)
        assert await mgms.read_unreceipted("app", "w1", block_ms=10) == []


async def test_resends_are_bounded_by_attempts(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("mgms", keys, rc, net, receipts=FAST.model_copy(update={"max_attempts": 3})) as mgms:
        await mgms.send(flex(), "ams")

        async def given_up() -> bool:
            return mgms.counters["unreceipted_max_attempts"] == 1

        await until(given_up)
        assert mgms.counters["resent"] == 2  # three sends in all
        assert await mgms.awaiting_length() == 0 and await mgms.outbox_length() == 0


async def test_unsent_message_past_its_deadline_is_given_up_from_the_outbox(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("mgms", keys, rc, net) as mgms:
        await mgms.close()  # not sending: the entry stays in the outbox
        await mgms.send(flex(), "ams", deadline=datetime.now(UTC) - timedelta(seconds=1), subject="s")
        assert await mgms.outbox_length() == 1
    async with messenger("mgms", keys, rc, net) as again:
        await until(lambda: _eq(again.outbox_length(), 0))
        (given_up,) = await again.read_unreceipted("app", "w1", block_ms=100)
        assert given_up.reason is UnreceiptedReason.DEADLINE and given_up.sends == 0


async def test_refused_message_is_reported_unreceipted(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("mgms", keys, rc, net) as mgms:
        pipe_of(mgms).refuse = True
        await mgms.send(flex(), "ams", subject="act:9")
        await until(lambda: _eq(mgms.outbox_length(), 0))
        (given_up,) = await mgms.read_unreceipted("app", "w1", block_ms=100)
        assert given_up.reason is UnreceiptedReason.REFUSED and "not authorised" in given_up.detail
        assert mgms.counters["refused"] == 1 and mgms.counters["unreceipted"] == 0


async def test_a_receipt_that_does_not_match_leaves_the_message_waiting(
    keys: dict[str, Keystore], rc: aioredis.Redis
) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("mgms", keys, rc, net, receipts=FAST.model_copy(update={"resend_initial_s": 30})) as mgms:
        sent = await mgms.send(flex(), "ams")
        await until(lambda: _eq(mgms.awaiting_length(), 1))
        # the recipient answers, but for other bytes than the ones sent
        ams = messenger("ams", keys, rc, net)
        from gateway.messaging import _ReceiptDue

        await ams._send_receipt(_ReceiptDue(sent.id, "mgms", "0" * 64, 0, "pipe"))
        assert mgms.counters["receipts_mismatched"] == 1 and await mgms.awaiting_length() == 1


async def test_outbox_age_and_size_are_written_as_gauges(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    net: dict[str, LossyPipe] = {}
    async with messenger("mgms", keys, rc, net, receipts=FAST.model_copy(update={"resend_initial_s": 30})) as mgms:
        await mgms.send(flex(1), "ams")
        await until(lambda: _eq(mgms.awaiting_length(), 1))
        await asyncio.sleep(0.2)
        await mgms.close()
        await mgms.send(flex(2), "ams")  # not sent: no sender task now
        status = await outbox_status(rc, mgms.keys, ["pipe"])
        assert status.unsent == 1 and status.awaiting_receipt == 1
        assert status.oldest_awaiting_age_s >= 0.2 and status.oldest_unsent_age_s < status.oldest_awaiting_age_s
        await mgms.write_stats()
        stats = await rc.hgetall(mgms.keys.stats)
        assert stats["outbox_unsent"] == "1" and stats["outbox_awaiting_receipt"] == "1"
        assert float(stats["outbox_oldest_awaiting_s"]) >= 0.2


async def test_awaiting_messages_count_against_the_outbox_limit(keys: dict[str, Keystore], rc: aioredis.Redis) -> None:
    from gateway.errors import StoreError

    net: dict[str, LossyPipe] = {}
    m = messenger("mgms", keys, rc, net, receipts=FAST.model_copy(update={"resend_initial_s": 30}))
    m.outbox_max = 2
    async with m:
        await m.send(flex(1), "ams")
        await m.send(flex(2), "ams")
        await until(lambda: _eq(m.awaiting_length(), 2))
        with pytest.raises(StoreError, match="the limit"):
            await m.send(flex(3), "ams")


def test_a_receipt_is_sealed_and_opened_like_any_message(keys: dict[str, Keystore]) -> None:
    from gateway.semantic import Envelope

    r = Receipt(message_ref="urn:uuid:3f1b2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d", digest_sha256="a" * 64,
                stored_at=datetime.now(UTC))  # fmt: skip
    env = Envelope.create(r, sender="ams", recipient="mgms", topic="heila/v1/to/mgms/from/ams/Receipt")
    doc = load_json(Sealer(keys["ams"]).seal(env))
    assert "ciphertext" in doc and doc["type"] == "Receipt"
    with pytest.raises(ValueError):
        Receipt(message_ref="not-an-id", digest_sha256="a" * 64, stored_at=datetime.now(UTC))
    with pytest.raises(ValueError):
        Receipt(message_ref=r.message_ref, digest_sha256="A" * 64, stored_at=datetime.now(UTC))


async def _eq(coro: object, value: int) -> bool:
    return await coro == value  # type: ignore[misc]
