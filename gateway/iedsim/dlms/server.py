"""``iedsim dlms``: a DLMS/COSEM meter on TCP (WRAPPER or HDLC framing), driven by the lab config.

One asyncio server; one :class:`~gateway.iedsim.dlms.meter.Association` per connection.
The meter's values come from the shared :class:`~gateway.iedsim.dynamics.FeederModel`
(stepped every ``simulator.period_s``), so voltages, currents, powers and energies are
mutually consistent and the energy registers integrate the power. A load-profile row is
captured every ``dlms.load_profile.capture_period_s`` on the meter clock.

Fault injection for tests: :meth:`DlmsMeter.restart` (drop every association, as a meter
reboot does), :attr:`DlmsMeter.clock_drift_s`, :meth:`DlmsMeter.garble_next`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Coroutine
from typing import Any

from gateway.config import LabConfig
from gateway.iedsim.dlms.framing import (
    DISC,
    DM,
    LLC_RESPONSE,
    SNRM,
    UA,
    FramingError,
    decode_hdlc,
    decode_wrapper,
    encode_hdlc,
    encode_wrapper,
    hdlc_address,
)
from gateway.iedsim.dlms.meter import Association, MeterApplication, ProtocolViolation
from gateway.iedsim.dynamics import FeederModel

log = logging.getLogger(__name__)

__all__ = ["DlmsMeter"]

_HDLC_MAX_INFO = 128  # default maximum information field length (no negotiation)


class DlmsMeter:
    """A simulated meter for one ``protocol: dlms`` device of the lab."""

    def __init__(
        self,
        config: LabConfig,
        device: str,
        *,
        host: str | None = None,
        port: int | None = None,
        seed: int | None = None,
    ) -> None:
        dev = config.devices[device]
        if dev.protocol != "dlms":
            raise ValueError(f"device {device!r} speaks {dev.protocol}, not dlms")
        self.name = device
        self.device = dev
        self.host = host if host is not None else dev.host
        self.port = port if port is not None else dev.port
        self.points = config.points_of(device)
        self.model = FeederModel(dev.simulator, self.points, seed=seed, start_time=time.time())
        self.clock_drift_s = 0.0
        self.app = MeterApplication(dev, self.points, self.model.value, self.meter_time)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._garble = 0

    def meter_time(self) -> float:
        return time.time() + self.clock_drift_s

    @property
    def framing(self) -> str:
        return self.device.dlms.framing

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        self._spawn(self._step_model(), "dlms-sim-model")
        if self.device.dlms.load_profile is not None:
            self._spawn(self._capture_profile(), "dlms-sim-profile")
        log.info(
            "dlms meter %s on %s:%d (%s, security %s)",
            self.name,
            self.host,
            self.port,
            self.framing,
            self.device.dlms.security,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self.restart()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def restart(self) -> None:
        """Drop every association at once, as a meter reboot does (counters survive: NVM)."""
        for w in list(self._writers):
            w.transport.abort()
        self.app.counters["restarts"] += 1

    def garble_next(self, count: int = 1) -> None:
        """Corrupt the next ``count`` reply frames (one bit of the payload flipped)."""
        self._garble += count

    def stats(self) -> dict[str, int]:
        out = dict(self.app.counters)
        out["rows_served"] = self.app.rows_served
        out["invocation_counter"] = self.app.invocation_counter
        out["connections"] = len(self._writers)
        return out

    # -- background ---------------------------------------------------------------------

    async def _step_model(self) -> None:
        period = self.device.simulator.period_s
        while True:
            await asyncio.sleep(period)
            self.model.step(time.time())

    async def _capture_profile(self) -> None:
        lp = self.device.dlms.load_profile
        assert lp is not None
        period = lp.capture_period_s
        while True:
            t = self.meter_time()
            nxt = (math.floor(t / period) + 1) * period
            await asyncio.sleep(max(0.0, nxt - t))
            self.model.step(time.time())
            self.app.capture(nxt)

    # -- connections --------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.app.counters["connects"] += 1
        try:
            if self.framing == "hdlc":
                await self._serve_hdlc(reader, writer)
            else:
                await self._serve_wrapper(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except (FramingError, ProtocolViolation) as exc:
            self.app.counters["protocol_errors"] += 1
            log.warning("%s: dropping client: %s", self.name, exc)
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _maybe_garble(self, frame: bytes) -> bytes:
        if self._garble <= 0:
            return frame
        self._garble -= 1
        self.app.counters["garbled_replies"] += 1
        mid = len(frame) // 2 + 4
        return frame[:mid] + bytes([frame[mid] ^ 0x5A]) + frame[mid + 1 :]

    async def _serve_wrapper(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        assoc: Association | None = None
        while True:
            used, frame = decode_wrapper(buf)
            if frame is None:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
                continue
            buf = buf[used:]
            if assoc is None or assoc.client_sap != frame.source:
                assoc = Association(frame.source)
            reply = self.app.handle(assoc, frame.apdu)
            if reply is not None:
                writer.write(self._maybe_garble(encode_wrapper(frame.destination, frame.source, reply)))
                await writer.drain()

    async def _serve_hdlc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = b""
        assoc: Association | None = None
        vs = vr = 0  # our send / receive sequence numbers
        pending: list[bytes] = []  # reply segments still to send (after the client's RR)
        partial = b""  # a segmented request being assembled
        while True:
            used, frame = decode_hdlc(buf)
            buf = buf[used:]
            if frame is None:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                buf += chunk
                continue
            me = hdlc_address(frame.destination)
            peer = hdlc_address(frame.source)
            control = frame.control

            def send(ctrl: int, info: bytes = b"", segmented: bool = False, me: bytes = me, peer: bytes = peer) -> None:
                writer.write(self._maybe_garble(encode_hdlc(peer, me, ctrl, info, segmented)))

            if control == SNRM:
                vs = vr = 0
                pending.clear()
                assoc = Association(frame.source)
                send(UA)
            elif control == DISC:
                send(UA if assoc is not None else DM)
                assoc = None
            elif assoc is None:
                send(DM)
            elif frame.is_information:
                vr = (frame.send_sequence + 1) % 8
                partial += frame.info
                if frame.segmented:
                    send(0x01 | 0x10 | (vr << 5))  # RR: send the next segment
                else:
                    info, partial = partial, b""
                    if info[:3] not in (b"\xe6\xe6\x00",):
                        raise FramingError("I-frame without the LLC request header")
                    reply = self.app.handle(assoc, info[3:])
                    if reply is not None:
                        data = LLC_RESPONSE + reply
                        pending[:] = [data[i : i + _HDLC_MAX_INFO] for i in range(0, len(data), _HDLC_MAX_INFO)]
                        seg = pending.pop(0)
                        send(0x10 | (vr << 5) | (vs << 1), seg, bool(pending))
                        vs = (vs + 1) % 8
            elif frame.is_rr and pending:
                seg = pending.pop(0)
                send(0x10 | (vr << 5) | (vs << 1), seg, bool(pending))
                vs = (vs + 1) % 8
            await writer.drain()
