"""The AMS worker: flexibility registry, offers, clearance, reserve/activation, settlement.

Why it works this way: every step is triggered by a message or a DSO request taken from a
Redis stream through a consumer group, and every decision is written to Redis before the
worker acknowledges what triggered it. A worker that dies mid-step leaves the trigger
pending; the step runs again on restart and, being keyed by business identifiers (offer,
reserve and activation ids derived from the flexibility id), does not create a second offer
or a second activation. Outgoing notifications go through the durable outbox, so they survive
too. Several workers may share one AMS: they read the same inbox group (and MQTT v5 shared
subscriptions split the transport side).

Key layout (``A`` = ``ams:{participant}``)::

    A:mg                  HASH    microgrid participant -> JSON (location, reliability, counts)
    A:flex:{mg}:{id}      HASH    a received Flexibility (document, received/stored ns, offer id)
    A:offer:{offer}       HASH    offer: owner, location, type, kW, window, price, rank, state
    A:offers:{location}   ZSET    open offers of a location by risk-adjusted price (merit order)
    A:dso:requests        STREAM  DSO requests to clear (``ams request``), consumer group
    A:activation:{act}    HASH    activation: offer, owner, kW, price, window, sent ns, state
                                  (ActivationState: activated, settled, failed, undelivered)
    A:settlement:{act}    HASH    verdict and payment of one activation
    A:settlements         STREAM  every settlement, in order
    A:events              STREAM  audit trail: what the AMS did and why (capped)
    A:asset-reliability   HASH    VPP asset -> reliability (delivered / requested, averaged)

A VPP coalition (``ams.vpp``) enters the same flow through :meth:`AmsService.dispatch`:
each chosen asset's block becomes an offer (owner = the asset's microgrid), accepted by
construction, so it is reserved and activated at once; its verification settles it and
updates the asset's reliability, which the next coalition reads back
(:func:`ams.dispatch.portfolio_with_reliability`).

Delivery is proved by the microgrid's signed receipt, not by the broker's PUBACK
(:mod:`gateway.messaging`): an Activation Notification is sent with a deadline (its start,
or ``market.activation_receipt_grace_s`` after sending if that is later) and its activation
id as subject. One whose receipt has not come by then is given up by the Messenger and
reported on its ``unreceipted`` stream; this worker settles it ``undelivered`` (no payment,
the microgrid's reliability untouched: the fault may be the network's) instead of leaving
it ``activated`` forever. A verification that still comes for it (the activation reached the
microgrid, only its receipt was lost) settles it as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any, cast

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError, ResponseError
from redis.typing import EncodableT, FieldT

from ams.market import (
    CostModel,
    DsoRequest,
    OfferRecord,
    VerificationPolicy,
    clear,
    verify_delivery,
)
from gateway.audit import AuditKind, AuditLog, os_user
from gateway.errors import GatewayError, StoreError
from gateway.messaging import Messenger, Received, Unreceipted
from gateway.semantic import (
    ActivationNotification,
    Flexibility,
    FlexibilityType,
    Offer,
    OfferList,
    ReserveNotification,
    VerificationNotification,
)
from gateway.store import reraise_lost_cancel, stream_entries

if TYPE_CHECKING:
    from ams.vpp.offers import OfferLine

__all__ = [
    "ActivationState",
    "AmsKeys",
    "AmsService",
    "AmsSettings",
    "MarketSettings",
    "MicrogridEntry",
    "NotRegistered",
    "OfferState",
]

log = logging.getLogger(__name__)

WORKER_GROUP = "ams"
ASSET_RELIABILITY_WEIGHT = 0.3  # as ams.vpp.portfolio.update_reliability
EVENTS_MAXLEN = 10_000

# A received flexibility in one step: its record (first-seen fields win) and, the first time,
# the offer made of it (hash, open-offer index, location set, audit entry).
# KEYS: flex, offer, open offers of the location, locations, events
# ARGV: n, n flex field/value pairs, rank, offer id, location, m, m offer pairs, e, e event pairs
_FLEX_OFFER_LUA = """
local i = 2
local fresh_flex = 0
for _ = 1, tonumber(ARGV[1]) do
  local set = redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
  if i == 2 then fresh_flex = set end
  i = i + 2
end
local rank, offer_id, location = ARGV[i], ARGV[i + 1], ARGV[i + 2]
local m = tonumber(ARGV[i + 3])
i = i + 4
local fresh_offer = redis.call('HSETNX', KEYS[2], 'state', 'open')
if fresh_offer == 1 then
  redis.call('HSET', KEYS[2], unpack(ARGV, i, i + 2 * m - 1))
  redis.call('ZADD', KEYS[3], rank, offer_id)
  redis.call('SADD', KEYS[4], location)
