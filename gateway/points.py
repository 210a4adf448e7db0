"""Protocol-neutral point model: what every adapter hands to the core.

Values travel as plain numbers (``float`` for measurements and set-points, ``int`` for
double points, ``bool`` for single points) so the hot path does no conversion; the meaning
of a value (unit, quantity, phase) stays in the point's configuration.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

__all__ = [
    "CommandRequest",
    "DoublePoint",
    "PointUpdate",
    "Quality",
    "UpdateCause",
    "now",
]


def now() -> float:
    """Wall-clock time in seconds; every timestamp in the gateway uses this clock."""
    return time.time()


class Quality(enum.IntFlag):
    """Quality bits, named after IEC 60870-5-101/104 and mapped from other protocols.

    The bit values are those of the 104 quality descriptor (QDS), so a 104 adapter passes
    them through unchanged; ``QUESTIONABLE`` is outside the QDS octet for protocols (61850)
    that know it.
    """

    GOOD = 0
    OVERFLOW = 0x01
    ELAPSED_TIME_INVALID = 0x08
    BLOCKED = 0x10
    SUBSTITUTED = 0x20
    NOT_TOPICAL = 0x40
    INVALID = 0x80
    QUESTIONABLE = 0x100

    @property
    def is_good(self) -> bool:
        """No bit set at all: value may be used without second thought."""
        return self == Quality.GOOD

    def flags(self) -> list[str]:
        """Lower-case names of the set bits, for humans reading Redis."""
        return [m.name.lower() for m in Quality if m and m in self and m.name]


class DoublePoint(enum.IntEnum):
    """Double-point state (IEC 60870-5 DPI; 61850 Dbpos uses the same numbers)."""

    INTERMEDIATE = 0
    OFF = 1
    ON = 2
    INDETERMINATE = 3


class UpdateCause(enum.StrEnum):
    """Why a value reached the gateway."""

    SPONTANEOUS = "spontaneous"
    PERIODIC = "periodic"
    INTERROGATED = "interrogated"
    REQUESTED = "requested"
    RETURN = "return"  # return information caused by a command
    LINK_LOST = "link_lost"  # synthesised by the adapter: device unreachable
    OTHER = "other"


@dataclass(slots=True, frozen=True)
class PointUpdate:
    """One new value of one configured point.

    ``source_time`` is the device's time tag (None when the device sends none);
    ``receive_time`` is when the adapter got it, on this host's clock.
    ``time_substituted`` says that ``source_time`` is not the device's: the value came without
    a time tag (an IEC 104 untagged type, as outstations answer a general interrogation), so
    the adapter put its receive time there. Kept apart from :class:`Quality`: the value itself
    is as good as the device says; only its time is ours.
    """

    point: str
    value: float | int | bool | None
    quality: Quality = Quality.GOOD
    source_time: float | None = None
    receive_time: float = field(default_factory=now)
    cause: UpdateCause = UpdateCause.SPONTANEOUS
    time_substituted: bool = False


@dataclass(slots=True, frozen=True)
class CommandRequest:
    """A request to operate a control point, as the core hands it to an adapter.

    ``value`` is already in protocol units (scale/offset undone) and typed for the point:
    ``DoublePoint`` for double commands, ``bool`` for single, ``float`` for set-points.
    """

    point: str
    value: float | int | bool
    requested_by: str = "operator"
    request_id: str = ""
    select_before_operate: bool = False
