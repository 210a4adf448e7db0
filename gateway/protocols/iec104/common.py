"""IEC 104 pieces both client engines share (c104 and asyncio): confirmations, backoff,
the bounded event queue's drop policy.

Kept free of c104 so the asyncio engine can use them without loading the native library.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from gateway.config import Point, iec104_address
from gateway.errors import CommandInvalid, LinkError
from gateway.points import DoublePoint, PointUpdate, UpdateCause, now
from gateway.protocols.base import Adapter, LinkState, LinkStateChange

log = logging.getLogger("gateway.protocols.iec104")

#: what an IEC 104 adapter hands to the core
Event = PointUpdate | LinkStateChange

__all__ = [
    "CAUSE_OF_COT",
    "COMMAND_VALUE_LEN",
    "COT_ACTCON",
    "COT_ACTTERM",
    "COT_UNKNOWN",
    "MONITOR_COTS",
    "CommandKind",
    "Confirmation",
    "Event",
    "EventBuffer",
    "Iec104AdapterBase",
    "backoff_delay",
    "command_reply",
    "command_value",
    "monitor_asdu_refusal",
    "parse_command_reply",
    "parse_confirmation",
]

# Causes of transmission (IEC 60870-5-101 7.2.3) the adapter looks at in raw frames.
COT_ACTCON = 7
COT_ACTTERM = 10
COT_UNKNOWN = {
    44: "unknown type id",
    45: "unknown cause of transmission",
    46: "unknown common address",
    47: "unknown information object address",
}


def _cause_table() -> tuple[UpdateCause, ...]:
    """Update cause per 6-bit COT, indexed by the COT itself (no enum built per object)."""
    table = [UpdateCause.OTHER] * 64
    table[1] = table[2] = UpdateCause.PERIODIC  # periodic, background scan
    table[3] = UpdateCause.SPONTANEOUS
    table[5] = UpdateCause.REQUESTED
    table[11] = table[12] = UpdateCause.RETURN  # return information, remote / local command
    for cot in range(20, 42):  # 20-36 by (group) interrogation, 37-41 by counter interrogation
        table[cot] = UpdateCause.INTERROGATED
    return tuple(table)


#: the update cause of each 6-bit cause of transmission, for values decoded from raw ASDUs
CAUSE_OF_COT = _cause_table()

#: causes of transmission a monitor-direction value may carry (IEC 60870-5-101 7.2.3 and the
#: type/cause table): periodic, background, spontaneous, requested, return information
#: (remote/local command), interrogated (general, groups 1-16) and counter interrogated.
#: 0 is "not used", 4 (initialised) only for M_EI_NA_1, 6-10 and 44-47 are command causes.
MONITOR_COTS: frozenset[int] = frozenset({1, 2, 3, 5, 11, 12, *range(20, 42)})


def monitor_asdu_refusal(cot: int, negative: bool, test: bool) -> str | None:
    """The counter under which a monitor ASDU is refused, or None when its values may be used.

    A test transmission (T = 1) is the device checking the link, not a measurement, so it
    never becomes live state (``test_values``). The P/N bit is for confirmations; on a value
    it, and a cause no monitor value can have (0, 63, the command causes), make the ASDU
    meaningless (``bad_cot``): refused and counted rather than stored as good.
    """
    if test:
        return "test_values"
    if negative or cot not in MONITOR_COTS:
        return "bad_cot"
    return None

# Command type ids -> length of the value in front of the qualifier octet (S/E bit there).
COMMAND_VALUE_LEN = {45: 0, 46: 0, 58: 0, 59: 0, 48: 2, 49: 2, 50: 4, 61: 2, 62: 2, 63: 4}


class EventBuffer:
    """The adapter's bounded event stream, shared by both engines: when the consumer falls
    ``maxlen`` events behind, the oldest are dropped, counted and logged (at most once a
    second), never silently. Subclasses decide how events get in and out (from c104's
    threads, or from the loop itself)."""

    def __init__(self, maxlen: int) -> None:
        self._items: collections.deque[Event] = collections.deque()
        self._maxlen = maxlen
        self._event = asyncio.Event()
        self.dropped = 0
        self._last_drop_log = 0.0

    def _drop(self, n: int) -> None:
        """Drop the ``n`` oldest queued events (as many as there are) and count ``n``."""
        self.dropped += n
        with contextlib.suppress(IndexError):  # the consumer may take some meanwhile
            for _ in range(min(n, len(self._items))):
                self._items.popleft()
        t = time.monotonic()
        if t - self._last_drop_log > 1.0:
            self._last_drop_log = t
            log.warning("event queue full: %d events dropped so far", self.dropped)

    @property
    def pending(self) -> int:
        return len(self._items)

    def wake(self) -> None:
        """From the loop: make a waiting consumer look again (e.g. at close)."""
        self._event.set()

    def put(self, item: Event) -> None:
        """Queue one event (from c104's threads or from the loop, as the subclass allows)."""
        raise NotImplementedError

    async def get_batch(self, limit: int = 4096) -> list[Event]:
        """Up to ``limit`` events; [] only when woken with nothing to give (close)."""
        raise NotImplementedError


class Iec104AdapterBase(Adapter):
    """What both IEC 104 client engines share around their event buffer: the link state, the
    counters with the buffer's drops, an event stream that ends once closed and drained, and
    the periodic general interrogation (``gi_period_s``)."""

    _state: LinkState
    _counters: collections.Counter[str]
    _closing: bool
    _buffer: EventBuffer | None

    @property
    def link_state(self) -> LinkState:
        return self._state

    def _set_state(self, state: LinkState, reason: str = "") -> None:
        if state is self._state:
            return
        self._state = state
        log.info("%s: link %s%s", self.device.name, state.value, f" ({reason})" if reason else "")
        if self._buffer is not None:
            self._buffer.put(LinkStateChange(self.device.name, state, reason))

    def stats(self) -> dict[str, int]:
        out = dict(self._counters)
        if self._buffer is not None:
            out["events_dropped"] = self._buffer.dropped
        return out

    async def _periodic_gi(self) -> None:
        period = self.device.gi_period_s
        while not self._closing:
            await asyncio.sleep(period)
            if self._state is LinkState.UP:
                try:
                    await self.interrogate()
                except LinkError as exc:
                    log.warning("%s: periodic interrogation failed: %s", self.device.name, exc)

    async def events(self) -> AsyncIterator[Event]:
        assert self._buffer is not None, "start() first"
        buffer = self._buffer
        while True:
            if self._closing and not buffer.pending:
                return  # closed and drained: the stream ends
            for item in await buffer.get_batch():
                yield item


#: the value kinds of IEC 104 commands, as :func:`command_value` tells them apart
CommandKind = Literal["double", "single", "scaled", "normalized", "float"]


def command_value(pt: Point, value: float | int | bool) -> tuple[CommandKind, int | bool | float]:
    """The command value checked against the point's IEC 104 type, in protocol terms: both
    engines refuse the same requests with the same reasons, then each builds its own object."""
    t = iec104_address(pt).type
    if t.startswith("C_DC"):
        try:
            state = DoublePoint(int(value))
        except ValueError:
            raise CommandInvalid(pt.name, f"double command takes 1 (off) or 2 (on), not {value!r}") from None
        if state not in (DoublePoint.ON, DoublePoint.OFF):
            raise CommandInvalid(pt.name, "double command takes 1 (off) or 2 (on)")
        return "double", int(state)
    if t.startswith("C_SC"):
        return "single", bool(value)
    if isinstance(value, bool) or not math.isfinite(float(value)):
        raise CommandInvalid(pt.name, f"set-point needs a finite number, not {value!r}")
    if t in ("C_SE_NB_1", "C_SE_TB_1"):
        raw = round(float(value))
        if not -32768 <= raw <= 32767:
            raise CommandInvalid(pt.name, f"scaled set-point {raw} outside -32768..32767")
        return "scaled", raw
    if t in ("C_SE_NA_1", "C_SE_TA_1"):
        if not -1.0 <= float(value) < 1.0:
            raise CommandInvalid(pt.name, f"normalized set-point {value} outside -1..1")
        return "normalized", float(value)
    return "float", float(value)


def backoff_delay(attempt: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, initial * 2**attempt)].

    Jitter spreads the reconnects of many gateways after a shared outage (e.g. a COM600
    reboot) instead of having them all knock at the same instant.
    """
    cap = min(max_s, initial_s * (2 ** min(attempt, 30)))
    return rng.uniform(min(initial_s, cap) / 2, cap)


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a raw command-direction frame from the device says about a command."""

    type_id: int
    ioa: int
    common_address: int
    cot: int
    negative: bool
    select: bool
    received_at: float = 0.0

    @property
    def reason(self) -> str:
        if self.cot in COT_UNKNOWN:
            return COT_UNKNOWN[self.cot]
        what = "select" if self.select else "execute"
        return f"negative confirmation of {what} (cot {self.cot})"


