"""The one interface every field-protocol adapter implements.

An adapter owns the link to one device: it connects (and reconnects by itself with capped,
jittered backoff until closed), turns what the device sends into :class:`PointUpdate`s on
one bounded asyncio stream, and executes commands. It knows nothing of Redis, MQTT or the
AMS. Confirmation of a command by its status point is the core's job (it is the same for
every protocol); the adapter only reports the device's own answer (e.g. 104 ACTCON).
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from gateway.config import Device, Point
from gateway.errors import LinkError
from gateway.points import CommandRequest, PointUpdate, now


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    UP = "up"
    DOWN = "down"
    CLOSED = "closed"


@dataclass(slots=True, frozen=True)
class LinkStateChange:
    """Reported on the update stream next to values, so the core sees both in order."""

    device: str
    state: LinkState
    reason: str = ""
    time: float = field(default_factory=now)


class Adapter(abc.ABC):
    """Async adapter for one device.

    Usage::

        adapter = create_adapter(device, points)
        await adapter.start()              # returns at once; connects in the background
        async for event in adapter.events():
            ...                            # PointUpdate | LinkStateChange
        await adapter.command(request)     # raises CommandRejected / CommandTimeout / LinkError
        await adapter.close()
    """

    #: set while the link is up (every adapter keeps it; :meth:`wait_connected` waits on it)
    _up: asyncio.Event

    def __init__(self, device: Device, points: tuple[Point, ...]) -> None:
        self.device = device
        self.points = points

    @abc.abstractmethod
    async def start(self) -> None:
        """Begin connecting; reconnects by itself until :meth:`close`."""

    async def wait_connected(self, timeout_s: float) -> None:
        """Return once the link is up (raise LinkError after ``timeout_s``)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._up.wait()
        except TimeoutError:
            raise LinkError(self.device.name, f"not connected within {timeout_s:g} s{self._why_down()}") from None

    def _why_down(self) -> str:
        """What the adapter knows of why it is not up, for the error (e.g. " (last error)")."""
        return ""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop the link and every background task; the event stream then ends."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[PointUpdate | LinkStateChange]:
        """The stream of values and link changes; one consumer."""

    @abc.abstractmethod
    async def read(self, point: str) -> PointUpdate:
        """Ask the device for the current value of one point now."""

    @abc.abstractmethod
    async def interrogate(self) -> None:
        """Ask the device for all its values (104 general interrogation); answers arrive as events."""

    @abc.abstractmethod
    async def command(self, request: CommandRequest) -> float:
        """Send a command and wait for the device's own confirmation (104 ACTCON).

        Returns the time (``points.now()`` clock) the device's acceptance arrived; raises
        CommandRejected on a negative answer, CommandTimeout when none came within the
        device's ``command_timeout_s``, LinkError when there is no link.
        """

    @property
    @abc.abstractmethod
    def link_state(self) -> LinkState:
        """Current state of the link."""

    def stats(self) -> dict[str, int]:
        """Counters for diagnostics (frames, drops, reconnects); adapters add their own."""
        return {}
