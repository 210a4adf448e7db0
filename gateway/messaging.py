"""The messaging core: durable outbox and inbox in Redis around any message transport.

Why it is shaped like this: paho keeps its queue in memory and an HTTPS request is gone when
the process is, yet "nothing acknowledged is lost" must hold across a broker restart, a
peer that is down and a restart of either participant. So both ends of every message are
Redis streams, written with AOF, and the transports in between only move bytes:

* :meth:`Messenger.send` validates, signs and (by default) encrypts the message, then appends
  the sealed bytes to the outbox stream of the transport that reaches the recipient. Once
  ``send`` returned the message is durable. A sender task per transport drains the outbox in
  order, a window of messages at a time, and deletes an entry only after the next hop
  acknowledged it (PUBACK, HTTP 2xx). A transport error leaves the entry in place and the
  task retries with capped, jittered backoff; a refusal (ACL, credentials, the receiver
  judged it bad) moves it to the dead-letter stream, counted.
* Inbound bytes from any transport go through one pipeline (:meth:`Messenger.deliver`):
  :class:`~gateway.semantic.security.Opener` checks size, JSON, context, version, header,
  recipient, sender key, time window, decryption and signature; the topic the message arrived
  on must equal the signed header topic; the peer the transport authenticated must be the
  signer. Then one Lua script claims the message id (replay and duplicate protection) and
  appends the plaintext to the inbox stream *in the same atomic step*, so a crash can neither
  store a message twice nor mark it seen without storing it. Only then does the transport
  acknowledge. A duplicate of the same bytes (a resend after a lost ack, a broker's
  redelivery) is counted as ``duplicates`` and acknowledged without being stored again; the
  id of a stored message on other bytes is a replay: refused (``Replayed``, HTTPS 422),
  counted as ``rejected_replayed``.
* Consumers (the AMS workers, the MGMS flexibility agent) read the inbox through a Redis
  consumer group (:meth:`Messenger.serve`) and acknowledge an entry after handling it; a
  consumer that dies leaves its entries pending and they are handled again on restart, so
  handlers are written to be idempotent (keyed by message id).

Key layout (``P`` = the participant's prefix, e.g. ``mgms:lab1`` or ``ams:ams``)::

    P:msg:outbox:{transport}   STREAM  sealed messages not yet acknowledged by the next hop
    P:msg:inbox                STREAM  accepted messages (plaintext), consumer group per service
    P:msg:dead                 STREAM  refused outbound and failed inbound messages, with reason
    P:msg:seen:{id}            STRING  message id claimed: digest of its bytes (expires with the replay window)
    P:msg:stats                HASH    counters
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.config import MessagingSettings
from gateway.errors import StoreError, TransportError, TransportRefused
from gateway.semantic import (
    Envelope,
    Keystore,
    KeystoreSettings,
    Malformed,
    MessageRejected,
    Opener,
    Payload,
    RedisNonceStore,
    Replayed,
    Sealer,
    SecurityMode,
    UnknownSender,
)
from gateway.semantic.envelope import parse, serialise
from gateway.store import reraise_lost_cancel, stream_entries
from gateway.transport.base import Delivery, MessageTransport, Outgoing, topic_for

__all__ = ["MessagingKeys", "Messenger", "Received", "build_messenger", "build_transport"]

log = logging.getLogger(__name__)

# Claim the id and store the message in one step; TIME gives the "stored" probe hop.
# Queue to the outbox unless it is full, in one round trip (never trim: unsent is unsent).
_QUEUE_LUA = """
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  return false
end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""