def parse_command_reply(apdu: bytes) -> Confirmation | None:
    """Any command-direction reply (ACTCON, ACTTERM, negative mirrors) in an I-frame, else None.

    Only the fixed header and the qualifier octet are read: the frame was already validated
    by lib60870, this only tells ACTCON/ACTTERM/negative/select apart.
    """
    if len(apdu) < 16 or apdu[0] != 0x68 or apdu[2] & 0x01:
        return None
    return command_reply(apdu[6:])


def parse_confirmation(apdu: bytes) -> Confirmation | None:
    """The device's confirmation of a command (ACTCON, positive or negative) in an I-frame,
    else None (an ACTTERM is not a confirmation)."""
    conf = parse_command_reply(apdu)
    if conf is None or (conf.cot != COT_ACTCON and conf.cot not in COT_UNKNOWN):
        return None
    return conf


def command_reply(asdu: bytes) -> Confirmation | None:
    """Any command-direction ASDU from the device (ACTCON, ACTTERM, negative mirrors) read
    down to what a client needs; None for other type ids or an ASDU too short to say."""
    if len(asdu) < 10:
        return None
    type_id = asdu[0]
    value_len = COMMAND_VALUE_LEN.get(type_id)
    if value_len is None:
        return None
    cot = asdu[2] & 0x3F
    q_index = 9 + value_len
    select = bool(asdu[q_index] & 0x80) if q_index < len(asdu) else False
    (ca,) = struct.unpack_from("<H", asdu, 4)
    ioa = asdu[6] | asdu[7] << 8 | asdu[8] << 16
    negative = bool(asdu[2] & 0x40) or cot in COT_UNKNOWN
    return Confirmation(type_id, ioa, ca, cot, negative, select, now())
