"""The messaging core: durable outbox and inbox in Redis around any message transport.

Why it is shaped like this: paho keeps its queue in memory and an HTTPS request is gone when
the process is, yet "nothing acknowledged is lost" must hold across a broker restart, a
peer that is down and a restart of either participant. So both ends of every message are
Redis streams, written with AOF, and the transports in between only move bytes. And since a
next hop's acknowledgement is no proof of delivery (mosquitto sends PUBACK before it writes
its store, so a kill -9 loses acknowledged messages), a message is done only when the
*receiver* says, in a signed :class:`~gateway.semantic.Receipt`, that it stored it:

* :meth:`Messenger.send` validates, signs and (by default) encrypts the message, then appends
  the sealed bytes to the outbox stream of the transport that reaches the recipient. Once
  ``send`` returned the message is durable. A sender task per transport drains the outbox in
  order, a window of messages at a time. When the next hop acknowledged an entry (PUBACK,
  HTTP 2xx: the hop-level step) the entry moves, in one atomic step, to the *awaiting
  receipt* state (a hash per message and two sorted sets: when to resend it, since when it
  waits). A transport error leaves the entry in the outbox and the task retries with
  capped, jittered backoff; a refusal (ACL, credentials, the receiver judged it bad) moves it
  to the dead-letter stream, counted.
* **Receipts.** The receiver stores a message (below), then answers a Receipt: the message
  id, the SHA-256 of the sealed bytes it stored, when it stored them; signed (and encrypted)
  like every message, sent over the transport that routes to the sender. A Receipt that
  matches an awaiting entry (same id, from the recipient, same digest) deletes it: only then
  has the message left the sender. Until then a resend task sends the *same bytes* again,
  after ``resend_initial_s`` doubling to ``resend_max_s``; the receiver drops the duplicate
  by id and answers the receipt again. Bounded: after ``max_attempts`` sends, past the
  message's maximum age, or past the deadline :meth:`send` was given (an activation's start),
  the message is given up: dead-lettered with the reason, counted ``unreceipted``, and
  written to the ``unreceipted`` stream for the application (the AMS settles such an
  activation ``undelivered``, see :class:`Unreceipted`). Receipts are not receipted: a lost
  one is answered again when the resend arrives.
* Inbound bytes from any transport go through one pipeline (:meth:`Messenger.deliver`):
  :class:`~gateway.semantic.security.Opener` checks size, JSON, context, version, header,
  recipient, sender key, time window, decryption and signature; the topic the message arrived
  on must equal the signed header topic; the peer the transport authenticated must be the
  signer. Then one Lua script claims the message id (replay and duplicate protection) and
  appends the plaintext to the inbox stream *in the same atomic step*, so a crash can neither
  store a message twice nor mark it seen without storing it. Only then does the transport
  acknowledge, and the receipt is queued. A duplicate of the same bytes (a resend after a
  lost receipt, a broker's redelivery) is counted as ``duplicates``, acknowledged without
  being stored again, and receipted again; the id of a stored message on other bytes is a
  replay: refused (``Replayed``, HTTPS 422), counted as ``rejected_replayed``.
* Consumers (the AMS workers, the MGMS flexibility agent) read the inbox through a Redis
  consumer group (:meth:`Messenger.serve`) and acknowledge an entry after handling it; a
  consumer that dies leaves its entries pending and they are handled again on restart, so
  handlers are written to be idempotent (keyed by message id).

Key layout (``P`` = the participant's prefix, e.g. ``mgms:lab1`` or ``ams:ams``)::

    P:msg:outbox:{transport}   STREAM  sealed messages not yet acknowledged by the next hop
    P:msg:await:{id}           HASH    a message the next hop took, awaiting its receipt (bytes, digest, sends)
    P:msg:await:due            ZSET    id -> when to resend it or give it up (ms)
    P:msg:await:since          ZSET    id -> when it was queued (ms): the oldest one's age is a metric
    P:msg:early:{id}           STRING  a receipt that came before its entry left the outbox (expires)
    P:msg:unreceipted          STREAM  messages given up without a receipt, typed, for the application (capped)
    P:msg:inbox                STREAM  accepted messages (plaintext), consumer group per service
    P:msg:dead                 STREAM  refused outbound and failed inbound messages, with reason
    P:msg:seen:{id}            STRING  message id claimed: digest of its bytes and when they were
                                       stored (expires with the replay window)
    P:msg:stats                HASH    counters and the outbox gauges
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.config import MessagingSettings, ReceiptSettings
from gateway.errors import StoreError, TransportError, TransportRefused
from gateway.semantic import (
    Envelope,
    Keystore,
    KeystoreSettings,
    Malformed,
    MessageRejected,
    Opener,
    Payload,
    Receipt,
    RedisNonceStore,
    Replayed,
    Sealer,
    SecurityMode,
    UnknownSender,
)
from gateway.semantic.envelope import parse, serialise
from gateway.store import reraise_lost_cancel, stream_entries
from gateway.transport.base import Delivery, MessageTransport, Outgoing, topic_for

__all__ = [
    "MessagingKeys",
    "Messenger",
    "OutboxStatus",
    "Received",
    "Unreceipted",
    "UnreceiptedReason",
    "build_messenger",
    "build_transport",
    "outbox_status",
]

log = logging.getLogger(__name__)

# Queue to the outbox unless it is full, in one round trip (never trim: unsent is unsent).
# Messages awaiting their receipt count against the same limit: they are not done either.
_QUEUE_LUA = """
if redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""

# Claim the id and store the message in one step; TIME gives the "stored" probe hop.
# The seen key holds a digest of the first copy's bytes and when they were stored: a
# duplicate answers {0, "digest ms"}, so the caller tells a redelivery (the same bytes) from
# an id reused for other content, and receipts it again with the first store's time.
_ACCEPT_LUA = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  local t = redis.call('TIME')
  local ns = t[1] .. string.format('%06d', tonumber(t[2])) .. '000'
  return {1, redis.call('XADD', KEYS[2], '*', 'stored_ns', ns, unpack(ARGV, 3))}
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""