# The seen key holds a digest of the first copy's bytes: a duplicate answers {0, digest}, so
# the caller tells a redelivery (the same bytes) from an id reused for other content.
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
        self._accept = self.redis.register_script(_ACCEPT_LUA if probes else _ACCEPT_BARE_LUA)
        self._hop_fields = _received_field if probes else _no_fields
        self._queue = self.redis.register_script(_QUEUE_LUA)
        self._wake: dict[str, asyncio.Event] = {name: asyncio.Event() for name in self.transports}
        self._senders: list[asyncio.Task[None]] = []
        self._started = False

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Start every transport (inbound goes to :meth:`deliver`) and the outbox senders."""
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

    async def close(self) -> None:
        """Stop the senders (unsent messages stay in the outbox) and the transports."""
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

    async def send(self, payload: Payload, recipient: str, *, ttl_s: float | None = None) -> Envelope:
        """Seal ``payload`` for ``recipient`` and queue it durably; returns the envelope sent.

        Raises :class:`StoreError` if Redis cannot take it (nothing was queued) and
        :class:`~gateway.semantic.errors.MessageRejected` if the payload does not validate.
        """
        envelope = Envelope.create(
            payload,
            sender=self.participant,
            recipient=recipient,
            topic=topic_for(recipient, self.participant, payload.message_type),
            ttl_s=self.ttl_s if ttl_s is None else ttl_s,
        )
        data = self.sealer.seal(envelope)
        transport = self.transport_for(recipient)
        key = self.keys.outbox(transport)
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
        ]
        try:
            queued = await self._queue(keys=[key], args=args)
        except RedisError as exc:
            raise StoreError(f"outbox: {exc}") from exc
        if queued is None:
            raise StoreError(f"outbox {key} holds {self.outbox_max} unsent messages (the limit): not queued")
        self.counters["queued"] += 1
        self._wake[transport].set()
        return envelope

    async def outbox_length(self, transport: str | None = None) -> int:
        names = [transport] if transport else list(self.transports)
        return sum([await self.redis.xlen(self.keys.outbox(n)) for n in names])

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
            outgoing = [
                (eid, Outgoing(message_id=f["id"], recipient=f["recipient"], topic=f["topic"], data=f["data"].encode()))
                for eid, f in entries
            ]
            results = await asyncio.gather(*(transport.send(o) for _, o in outgoing), return_exceptions=True)
            done: list[str] = []
            failed: list[BaseException] = []
            pipe = self.redis.pipeline(transaction=False)
            for (eid, out), result in zip(outgoing, results, strict=True):
                if result is None:
                    done.append(eid)
                    self.counters["sent"] += 1
                elif isinstance(result, TransportRefused):
                    done.append(eid)
                    self.counters["refused"] += 1
                    log.error("message %s to %s refused by %s: %s", out.message_id, out.recipient, name, result)
                    pipe.xadd(
                        self.keys.dead,
                        {"id": out.message_id, "direction": "out", "transport": name, "reason": str(result)},
                        maxlen=10_000,
                        approximate=True,
                    )
                elif isinstance(result, asyncio.CancelledError):
                    raise result
                else:
                    failed.append(result)
            if done:
                pipe.xdel(key, *done)
                try:
                    await pipe.execute()
                except RedisError as exc:  # the entries stay and go out again: a duplicate, not a loss
                    log.warning("outbox %s: could not delete sent entries: %s", name, exc)
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
        fields: dict[str, str] = {
            "id": envelope.id,
            "type": envelope.type,
            "sender": envelope.sender,
            "transport": delivery.transport,
            "peer": delivery.peer or "",
            "doc": serialise(envelope).decode(),
        }
        digest = hashlib.sha256(delivery.data).hexdigest()[:32]
        args: list[Any] = [max(1, int(ttl_s * 1000)), digest]
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
            if first in (digest, "1", ""):  # "1": claimed before digests were kept; "": just expired
                # The same bytes again: a resend after a lost acknowledgement, a broker's
                # redelivery after its restart. Already stored: acknowledged, not stored
                # again, and no rejection (the sender must stop resending).
                self.counters["duplicates"] += 1
                log.info("duplicate message %s from %s dropped (redelivery)", envelope.id, envelope.sender)
                return
            # The id of a stored message on other bytes: a replayed id (a signed message
            # re-sealed, or an id reused): refused, counted as a replay, never stored
            self._reject(Replayed("id seen before, on other content", message_id=envelope.id))
        self.counters["received"] += 1

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
        await pipe.execute()

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
        with contextlib.suppress(RedisError):
            stats = self.stats()
            if stats:
                await self.redis.hset(self.keys.stats, mapping={k: str(v) for k, v in stats.items()})


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
    )
