"""The MGMS side of the DSO flexibility use case: offer, execute, verify.

Why it works this way:

* **Flexibility from live values and the operation plan.** What a resource can offer is what
  it draws (or feeds) right now at its power point, minus what the operation plan keeps:
  the power an Operation Plan message (HEILA Table 2) schedules for the resource at this
  time when one covers now, else the configured ``reserve_kw``; capped (``max_kw``). The
  agent reads the gateway's latest values, not Redis, so an offer is never older than the
  last field update; a point that is invalid or not topical offers nothing (a stale
  measurement is not a promise).
* **Activation -> commands -> confirmation.** An Activation Notification becomes the lab
  config's ``activate`` commands at its start and ``restore`` commands at its stop, run
  through :meth:`Gateway.execute_logged`, i.e. confirmed by their status points like any operator
  command and logged in the command log with ``requested_by = ams:<activation id>``.
* **Verification from measurements.** The baseline is the power just before the first
  command; every ``time_step_s`` the agent records ``baseline - measured`` (upward: less
  drawn) or ``measured - baseline`` (downward) as the delivered flexibility, and after the
  stop sends the series in a Verification Notification.
* **Restart-safe and once only.** Activation state lives in Redis (``P:flex:act:{id}``); a
  re-delivered or duplicated activation (same business id, new message id) does not switch
  the breaker a second time; one interrupted by a restart resumes from its state. The
  baseline is persisted *before* the first command, and each command step (``steps``) after
  it ran, under a request id of its own (``{activation}/activate:0``): a resumed activation
  measures against the persisted baseline (never a re-measured one, which would see the load
  already shed), skips the steps it has, and asks the gateway by request id for the others,
  which answers with the outcome of a command cut by the crash (resolved from the device's
  status by its intent) instead of executing it twice.
* **Bookkeeping waits, the verdict does not.** Baseline and samples come from the gateway's
  memory, not Redis; writes of the activation hash and the verification message are retried
  through a Redis outage (bounded) instead of failing the activation. Only the commands wait
  for Redis: their intent must be on disk before they go to the field.
* **Probes only when asked.** The hop times an activation carries (``created_ns``,
  ``received_ns``, ``stored_ns``, ``handled_ns``, ``verified_ns``, the commands'
  ``sent_ts``/``confirm_ts``) are for latency measurement and nothing here decides with
  them, so with the lab's ``probes`` off they are neither read from the clock nor written.
  This path runs once per message, so it tests the flag there; the per-value paths choose
  at construction instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

from redis.exceptions import RedisError
from redis.typing import EncodableT, FieldT

from gateway.audit import AuditKind, AuditLog
from gateway.commands import CommandOutcome
from gateway.config import UNIT_SI_FACTORS, FlexAction, FlexibilitySettings, FlexResource, LabConfig
from gateway.errors import StoreError
from gateway.messaging import Messenger, Received
from gateway.points import Quality
from gateway.semantic import (
    ActivationNotification,
    Flexibility,
    FlexibilityType,
    OperationPlan,
    ReserveNotification,
    VerificationNotification,
)

__all__ = ["FlexAgent"]

log = logging.getLogger(__name__)

INBOX_GROUP = "mgms-flex"
_BAD = Quality.INVALID | Quality.NOT_TOPICAL
#: How long bookkeeping writes (activation hash, verification) are retried through a Redis outage.
BOOKKEEPING_RETRY_S = 120.0


class GatewayLike(Protocol):
    """What the agent needs of :class:`gateway.runtime.Gateway` (a Protocol, to avoid a cycle)."""

    config: LabConfig

    def latest_value(self, name: str) -> tuple[float | int | bool | None, int] | None: ...

    async def execute_logged(
        self, point: str, value: str | float | int | bool, requested_by: str = "operator", request_id: str = ""
    ) -> CommandOutcome: ...


class FlexAgent:
    """Publishes Flexibility periodically and serves Reserve/Activation Notifications."""

    def __init__(
        self,
        gateway: GatewayLike,
        messenger: Messenger,
        settings: FlexibilitySettings,
        *,
        prefix: str,
        audit: AuditLog | None = None,
    ) -> None:
        self.gateway = gateway
        self.audit = audit
        self.messenger = messenger
        self.settings = settings
        self.prefix = prefix
        self.redis = messenger.redis
        self.probes = gateway.config.probes.enabled
        self.counters: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._running_resource: dict[str, str] = {}  # activation id -> resource it switches
        self._plans: dict[str, OperationPlan] = {}

    # ------------------------------------------------------------------ keys

    def _act_key(self, act_id: str) -> str:
        return f"{self.prefix}:flex:act:{act_id}"

    @property
    def _offered_key(self) -> str:
        return f"{self.prefix}:flex:offered"

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Serve the inbox and (if ``period_s`` > 0) publish flexibility until ``stop``."""
        for name, doc in cast(dict[str, str], await self.redis.hgetall(f"{self.prefix}:flex:plan")).items():
            self._plans[name] = OperationPlan.model_validate_json(doc)  # plans survive a restart
        await self._resume_unfinished()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.messenger.serve(INBOX_GROUP, "gateway", self.handle, stop), name="flex-inbox")
                if self.settings.period_s > 0:
                    tg.create_task(self._publish_loop(stop), name="flex-publish")
        finally:
            for task in list(self._running.values()):
                task.cancel()
            for task in list(self._running.values()):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _publish_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.publish()
            except Exception:
                log.exception("publishing flexibility failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.period_s):
                    await stop.wait()

    # ------------------------------------------------------------------ offering

    def power_kw(self, res: FlexResource) -> float | None:
        """The resource's measured active power in kW, or None if not known and good."""
        latest = self.gateway.latest_value(res.power_point)
        if latest is None:
            return None
        value, quality = latest
        if value is None or quality & _BAD:
            return None
        unit = self.gateway.config.point(res.power_point).unit
        return float(value) * UNIT_SI_FACTORS[unit] / 1e3

    def planned_kw(self, res: FlexResource, at: datetime | None = None) -> float:
        """What the operation plan keeps for the resource at ``at`` (now): the plan's step
        value when an Operation Plan covers that time, else ``reserve_kw``."""
        plan = self._plans.get(res.name)
        t = at or datetime.now(UTC)
        if plan is not None and plan.start <= t < plan.stop:
            i = int((t - plan.start).total_seconds() // plan.time_step_s)
            return abs(plan.power_series_kw[min(i, len(plan.power_series_kw) - 1)])
        return res.reserve_kw

    def available_kw(self, res: FlexResource) -> float:
        p = self.power_kw(res)
        if p is None:
            return 0.0
        magnitude = abs(p) - self.planned_kw(res)
        if res.max_kw is not None:
            magnitude = min(magnitude, res.max_kw)
        return round(magnitude, 3) if magnitude >= res.min_kw else 0.0

    async def publish(self, *, start: datetime | None = None, window_s: float | None = None) -> list[Flexibility]:
        """Send one Flexibility per resource that can offer something now (and is idle)."""
        sent: list[Flexibility] = []
        begin = start or (datetime.now(UTC) + timedelta(seconds=self.settings.lead_s))
        span = timedelta(seconds=window_s or self.settings.window_s)
        for res in self.settings.resources:
            if res.name in self._busy_resources():
                continue
            kw = self.available_kw(res)
            if kw <= 0:
                self.counters["nothing_to_offer"] += 1
                continue
            flex = Flexibility(
                identifier=f"{res.name}-{time.time_ns()}",
                flexibility_type=FlexibilityType(res.flexibility_type),
                power_kw=kw,
                start=begin,
                stop=begin + span,
            )
            await self.redis.hset(self._offered_key, flex.identifier, res.name)
            await self.messenger.send(flex, self.settings.aggregator)
            self.counters["flexibilities"] += 1
            sent.append(flex)
            log.info(
                "flexibility %s: %s %.1f kW offered to %s",
                flex.identifier,
                res.flexibility_type,
                kw,
                self.settings.aggregator,
            )
        return sent

    def _busy_resources(self) -> set[str]:
        # (keyed by resource: it was keyed by activation id, so a resource under activation
        # was offered again, e.g. by a restarted gateway's first publish)
        return {self._running_resource[a] for a, task in self._running.items() if not task.done()}

    # ------------------------------------------------------------------ notifications

    async def handle(self, item: Received) -> None:
        payload = item.envelope.payload
        if item.envelope.sender != self.settings.aggregator:
            self.counters["foreign"] += 1
            raise ValueError(f"{item.envelope.type} from {item.envelope.sender}, not our aggregator")
        if isinstance(payload, ActivationNotification):
            await self.on_activation(item, payload)
        elif isinstance(payload, OperationPlan):
            if payload.resource not in {r.name for r in self.settings.resources}:
                self.counters["unknown_plan_resource"] += 1
                raise ValueError(f"operation plan {payload.identifier} for unknown resource {payload.resource!r}")
            self._plans[payload.resource] = payload
            await self.redis.hset(f"{self.prefix}:flex:plan", payload.resource, payload.model_dump_json())
            self.counters["plans"] += 1
            log.info("operation plan %s for %s from %s", payload.identifier, payload.resource, payload.start)
        elif isinstance(payload, ReserveNotification):
            self.counters["reserves"] += 1
            reserve: dict[FieldT, EncodableT] = {"doc": payload.model_dump_json()}
            if self.probes:
                reserve["received_ns"] = str(item.received_ns)
            await self.redis.hset(f"{self.prefix}:flex:reserve:{payload.identifier}", mapping=reserve)
            log.info(
                "reserved: %s %.1f kW at %.2f EUR/MWh", payload.identifier, payload.power_kw, payload.price_eur_per_mwh
            )
        else:
            self.counters["ignored"] += 1

    def _resource_for(self, act: ActivationNotification, offered: dict[str, str]) -> FlexResource:
        by_name = {r.name: r for r in self.settings.resources}
        refs = f"{act.identifier} {act.reserve_ref or ''}"
        for flex_id, res_name in offered.items():
            if flex_id in refs and res_name in by_name:
                return by_name[res_name]
        for res in self.settings.resources:
            if res.flexibility_type == act.flexibility_type.value:
                return res
        raise ValueError(f"no resource offers {act.flexibility_type.value} flexibility for {act.identifier}")

    async def on_activation(self, item: Received, act: ActivationNotification) -> None:
        key = self._act_key(act.identifier)
        # claim, look and read the offered resources in one round trip: this is on the
        # activation's critical path (docs/latency.md, the DSO loop)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hsetnx(key, "state", "received")
        pipe.hgetall(key)
        pipe.hgetall(self._offered_key)
        created, earlier, offered = await pipe.execute()
        state = cast(dict[str, str], earlier).get("state")
        if not created:
            if state in ("verified", "failed") or act.identifier in self._running:
                self.counters["duplicate_activations"] += 1
                log.info("activation %s already %s: not run again", act.identifier, state)
                return
            log.info("activation %s resumes from state %s", act.identifier, state)
        res = self._resource_for(act, cast(dict[str, str], offered))
        record: dict[FieldT, EncodableT] = {
            "doc": act.model_dump_json(),
            "resource": res.name,
            "message": item.envelope.id,
        }
        if self.probes:
            record |= {
                "created_ns": str(item.created_ns),
                "received_ns": str(item.received_ns),
                "stored_ns": str(item.stored_ns),
                "handled_ns": str(time.time_ns()),
            }
        await self.redis.hset(key, mapping=record)
        self.counters["activations"] += 1
        self._audit(act, "received" if created else "resumed", item.envelope.sender, resource=res.name,
                    message=item.envelope.id, power_kw=act.power_kw)  # fmt: skip
        self._start(act, res, None if created else cast(dict[str, str], earlier))

    def _start(self, act: ActivationNotification, res: FlexResource, resumed: Mapping[str, str] | None = None) -> None:
        # Executed in the background: the inbox goes on (a second activation, a reserve)
        # while this one waits for its start and stop.
        task = asyncio.create_task(self._execute(act, res, resumed), name=f"activation:{act.identifier}")
        self._running[act.identifier] = task
        self._running_resource[act.identifier] = res.name
        task.add_done_callback(lambda _t: self._forget(act.identifier))

    def _forget(self, act_id: str) -> None:
        self._running.pop(act_id, None)
        self._running_resource.pop(act_id, None)

    async def _resume_unfinished(self) -> None:
        """Take up activations a previous run left unfinished (the gateway stopped during one).

        Their inbox entries are acknowledged already, so Redis state is the only record. One
        whose commands ran is not switched again: it is sampled to its stop (steps missed while
        the gateway was down count as nothing delivered), restored, and verified.
        """
        by_name = {r.name: r for r in self.settings.resources}
        async for key in self.redis.scan_iter(match=self._act_key("*"), count=500):
            h = cast(dict[str, str], await self.redis.hgetall(key))
            state, doc, res = h.get("state"), h.get("doc"), by_name.get(h.get("resource", ""))
            if state not in _UNFINISHED or doc is None or res is None:
                continue
            act = ActivationNotification.model_validate_json(doc)
            if act.identifier in self._running:
                continue
            self.counters["resumed"] += 1
            log.info("activation %s resumes after a restart (state %s)", act.identifier, state)
            self._start(act, res, resumed=h)

    async def _execute(
        self, act: ActivationNotification, res: FlexResource, resumed: Mapping[str, str] | None = None
    ) -> None:
        """Baseline, activate, sample, restore, verify; from where ``resumed`` (the activation
        hash a previous run left) says it got to."""
        key = self._act_key(act.identifier)
        h = dict(resumed or {})
        state = h.get("state")
        steps: dict[str, dict[str, Any]] = json.loads(h.get("steps") or "{}")
        try:
            await self._sleep_until(act.start)
            if "baseline_kw" in h:
                baseline = _opt_float(h["baseline_kw"])
            else:
                # measured and persisted before the first command: a resumed activation must
                # not measure it again with the load already shed
                baseline = self.power_kw(res)
                await self._save(key, {"state": "executing", "baseline_kw": repr(baseline)})
            if state in ("active", "command_failed") and not any(k.startswith("activate:") for k in steps):
                # a hash from a run before step records: its commands ran, never switch twice
                outcomes: list[CommandOutcome] | None = None
                ok = state == "active"
            else:
                outcomes = [
                    await self._step(act, key, steps, f"activate:{i}", a) for i, a in enumerate(res.activate)
                ]
                ok = all(o.ok for o in outcomes)
            if state not in ("active", "command_failed", "restoring"):
                mapping: dict[FieldT, EncodableT] = {"state": "active" if ok else "command_failed"}
                if outcomes is not None:
                    mapping["commands"] = json.dumps([_outcome(o, self.probes) for o in outcomes])
                await self._save(key, mapping)
            prior = [float(x) for x in json.loads(h.get("series_kw") or "[]")]
            series = await self._sample(act, res, baseline, key, prior)
            if state != "restoring":
                await self._save(key, {"state": "restoring", "series_kw": json.dumps(series)})
            restored = [await self._step(act, key, steps, f"restore:{i}", a) for i, a in enumerate(res.restore)]
            ver = VerificationNotification(
                identifier=f"ver:{act.identifier}",
                activation_ref=act.identifier,
                start=act.start,
                stop=act.stop,
                time_step_s=self._step_s(act),
                power_series_kw=tuple(series),
            )
            await self._retry(
                f"verification of {act.identifier}", lambda: self.messenger.send(ver, self.settings.aggregator)
            )
            done: dict[FieldT, EncodableT] = {
                "state": "verified" if ok else "failed",
                "restore": json.dumps([_outcome(o, self.probes) for o in restored]),
                "series_kw": json.dumps(series),
            }
            if self.probes:
                done["verified_ns"] = str(time.time_ns())
            await self._save(key, done)
            self.counters["verifications"] += 1
            self._audit(act, "verified" if ok else "failed", self.settings.aggregator, resource=res.name,
                        series_kw=series, verification=ver.identifier)  # fmt: skip
            log.info("activation %s done: delivered %s kW", act.identifier, series)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.counters["activation_errors"] += 1
            log.exception("activation %s failed", act.identifier)
            self._audit(act, "failed", self.settings.aggregator, resource=res.name, reason=repr(exc))
            with contextlib.suppress(RedisError):
                await self.redis.hset(key, mapping={"state": "failed", "reason": repr(exc)})

    def _audit(self, act: ActivationNotification, phase: str, actor: str, **data: Any) -> None:
        """An activation's step into the audit trail (``actor``: the aggregator it serves)."""
        if self.audit is not None:
            self.audit.record(AuditKind.ACTIVATION, actor, activation=act.identifier, phase=phase,
                              start=act.start.isoformat(), stop=act.stop.isoformat(), **data)  # fmt: skip

    async def _step(
        self, act: ActivationNotification, key: str, steps: dict[str, dict[str, Any]], name: str, action: FlexAction
    ) -> CommandOutcome:
        """One command of the activation, at most once: from the step record if it ran,
        else through the gateway under the step's own request id (which returns the outcome
        of a command a crash cut short instead of sending it again)."""
        rid = f"{act.identifier}/{name}"
        done = steps.get(name)
        if done is not None:
            return CommandOutcome(
                rid, str(done.get("point", action.point)), done.get("value", ""), f"ams:{act.identifier}",
                result=str(done.get("result", "failed")), reason=str(done.get("reason", "")),
            )  # fmt: skip
        outcome: CommandOutcome = await self.gateway.execute_logged(
            action.point, action.value, requested_by=f"ams:{act.identifier}", request_id=rid
        )
        if outcome.result == "interrupted" and datetime.now(UTC) < act.stop:
            # Cut by a crash and, by the device's status after the restart, not carried out
            # (killed between its intent and the send). The activation is ours to decide and
            # still under way: one new command, under its own id and log entry; not a resend
            # of the request, whose outcome stays logged as it was found.
            log.warning("activation %s: %s was not carried out (%s); issuing it again", act.identifier, name,
                        outcome.reason)  # fmt: skip
            rid = f"{rid}#2"
            outcome = await self.gateway.execute_logged(
                action.point, action.value, requested_by=f"ams:{act.identifier}", request_id=rid
            )
        steps[name] = {"request_id": rid, **_outcome(outcome, self.probes)}
        await self._save(key, {"steps": json.dumps(steps)})
        return outcome

    async def _save(self, key: str, mapping: Mapping[FieldT, EncodableT]) -> None:
        """HSET the activation hash, retried through a Redis outage: bookkeeping may be late,
        it must not fail the activation (whose verdict comes from measurements)."""
        with contextlib.suppress(StoreError):
            await self._retry(f"activation record {key}", lambda: self.redis.hset(key, mapping=dict(mapping)))

    async def _retry(self, what: str, op: Any) -> Any:
        """``await op()``, retrying Redis (and outbox) errors with backoff for
        :data:`BOOKKEEPING_RETRY_S`; then StoreError, logged."""
        deadline = time.monotonic() + BOOKKEEPING_RETRY_S
        attempt = 0
        while True:
            try:
                return await op()
            except (RedisError, StoreError, OSError) as exc:
                attempt += 1
                left = deadline - time.monotonic()
                if left <= 0:
                    log.error("%s not written: %s (gave up after %g s)", what, exc, BOOKKEEPING_RETRY_S)
                    raise StoreError(f"{what}: {exc}") from exc
                if attempt == 1:
                    log.warning("%s: %s; retrying", what, exc)
                await asyncio.sleep(min(left, random.uniform(0.05, min(2.0, 0.1 * 2**attempt))))

    def _step_s(self, act: ActivationNotification) -> int:
        """The configured step if it divides the window, else the largest divisor below it."""
        span = int((act.stop - act.start).total_seconds())
        step = self.settings.verification_step_s
        while step > 1 and span % step:
            step -= 1
        return max(1, step) if span >= 1 else 1

    async def _sample(
        self,
        act: ActivationNotification,
        res: FlexResource,
        baseline: float | None,
        key: str = "",
        prior: list[float] | None = None,
    ) -> list[float]:
        """The delivered power at each step, against ``baseline``; ``prior`` = steps a
        previous run measured already. Each step is kept in the hash as it is taken (best
        effort: a Redis outage must not make the next step late)."""
        step = self._step_s(act)
        n = max(1, int((act.stop - act.start).total_seconds()) // step)
        sign = 1.0 if res.flexibility_type == "upward" else -1.0
        series: list[float] = list(prior or [])[:n]
        for i in range(len(series), n):
            due = act.start + timedelta(seconds=(i + 1) * step)
            await self._sleep_until(due)
            measured = self.power_kw(res)
            late = (datetime.now(UTC) - due).total_seconds() > step
            if baseline is None or measured is None or late:
                # not measured in time (e.g. the gateway was down then): nothing is claimed
                series.append(0.0)
            else:
                series.append(round(sign * (abs(baseline) - abs(measured)), 3))
            if key:
                with contextlib.suppress(RedisError, OSError):
                    async with asyncio.timeout(0.5):
                        await self.redis.hset(key, "series_kw", json.dumps(series))
        return series

    @staticmethod
    async def _sleep_until(t: datetime) -> None:
        delay = (t - datetime.now(UTC)).total_seconds()
        if delay > 0:
            await asyncio.sleep(delay)


#: activation states a restarted gateway takes up
_UNFINISHED = ("received", "executing", "active", "command_failed", "restoring")


def _opt_float(text: str | None) -> float | None:
    return None if text in (None, "", "None") else float(text)


def _outcome(o: CommandOutcome, probes: bool) -> dict[str, Any]:
    """A command's outcome for the activation hash. Its duration stays either way (it is what
    the operator reads); the two instants are copies of the command log's, kept as probes."""
    out: dict[str, Any] = {
        "point": o.point,
        "value": o.value,
        "result": o.result,
        "reason": o.reason,
        "ms": o.duration_ms,
    }
    if probes:
        out["sent_ts"] = o.sent_ts
        out["confirm_ts"] = o.confirm_ts
    return out