# The same without the probe hop (probes off): no TIME, no stored_ns field.
_ACCEPT_BARE_LUA = """
if redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[1]) then
  return {1, redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))}
end
return {0, redis.call('GET', KEYS[1]) or ''}
"""

# The next hop took an outbox entry: move it to "awaiting receipt" in one step, unless its
# receipt already came (the receiver can answer before the whole send window is acked).
# KEYS: outbox, await hash, due, since, early marker
# ARGV: stream entry id, message id, due ms, since ms, "digest recipient", field/value pairs
_MOVE_LUA = """
redis.call('XDEL', KEYS[1], ARGV[1])
local early = redis.call('GET', KEYS[5])
if early then
  redis.call('DEL', KEYS[5])
  if early == ARGV[5] then return 0 end
end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[2])
return 1
"""

# A receipt: delete the awaiting entry if it is this recipient's and these bytes'.
# KEYS: await hash, due, since, early marker; ARGV: message id, receipt sender, digest, early ttl ms
# -> {1, queued ms} done; {0} no entry (early: remembered); {-1, recipient}; {-2, digest}
_RECEIPT_LUA = """
local h = redis.call('HMGET', KEYS[1], 'recipient', 'digest', 'queued_ms')
if not h[1] then
  redis.call('SET', KEYS[4], ARGV[3] .. ' ' .. ARGV[2], 'PX', ARGV[4])
  return {0}
end
if h[1] ~= ARGV[2] then return {-1, h[1]} end
if h[2] ~= ARGV[3] then return {-2, h[2]} end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return {1, h[3] or '0'}
"""

# Take up to n due entries and lease them (push their due time out), so two workers of one
# participant do not resend or give up the same message at once.
# KEYS: due; ARGV: now ms, lease ms, n
_CLAIM_DUE_LUA = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return ids
"""

_UNRECEIPTED_MAXLEN = 10_000
_RECEIPT_QUEUE_MAX = 10_000
_RECEIPT_TRIES = 3
_LEASE_MS = 30_000


class UnreceiptedReason(StrEnum):
    """Why a message was given up without a receipt."""

    DEADLINE = "deadline"  # the deadline :meth:`Messenger.send` was given passed (an activation's start)
    MAX_AGE = "max_age"  # older than the receipts' max age: a resend would be refused as expired
    MAX_ATTEMPTS = "max_attempts"  # sent max_attempts times, the next hop took it each time, no receipt
    REFUSED = "refused"  # the next hop or the receiver refused it for good (ACL, 4xx)


@dataclass(frozen=True, slots=True)
class Unreceipted:
    """A message the sender gave up on: no receipt came back in time. The application decides
    what it means (the AMS settles an activation ``undelivered``).

    ``subject`` is the business id :meth:`Messenger.send` was given (an activation id), empty
    when none was; ``deadline`` is None when the message had none.
    """

    entry_id: str
    message_id: str
    recipient: str
    type: str
    subject: str
    reason: UnreceiptedReason
    detail: str
    sends: int
    queued_at: datetime
    deadline: datetime | None


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """How much a participant's outbox holds and for how long (metrics, ``ams status``)."""

    unsent: int
    awaiting_receipt: int
    oldest_unsent_age_s: float
    oldest_awaiting_age_s: float

    def gauges(self) -> dict[str, str]:
        return {
            "outbox_unsent": str(self.unsent),
            "outbox_awaiting_receipt": str(self.awaiting_receipt),
            "outbox_oldest_unsent_s": f"{self.oldest_unsent_age_s:.3f}",
            "outbox_oldest_awaiting_s": f"{self.oldest_awaiting_age_s:.3f}",
        }


@dataclass(frozen=True, slots=True)
class _ReceiptDue:
    """A receipt to send: for which message, to whom, what was stored when."""

    message_id: str
    sender: str
    digest: str
    stored_ms: int
    arrived_on: str


async def _execute(pipe: Any) -> list[Any]:
    """``pipe.execute()`` that always gives the connection back: redis-py loads a pipeline's
    scripts before its own try/finally, so a cancel there would leave the connection held."""
    try:
        result: list[Any] = await pipe.execute()
        return result
    finally:
        await pipe.reset()


def _ms_to_dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _text(v: bytes | str | int) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True, slots=True)
class MessagingKeys:
    """Redis keys of one participant's messaging state (see the module docstring)."""

    prefix: str

    def outbox(self, transport: str) -> str:
        return f"{self.prefix}:msg:outbox:{transport}"

    @property
    def inbox(self) -> str:
        return f"{self.prefix}:msg:inbox"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:msg:dead"

    def seen(self, message_id: str) -> str:
        return f"{self.prefix}:msg:seen:{message_id}"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:msg:stats"

    def awaiting(self, message_id: str) -> str:
        return f"{self.prefix}:msg:await:{message_id}"

    @property
    def due(self) -> str:
        return f"{self.prefix}:msg:await:due"

    @property
    def since(self) -> str:
        return f"{self.prefix}:msg:await:since"

    def early(self, message_id: str) -> str:
        return f"{self.prefix}:msg:early:{message_id}"

    @property
    def unreceipted(self) -> str:
        return f"{self.prefix}:msg:unreceipted"