end
i = i + 2 * m
local e = tonumber(ARGV[i])
if fresh_offer == 1 then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[#ARGV], '*', unpack(ARGV, i + 1, i + 2 * e))
end
return {fresh_flex, fresh_offer}
"""


class OfferState(StrEnum):
    """An offer's life: open in the merit order, reserved, activated, then as its activation ends."""

    OPEN = "open"
    RESERVED = "reserved"
    ACTIVATED = "activated"
    SETTLED = "settled"
    FAILED = "failed"
    UNDELIVERED = "undelivered"


class ActivationState(StrEnum):
    """An activation's state in ``A:activation:{act}``.

    ``activated``: the notification is queued (sent, or on its way). ``settled`` / ``failed``:
    its verification came and was judged. ``undelivered``: no receipt from the microgrid by
    the deadline (its start, or the grace after sending): settled without payment, as the
    AMS cannot know that the microgrid ever had it. The last three are final, except that a
    verification for an ``undelivered`` one (its receipt was lost, not the activation)
    settles it as usual.
    """

    ACTIVATED = "activated"
    SETTLED = "settled"
    FAILED = "failed"
    UNDELIVERED = "undelivered"


# An undelivered activation in one step, only if it is still "activated" (a verification
# that came first wins). KEYS: activation, offer; ARGV: state, reason, deadline
_UNDELIVERED_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'activated' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'undelivered_reason', ARGV[2], 'deadline', ARGV[3])
redis.call('HSET', KEYS[2], 'state', ARGV[1])
return 1
"""


class NotRegistered(GatewayError):
    """A message came from a participant the AMS holds keys for but never registered."""


class MicrogridEntry(BaseModel):
    """A microgrid the AMS trades for: its MGMS participant name and its grid location."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    participant: str = Field(min_length=1)
    location: str = Field(min_length=1)


class MarketSettings(BaseModel):
    """The simulated market: with ``auto_clear`` a DSO buys every new offer under the cap at
    once (the demo and HIL flow); otherwise requests come from ``ams request``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    auto_clear: bool = True
    price_cap_eur_per_mwh: float = 500.0
    divisible: bool = True
    activate_on_reserve: bool = True
    activation_receipt_grace_s: float = Field(default=10.0, gt=0, le=3600)
    """An activation whose receipt has not come by its start, or by this long after it was
    sent when that is later (an activation sent at or after its start), is ``undelivered``."""


class AmsSettings(BaseModel):
    """Everything the AMS decides with; transports and keys are configured elsewhere."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cost_model: CostModel = CostModel()
    verification: VerificationPolicy = VerificationPolicy()
    market: MarketSettings = MarketSettings()
    microgrids: tuple[MicrogridEntry, ...] = ()
    reliability_memory: float = Field(default=0.8, gt=0, lt=1)


class AmsKeys:
    def __init__(self, participant: str) -> None:
        self.prefix = f"ams:{participant}"

    @property
    def microgrids(self) -> str:
        return f"{self.prefix}:mg"

    def flex(self, mg: str, identifier: str) -> str:
        return f"{self.prefix}:flex:{mg}:{identifier}"

    def offer(self, offer_id: str) -> str:
        return f"{self.prefix}:offer:{offer_id}"

    def offers(self, location: str) -> str:
        return f"{self.prefix}:offers:{location}"

    @property
    def offer_locations(self) -> str:
        return f"{self.prefix}:offer-locations"

    @property
    def requests(self) -> str:
        return f"{self.prefix}:dso:requests"

    def activation(self, act_id: str) -> str:
        return f"{self.prefix}:activation:{act_id}"

    def settlement(self, act_id: str) -> str:
        return f"{self.prefix}:settlement:{act_id}"

    @property
    def settlements(self) -> str:
        return f"{self.prefix}:settlements"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def asset_reliability(self) -> str:
        return f"{self.prefix}:asset-reliability"

    @property
    def stats(self) -> str:
        return f"{self.prefix}:stats"


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).isoformat()


