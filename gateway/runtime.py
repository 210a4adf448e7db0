"""The gateway core: wires adapters to the Redis store and serves command requests.

One task per device pumps adapter events into the store (values, link changes); one task
serves operator command requests from Redis. Everything the gateway holds is in the
:class:`Gateway` object; dependencies (store, adapters) come in through the constructor so
tests can hand in their own.

Commands execute at most once, and every execution is logged, even across a ``kill -9``:
before anything goes to the field the command's *intent* is written to Redis and
acknowledged (``RedisStore.write_intent``); the outcome removes it in the MULTI that logs
it, replies and acknowledges the request. A run that starts with intents left over (the
previous one died between the two) resolves each from the device's status once the link
is up and a fresh status value came in, logs it (``confirmed`` or ``interrupted``) and
acknowledges its request, before it serves any new request; it never sends one again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from math import isfinite
from typing import TYPE_CHECKING, Any

from gateway.audit import AuditLog
from gateway.commands import (
    CommandOutcome,
    StatusWatcher,
    build_request,
    confirm,
    expected_status,
    parse_command_value,
)
from gateway.config import Direction, LabConfig
from gateway.errors import CommandInvalid, LinkError, StoreError
from gateway.points import PointUpdate, Quality, UpdateCause, now
from gateway.protocols import Adapter, LinkState, LinkStateChange, create_adapter
from gateway.store import (
    CommandIntent,
    CommandRecord,
    CommandRequestEntry,
    RedisStore,
    encode_value,
    reraise_lost_cancel,
)

if TYPE_CHECKING:
    from gateway.flexibility import FlexAgent
    from gateway.messaging import Messenger

log = logging.getLogger(__name__)

__all__ = ["Gateway"]

STALE = Quality.NOT_TOPICAL | Quality.INVALID


class Gateway:
    """A running MGMS for one lab.

    ``run(stop)`` returns after ``stop`` is set and everything was shut down and flushed.
    """

    def __init__(
        self,
        config: LabConfig,
        store: RedisStore,
        adapters: Mapping[str, Adapter] | None = None,
        *,
        max_parallel_commands: int = 16,
        drain_timeout_s: float = 30.0,
        stats_period_s: float = 5.0,
    ) -> None:
        self.stats_period_s = stats_period_s
        self.drain_timeout_s = drain_timeout_s
        # A breaker request that waited in Redis for longer than this (the gateway was down)
        # is refused as expired instead of being executed into a field that has moved on.
        self.request_max_age_s: float | None = config.commands.request_validity_s
        self.config = config
        self.store = store
        self.adapters: dict[str, Adapter] = (
            dict(adapters)
            if adapters is not None
            else {name: create_adapter(dev, config.points_of(name)) for name, dev in config.devices.items()}
        )
        self._watcher = StatusWatcher()
        self._latest: dict[str, PointUpdate] = {}
        self._non_finite_seen: set[str] = set()
        self._monitor_points = {
            dev: [p for p in config.points_of(dev) if p.direction is Direction.MONITOR] for dev in config.devices
        }
        self._command_slots = asyncio.Semaphore(max_parallel_commands)
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self.counters: dict[str, int] = {
            "updates": 0,
            "link_changes": 0,
            "commands": 0,
            "non_finite_values": 0,
            "commands_resolved": 0,
        }
        # intents: those this run wrote (never taken for a previous run's), and the outcomes of
        # the previous run's, for a caller that asks again by request id (a resumed activation)
        self._run_started = now()
        self._own_intents: set[str] = set()
        self._resolved: dict[str, CommandOutcome] = {}
        self._intents_resolved = asyncio.Event()
        self.messenger: Messenger | None = None
        self.flex_agent: FlexAgent | None = None
        # the audit trail (P:audit); its checkpoints are signed once the messaging identity is loaded
        self.audit = AuditLog(store.redis, prefix=store.keys.prefix)
        store.on_refused = self.audit.request_refused

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        self._run_started = now()
        await self.store.start()
        await self.audit.start()
        self.audit.config_load(self.config.source, who="mgms run", lab=self.config.lab.name)
        messenger: Messenger | None = None
        agent_stop = asyncio.Event()
        try:
            # Started outside the task group so a start-up error (e.g. a certificate file
            # gone since the config was loaded) comes out as itself, not in an ExceptionGroup.
            for adapter in self.adapters.values():
                await adapter.start()
            if self.config.messaging is not None:
                from gateway.messaging import build_messenger

                messenger = build_messenger(
                    self.config.messaging,
                    self.store.redis,
                    prefix=self.store.keys.prefix,
                    probes=self.config.probes.enabled,
                )
                await messenger.start()
                self.messenger = messenger
                self.audit.identity = messenger.sealer.keystore.own
            async with asyncio.TaskGroup() as tg:
                if messenger is not None and self.config.flexibility is not None:
                    from gateway.flexibility import FlexAgent

                    self.flex_agent = FlexAgent(
                        self, messenger, self.config.flexibility, prefix=self.store.keys.prefix, audit=self.audit
                    )
                    tg.create_task(self.flex_agent.run(agent_stop), name="flexibility")
                for name, adapter in self.adapters.items():
                    tg.create_task(self._pump(adapter), name=f"pump:{name}")
                requests = tg.create_task(self._serve_requests(), name="command-requests")
                reporter = tg.create_task(self._report_stats(), name="stats")
                self._ready.set()
                log.info(
                    "gateway %s running: %d devices, %d points",
                    self.config.lab.name,
                    len(self.adapters),
                    len(self.config.points),
                )
                await stop.wait()
                log.info("gateway %s stopping", self.config.lab.name)
                # No new command requests; commands under way finish (their devices still
                # connected) before the links close, so none ends as failed by our own hand.
                self._stopping.set()
                agent_stop.set()
                await asyncio.wait({requests}, timeout=self.drain_timeout_s)
                reporter.cancel()
                for adapter in self.adapters.values():
                    await adapter.close()
        finally:
            agent_stop.set()
            if messenger is not None:
                await messenger.close()
            await self.audit.close()  # before the store: it closes the client they share
            await self.store.close()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def wait_connected(self, timeout_s: float) -> None:
        """Return once every adapter has a link (LinkError otherwise)."""
        await self.wait_ready()
        async with asyncio.TaskGroup() as tg:
            for adapter in self.adapters.values():
                tg.create_task(adapter.wait_connected(timeout_s))

    async def _pump(self, adapter: Adapter) -> None:
        store_put = self.store.put
        feed = self._watcher.feed
        latest = self._latest
        async for ev in adapter.events():
            if isinstance(ev, PointUpdate):
                v = ev.value
                if v.__class__ is float and not isfinite(v):  # type(v) is float: no bool/int/None here
                    ev = self._non_finite(ev)
                latest[ev.point] = ev
                store_put(ev)
                feed(ev)
                self.counters["updates"] += 1
            elif isinstance(ev, LinkStateChange):
                self.counters["link_changes"] += 1
                await self._on_link(ev)

    def _non_finite(self, ev: PointUpdate) -> PointUpdate:
        """A NaN or infinite measurand is no measurement: flagged invalid (IV), counted, and
        logged once per point. A device may send one (an IEEE 754 float has the bit patterns
        for it; a failed sensor or a division by zero in an RTU does); stored as good, a NaN
        would also stop every later history entry (no deadband comparison with it is true)."""
        self.counters["non_finite_values"] += 1
        if ev.point not in self._non_finite_seen:
            self._non_finite_seen.add(ev.point)
            log.warning("%s: non-finite value %r from the device; stored as invalid", ev.point, ev.value)
        return dataclasses.replace(ev, quality=ev.quality | Quality.INVALID)

    async def _on_link(self, ev: LinkStateChange) -> None:
        try:
            await self.store.set_link_state(ev.device, ev.state.value, ev.reason, ev.time)
        except Exception as exc:  # a Redis outage must not stop the pump
            log.warning("could not record link state of %s: %s", ev.device, exc)
        if ev.state in (LinkState.DOWN, LinkState.CLOSED):
            self._mark_stale(ev.device, ev.time)

    def _mark_stale(self, device: str, at: float) -> None:
        """Link gone: every point of the device keeps its last value but is flagged NT|IV."""
        for pt in self._monitor_points.get(device, ()):
            last = self._latest.get(pt.name)
            if last is not None and STALE in last.quality:
                continue
            upd = PointUpdate(
                pt.name,
                last.value if last is not None else None,
                (last.quality if last is not None else Quality.GOOD) | STALE,
                last.source_time if last is not None else None,
                at,
                UpdateCause.LINK_LOST,
                time_substituted=last.time_substituted if last is not None else False,
            )
            self._latest[pt.name] = upd
            self.store.put(upd)

    # ----------------------------------------------------------------- commands

    async def execute_logged(
        self,
        point: str,
        value: str | float | int | bool,
        requested_by: str = "operator",
        request_id: str = "",
    ) -> CommandOutcome:
        """:meth:`execute` for commands the gateway decides itself (a flexibility activation).

        Kept as the name the FlexAgent calls: every execution is logged now. With a
        ``request_id`` the caller asked before (a resumed activation) gets the first
        outcome back instead of a second execution.
        """
        return await self.execute(point, value, requested_by, request_id)

    def latest_value(self, name: str) -> tuple[float | int | bool | None, int] | None:
        """The last value and quality bits of a point as the gateway saw it (None: none yet)."""
        upd = self._latest.get(name)
        return None if upd is None else (upd.value, int(upd.quality))

    async def execute(
        self,
        point: str,
        value: str | float | int | bool,
        requested_by: str = "operator",
        request_id: str = "",
        *,
        request: CommandRequestEntry | None = None,
    ) -> CommandOutcome:
        """Run one command to its end and log it (confirmed / rejected / timeout / invalid /
        failed); ``request`` is the stream entry it came from, acknowledged with the log entry.

        Nothing goes to the device before its intent is in Redis; if Redis cannot take it
        within the device's ``command_timeout_s`` the command ends ``failed`` unsent. A
        ``request_id`` that already has an outcome (logged by this or, within a day, an
        earlier run) returns that outcome: a caller repeating itself after a crash does not
        operate the field twice.
        """
        self.counters["commands"] += 1
        rid = request_id or (request.request_id if request is not None else "") or CommandOutcome.new_id()
        outcome = CommandOutcome(rid, point, value, requested_by)  # type: ignore[arg-type]
        self.audit.command_request(outcome, via="stream" if request is not None else "internal")
        if request is not None:
            outcome.requested_ts = request.requested_ts
        elif request_id:
            earlier = await self._earlier_outcome(rid)
            if earlier is not None:
                return earlier
        try:
            control, status, req, eng = build_request(self.config, point, value, requested_by, rid)
            outcome.value = eng
            dev = self.config.devices[control.device]
            if dev.read_only:
                raise CommandInvalid(point, f"device {dev.name} is read-only (read_only: true in the lab config)")
        except CommandInvalid as exc:
            outcome.result, outcome.reason = exc.result, exc.reason
            log.info("command %s %s=%r by %s: invalid: %s", rid, point, value, requested_by, exc.reason)
            self.audit.command_decision(outcome, "refused", f"{exc.result}: {exc.reason}")
            return await self._finish(outcome, request)
        self.audit.command_decision(outcome, "authorised", "point, value and device checked against the lab config")
        adapter = self.adapters[control.device]
        if adapter.link_state is not LinkState.UP:
            # e.g. a request left pending by the previous run, taken while connecting:
            # give the link the command's own time budget before failing it.
            try:
                await adapter.wait_connected(dev.command_timeout_s)
            except LinkError as exc:
                outcome.result, outcome.reason = "failed", str(exc)
                log.info("command %s %s: failed: %s", rid, point, exc)
                return await self._finish(outcome, request)
        before = self._latest.get(status.name)
        intent = CommandIntent(
            request_id=rid,
            point=point,
            value=encode_value(eng),
            requested_by=requested_by,
            status_point=status.name,
            status_value=encode_value(before.value) if before is not None else "",
            status_quality=int(before.quality) if before is not None else None,
            stream_id=request.stream_id if request is not None else "",
            requested_ts=outcome.requested_ts,
        )
        self._own_intents.add(rid)
        try:
            await self.store.write_intent(intent, timeout_s=dev.command_timeout_s)
        except StoreError as exc:
            outcome.result, outcome.reason = "failed", f"not sent: {exc}"
            log.warning("command %s %s: %s", rid, point, outcome.reason)
            return await self._finish(outcome, request)
        outcome.sent_ts = now()
        self.audit.command_sent(outcome)
        send = asyncio.ensure_future(adapter.command(req))
        await confirm(
            self._watcher,
            control,
            status,
            eng,
            send,
            outcome,
            control.confirm_timeout_s or dev.command_timeout_s,
            self._latest.get(status.name),
        )
        log.info(
            "command %s %s=%r by %s: %s%s (%.1f ms)",
            rid,
            point,
            eng,
            requested_by,
            outcome.result,
            f": {outcome.reason}" if outcome.reason else "",
            outcome.duration_ms or 0.0,
        )
        return await self._finish(outcome, request)

    async def _finish(self, outcome: CommandOutcome, request: CommandRequestEntry | None) -> CommandOutcome:
        """Log the outcome, reply, acknowledge the request and drop the intent (one MULTI).

        If Redis cannot take it (30 s of retries), the intent stays and the request stays
        pending: the next run resolves the command from the device's status and logs it then,
        so the execution is in the log once either way.
        """
        self.audit.command_end(outcome)
        try:
            await self.store.log_command(outcome, request)
        except StoreError as exc:
            log.error("command %s not logged (%s); the next run resolves it from its intent", outcome.request_id, exc)
        finally:
            self._own_intents.discard(outcome.request_id)
        return outcome

    async def _earlier_outcome(self, rid: str) -> CommandOutcome | None:
        """The outcome of a command this id already had: resolved at start-up, or logged."""
        with contextlib.suppress(TimeoutError):  # bounded: a gateway never run() has none
            async with asyncio.timeout(self._resolve_bound_s()):
                await self._intents_resolved.wait()
        if rid in self._resolved:
            return self._resolved[rid]
        rec: CommandRecord | None = None
        for attempt in range(1, 6):  # the intent write needs Redis anyway: wait a little for it
            try:
                rec = await self.store.finished_command(rid)
                break
            except StoreError as exc:
                log.warning("command %s: cannot check for an earlier outcome (%s), retrying", rid, exc)
                await asyncio.sleep(0.2 * attempt)
        if rec is None:
            return None
        out = CommandOutcome(rec.request_id, rec.point, rec.value, rec.requested_by)  # type: ignore[arg-type]
        out.result, out.reason = rec.result.value, rec.reason
        out.requested_ts = rec.requested_ts or out.requested_ts
        out.sent_ts, out.ack_ts, out.confirm_ts = rec.sent_ts, rec.ack_ts, rec.confirm_ts
        log.info("command %s already ended %s: not executed again", rid, out.result)
        return out

    def _resolve_bound_s(self) -> float:
        """Longest a resolution can take: a link wait and a status wait per device."""
        return 2 * max((d.command_timeout_s for d in self.config.devices.values()), default=5.0) + 5.0

    async def _serve_requests(self) -> None:
        await self._resolve_intents()
        async with asyncio.TaskGroup() as tg:
            async for entry in self.store.command_requests(
                block_ms=250, stop=self._stopping, max_age_s=self.request_max_age_s
            ):
                await self._command_slots.acquire()
                tg.create_task(self._handle_request(entry), name=f"command:{entry.request_id}")

    async def _handle_request(self, entry: CommandRequestEntry) -> None:
        try:
            await self.execute(entry.point, entry.value, entry.requested_by, entry.request_id, request=entry)
        except Exception:
            log.exception("command request %s could not be completed; it stays pending", entry.request_id)
        finally:
            self._command_slots.release()

    # ----------------------------------------------------------------- intents of a crashed run

    async def _resolve_intents(self) -> None:
        """Resolve and log the commands the previous run had on their way to the field."""
        try:
            attempt = 0
            while not self._stopping.is_set():
                reraise_lost_cancel()
                try:
                    intents = [i for i in await self.store.pending_intents() if i.request_id not in self._own_intents]
                    break
                except StoreError as exc:
                    attempt += 1
                    log.warning("cannot read command intents (%s), retrying", exc)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(5.0, 0.1 * 2**attempt)):
                            await self._stopping.wait()
            else:
                return
            if intents:
                log.warning(
                    "%d command(s) cut by the previous run: resolving them from the devices' status, not re-sending",
                    len(intents),
                )
            async with asyncio.TaskGroup() as tg:
                for intent in intents:
                    tg.create_task(self._resolve(intent), name=f"resolve:{intent.request_id}")
        finally:
            self._intents_resolved.set()

    async def _resolve(self, intent: CommandIntent) -> None:
        """Find out from the device what became of a command cut by a crash, and log it.

        Waits for the link (``command_timeout_s``), then for a status value received by this
        run at the requested state (again the command's timeout: a breaker may still travel).
        Confirmed by it -> ``confirmed``; otherwise ``interrupted`` with what the status
        showed. Never re-sent: the field may have been operated since by someone else.
        """
        outcome = CommandOutcome(intent.request_id, intent.point, intent.value, intent.requested_by)  # type: ignore[arg-type]
        outcome.requested_ts = intent.requested_ts or intent.written_ts
        cut = "cut by a gateway restart"
        try:
            control = self.config.point(intent.point)
            eng, _raw = parse_command_value(control, intent.value)
            status = self.config.point(control.status_point or intent.status_point)
        except (KeyError, CommandInvalid) as exc:
            outcome.result = "interrupted"
            outcome.reason = f"{cut}; cannot check it against this lab config ({exc}); not re-sent"
        else:
            outcome.value = eng
            dev = self.config.devices[control.device]
            timeout_s = control.confirm_timeout_s or dev.command_timeout_s
            expected, tol = expected_status(control, status, eng)
            seen = await self._fresh_status(self.adapters[control.device], status.name, expected, tol, timeout_s)
            if seen is not None and _at(seen, expected, tol):
                already = intent.status_value != "" and _at_text(intent.status_value, expected, tol)
                outcome.result, outcome.confirm_ts = "confirmed", seen.receive_time
                outcome.reason = f"{cut}; confirmed from the device status, not re-sent" + (
                    " (the status was at the requested value already before the command)" if already else ""
                )
            else:
                outcome.result = "interrupted"
                shown = f"shows {seen.value!r}" if seen is not None else f"sent no good value within {timeout_s:g} s"
                outcome.reason = (
                    f"{cut}; the device status {status.name} {shown}, not the requested {expected!r} "
                    "(the command may not have reached the device); not re-sent"
                )
        self.counters["commands_resolved"] += 1
        self._resolved[intent.request_id] = outcome
        self.audit.command_end(outcome)
        log.warning("command %s %s=%s by %s: %s: %s", intent.request_id, intent.point, intent.value,
                    intent.requested_by, outcome.result, outcome.reason)  # fmt: skip
        try:
            await self.store.log_command(outcome, intent.stream_id or None)
        except StoreError as exc:
            log.error("resolved command %s not logged (%s); its intent stays for the next run", intent.request_id, exc)

    async def _fresh_status(
        self, adapter: Adapter, status: str, expected: float | int | bool, tol: float, timeout_s: float
    ) -> PointUpdate | None:
        """The status as this run saw it after the link came up: at ``expected`` if it gets
        there within ``timeout_s``, else the last good value this run received (None: none)."""
        try:
            await adapter.wait_connected(timeout_s)
        except LinkError:
            return self._fresh(status)
        last = self._fresh(status)
        if last is not None and _at(last, expected, tol):
            return last
        fut = self._watcher.watch(status, expected, tol, self._run_started)
        try:
            async with asyncio.timeout(timeout_s):
                return await fut
        except TimeoutError:
            return self._fresh(status)
        finally:
            self._watcher.discard(status, fut)
            fut.cancel()

    def _fresh(self, status: str) -> PointUpdate | None:
        upd = self._latest.get(status)
        if upd is None or upd.receive_time < self._run_started or not upd.quality.is_good or upd.value is None:
            return None
        return upd

    # ----------------------------------------------------------------- diagnostics

    async def _report_stats(self) -> None:
        """Every ``stats_period_s``, each adapter's counters go to its device hash in Redis."""
        # Ends on _stopping, not only on cancel: a Redis client busy with a write when the
        # cancel lands has been seen to swallow it, which left shutdown waiting forever.
        while not self._stopping.is_set():
            reraise_lost_cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.stats_period_s):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            for name, adapter in self.adapters.items():
                await self.store.write_device_stats(name, adapter.stats())
            if self.messenger is not None:
                await self.messenger.write_stats()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.counters)
        for name, adapter in self.adapters.items():
            out[name] = {"link": adapter.link_state.value, **adapter.stats()}
        return out


def _at(upd: PointUpdate, expected: float | int | bool, tol: float) -> bool:
    if upd.value is None:
        return False
    if isinstance(expected, float):
        return abs(float(upd.value) - expected) <= tol
    return upd.value == expected


def _at_text(text: str, expected: float | int | bool, tol: float) -> bool:
    try:
        v = float(text)
    except ValueError:
        return False
    return abs(v - float(expected)) <= tol if isinstance(expected, float) else v == float(expected)