async def outbox_status(redis: aioredis.Redis, keys: MessagingKeys, transports: list[str]) -> OutboxStatus:
    """The outbox gauges from Redis alone (no Messenger needed: ``ams status`` uses it).

    Unsent ages come from the stream entry ids (milliseconds since the epoch, Redis clock),
    awaiting ages from the ``since`` set; "now" is this host's clock.
    """
    pipe = redis.pipeline(transaction=False)
    for name in transports:
        pipe.xlen(keys.outbox(name))
        pipe.xrange(keys.outbox(name), "-", "+", count=1)
    pipe.zcard(keys.since)
    pipe.zrange(keys.since, 0, 0, withscores=True)
    replies = await _execute(pipe)
    now_ms = time.time() * 1000
    unsent, oldest_unsent = 0, now_ms
    for i in range(len(transports)):
        unsent += int(replies[2 * i])
        first = stream_entries(replies[2 * i + 1])
        if first:
            oldest_unsent = min(oldest_unsent, float(first[0][0].split("-")[0]))
    awaiting = int(replies[-2])
    oldest = replies[-1]
    oldest_awaiting = float(oldest[0][1]) if oldest else now_ms
    return OutboxStatus(
        unsent=unsent,
        awaiting_receipt=awaiting,
        oldest_unsent_age_s=max(0.0, (now_ms - oldest_unsent) / 1000),
        oldest_awaiting_age_s=max(0.0, (now_ms - oldest_awaiting) / 1000),
    )


@dataclass(frozen=True, slots=True)
class Received:
    """One accepted message as a consumer gets it from the inbox, with its probe hops.

    ``created_ns`` is when the sender created (and queued) it, ``received_ns`` when our
    transport got the bytes, ``stored_ns`` when Redis stored it (Redis clock). The last two
    are probe hops: 0 when the receiving Messenger runs with probes off. ``created_ns``
    comes from the envelope and is always there.
    """

    entry_id: str
    envelope: Envelope
    transport: str
    peer: str
    received_ns: int
    stored_ns: int

    @property
    def created_ns(self) -> int:
        return int(self.envelope.created.timestamp() * 1e9)


def _received_field(delivery: Delivery) -> tuple[str, ...]:
    return ("received_ns", str(delivery.received_ns))


def _no_fields(delivery: Delivery) -> tuple[str, ...]:
    return ()


def _backoff(attempt: int, low: float = 0.05, high: float = 5.0) -> float:
    return random.uniform(0, min(high, low * 2**attempt))


Handler = Callable[[Received], Awaitable[None]]