class AmsService:
    """One AMS worker. ``run(stop)`` serves the inbox and the DSO request stream."""

    def __init__(
        self,
        settings: AmsSettings,
        redis: aioredis.Redis,
        participant: str,
        *,
        messenger: Messenger | None = None,
        worker: str = "w1",
        probes: bool = True,
        audit: AuditLog | None = None,
    ) -> None:
        """``messenger`` None: an offline view (CLI status, register, request) that never sends.

        ``probes`` False (the AMS config's ``probes``): the hop times of flexibilities,
        activations and settlements are neither read from the clock nor written. A
        flexibility's ``created_ns`` stays: it comes from the signed envelope, no clock is
        read for it, and :func:`ams.dispatch.portfolio_with_flexibility` picks the newest
        flexibility per asset by it. One flag test per message: not a per-value path.
        """
        self.settings = settings
        self.probes = probes
        self._messenger = messenger
        self.redis = redis
        self.participant = participant
        self.keys = AmsKeys(participant)
        self.worker = worker
        self.counters: Counter[str] = Counter()
        self.audit = audit  # the AMS's audit trail (ams:<participant>:audit), None: not recorded
        self._flex_offer_script = redis.register_script(_FLEX_OFFER_LUA)
        self._undelivered_script = redis.register_script(_UNDELIVERED_LUA)

    async def _flex_offer(self, keys: list[str], args: list[str | int]) -> tuple[bool, bool]:
        fresh_flex, fresh_offer = await self._flex_offer_script(keys=keys, args=[*args, EVENTS_MAXLEN])
        return bool(fresh_flex), bool(fresh_offer)

    @property
    def messenger(self) -> Messenger:
        if self._messenger is None:
            raise RuntimeError("this AmsService was built without a messenger (offline view)")
        return self._messenger

    # ----------------------------------------------------------------- registry

    async def register(self, participant: str, location: str) -> None:
        """Add (or move) a microgrid; keeps its reliability record if it was known."""
        raw = await self.redis.hget(self.keys.microgrids, participant)
        record = json.loads(raw) if raw else {"reliability": 1.0, "delivered": 0, "failed": 0}
        record.update(location=location, registered_at=record.get("registered_at") or _iso(datetime.now(UTC)))
        await self.redis.hset(self.keys.microgrids, participant, json.dumps(record))
        await self._event("registered", participant=participant, location=location)
        self._audit(AuditKind.REGISTRATION, os_user(), microgrid=participant, location=location)

    async def microgrid(self, participant: str) -> dict[str, Any]:
        raw = await self.redis.hget(self.keys.microgrids, participant)
        if raw is None:
            raise NotRegistered(f"microgrid {participant!r} is not registered with this AMS")
        record: dict[str, Any] = json.loads(raw)
        return record

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        for mg in self.settings.microgrids:
            if not await self.redis.hexists(self.keys.microgrids, mg.participant):
                await self.register(mg.participant, mg.location)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.messenger.serve(WORKER_GROUP, self.worker, self.handle, stop), name="ams-inbox")
            tg.create_task(self._serve_requests(stop), name="ams-dso-requests")
            tg.create_task(self._serve_unreceipted(stop), name="ams-unreceipted")
            tg.create_task(self._report(stop), name="ams-stats")

    async def _report(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            reraise_lost_cancel()
            try:
                stats = {**self.messenger.stats(), **{f"ams_{k}": v for k, v in self.counters.items()}}
                gauges = (await self.messenger.outbox_status()).gauges()
                mapping = {**{k: str(v) for k, v in stats.items()}, **gauges}
                await self.redis.hset(self.keys.stats, mapping=cast(Any, mapping))
            except RedisError as exc:
                log.debug("stats not written: %s", exc)
            try:
                async with asyncio.timeout(1.0):
                    await stop.wait()
            except TimeoutError:
                pass

    async def handle(self, item: Received) -> None:
        payload = item.envelope.payload
        if isinstance(payload, Flexibility) and not isinstance(payload, Offer):
            await self.on_flexibility(item, payload)
        elif isinstance(payload, VerificationNotification):
            await self.on_verification(item, payload)
        else:
            self.counters["ignored"] += 1
            log.info("AMS ignores %s from %s", item.envelope.type, item.envelope.sender)

    # ----------------------------------------------------------------- flexibility -> offer

    async def on_flexibility(self, item: Received, flex: Flexibility) -> None:
        mg_name = item.envelope.sender
        try:
            mg = await self.microgrid(mg_name)
        except NotRegistered:
            self.counters["unregistered"] += 1
            await self._event("refused", reason="not registered", sender=mg_name, message=item.envelope.id)
            raise
        key = self.keys.flex(mg_name, flex.identifier)
        offer_id = f"offer:{mg_name}:{flex.identifier}"
        # first-seen values win (HSETNX per field); the offer is made once: one round trip
        fields = [
            ("doc", flex.model_dump_json()),
            ("message", item.envelope.id),
            ("created_ns", str(item.created_ns)),
            ("offer", offer_id),
        ]
        if self.probes:
            fields += [("received_ns", str(item.received_ns)), ("stored_ns", str(item.stored_ns))]
        location = str(mg["location"])
        price = self.settings.cost_model.price(flex.flexibility_type, flex.power_kw, location)
        rank = self.settings.cost_model.rank_key(price, float(mg.get("reliability", 1.0)))
        record = OfferRecord(
            offer_id, mg_name, location, flex.flexibility_type, flex.power_kw, flex.start, flex.stop, price, rank
        )
        offer_fields = {
            "microgrid": mg_name,
            "location": location,
            "type": flex.flexibility_type.value,
            "power_kw": repr(flex.power_kw),
            "start": _iso(flex.start),
            "stop": _iso(flex.stop),
            "price": repr(price),
            "rank": repr(rank),
            "flexibility": flex.identifier,
        }
        event = self._event_fields("offer", offer=offer_id, microgrid=mg_name, price=price, power_kw=flex.power_kw)
        fresh_flex, fresh_offer = await self._flex_offer(
            keys=[key, self.keys.offer(offer_id), self.keys.offers(location), self.keys.offer_locations,
                  self.keys.events],
            args=[len(fields), *_flat(fields), repr(rank), offer_id, location,
                  len(offer_fields), *_flat(offer_fields.items()), len(event), *_flat(event.items())],
        )  # fmt: skip
        if fresh_flex:
            self.counters["flexibilities"] += 1
        if fresh_offer:
            self.counters["offers"] += 1
        if self.settings.market.auto_clear:
            request = DsoRequest(
                request_id=f"auto:{offer_id}",
                location=location,
                flexibility_type=flex.flexibility_type,
                power_kw=flex.power_kw,
                start=flex.start,
                stop=flex.stop,
                price_cap_eur_per_mwh=self.settings.market.price_cap_eur_per_mwh,
            )
            # the offer just made is known: no need to read it back (a redelivered
            # flexibility reads the offer's state, so a reserved one is not taken again)
            offers = [record] if fresh_offer else await self.open_offers(location)
            await self.clear_request(request, offers=[o for o in offers if o.offer_id == offer_id], fresh=fresh_offer)

    async def open_offers(self, location: str | None = None) -> list[OfferRecord]:
        if location:
            locations = [location]
        else:
            locations = sorted(cast(set[str], await self.redis.smembers(self.keys.offer_locations)))
        out: list[OfferRecord] = []
        for loc in locations:
            for offer_id in cast(list[str], await self.redis.zrange(self.keys.offers(loc), 0, -1)):
                h = await self._hash(self.keys.offer(offer_id))
                if h.get("state") == OfferState.OPEN:
                    out.append(_offer_record(offer_id, h))
        return out

    async def offer_list(self, location: str) -> OfferList:
        """The HEILA Offer List of one location, cheapest first."""
        offers = sorted(await self.open_offers(location), key=lambda o: (o.price_eur_per_mwh, o.offer_id))
        return OfferList(
            location=location,
            offers=tuple(
                Offer(
                    identifier=o.offer_id,
                    flexibility_type=o.flexibility_type,
                    power_kw=o.power_kw,
                    start=o.start,
                    stop=o.stop,
                    price_eur_per_mwh=o.price_eur_per_mwh,
                )
                for o in offers
            ),
        )

    # ----------------------------------------------------------------- clearance -> reserve, activation

    async def submit_request(self, request: DsoRequest) -> str:
        """Queue a DSO request (what ``ams request`` does); a worker clears it."""
        await self.redis.xadd(self.keys.requests, {"request": request.model_dump_json()})
        return request.request_id

    async def _serve_requests(self, stop: asyncio.Event) -> None:
        group = WORKER_GROUP
        try:
            await self.redis.xgroup_create(self.keys.requests, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        while not stop.is_set():
            reraise_lost_cancel()
            try:
                entries = stream_entries(
                    await self.redis.xreadgroup(group, self.worker, {self.keys.requests: "0"}, count=10)
                )
                if not entries:  # requests a stopped worker left pending for 30 s
                    claimed = await self.redis.xautoclaim(
                        self.keys.requests, group, self.worker, 30_000, "0-0", count=10
                    )
                    entries = stream_entries(claimed[1]) if claimed and len(claimed) > 1 else []
                if not entries:
                    entries = stream_entries(
                        await self.redis.xreadgroup(group, self.worker, {self.keys.requests: ">"}, count=10, block=200)
                    )
            except RedisError as exc:
                log.warning("DSO requests: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for eid, fields in entries:
                if fields:
                    try:
                        if "dispatch" in fields:
                            await self.dispatch(_lines_from_json(fields["dispatch"]), fields.get("id", eid))
                        else:
                            await self.clear_request(DsoRequest.model_validate_json(fields["request"]))
                    except (RedisError, StoreError) as exc:
                        # not judged: the entry stays pending and is taken again
                        log.warning("DSO request %s: %s; retrying", eid, exc)
                        await asyncio.sleep(0.5)
                        break
                    except Exception as exc:  # a bad request must not stop the worker
                        log.exception("DSO request %s failed", eid)
                        self.counters["bad_requests"] += 1
                        with contextlib.suppress(RedisError):
                            await self._event("refused", reason=f"request failed: {exc}", request=eid)
                with contextlib.suppress(RedisError):  # unacknowledged: handled again, idempotently
                    await self.redis.xack(self.keys.requests, group, eid)

    async def clear_request(
        self, request: DsoRequest, *, offers: list[OfferRecord] | None = None, fresh: bool = False
    ) -> None:
        """Clear ``request`` against ``offers`` (default: every open offer it may take).

        ``fresh``: the offers were made just now and are known to be open, so their state is
        not read back. The outcome (cleared, reserved, activated) is written in one
        transaction after the notifications are queued: a crash in between makes a
        redelivered flexibility or request send them again under the same identifiers, which
        the microgrid takes once.
        """
        if offers is None:
            offers = await self.open_offers(None if request.location == "*" else request.location)
        result = clear(request, offers, divisible=self.settings.market.divisible)
        pipe = self.redis.pipeline(transaction=True)
        self._event_in(
            pipe,
            "cleared",
            request=request.request_id,
            accepted_kw=result.accepted_kw,
            shortfall_kw=result.shortfall_kw,
            offers=",".join(o.offer_id for o, _ in result.taken),
        )
        try:
            for offer, kw in result.taken:
                await self.reserve(offer, kw, request, pipe=pipe, state=OfferState.OPEN if fresh else None)
        finally:
            await pipe.execute()

    async def reserve(
        self, offer: OfferRecord, kw: float, request: DsoRequest, *, pipe: Any = None, state: str | None = None
    ) -> None:
        """Reserve an open offer (and activate it, if the market says so).

        ``pipe``: a transaction the caller executes, to which the state changes are added
        (else they are written here); ``state``: the offer's state if the caller knows it.
        """
        own = pipe is None
        if own:
            pipe = self.redis.pipeline(transaction=True)
        offer_key = self.keys.offer(offer.offer_id)
        reserve_id = f"res:{offer.offer_id}"
        if state is None:
            state = cast(str | None, await self.redis.hget(offer_key, "state"))
        known: dict[str, str] | None = None
        if state == OfferState.OPEN:
            await self.messenger.send(
                ReserveNotification(
                    identifier=reserve_id,
                    offer_ref=offer.offer_id,
                    flexibility_type=offer.flexibility_type,
                    power_kw=kw,
                    start=request.start,
                    stop=request.stop,
                    price_eur_per_mwh=offer.price_eur_per_mwh,
                ),
                offer.microgrid,
            )
            pipe.hset(
                offer_key,
                mapping={"state": OfferState.RESERVED, "reserved_kw": repr(kw), "request": request.request_id},
            )
            pipe.zrem(self.keys.offers(offer.location), offer.offer_id)
            self._event_in(pipe, "reserved", offer=offer.offer_id, power_kw=kw)
            self.counters["reserves"] += 1
            state = OfferState.RESERVED
            known = {
                "state": state,
                "microgrid": offer.microgrid,
                "type": offer.flexibility_type.value,
                "start": _iso(offer.start),
                "stop": _iso(offer.stop),
                "price": repr(offer.price_eur_per_mwh),
                "reserved_kw": repr(kw),
            }
        try:
            if state == OfferState.RESERVED and self.settings.market.activate_on_reserve:
                await self.activate(offer.offer_id, pipe=pipe, known=known)
        finally:
            if own:
                await pipe.execute()

    async def activate(self, offer_id: str, *, pipe: Any = None, known: Mapping[str, str] | None = None) -> str:
        """Send the Activation Notification of a reserved offer (once).

        ``known``: the offer's fields as the caller just wrote them (not yet in Redis when
        ``pipe`` is the caller's transaction), so the offer is not read back.
        """
        offer_key = self.keys.offer(offer_id)
        h = dict(known) if known is not None else await self._hash(offer_key)
        if h.get("state") != OfferState.RESERVED:
            raise ValueError(f"offer {offer_id} is {h.get('state', 'unknown')}, not reserved")
        act_id = f"act:{offer_id}"
        kw = float(h.get("reserved_kw", h.get("power_kw", "0")))
        hops: dict[FieldT, EncodableT] = {"sent_ns": str(time.time_ns())} if self.probes else {}
        start = datetime.fromisoformat(h["start"])
        now = datetime.now(UTC)
        deadline = max(start, now + timedelta(seconds=self.settings.market.activation_receipt_grace_s))
        # the envelope expires at the deadline: an activation written off as undelivered is
        # refused by the microgrid if a broker hands it over later
        ttl_s = min(self.messenger.ttl_s, max(1.0, (deadline - now).total_seconds()))
        envelope = await self.messenger.send(
            ActivationNotification(
                identifier=act_id,
                reserve_ref=f"res:{offer_id}",
                flexibility_type=FlexibilityType(h["type"]),
                power_kw=kw,
                start=start,
                stop=datetime.fromisoformat(h["stop"]),
            ),
            h["microgrid"],
            ttl_s=ttl_s,
            deadline=deadline,
            subject=act_id,
        )
        own = pipe is None
        if own:
            pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            self.keys.activation(act_id),
            mapping={
                "offer": offer_id,
                "microgrid": h["microgrid"],
                "power_kw": repr(kw),
                "price": h["price"],
                "start": h["start"],
                "stop": h["stop"],
                "message": envelope.id,
                **hops,
                "state": ActivationState.ACTIVATED,
            },
        )
        pipe.hset(offer_key, "state", OfferState.ACTIVATED)
        self._event_in(pipe, "activated", activation=act_id, microgrid=h["microgrid"], power_kw=kw)
        if own:
            await pipe.execute()
        self.counters["activations"] += 1
        self._audit(AuditKind.ACTIVATION, self.participant, activation=act_id, phase="sent", microgrid=h["microgrid"],
                    offer=offer_id, power_kw=kw, start=h["start"], stop=h["stop"], message=envelope.id)  # fmt: skip
        return act_id

    async def submit_dispatch(self, lines: Sequence[OfferLine], dispatch_id: str) -> str:
        """Queue a coalition's offer lines (what ``ams dispatch`` does); a worker sends them."""
        await self.redis.xadd(self.keys.requests, {"dispatch": _lines_to_json(lines), "id": dispatch_id})
        return dispatch_id

    async def dispatch(self, lines: Sequence[OfferLine], dispatch_id: str) -> list[str]:
        """A coalition's chosen assets become offers, reserved and activated to their owners.

        Returns the activation ids. Idempotent per (dispatch id, asset, start): a re-run after
        a crash re-activates nothing that was activated.
        """
        acts: list[str] = []
        for line in lines:
            try:
                mg = await self.microgrid(line.microgrid)
            except NotRegistered:
                self.counters["unregistered"] += 1
                await self._event("refused", reason="asset of an unregistered microgrid", dispatch=dispatch_id,
                                  asset=line.asset, microgrid=line.microgrid)  # fmt: skip
                continue
            offer_id = f"offer:{line.microgrid}:{dispatch_id}:{line.asset}:{line.start:%Y%m%dT%H%M%SZ}"
            location = str(mg["location"])
            rank = self.settings.cost_model.rank_key(line.price_eur_per_mwh, float(mg.get("reliability", 1.0)))
            if await self.redis.hsetnx(self.keys.offer(offer_id), "state", OfferState.OPEN):
                await self.redis.hset(
                    self.keys.offer(offer_id),
                    mapping={
                        "microgrid": line.microgrid,
                        "location": location,
                        "type": line.flexibility_type.value,
                        "power_kw": repr(line.power_kw),
                        "start": _iso(line.start),
                        "stop": _iso(line.stop),
                        "price": repr(line.price_eur_per_mwh),
                        "rank": repr(rank),
                        "asset": line.asset,
                        "dispatch": dispatch_id,
                    },
                )
                self.counters["offers"] += 1
                await self._event("offer", offer=offer_id, microgrid=line.microgrid, asset=line.asset,
                                  price=line.price_eur_per_mwh, power_kw=line.power_kw)  # fmt: skip
            record = _offer_record(offer_id, await self._hash(self.keys.offer(offer_id)))
            request = DsoRequest(
                request_id=dispatch_id,
                location=location,
                flexibility_type=line.flexibility_type,
                power_kw=line.power_kw,
                start=line.start,
                stop=line.stop,
            )
            if await self.redis.hget(self.keys.offer(offer_id), "state") == OfferState.OPEN:
                await self.reserve(record, line.power_kw, request)
            if await self.redis.hget(self.keys.offer(offer_id), "state") == OfferState.RESERVED:
                await self.activate(offer_id)  # accepted by construction: activate even without activate_on_reserve
            acts.append(f"act:{offer_id}")
        await self._event("dispatched", dispatch=dispatch_id, lines=len(lines))
        return acts

    # ----------------------------------------------------------------- verification -> settlement

    async def on_verification(self, item: Received, ver: VerificationNotification) -> None:
        act_id = ver.activation_ref or ""
        act_key = self.keys.activation(act_id)
        act = await self._hash(act_key)
        if not act:
            self.counters["unknown_activation"] += 1
            await self._event("refused", reason="unknown activation", activation=act_id, message=item.envelope.id)
            raise ValueError(f"verification {ver.identifier} names unknown activation {act_id!r}")
        if act.get("microgrid") != item.envelope.sender:
            self.counters["foreign_verification"] += 1
            raise ValueError(
                f"verification for {act_id} from {item.envelope.sender}, activation belongs to {act['microgrid']}"
            )
        if act.get("state") in (ActivationState.SETTLED, ActivationState.FAILED):
            return  # a duplicate (new message id, same business id): already settled
        late = act.get("state") == ActivationState.UNDELIVERED
        verdict = verify_delivery(
            float(act["power_kw"]),
            float(act["price"]),
            ver.power_series_kw,
            ver.time_step_s,
            self.settings.verification,
        )
        state = ActivationState.SETTLED if verdict.delivered else ActivationState.FAILED
        record = {
            "activation": act_id,
            "microgrid": act["microgrid"],
            "verification": ver.identifier,
            "state": state,
            **{k: str(v) for k, v in asdict(verdict).items()},
        }
        if self.probes:
            record |= {
                "received_ns": str(item.received_ns),
                "stored_ns": str(item.stored_ns),
                "created_ns": str(item.created_ns),
            }
        mg = await self.microgrid(act["microgrid"])
        m = self.settings.reliability_memory
        mg["reliability"] = round(
            m * float(mg.get("reliability", 1.0)) + (1 - m) * (1.0 if verdict.delivered else 0.0), 6
        )
        mg["delivered" if verdict.delivered else "failed"] = (
            int(mg.get("delivered" if verdict.delivered else "failed", 0)) + 1
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.settlement(act_id), mapping=cast(Any, record))
        pipe.xadd(self.keys.settlements, cast(Any, record), maxlen=100_000, approximate=True)
        pipe.hset(act_key, "state", state)
        pipe.hset(self.keys.offer(act["offer"]), "state", state)
        pipe.hset(self.keys.microgrids, act["microgrid"], json.dumps(mg))
        self._event_in(
            pipe, "settled", activation=act_id, state=state, payment_eur=verdict.payment_eur, reason=verdict.reason,
            **({"was": ActivationState.UNDELIVERED} if late else {}),
        )  # fmt: skip
        asset = await self.redis.hget(self.keys.offer(act["offer"]), "asset")
        if asset:
            # the VPP's per-asset record (eDREAM risk): share of the requested power delivered
            old = float(await self.redis.hget(self.keys.asset_reliability, asset) or 1.0)
            share = min(1.0, max(0.0, verdict.mean_kw) / float(act["power_kw"]))
            new = (1 - ASSET_RELIABILITY_WEIGHT) * old + ASSET_RELIABILITY_WEIGHT * share
            pipe.hset(self.keys.asset_reliability, asset, repr(round(new, 6)))
        await pipe.execute()
        self.counters["settlements"] += 1
        if late:
            self.counters["late_verifications"] += 1
        self._audit(AuditKind.SETTLEMENT, item.envelope.sender, activation=act_id, verification=ver.identifier,
                    state=state, payment_eur=verdict.payment_eur, reason=verdict.reason)  # fmt: skip

    # ----------------------------------------------------------------- no receipt -> undelivered

    async def _serve_unreceipted(self, stop: asyncio.Event) -> None:
        """Act on messages the Messenger gave up without a receipt (at least once, idempotent)."""
        while not stop.is_set():
            reraise_lost_cancel()
            try:
                batch = await self.messenger.read_unreceipted(WORKER_GROUP, self.worker, block_ms=200)
            except (RedisError, StoreError) as exc:
                log.warning("unreceipted messages: %s", exc)
                await asyncio.sleep(0.5)
                continue
            for item in batch:
                try:
                    await self.on_unreceipted(item)
                except (RedisError, StoreError) as exc:  # left pending: taken again
                    log.warning("unreceipted %s: %s; retrying", item.message_id, exc)
                    await asyncio.sleep(0.5)
                    break
                except Exception:  # a bug must not stop the worker; the message is dead-lettered already
                    log.exception("unreceipted %s not handled", item.message_id)
                    self.counters["unreceipted_errors"] += 1
                with contextlib.suppress(RedisError):
                    await self.messenger.ack_unreceipted(WORKER_GROUP, item.entry_id)

    async def on_unreceipted(self, item: Unreceipted) -> None:
        """An activation without receipt by its deadline is settled ``undelivered``; anything
        else given up is recorded in the audit trail."""
        self.counters["unreceipted"] += 1
        act_key = self.keys.activation(item.subject)
        act = await self._hash(act_key) if item.subject and item.type == "ActivationNotification" else {}
        if not act or act.get("message") != item.message_id:
            await self._event("unreceipted", message=item.message_id, type=item.type, recipient=item.recipient,
                              subject=item.subject, reason=item.reason, detail=item.detail)  # fmt: skip
            return
        reason = (
            f"no receipt from {act.get('microgrid', item.recipient)}: {item.reason}: {item.detail} ({item.sends} sends)"
        )
        deadline = item.deadline.isoformat() if item.deadline else ""
        changed = await self._undelivered_script(
            keys=[act_key, self.keys.offer(act.get("offer", ""))], args=[ActivationState.UNDELIVERED, reason, deadline]
        )
        if not int(changed):
            return  # settled by its verification meanwhile, or already undelivered
        record = {
            "activation": item.subject,
            "microgrid": act.get("microgrid", item.recipient),
            "verification": "",
            "state": ActivationState.UNDELIVERED,
            "delivered": "False",
            "mean_kw": "0.0",
            "payment_eur": "0.0",
            "reason": reason,
        }
        mg_name = act.get("microgrid", item.recipient)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.keys.settlement(item.subject), mapping=cast(Any, record))
        pipe.xadd(self.keys.settlements, cast(Any, record), maxlen=100_000, approximate=True)
        raw = await self.redis.hget(self.keys.microgrids, mg_name)
        if raw:
            mg = json.loads(raw)
            mg["undelivered"] = int(mg.get("undelivered", 0)) + 1
            pipe.hset(self.keys.microgrids, mg_name, json.dumps(mg))
        self._event_in(pipe, "undelivered", activation=item.subject, microgrid=mg_name, reason=reason)
        await pipe.execute()
        self.counters["undelivered"] += 1
        self._audit(AuditKind.SETTLEMENT, self.participant, activation=item.subject, verification="",
                    state=ActivationState.UNDELIVERED.value, payment_eur=0.0, reason=reason)  # fmt: skip

    async def settlement(self, act_id: str) -> dict[str, str]:
        return dict(await self._hash(self.keys.settlement(act_id)))

    # ----------------------------------------------------------------- audit

    async def _hash(self, key: str) -> dict[str, str]:
        """HGETALL on a ``decode_responses`` client: str keys and values."""
        return cast(dict[str, str], await self.redis.hgetall(key))

    def _audit(self, kind: AuditKind, actor: str, **data: Any) -> None:
        """Into the tamper-evident trail (gateway/audit.py), once the state change is stored."""
        if self.audit is not None:
            self.audit.record(kind, actor, worker=self.worker, **data)

    async def _event(self, event: str, **fields: Any) -> None:
        pipe = self.redis.pipeline(transaction=False)
        self._event_in(pipe, event, **fields)
        await pipe.execute()

    def _event_in(self, pipe: Any, event: str, **fields: Any) -> None:
        """Queue an audit entry on ``pipe``: written with the state change it describes."""
        pipe.xadd(self.keys.events, cast(Any, self._event_fields(event, **fields)), maxlen=EVENTS_MAXLEN,
                  approximate=True)  # fmt: skip

    def _event_fields(self, event: str, **fields: Any) -> dict[str, str]:
        log.info("AMS %s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
        return {"event": event, "worker": self.worker, **{k: str(v) for k, v in fields.items()}}


def _offer_record(offer_id: str, h: Mapping[str, str]) -> OfferRecord:
    return OfferRecord(
        offer_id=offer_id,
        microgrid=h["microgrid"],
        location=h["location"],
        flexibility_type=FlexibilityType(h["type"]),
        power_kw=float(h["power_kw"]),
        start=datetime.fromisoformat(h["start"]),
        stop=datetime.fromisoformat(h["stop"]),
        price_eur_per_mwh=float(h["price"]),
        rank_eur_per_mwh=float(h["rank"]),
    )


def _flat(pairs: Any) -> list[str]:
    """Field/value pairs as one flat argument list (for a Lua script's ARGV)."""
    return [str(x) for pair in pairs for x in pair]


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:12]}"


def request_window(start_in_s: float, duration_s: float) -> tuple[datetime, datetime]:
    start = datetime.now(UTC) + timedelta(seconds=start_in_s)
    return start, start + timedelta(seconds=max(duration_s, 1e-3))


def _lines_to_json(lines: Sequence[OfferLine]) -> str:
    return json.dumps(
        [
            {
                "microgrid": x.microgrid,
                "asset": x.asset,
                "power_kw": x.power_kw,
                "start": _iso(x.start),
                "stop": _iso(x.stop),
                "price_eur_per_mwh": x.price_eur_per_mwh,
                "flexibility_type": x.flexibility_type.value,
            }
            for x in lines
        ]
    )


def _lines_from_json(text: str) -> list[OfferLine]:
    from ams.vpp.offers import OfferLine

    return [
        OfferLine(
            d["microgrid"],
            d["asset"],
            float(d["power_kw"]),
            datetime.fromisoformat(d["start"]),
            datetime.fromisoformat(d["stop"]),
            float(d["price_eur_per_mwh"]),
            FlexibilityType(d["flexibility_type"]),
        )
        for d in json.loads(text)
    ]
