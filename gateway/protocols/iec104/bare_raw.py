"""A bare raw-socket IEC 104 reader: the floor of the asyncio engine's value route.

Why a second bare client next to :mod:`.bare` (c104): the gateway's asyncio engine reads the
socket on the event loop and decodes with the project's codec, with no native thread and no
hand-off; it beats a bare c104 client (whose callback runs on lib60870's thread), so c104 is
no floor for it. This reader is what the asyncio engine does at the very least: one
:class:`asyncio.Protocol` on the event loop, STARTDT, frames split and monitor ASDUs decoded
by the same codec (:class:`~.codec.FrameDecoder`, :func:`~.codec.decode_monitor`), an S-frame
every ``w`` I-frames or ``t2`` and a TESTFR con when asked (so the outstation keeps sending). No
interrogation, no sequence check, no store, no queue: the moment a watched value is decoded
is noted in :meth:`BareRaw104.data_received` itself, and :attr:`BareRaw104.event` is set.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from gateway.protocols.iec104.codec import (
    MONITOR_TYPE_IDS,
    SEQ_MODULO,
    AsduError,
    FrameDecoder,
    IFrame,
    SFrame,
    UFrame,
    UFunction,
    decode_monitor,
    encode_frame,
)

__all__ = ["BareRaw104"]

_STARTDT_ACT: Final = encode_frame(UFrame(UFunction.STARTDT_ACT))
_TESTFR_CON: Final = encode_frame(UFrame(UFunction.TESTFR_CON))


class BareRaw104(asyncio.Protocol):
    """STARTDT, then note when a watched (IOA, value) is decoded: time.time() in :attr:`seen_t`."""

    def __init__(self, *, w: int = 8, t2_s: float = 0.5) -> None:
        """``w``, ``t2_s``: when to acknowledge (the device's own timers, as the engine uses)."""
        self._w = w
        self._t2_s = t2_s
        self._t2: asyncio.TimerHandle | None = None
        self._decoder = FrameDecoder()
        self._transport: asyncio.Transport | None = None
        self._vr = 0  # receive sequence number (for the S-frames)
        self._unacked = 0
        self._watch: tuple[int, float] | None = None
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.event = asyncio.Event()
        self.seen_t = 0.0
        self.frames = 0

    @classmethod
    async def open(cls, host: str, port: int, *, w: int = 8, t2_s: float = 0.5, timeout_s: float = 5.0) -> BareRaw104:
        """Connect, send STARTDT act and wait for its con (TimeoutError after ``timeout_s``)."""
        loop = asyncio.get_running_loop()
        _t, proto = await asyncio.wait_for(loop.create_connection(lambda: cls(w=w, t2_s=t2_s), host, port), timeout_s)
        await asyncio.wait_for(proto.started.wait(), timeout_s)
        return proto

    def arm(self, ioa: int, value: float) -> None:
        """Watch for ``value`` (protocol units) at ``ioa`` next."""
        self.event.clear()
        self._watch = (ioa, value)

    def close(self) -> None:
        if self._t2 is not None:
            self._t2.cancel()
        if self._transport is not None:
            self._transport.close()

    def _ack(self) -> None:
        """S-frame for everything received (after ``w`` I-frames, or ``t2`` after the first)."""
        if self._t2 is not None:
            self._t2.cancel()
            self._t2 = None
        if self._unacked and self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_frame(SFrame(self._vr)))
        self._unacked = 0

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(_STARTDT_ACT)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._t2 is not None:
            self._t2.cancel()
        self.closed.set()

    def data_received(self, data: bytes) -> None:
        frames, error = self._decoder.feed_batch(data)
        watch = self._watch
        for f in frames:
            self.frames += 1
            if isinstance(f, IFrame):
                self._vr = (self._vr + 1) % SEQ_MODULO
                self._unacked += 1
                if watch is not None and f.asdu and f.asdu[0] in MONITOR_TYPE_IDS:
                    try:
                        objects = decode_monitor(f.asdu).objects
                    except AsduError:
                        continue
                    for ioa, value, _q, _t in objects:
                        if ioa == watch[0] and abs(float(value) - watch[1]) < 1e-3:
                            self.seen_t = time.time()
                            self._watch = None
                            self.event.set()
                            break
            elif isinstance(f, UFrame):
                if f.function is UFunction.STARTDT_CON:
                    self.started.set()
                elif f.function is UFunction.TESTFR_ACT and self._transport is not None:
                    self._transport.write(_TESTFR_CON)
        if self._unacked >= self._w:
            self._ack()
        elif self._unacked and self._t2 is None:
            self._t2 = asyncio.get_running_loop().call_later(self._t2_s, self._ack)
        if error is not None and self._transport is not None:
            self._transport.close()