class Messenger:
    """Sends and receives sealed HEILA messages for one participant over its transports.

    ``routes`` names the transport that reaches each peer; peers not listed use
    ``default_transport`` (the first transport when not given).

    ``probes`` False: the inbox entry gets no ``received_ns`` and no ``stored_ns`` (the
    accept script is chosen here, without Redis ``TIME``). Build the transports with the
    same setting (:func:`build_messenger` does) so they do not read the clock either.

    ``receipts`` (default: on, :class:`~gateway.config.ReceiptSettings`): a sent message
    waits for the receiver's Receipt and is resent until it comes (module docstring);
    disabled, an entry is done at the next hop's acknowledgement and no receipts are sent.
    """

    def __init__(
        self,
        sealer: Sealer,
        opener: Opener,
        redis: aioredis.Redis,
        transports: Mapping[str, MessageTransport],
        *,
        prefix: str,
        routes: Mapping[str, str] | None = None,
        default_transport: str | None = None,
        ttl_s: float = 300.0,
        send_window: int = 64,
        outbox_max: int = 100_000,
        probes: bool = True,
        receipts: ReceiptSettings | None = None,
    ) -> None:
        if not transports:
            raise ValueError("a Messenger needs at least one transport")
        self.participant = sealer.keystore.own.participant
        if opener.keystore.own.participant != self.participant:
            raise ValueError("sealer and opener belong to different participants")
        self.sealer = sealer
        self.opener = opener
        self.redis = redis
        self.transports = dict(transports)
        self.keys = MessagingKeys(prefix)
        self.routes = dict(routes or {})
        self.default_transport = default_transport or next(iter(self.transports))
        for peer, name in {**self.routes, "": self.default_transport}.items():
            if name not in self.transports:
                raise ValueError(f"route {peer or '(default)'} -> {name!r}: no such transport")
        self.ttl_s = ttl_s
        self.send_window = send_window
        self.outbox_max = outbox_max
        self.counters: Counter[str] = Counter()
        self.probes = probes
        self.receipts = receipts or ReceiptSettings()
        window_s = min(ttl_s, opener.replay_window.total_seconds())
        self.max_age_s = self.receipts.max_age_s or 0.9 * window_s
        self._accept = self.redis.register_script(_ACCEPT_LUA if probes else _ACCEPT_BARE_LUA)
        self._hop_fields = _received_field if probes else _no_fields
        self._queue = self.redis.register_script(_QUEUE_LUA)
        self._move = self.redis.register_script(_MOVE_LUA)
        self._receipt = self.redis.register_script(_RECEIPT_LUA)
        self._claim_due = self.redis.register_script(_CLAIM_DUE_LUA)
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.transports}
        # receipts to send: bounded; a receipt dropped here is answered again on the resend
        self._receipts_due: deque[_ReceiptDue] = deque()
        self._receipts_wake = asyncio.Event()
        self._resend_wake = asyncio.Event()  # set when entries start awaiting a receipt
        self._senders: list[asyncio.Task[None]] = []
        self._started = False

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start every transport (inbound goes to :meth:`deliver`), the outbox senders and,
        with receipts on, the resend and receipt tasks."""
        if self._started:
            return
        self._started = True
        try:
            for transport in self.transports.values():
                await transport.start(self.deliver)
        except BaseException:
            await self.close()
            raise
        for name in self.transports:
            self._senders.append(asyncio.create_task(self._drain_outbox(name), name=f"outbox:{name}"))
        if self.receipts.enabled:
            self._senders.append(asyncio.create_task(self._resend_loop(), name="outbox:resend"))
            self._senders.append(asyncio.create_task(self._send_receipts(), name="outbox:receipts"))

    async def close(self) -> None:
        """Stop the senders (unsent and unreceipted messages stay in Redis) and the transports."""
        for task in self._senders:
            task.cancel()
        for task in self._senders:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._senders.clear()
        for transport in self.transports.values():
            try:
                await transport.close()
            except Exception:
                log.exception("closing transport %s", transport.name)

    async def __aenter__(self) -> Messenger:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----------------------------------------------------------------- sending

    def transport_for(self, recipient: str) -> str:
        return self.routes.get(recipient, self.default_transport)

    async def send(
        self,
        payload: Payload,
        recipient: str,
        *,
        ttl_s: float | None = None,
        deadline: datetime | None = None,
        subject: str = "",
    ) -> Envelope:
        """Seal ``payload`` for ``recipient`` and queue it durably; returns the envelope sent.

        ``deadline``: with receipts on, a message whose receipt has not come by then is given
        up (reason ``deadline``) and reported on the ``unreceipted`` stream with ``subject``
        (the business id, e.g. an activation id), so the application can act on it.

        Raises :class:`StoreError` if Redis cannot take it (nothing was queued) and
        :class:`~gateway.semantic.errors.MessageRejected` if the payload does not validate.
        """
        ttl = self.ttl_s if ttl_s is None else ttl_s
        envelope = Envelope.create(
            payload,
            sender=self.participant,
            recipient=recipient,
            topic=topic_for(recipient, self.participant, payload.message_type),
            ttl_s=ttl,
        )
        data = self.sealer.seal(envelope)
        transport = self.transport_for(recipient)
        key = self.keys.outbox(transport)
        queued_ms = int(envelope.created.timestamp() * 1000)
        # resends stop a little before the envelope expires (one arriving later is refused);
        # a message with a deadline is given up at the deadline, however long its envelope lives
        give_up_ms = queued_ms + int(min(self.max_age_s, max(0.5 * ttl, ttl - 1.0)) * 1000)
        if deadline is not None:
            give_up_ms = min(queued_ms + int(self.max_age_s * 1000), int(deadline.timestamp() * 1000))
        args: list[str | bytes | int] = [
            self.outbox_max,
            "id",
            envelope.id,
            "recipient",
            recipient,
            "topic",
            envelope.topic,
            "data",
            data,
            "type",
            payload.message_type,
            "digest",
            hashlib.sha256(data).hexdigest(),
            "queued_ms",
            queued_ms,
            "give_up_ms",
            give_up_ms,
        ]
        if deadline is not None:
            args += ["deadline_ms", int(deadline.timestamp() * 1000)]
        if subject:
            args += ["subject", subject]
        try:
            queued = await self._queue(keys=[key, self.keys.since], args=args)
        except RedisError as exc:
            raise StoreError(f"outbox: {exc}") from exc
        if queued is None:
            raise StoreError(
                f"outbox {key} holds {self.outbox_max} unsent or unreceipted messages (the limit): not queued"
            )
        self.counters["queued"] += 1
        self._wake[transport].set()
        return envelope

    async def outbox_length(self, transport: str | None = None) -> int:
        """Messages not yet taken by the next hop (not counting those awaiting a receipt)."""
        names = [transport] if transport else list(self.transports)
        return sum([await self.redis.xlen(self.keys.outbox(n)) for n in names])

    async def awaiting_length(self) -> int:
        """Messages the next hop took whose receipt has not come back yet."""
        return int(await self.redis.zcard(self.keys.since))

    async def outbox_status(self) -> OutboxStatus:
        return await outbox_status(self.redis, self.keys, list(self.transports))

    def _overdue(self, f: Mapping[str, str], now_ms: int) -> tuple[UnreceiptedReason, str] | None:
        """Why a message must be given up now, or None; see the module docstring."""
        deadline = int(f.get("deadline_ms", "0") or 0)
        if deadline and now_ms >= deadline:
            return UnreceiptedReason.DEADLINE, f"no receipt before its deadline {_ms_to_dt(deadline).isoformat()}"
        give_up = int(f.get("give_up_ms", "0") or 0)
        if give_up and now_ms >= give_up:
            return (
                UnreceiptedReason.MAX_AGE,
                f"no receipt within {(give_up - int(f.get('queued_ms', give_up))) / 1000:g} s",
            )
        if int(f.get("sends", "0") or 0) >= self.receipts.max_attempts:
            return UnreceiptedReason.MAX_ATTEMPTS, f"no receipt after {f.get('sends')} sends"
        return None

    def _next_due_ms(self, f: Mapping[str, str], sends: int, now_ms: int) -> int:
        """When to resend: doubling from resend_initial_s, jittered down by up to half; never
        later than the deadline or the give-up time (it is given up then)."""
        delay_s = min(self.receipts.resend_max_s, self.receipts.resend_initial_s * 2 ** max(0, sends - 1))
        due = now_ms + int(random.uniform(0.5, 1.0) * delay_s * 1000)
        for limit in (f.get("deadline_ms"), f.get("give_up_ms")):
            if limit:
                due = min(due, int(limit))
        return due

    async def _drain_outbox(self, name: str) -> None:
        transport = self.transports[name]
        key = self.keys.outbox(name)
        wake = self._wake[name]
        attempt = 0
        while True:
            reraise_lost_cancel()  # redis-py can swallow a cancel (see gateway.store)
            # Cleared before looking, so a send() that lands while we look is not missed.
            wake.clear()
            try:
                entries = stream_entries(await self.redis.xrange(key, "-", "+", count=self.send_window))
            except RedisError as exc:
                log.warning("outbox %s: Redis: %s", name, exc)
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            if not entries:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await wake.wait()
                continue
            if self.receipts.enabled:
                # a message that could not even reach the next hop before its deadline or
                # max age is given up here, as one awaiting its receipt would be
                now_ms = int(time.time() * 1000)
                keep: list[tuple[str, dict[str, str]]] = []
                for eid, f in entries:
                    overdue = self._overdue({**f, "sends": "0"}, now_ms)
                    if overdue is None:
                        keep.append((eid, f))
                    else:
                        await self._give_up(f, *overdue, outbox=(key, eid), transport=name)
                entries = keep
                if not entries:
                    continue
            outgoing = [
                (
                    eid,
                    f,
                    Outgoing(message_id=f["id"], recipient=f["recipient"], topic=f["topic"], data=f["data"].encode()),
                )
                for eid, f in entries
            ]
            results = await asyncio.gather(*(transport.send(o) for _, _, o in outgoing), return_exceptions=True)
            done: list[str] = []
            moved = 0
            failed: list[BaseException] = []
            pipe = self.redis.pipeline(transaction=False)
            now_ms = int(time.time() * 1000)
            for (eid, f, out), result in zip(outgoing, results, strict=True):
                if result is None:
                    self.counters["sent"] += 1
                    if self.receipts.enabled:
                        await self._queue_move(pipe, name, eid, f, now_ms)
                        moved += 1
                    else:
                        done.append(eid)
                elif isinstance(result, TransportRefused):
                    self.counters["refused"] += 1
                    log.error("message %s to %s refused by %s: %s", out.message_id, out.recipient, name, result)
                    await self._give_up(f, UnreceiptedReason.REFUSED, str(result), outbox=(key, eid), transport=name)
                elif isinstance(result, asyncio.CancelledError):
                    raise result
                else:
                    failed.append(result)
            if done:
                pipe.xdel(key, *done)
            if len(pipe):
                try:
                    replies = await _execute(pipe)
                except RedisError as exc:  # the entries stay and go out again: a duplicate, not a loss
                    log.warning("outbox %s: could not move sent entries: %s", name, exc)
                else:
                    # a move that answers 0 found the receipt there before it: done already
                    self.counters["receipted"] += sum(1 for r in replies[:moved] if r == 0)
                self._resend_wake.set()
            if failed:
                self.counters["send_errors"] += len(failed)
                if not isinstance(failed[0], TransportError):
                    log.error("outbox %s: unexpected send error", name, exc_info=failed[0])
                else:
                    log.info("outbox %s: %d not sent (%s); retrying", name, len(failed), failed[0])
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
            else:
                attempt = 0

    async def _queue_move(self, pipe: Any, transport: str, eid: str, f: Mapping[str, str], now_ms: int) -> None:
        """Add to ``pipe`` the move of a hop-acknowledged entry to "awaiting receipt"."""
        mid = f["id"]
        fields = {**f, "transport": transport, "sends": "1"}
        fields.setdefault("queued_ms", eid.split("-")[0])
        fields.setdefault("digest", hashlib.sha256(f["data"].encode()).hexdigest())
        args: list[str | int] = [
            eid,
            mid,
            self._next_due_ms(fields, 1, now_ms),
            fields["queued_ms"],
            f"{fields['digest']} {f['recipient']}",
        ]
        for k, v in fields.items():
            args += [k, v]
        keys = [
            self.keys.outbox(transport),
            self.keys.awaiting(mid),
            self.keys.due,
            self.keys.since,
            self.keys.early(mid),
        ]
        await self._move(keys=keys, args=args, client=pipe)  # queued on the pipeline, not run yet

    async def _give_up(
        self,
        f: Mapping[str, str],
        reason: UnreceiptedReason,
        detail: str,
        *,
        outbox: tuple[str, str] | None = None,
        transport: str = "",
    ) -> None:
        """Dead-letter a message with its reason and report it on the ``unreceipted`` stream,
        in one transaction with its removal from the outbox or the awaiting state.

        Redis failing here leaves the message where it was: it is given up on the next look.
        """
        mid = f["id"]
        pipe = self.redis.pipeline(transaction=True)
        if outbox is not None:
            pipe.xdel(outbox[0], outbox[1])
        else:
            pipe.delete(self.keys.awaiting(mid))
            pipe.zrem(self.keys.due, mid)
            pipe.zrem(self.keys.since, mid)
        pipe.xadd(
            self.keys.dead,
            {
                "id": mid,
                "direction": "out",
                "transport": transport or f.get("transport", ""),
                "reason": f"{reason}: {detail}",
            },
            maxlen=10_000,
            approximate=True,
        )
        if self.receipts.enabled:
            pipe.xadd(
                self.keys.unreceipted,
                {
                    "id": mid,
                    "recipient": f.get("recipient", ""),
                    "type": f.get("type", ""),
                    "subject": f.get("subject", ""),
                    "reason": str(reason),
                    "detail": detail,
                    "sends": f.get("sends", "0"),
                    "queued_ms": f.get("queued_ms", "0"),
                    "deadline_ms": f.get("deadline_ms", ""),
                },
                maxlen=_UNRECEIPTED_MAXLEN,
                approximate=True,
            )
        try:
            await _execute(pipe)
        except RedisError as exc:
            log.warning("message %s not given up yet (Redis: %s)", mid, exc)
            return
        if reason is not UnreceiptedReason.REFUSED:
            self.counters["unreceipted"] += 1
            self.counters[f"unreceipted_{reason}"] += 1
        log.error(
            "message %s (%s to %s) given up: %s: %s", mid, f.get("type", "?"), f.get("recipient", "?"), reason, detail
        )

    async def _resend_loop(self) -> None:
        """Resend messages whose receipt is overdue; give up those past their limits."""
        attempt = 0
        while True:
            reraise_lost_cancel()
            self._resend_wake.clear()  # before looking: an entry moved while we look is not missed
            now_ms = int(time.time() * 1000)
            try:
                ids = await self._claim_due(keys=[self.keys.due], args=[now_ms, _LEASE_MS, self.send_window])
                nxt = await self.redis.zrange(self.keys.due, 0, 0, withscores=True)
                attempt = 0
            except RedisError as exc:
                log.warning("resend: Redis: %s", exc)
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            if ids:
                await asyncio.gather(*(self._resend_one(_text(i)) for i in ids))
                continue
            wait_s = 1.0 if not nxt else (float(nxt[0][1]) - now_ms) / 1000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(1.0, max(0.01, wait_s))):
                    await self._resend_wake.wait()

    async def _resend_one(self, mid: str) -> None:
        try:
            f = cast(dict[str, str], await self.redis.hgetall(self.keys.awaiting(mid)))
        except RedisError as exc:
            log.warning("resend %s: Redis: %s", mid, exc)
            return  # leased: looked at again when the lease ends
        if not f:
            with contextlib.suppress(RedisError):  # receipted meanwhile
                await self.redis.zrem(self.keys.due, mid)
            return
        now_ms = int(time.time() * 1000)
        overdue = self._overdue(f, now_ms)
        if overdue is not None:
            await self._give_up(f, *overdue)
            return
        name = f.get("transport") or self.transport_for(f["recipient"])
        transport = self.transports.get(name) or self.transports[self.transport_for(f["recipient"])]
        out = Outgoing(message_id=mid, recipient=f["recipient"], topic=f["topic"], data=f["data"].encode())
        sends = int(f.get("sends", "1") or 1)
        try:
            await transport.send(out)  # the same bytes: the receiver tells a duplicate from a replay
        except TransportRefused as exc:
            self.counters["refused"] += 1
            await self._give_up(f, UnreceiptedReason.REFUSED, str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not taken by the next hop: try again soon, not counted as a send
            self.counters["resend_errors"] += 1
            log.info("resend of %s failed (%s); retrying", mid, exc)
            due = self._next_due_ms(f, 1, int(time.time() * 1000))
            with contextlib.suppress(RedisError):
                await self.redis.zadd(self.keys.due, {mid: due}, xx=True)
            return
        self.counters["resent"] += 1
        log.info("message %s to %s resent (send %d, no receipt yet)", mid, f["recipient"], sends + 1)
        due = self._next_due_ms(f, sends + 1, int(time.time() * 1000))
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(self.keys.awaiting(mid), "sends", 1)
        pipe.zadd(self.keys.due, {mid: due}, xx=True)  # xx: not back if the receipt came meanwhile
        try:
            results = await _execute(pipe)
        except RedisError as exc:
            log.warning("resend %s: Redis: %s", mid, exc)
            return
        if results and int(results[0]) == 1:  # HINCRBY made the hash anew: it had been receipted
            with contextlib.suppress(RedisError):
                await self.redis.delete(self.keys.awaiting(mid))

    # ----------------------------------------------------------------- receipts

    def _queue_receipt(self, due: _ReceiptDue) -> None:
        if len(self._receipts_due) >= _RECEIPT_QUEUE_MAX:
            self._receipts_due.popleft()
            self.counters["receipts_dropped"] += 1
        self._receipts_due.append(due)
        self._receipts_wake.set()

    async def _send_receipts(self) -> None:
        """Seal and send queued receipts, a window at a time; see the module docstring."""
        while True:
            reraise_lost_cancel()
            self._receipts_wake.clear()
            if not self._receipts_due:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self._receipts_wake.wait()
                continue
            batch = [self._receipts_due.popleft() for _ in range(min(self.send_window, len(self._receipts_due)))]
            await asyncio.gather(*(self._send_receipt(r) for r in batch))

    async def _send_receipt(self, due: _ReceiptDue) -> None:
        receipt = Receipt(message_ref=due.message_id, digest_sha256=due.digest, stored_at=_ms_to_dt(due.stored_ms))
        try:
            envelope = Envelope.create(
                receipt,
                sender=self.participant,
                recipient=due.sender,
                topic=topic_for(due.sender, self.participant, Receipt.message_type),
                ttl_s=self.ttl_s,
            )
            data = self.sealer.seal(envelope)
        except Exception:  # e.g. no key for that sender any more: nothing to send it with
            self.counters["receipt_errors"] += 1
            log.exception("receipt for %s to %s not sealed", due.message_id, due.sender)
            return
        out = Outgoing(message_id=envelope.id, recipient=due.sender, topic=envelope.topic, data=data)
        # the route to the sender first, then the transport the message came on
        names = list(dict.fromkeys([self.transport_for(due.sender), due.arrived_on]))
        names = [n for n in names if n in self.transports]
        for attempt in range(_RECEIPT_TRIES):
            name = names[attempt % len(names)]
            try:
                await self.transports[name].send(out)
            except asyncio.CancelledError:
                raise
            except TransportRefused as exc:
                self.counters["receipt_errors"] += 1
                log.warning("receipt for %s refused by %s: %s", due.message_id, name, exc)
                return
            except Exception as exc:
                log.info("receipt for %s over %s: %s", due.message_id, name, exc)
                await asyncio.sleep(_backoff(attempt, 0.1, 1.0))
                continue
            self.counters["receipts_sent"] += 1
            return
        # the sender resends the message and gets the receipt answered again
        self.counters["receipt_errors"] += 1

    async def _take_receipt(self, envelope: Envelope, receipt: Receipt) -> None:
        """A receipt came back: the message it names has left our outbox (if it matches)."""
        mid = receipt.message_ref
        keys = [self.keys.awaiting(mid), self.keys.due, self.keys.since, self.keys.early(mid)]
        args: list[str | int] = [mid, envelope.sender, receipt.digest_sha256, max(1000, int(self.max_age_s * 1000))]
        try:
            result = await self._receipt(keys=keys, args=args)
        except RedisError as exc:
            self.counters["store_errors"] += 1
            raise TransportError("receipt", f"receipt not recorded, not acknowledged: {exc}") from exc
        code = int(result[0])
        self.counters["receipts_received"] += 1
        if code == 1:
            self.counters["receipted"] += 1
            log.debug("receipt for %s from %s", mid, envelope.sender)
        elif code == 0:
            self.counters["receipts_early"] += 1  # ahead of the move (or a repeat): remembered
        else:
            self.counters["receipts_mismatched"] += 1
            what = "recipient" if code == -1 else "digest"
            log.warning("receipt for %s from %s does not match the message's %s: ignored", mid, envelope.sender, what)

    # ----------------------------------------------------------------- unreceipted

    async def read_unreceipted(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000
    ) -> list[Unreceipted]:
        """Given-up messages for this consumer group (its own pending ones first, then new)."""
        try:
            await self.redis.xgroup_create(self.keys.unreceipted, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        key = self.keys.unreceipted
        entries = stream_entries(await self.redis.xreadgroup(group, consumer, {key: "0"}, count=count))
        if not entries:
            entries = stream_entries(
                await self.redis.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms)
            )
        out: list[Unreceipted] = []
        for eid, f in entries:
            if not f:
                continue
            deadline = int(f.get("deadline_ms") or 0)
            out.append(
                Unreceipted(
                    entry_id=eid,
                    message_id=f.get("id", ""),
                    recipient=f.get("recipient", ""),
                    type=f.get("type", ""),
                    subject=f.get("subject", ""),
                    reason=UnreceiptedReason(f.get("reason", "max_age")),
                    detail=f.get("detail", ""),
                    sends=int(f.get("sends") or 0),
                    queued_at=_ms_to_dt(int(f.get("queued_ms") or 0)),
                    deadline=_ms_to_dt(deadline) if deadline else None,
                )
            )
        return out

    async def ack_unreceipted(self, group: str, *entry_ids: str) -> None:
        if entry_ids:
            await self.redis.xack(self.keys.unreceipted, group, *entry_ids)

    # ----------------------------------------------------------------- receiving

    async def deliver(self, delivery: Delivery) -> None:
        """The one inbound pipeline; see the module docstring. Called by the transports."""
        envelope, ttl_s = self.opener.open_unclaimed(delivery.data)  # raises MessageRejected, counted
        topic = delivery.topic.lstrip("/")
        if topic != envelope.topic:
            self._reject(Malformed(f"arrived on {topic!r}, signed for {envelope.topic!r}", message_id=envelope.id))
        if topic != topic_for(envelope.recipient, envelope.sender, envelope.type):
            # signed, but not on the layout's topic for its sender: broker ACLs are written
            # per layout topic, so a message outside it could dodge them
            self._reject(Malformed(f"topic {topic!r} does not follow the layout", message_id=envelope.id))
        if delivery.peer is not None and delivery.peer != envelope.sender:
            self._reject(
                UnknownSender(
                    f"authenticated as {delivery.peer!r} but signed by {envelope.sender!r}", message_id=envelope.id
                )
            )
        if isinstance(envelope.payload, Receipt):
            # checked like any message (signed by the receiver, on its own topic), never
            # stored in the inbox and never receipted: it only ends the wait for its message
            await self._take_receipt(envelope, envelope.payload)
            return
        fields: dict[str, str] = {
            "id": envelope.id,
            "type": envelope.type,
            "sender": envelope.sender,
            "transport": delivery.transport,
            "peer": delivery.peer or "",
            "doc": serialise(envelope).decode(),
        }
        full_digest = hashlib.sha256(delivery.data).hexdigest()
        digest = full_digest[:32]
        stored_ms = int(time.time() * 1000)
        args: list[Any] = [max(1, int(ttl_s * 1000)), f"{digest} {stored_ms}"]
        for k, v in fields.items():
            args += [k, v]
        args += self._hop_fields(delivery)
        try:
            entry = await self._accept(keys=[self.keys.seen(envelope.id), self.keys.inbox], args=args)
        except RedisError as exc:
            self.counters["store_errors"] += 1
            raise TransportError(delivery.transport, f"inbox not stored, not acknowledged: {exc}") from exc
        stored, first = int(entry[0]), _text(entry[1])
        if not stored:
            first_digest, _, first_ms = first.partition(" ")
            if first_digest in (digest, "1", ""):  # "1": claimed before digests were kept; "": just expired
                # The same bytes again: a resend after a lost receipt, a broker's redelivery
                # after its restart. Already stored: acknowledged, not stored again, no
                # rejection, and receipted again (with the first store's time), so the
                # sender stops resending.
                self.counters["duplicates"] += 1
                log.info("duplicate message %s from %s dropped (redelivery)", envelope.id, envelope.sender)
                if self.receipts.enabled:
                    self.counters["receipts_repeated"] += 1
                    ms = int(first_ms) if first_ms.isdigit() else stored_ms
                    self._queue_receipt(_ReceiptDue(envelope.id, envelope.sender, full_digest, ms, delivery.transport))
                return
            # The id of a stored message on other bytes: a replayed id (a signed message
            # re-sealed, or an id reused): refused, counted as a replay, never stored
            self._reject(Replayed("id seen before, on other content", message_id=envelope.id))
        self.counters["received"] += 1
        if self.receipts.enabled:
            self._queue_receipt(_ReceiptDue(envelope.id, envelope.sender, full_digest, stored_ms, delivery.transport))

    def _reject(self, exc: MessageRejected) -> None:
        self.opener.counter.record(exc)
        log.info("rejected message: %s", exc)
        raise exc

    async def ensure_group(self, group: str) -> None:
        try:
            await self.redis.xgroup_create(self.keys.inbox, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def read(
        self, group: str, consumer: str, *, count: int = 100, block_ms: int = 1000, claim_idle_ms: int = 30_000
    ) -> list[Received]:
        """Entries for this consumer: its own pending ones (after a restart), then entries
        another consumer of the group left pending for ``claim_idle_ms`` (it died, or it
        was restarted under a new name), then new ones.

        Consumer names must be unique per running worker: two workers under one name would
        both re-read that name's pending entries and handle them twice.
        """
        await self.ensure_group(group)
        entries = stream_entries(await self.redis.xreadgroup(group, consumer, {self.keys.inbox: "0"}, count=count))
        if not entries and claim_idle_ms > 0:
            claimed = await self.redis.xautoclaim(self.keys.inbox, group, consumer, claim_idle_ms, "0-0", count=count)
            entries = stream_entries(claimed[1]) if claimed and len(claimed) > 1 else []
            if entries:
                self.counters["claimed"] += len(entries)
        if not entries:
            reply = await self.redis.xreadgroup(group, consumer, {self.keys.inbox: ">"}, count=count, block=block_ms)
            entries = stream_entries(reply)
        # an entry deleted while pending comes back without fields: nothing left to handle
        return [self._decode(eid, f) for eid, f in entries if f]

    @staticmethod
    def _decode(eid: str, f: Mapping[str, str]) -> Received:
        return Received(
            entry_id=eid,
            envelope=parse(f["doc"].encode()),
            transport=f.get("transport", ""),
            peer=f.get("peer", ""),
            received_ns=int(f.get("received_ns", "0")),
            stored_ns=int(f.get("stored_ns", "0")),
        )

    async def ack(self, group: str, *entry_ids: str) -> None:
        """Handled: acknowledge and delete (each participant reads its inbox with one group)."""
        if not entry_ids:
            return
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(self.keys.inbox, group, *entry_ids)
        pipe.xdel(self.keys.inbox, *entry_ids)
        await _execute(pipe)

    async def serve(self, group: str, consumer: str, handle: Handler, stop: asyncio.Event) -> None:
        """Hand every inbox entry to ``handle`` until ``stop`` is set; see the module docstring.

        ``handle`` raising a retryable error leaves the entry pending (tried again later);
        any other error is logged, counted, and the entry goes to the dead-letter stream.
        """
        attempt = 0
        while not stop.is_set():
            reraise_lost_cancel()
            try:
                batch = await self.read(group, consumer, block_ms=200)
                attempt = 0
            except RedisError as exc:
                log.warning("inbox read: %s", exc)
                await asyncio.sleep(_backoff(attempt))
                attempt += 1
                continue
            for item in batch:
                try:
                    await handle(item)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if getattr(exc, "retryable", False) or isinstance(exc, RedisError):
                        self.counters["handler_retries"] += 1
                        log.warning("handling %s: %s; will retry", item.envelope.id, exc)
                        await asyncio.sleep(_backoff(attempt))
                        attempt += 1
                        break
                    self.counters["handler_errors"] += 1
                    log.exception("handling %s %s failed", item.envelope.type, item.envelope.id)
                    with contextlib.suppress(RedisError):
                        await self.redis.xadd(
                            self.keys.dead,
                            {"id": item.envelope.id, "direction": "in", "reason": repr(exc)},
                            maxlen=10_000,
                            approximate=True,
                        )
                with contextlib.suppress(RedisError):
                    await self.ack(group, item.entry_id)

    # ----------------------------------------------------------------- counters

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        for reason, n in self.opener.counter.snapshot().items():
            out[f"rejected_{reason}"] = n
        for name, transport in self.transports.items():
            for k, v in transport.stats().items():
                out[f"{name}_{k}"] = v
        return out

    async def write_stats(self) -> None:
        """Counters and the outbox gauges (:class:`OutboxStatus`) into ``P:msg:stats``."""
        with contextlib.suppress(RedisError):
            stats = {k: str(v) for k, v in self.stats().items()} | (await self.outbox_status()).gauges()
            await self.redis.hset(self.keys.stats, mapping=cast(Any, stats))


def build_transport(name: str, raw: Mapping[str, Any], participant: str, *, probes: bool = True) -> MessageTransport:
    """A transport from its config block (validated again; participant filled in)."""
    from gateway.config import transport_settings_model

    settings = transport_settings_model(name).model_validate({**raw, "participant": participant})
    if name == "mqtt":
        from gateway.transport.mqtt import MqttTransport

        return MqttTransport(settings, probes=probes)  # type: ignore[arg-type]
    if name == "https":
        from gateway.transport.https import HttpsTransport

        return HttpsTransport(settings, probes=probes)  # type: ignore[arg-type]
    raise ValueError(f"unknown transport {name!r}")


def build_messenger(
    settings: MessagingSettings, redis: aioredis.Redis, *, prefix: str, probes: bool = True
) -> Messenger:
    """The Messenger a config's ``messaging`` block describes (keys read now: bad ones fail here).

    ``probes`` is the config's ``probes.enabled``; the transports get it too.
    """
    keystore = Keystore.load(
        KeystoreSettings(
            identity=Path(settings.identity_file),
            peers_dir=Path(settings.peers_dir) if settings.peers_dir else None,
            peers=tuple(Path(f) for f in settings.peer_files),
        )
    )
    mode = SecurityMode.ENCRYPTED if settings.security == "encrypted" else SecurityMode.SIGNED
    opener = Opener(
        keystore,
        RedisNonceStore(redis, prefix=f"{prefix}:msg:seen:"),
        replay_window_s=settings.replay_window_s,
        accept_signed_only=settings.accept_signed_only or mode is SecurityMode.SIGNED,
    )
    transports = {
        name: build_transport(name, raw, settings.participant, probes=probes)
        for name, raw in settings.transports.items()
    }
    return Messenger(
        Sealer(keystore, mode=mode),
        opener,
        redis,
        transports,
        prefix=prefix,
        routes=settings.routes,
        default_transport=settings.default_transport,
        ttl_s=settings.ttl_s,
        probes=probes,
        receipts=settings.receipts,
    )
