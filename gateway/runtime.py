"""The gateway core: wires adapters to the Redis store and serves command requests.

One task per device pumps adapter events into the store (values, link changes); one task
serves operator command requests from Redis. Everything the gateway holds is in the
:class:`Gateway` object; dependencies (store, adapters) come in through the constructor so
tests can hand in their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Mapping
from math import isfinite
from typing import TYPE_CHECKING, Any

from gateway.commands import CommandOutcome, StatusWatcher, build_request, confirm
from gateway.config import Direction, LabConfig
from gateway.errors import CommandInvalid, LinkError
from gateway.points import PointUpdate, Quality, UpdateCause, now
from gateway.protocols import Adapter, LinkState, LinkStateChange, create_adapter
from gateway.store import CommandRequestEntry, RedisStore, reraise_lost_cancel

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
        request_max_age_s: float | None = 600.0,
        stats_period_s: float = 5.0,
    ) -> None:
        self.stats_period_s = stats_period_s
        self.drain_timeout_s = drain_timeout_s
        # A breaker request that waited in Redis for longer than this (the gateway was down)
        # is logged as invalid instead of being executed into a field that has moved on.
        self.request_max_age_s = request_max_age_s
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
        self.counters: dict[str, int] = {"updates": 0, "link_changes": 0, "commands": 0, "non_finite_values": 0}
        self.messenger: Messenger | None = None
        self.flex_agent: FlexAgent | None = None

    # ----------------------------------------------------------------- running

    async def run(self, stop: asyncio.Event) -> None:
        await self.store.start()
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
            async with asyncio.TaskGroup() as tg:
                if messenger is not None and self.config.flexibility is not None:
                    from gateway.flexibility import FlexAgent

                    self.flex_agent = FlexAgent(self, messenger, self.config.flexibility, prefix=self.store.keys.prefix)
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
        self, point: str, value: str | float | int | bool, requested_by: str = "operator"
    ) -> CommandOutcome:
        """:meth:`execute`, then the outcome into the command log (for commands the gateway
        decides itself, e.g. a flexibility activation, so the operator sees them too)."""
        outcome = await self.execute(point, value, requested_by)
        try:
            await self.store.log_command(outcome)
        except Exception as exc:  # the command happened; a log outage must not undo that
            log.warning("command %s not logged: %s", outcome.request_id, exc)
        return outcome

    def latest_value(self, name: str) -> tuple[float | int | bool | None, int] | None:
        """The last value and quality bits of a point as the gateway saw it (None: none yet)."""
        upd = self._latest.get(name)
        return None if upd is None else (upd.value, int(upd.quality))

    async def execute(
        self, point: str, value: str | float | int | bool, requested_by: str = "operator", request_id: str = ""
    ) -> CommandOutcome:
        """Run one command to its end (confirmed / rejected / timeout / invalid / failed) and log it."""
        self.counters["commands"] += 1
        outcome = CommandOutcome(request_id or CommandOutcome.new_id(), point, value, requested_by)  # type: ignore[arg-type]
        try:
            control, status, req, eng = build_request(self.config, point, value, requested_by, outcome.request_id)
            outcome.value = eng
            dev = self.config.devices[control.device]
            if dev.read_only:
                raise CommandInvalid(point, f"device {dev.name} is read-only (read_only: true in the lab config)")
        except CommandInvalid as exc:
            outcome.result, outcome.reason = exc.result, exc.reason
            log.info("command %s %s=%r by %s: invalid: %s", outcome.request_id, point, value, requested_by, exc.reason)
            return outcome
        adapter = self.adapters[control.device]
        if adapter.link_state is not LinkState.UP:
            # e.g. a request left pending by the previous run, taken while connecting:
            # give the link the command's own time budget before failing it.
            try:
                await adapter.wait_connected(dev.command_timeout_s)
            except LinkError as exc:
                outcome.result, outcome.reason = "failed", str(exc)
                log.info("command %s %s: failed: %s", outcome.request_id, point, exc)
                return outcome
        outcome.sent_ts = now()
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
            outcome.request_id,
            point,
            eng,
            requested_by,
            outcome.result,
            f": {outcome.reason}" if outcome.reason else "",
            outcome.duration_ms or 0.0,
        )
        return outcome

    async def _serve_requests(self) -> None:
        async with asyncio.TaskGroup() as tg:
            async for entry in self.store.command_requests(
                block_ms=250, stop=self._stopping, max_age_s=self.request_max_age_s
            ):
                await self._command_slots.acquire()
                tg.create_task(self._handle_request(entry), name=f"command:{entry.request_id}")

    async def _handle_request(self, entry: CommandRequestEntry) -> None:
        try:
            outcome = await self.execute(entry.point, entry.value, entry.requested_by, entry.request_id)
            await self.store.log_command(outcome, entry.stream_id)
        except Exception:
            log.exception("command request %s could not be completed; it stays pending", entry.request_id)
        finally:
            self._command_slots.release()

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

