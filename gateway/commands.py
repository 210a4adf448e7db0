"""Commands, protocol-neutral: parse an operator's value, send, confirm by the status point.

The adapter reports only the device's own answer (e.g. 104 ACTCON). Whether the field
really followed is decided here, the same way for every protocol: a command is *confirmed*
when its status point reports the expected value after the command was sent, *rejected*
when the device refused it, *timeout* when either answer did not come in time.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass, field

from gateway.config import Direction, LabConfig, Point
from gateway.errors import CommandError, CommandInvalid, CommandTimeout, GatewayError
from gateway.points import CommandRequest, DoublePoint, PointUpdate, now

__all__ = ["CommandOutcome", "StatusWatcher", "expected_status", "parse_command_value"]

_DOUBLE_WORDS = {
    "open": DoublePoint.OFF,
    "off": DoublePoint.OFF,
    "trip": DoublePoint.OFF,
    "1": DoublePoint.OFF,
    "close": DoublePoint.ON,
    "closed": DoublePoint.ON,
    "on": DoublePoint.ON,
    "2": DoublePoint.ON,
}
_SINGLE_WORDS = {"on": True, "true": True, "1": True, "off": False, "false": False, "0": False}


def parse_command_value(point: Point, value: str | float | int | bool) -> tuple[float | int | bool, float | int | bool]:
    """Operator value -> (engineering value, protocol value); CommandInvalid when it does not fit.

    Accepts words an operator types ("open", "close", "on", "off") as well as numbers.
    Set-points are given in the point's engineering unit and checked against min/max.
    """
    if point.direction is not Direction.CONTROL:
        raise CommandInvalid(point.name, "not a control point")
    kind = point.address.kind
    text = str(value).strip().lower() if not isinstance(value, bool) else ("on" if value else "off")
    if kind == "double":
        if isinstance(value, DoublePoint):
            state = value
        elif text in _DOUBLE_WORDS:
            state = _DOUBLE_WORDS[text]
        else:
            raise CommandInvalid(point.name, f"{value!r} is not a double command (open/off/1 or close/on/2)")
        return int(state), int(state)
    if kind == "single":
        if text not in _SINGLE_WORDS:
            raise CommandInvalid(point.name, f"{value!r} is not a single command (on/off)")
        return _SINGLE_WORDS[text], _SINGLE_WORDS[text]
    try:
        eng = float(value)
    except (TypeError, ValueError):
        raise CommandInvalid(point.name, f"set-point needs a number in {point.unit}, not {value!r}") from None
    if not math.isfinite(eng):
        raise CommandInvalid(point.name, "set-point must be finite")
    if point.min_value is not None and eng < point.min_value:
        raise CommandInvalid(point.name, f"{eng:g} {point.unit} is below the minimum {point.min_value:g}")
    if point.max_value is not None and eng > point.max_value:
        raise CommandInvalid(point.name, f"{eng:g} {point.unit} is above the maximum {point.max_value:g}")
    return eng, point.to_raw(eng)


def expected_status(control: Point, status: Point, engineering: float | int | bool) -> tuple[float | int | bool, float]:
    """The status value (engineering, as stored) that confirms the command, and the tolerance."""
    if control.address.kind == "measured":
        tol = control.confirm_tolerance or max(1e-6, abs(float(engineering)) * 1e-6)
        return float(engineering), tol
    return engineering, 0.0


@dataclass(slots=True)
class CommandOutcome:
    """How a command ended, with every timestamp (seconds, wall clock) for the command log."""

    request_id: str
    point: str
    value: float | int | bool
    requested_by: str
    result: str = "pending"  # confirmed | rejected | timeout | invalid | failed | expired | interrupted
    reason: str = ""
    requested_ts: float = field(default_factory=now)
    sent_ts: float | None = None
    ack_ts: float | None = None
    confirm_ts: float | None = None

    @property
    def ok(self) -> bool:
        return self.result == "confirmed"

    @property
    def duration_ms(self) -> float | None:
        """Request to confirmation (or to the end) in milliseconds."""
        end = self.confirm_ts or self.ack_ts
        return None if end is None or self.sent_ts is None else (end - self.sent_ts) * 1000.0

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex[:16]


class StatusWatcher:
    """Futures waiting for a status point to reach a value; fed by the core's update loop.

    A waiter registers *before* the command is sent so a fast device cannot confirm before
    anyone listens; only updates received after the send time count.
    """

    def __init__(self) -> None:
        self._waiters: dict[str, list[tuple[float | int | bool, float, float, asyncio.Future[PointUpdate]]]] = {}

    def watch(
        self, status: str, expected: float | int | bool, tolerance: float, after: float
    ) -> asyncio.Future[PointUpdate]:
        fut: asyncio.Future[PointUpdate] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(status, []).append((expected, tolerance, after, fut))
        return fut

    def discard(self, status: str, fut: asyncio.Future[PointUpdate]) -> None:
        waiters = self._waiters.get(status)
        if waiters:
            waiters[:] = [w for w in waiters if w[3] is not fut]
            if not waiters:
                del self._waiters[status]

    def feed(self, upd: PointUpdate) -> None:
        waiters = self._waiters.get(upd.point)
        if not waiters or upd.value is None or not upd.quality.is_good:
            return
        keep = []
        for expected, tol, after, fut in waiters:
            if fut.done():
                continue
            if upd.receive_time >= after and _matches(upd.value, expected, tol):
                fut.set_result(upd)
            else:
                keep.append((expected, tol, after, fut))
        if keep:
            self._waiters[upd.point] = keep
        else:
            del self._waiters[upd.point]


def _matches(value: float | int | bool, expected: float | int | bool, tol: float) -> bool:
    if isinstance(expected, float):
        return abs(float(value) - expected) <= tol
    return value == expected


async def confirm(
    watcher: StatusWatcher,
    control: Point,
    status: Point,
    engineering: float | int | bool,
    send: asyncio.Future[float] | asyncio.Task[float],
    outcome: CommandOutcome,
    timeout_s: float,
    latest_status: PointUpdate | None,
) -> CommandOutcome:
    """Await the device's acceptance then the status; fill ``outcome`` (never raises GatewayError)."""
    expected, tol = expected_status(control, status, engineering)
    fut = watcher.watch(status.name, expected, tol, outcome.sent_ts or now())
    try:
        try:
            outcome.ack_ts = await send
        except CommandError as exc:
            outcome.result, outcome.reason = exc.result, exc.reason
            return outcome
        except GatewayError as exc:
            outcome.result, outcome.reason = "failed", str(exc)
            return outcome
        try:
            async with asyncio.timeout(timeout_s):
                upd = await fut
        except TimeoutError:
            if (
                latest_status is not None
                and latest_status.quality.is_good
                and latest_status.value is not None
                and _matches(latest_status.value, expected, tol)
            ):
                # Device accepted, status already showed the target and did not change.
                outcome.result, outcome.reason = "confirmed", "status already at the requested value"
                outcome.confirm_ts = now()
                return outcome
            exc2 = CommandTimeout(
                control.name, f"status {status.name} did not reach {expected!r} within {timeout_s:g} s"
            )
            outcome.result, outcome.reason = exc2.result, exc2.reason
            return outcome
        outcome.result = "confirmed"
        outcome.confirm_ts = upd.receive_time
        return outcome
    finally:
        watcher.discard(status.name, fut)
        if not fut.done():
            fut.cancel()


def build_request(
    cfg: LabConfig, point_name: str, value: str | float | int | bool, requested_by: str, request_id: str = ""
) -> tuple[Point, Point, CommandRequest, float | int | bool]:
    """Validate an operator request against the config; CommandInvalid names what is wrong."""
    try:
        control = cfg.point(point_name)
    except KeyError:
        raise CommandInvalid(point_name, "no such point in the lab config") from None
    eng, raw = parse_command_value(control, value)
    if control.status_point is None:  # config validation forbids it; keep mypy and readers sure
        raise CommandInvalid(point_name, "control point has no status point")
    status = cfg.point(control.status_point)
    req = CommandRequest(
        point_name, raw, requested_by, request_id or CommandOutcome.new_id(), control.select_before_operate
    )
    return control, status, req, eng
