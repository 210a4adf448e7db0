"""A bare c104 client: the floor of the IEC 104 stack, measured without the gateway.

Why here: ``mgms bench`` measures each route next to what the protocol library alone achieves
on the same simulator in the same run. The bare client talks to c104 directly, and c104 is
imported only inside ``gateway/protocols/`` (and the simulators).
"""

# No `from __future__ import annotations` here: c104 checks callback signatures against
# real annotation objects, and string annotations make it refuse the callback.

import threading
import time
from typing import Any

import c104

from gateway.config import Iec104Address, LabConfig, Point

__all__ = ["BareC104", "ioa_of"]


def ioa_of(point: Point) -> tuple[int, str]:
    """(IOA, c104 type name) of an IEC 104 point."""
    if not isinstance(point.address, Iec104Address):
        raise TypeError(f"{point.name} is not an IEC 104 point")
    return point.address.ioa, point.address.type


class BareC104:
    """A bare c104 client on the simulator: the floor of the 104 stack without the gateway."""

    def __init__(
        self,
        port: int,
        cfg: LabConfig,
        device: str,
        command_point: str | None,
        *,
        host: str = "127.0.0.1",
        record_tags: bool = False,
    ) -> None:
        """``command_point`` None: monitoring only (a second client on a real relay must not
        command it). ``record_tags``: note time tag -> callback of every time-tagged value in
        :attr:`tag_delays_ms` (the floor of a lab's field route, which is time tag -> stored)."""
        self.client = c104.Client(tick_rate_ms=50, command_timeout_ms=5000)
        conn = self.client.add_connection(ip=host, port=port, init=c104.Init.INTERROGATION)
        station = None if conn is None else conn.add_station(common_address=cfg.devices[device].common_address)
        if conn is None or station is None:
            raise RuntimeError("c104 refused the connection or station")
        self.conn = conn
        # The device's own link timers, as the adapter sets them: c104's default t2 (10 s)
        # is longer than the simulator's t1 (2 s), so an idle bare client would lose its link.
        timers = cfg.devices[device].timers
        params = conn.protocol_parameters
        params.connection_timeout = timers.t0_s
        params.message_timeout = timers.t1_s
        params.confirm_interval = timers.t2_s
        params.keep_alive_interval = timers.t3_s
        params.send_window_size = timers.k
        params.receive_window_size = timers.w
        self.seen_t = 0.0
        self.event = threading.Event()
        self._watch: tuple[int, float] | None = None
        self._record_tags = record_tags
        self.tag_delays_ms: list[float] = []
        for p in cfg.points_of(device):
            ioa, kind = ioa_of(p)
            cp = station.add_point(io_address=ioa, type=getattr(c104.Type, kind))
            if cp is not None and p.direction.value == "monitor":
                cp.on_receive(callable=self._on_receive)
        self.breaker: c104.Point | None = None
        if command_point is not None:
            breaker = station.get_point(io_address=ioa_of(cfg.point(command_point))[0])
            if breaker is None:
                raise RuntimeError(f"no 104 point for {command_point}")
            breaker.command_mode = c104.CommandMode.SELECT_AND_EXECUTE
            self.breaker = breaker

    def _on_receive(
        self, point: c104.Point, previous_info: c104.Information, message: c104.IncomingMessage
    ) -> c104.ResponseState:
        t = time.time()
        if self._record_tags and message.cot == c104.Cot.SPONTANEOUS:
            rec = point.recorded_at
            if rec is not None:
                self.tag_delays_ms.append((t - rec.timestamp()) * 1000)
        watch = self._watch
        if watch is not None and point.io_address == watch[0]:
            v: Any = point.value
            v = getattr(v, "value", v) if not isinstance(v, float) else v
            if abs(float(v) - watch[1]) < 1e-3:
                self.seen_t = t
                self.event.set()
        return c104.ResponseState.NONE

    def arm(self, ioa: int, value: float) -> None:
        """Wait for ``value`` at ``ioa`` next (the callback sets :attr:`event`)."""
        self.event.clear()
        self._watch = (ioa, value)

    def start(self) -> None:
        """Blocking (run it in a thread): connect and wait for the interrogation to settle."""
        self.client.start()
        deadline = time.monotonic() + 10
        while not self.conn.is_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        if self.conn.is_muted:
            self.conn.unmute()

    def stop(self) -> None:
        self.client.stop()

    def transmit_breaker(self, close: bool) -> bool:
        """Blocking: one SBO double command (select + execute); True if c104 reports success."""
        if self.breaker is None:
            raise RuntimeError("this bare client was built without a command point")
        self.breaker.value = c104.Double.ON if close else c104.Double.OFF
        return bool(self.breaker.transmit(cause=c104.Cot.ACTIVATION))
