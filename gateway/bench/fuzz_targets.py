"""Fuzz targets: every parser that takes bytes or text from outside, with its contract.

Each :class:`Target` names a parser, the only exceptions it may raise on bad input (its
documented, typed rejections) and a ``make()`` that builds the one-input function. The
one-input function raises nothing for input the parser handles as documented; any other
exception (``IndexError``, ``struct.error``, ``RecursionError``, a mismatch between two
decoders of the same bytes ...) is a crash that :mod:`gateway.bench.fuzz` reports.

Why the harness feeds some inputs through a mode octet instead of handing the bytes to one
function: a raw byte stream rarely gets past the framing into the ASDU, APDU or payload
parsers; the first octet chooses the layer (stream, ASDU, A-XDR ...) so each layer gets
inputs aimed at it, and the seeds (built here from the golden vectors of the tests) start
each layer from valid data. Everything the harness needs at run time (keys, a DLMS lab, a
temporary directory) is made at run time: no key or secret sits in a seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

__all__ = ["TARGETS", "Contract", "Harness", "Target"]

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "gateway"
SIM_CONFIG = ROOT / "lab_configs" / "multipower-sim.yaml"
ICD = ROOT / "lab_configs" / "ref615.icd"

OneInput = Callable[[bytes], None]


class Harness:
    """A target's one-input function and what it holds open (event loop, temporary files):
    ``with target.make() as one: one(data)``."""

    def __init__(self, one: OneInput, *cleanups: Callable[[], object]) -> None:
        self._one = one
        self._cleanups = cleanups

    def __call__(self, data: bytes) -> None:
        self._one(data)

    def close(self) -> None:
        for c in self._cleanups:
            c()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Contract(AssertionError):
    """The parser broke a property stronger than "no unexpected exception" (two decoders
    disagree, a decoded value does not re-encode, a reply the codec cannot read)."""


@dataclass(frozen=True)
class Target:
    """One fuzz target: what it parses, how to build it, what may come out."""

    name: str
    what: str
    #: builds the one-input function (imports and sets up the parser once per process)
    make: Callable[[], Harness]
    #: the seed corpus (valid and near-valid inputs from the golden vectors)
    seeds: Callable[[], list[bytes]]
    #: source files whose code is instrumented for coverage (relative to the repo)
    sources: tuple[str, ...]
    max_len: int = 4096
    timeout_s: int = 2


def _h(text: str) -> bytes:
    return bytes.fromhex(text)


def _mode(data: bytes, n: int) -> tuple[int, bytes]:
    """First octet modulo ``n`` picks the layer; the rest is that layer's input."""
    if not data:
        return 0, b""
    return data[0] % n, data[1:]


def _same(a: Any, b: Any) -> bool:
    """Equality that counts NaN as equal to NaN (a float value decoded twice)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


# ----------------------------------------------------------------------------- IEC 104 codec

# ASDUs of the codec's golden vectors (tests/iedsim/test_codec.py, test_iec104_codec_bulk.py)
_GOLDEN_ASDUS = (
    "64 01 06 00 01 00 00 00 00 14",  # C_IC_NA_1 act, QOI 20
    "24 01 03 00 01 00 E9 03 00 00 80 66 43 00 D5 DD 22 0C AF 03 18",  # M_ME_TF_1 spont
    "2E 01 06 00 01 00 B9 0B 00 82",  # C_DC_NA_1
    "2E 01 47 00 01 00 B9 0B 00 82",  # C_DC_NA_1 actcon negative
    "2E 01 6F 00 01 00 B9 0B 00 82",  # unknown IOA mirror
    "1F 01 03 05 34 12 D1 07 00 81 D5 DD 22 0C AF 03 18",  # M_DP_TB_1
    "32 01 06 00 01 00 C3 0B 00 00 50 43 47 80",  # C_SE_NC_1
    "0B 01 14 00 01 00 07 00 00 FE FF 81",  # M_ME_NB_1 interrogated
    "09 01 01 00 01 00 08 00 00 00 40 70",  # M_ME_NA_1
    "01 83 03 00 01 00 64 00 00 01 00 81",  # M_SP_NA_1 SQ=1, 3 objects
    "2D 01 86 00 01 00 05 00 00 05",  # C_SC_NA_1 test bit
    "67 01 06 00 FF FF 00 00 00 B8 DB 0E 03 16 0B 1A",  # C_CS_NA_1 broadcast
    "6B 01 06 00 01 00 00 00 00 34 12 D5 DD 22 0C AF 03 18",  # C_TS_TA_1
    "46 01 04 00 01 00 00 00 00 00",  # M_EI_NA_1
    "66 01 05 00 01 00 E9 03 00",  # C_RD_NA_1
    "7F 01 06 00 01 00 00 00 00 00",  # unknown type id
    "64 01 00 00 01 00 00 00 00 14",  # cause 0
)
_GOLDEN_APDUS = (
    "68 04 07 00 00 00",
    "68 04 0B 00 00 00",
    "68 04 13 00 00 00",
    "68 04 43 00 00 00",
    "68 04 83 00 00 00",
    "68 04 01 00 58 02",
    "68 05 FE FF 02 00 01",
    "68 0E 00 00 00 00 64 01 06 00 01 00 00 00 00 14",
)


def _iec104_asdus() -> list[bytes]:
    """The golden ASDUs plus one ASDU of every type the codec encodes (built by the codec)."""
    from gateway.points import Quality
    from gateway.protocols.iec104 import codec as c

    t = c.Cp56Time(datetime(2024, 3, 15, 12, 34, 56, 789000, tzinfo=UTC))
    q = Quality(0)
    built: list[tuple[c.TypeId, Any, c.Cot, bool]] = [
        (c.TypeId.M_SP_NA_1, c.SinglePointInfo(True, q), c.Cot.SPONTANEOUS, False),
        (c.TypeId.M_SP_TB_1, c.SinglePointInfo(False, q), c.Cot.SPONTANEOUS, True),
        (c.TypeId.M_DP_NA_1, c.DoublePointInfo(2, q), c.Cot.INTERROGATED_BY_STATION, False),
        (c.TypeId.M_DP_TB_1, c.DoublePointInfo(1, q), c.Cot.SPONTANEOUS, True),
        (c.TypeId.M_ME_NA_1, c.NormalizedInfo(0.5, q), c.Cot.PERIODIC, False),
        (c.TypeId.M_ME_TD_1, c.NormalizedInfo(-0.25, q), c.Cot.SPONTANEOUS, True),
        (c.TypeId.M_ME_NB_1, c.ScaledInfo(-300, q), c.Cot.INTERROGATED_BY_STATION, False),
        (c.TypeId.M_ME_TE_1, c.ScaledInfo(1234, q), c.Cot.SPONTANEOUS, True),
        (c.TypeId.M_ME_NC_1, c.FloatInfo(230.5, q), c.Cot.INTERROGATED_BY_STATION, False),
        (c.TypeId.M_ME_TF_1, c.FloatInfo(-1.5e3, q), c.Cot.SPONTANEOUS, True),
    ]
    out = [_h(a) for a in _GOLDEN_ASDUS]
    for type_id, element, cot, timed in built:
        for n in (1, 3):
            objs = tuple(c.InfoObject(1000 + i, element, t if timed else None) for i in range(n))
            out.append(c.encode_asdu(c.Asdu(type_id, cot, 1, objs)))
    # and one raw ASDU of every type the codec knows (so types added later are seeded too):
    # zero element octets, the golden CP56Time2a where the type is timed
    for type_id, spec in c._SPECS.items():
        cause = 6 if type_id.is_command else 3
        body = bytes(spec.size) + (_h("D5 DD 22 0C AF 03 18") if spec.timed else b"")
        out.append(bytes([type_id, 1, cause, 0, 1, 0, 0x2A, 0, 0]) + body)
    seq = c.Asdu(c.TypeId.M_ME_NC_1, c.Cot.SPONTANEOUS, 1,
                 tuple(c.InfoObject(7 + i, c.FloatInfo(1.0 * i, q), None) for i in range(4)), sequence=True)
    out.append(c.encode_asdu(seq))
    return out


def _iec104_seeds() -> list[bytes]:
    from gateway.protocols.iec104 import codec as c

    asdus = _iec104_asdus()
    out = [b"\x01" + a for a in asdus]  # mode 1: one ASDU
    stream = b"".join(_h(a) for a in _GOLDEN_APDUS)
    out.append(b"\x00" + stream)
    out.append(b"\x10" + stream)
    for i in range(0, len(asdus), 4):  # mode 0: a stream of I-frames, chunked at octet 0's value
        out.append(bytes([0x20 + 2 * i]) + b"".join(c.encode_frame(c.IFrame(i + j, 0, a))
                                                    for j, a in enumerate(asdus[i : i + 4])))
    return out


def _make_iec104() -> Harness:
    from gateway.protocols.iec104 import codec as c
    from gateway.protocols.iec104.common import command_reply

    def asdu_layer(raw: bytes) -> None:
        try:
            asdu: c.Asdu | None = c.decode_asdu(raw)
        except c.AsduError:
            asdu = None
        if asdu is not None:
            try:
                again = c.encode_asdu(asdu)
            except ValueError as exc:
                raise Contract(f"decoded ASDU does not re-encode: {exc}") from exc
            if c.encode_asdu(c.decode_asdu(again)) != again:
                raise Contract("decode(encode(decode(x))) re-encodes differently")
        if raw[:1] and raw[0] in c.MONITOR_TYPE_IDS:
            try:
                mon: c.MonitorAsdu | None = c.decode_monitor(raw)
            except c.AsduError:
                mon = None
            if asdu is not None and mon is None:
                raise Contract("decode_asdu accepts what decode_monitor refuses")
            if asdu is not None and mon is not None:
                bulk = c._monitor_from_asdu(asdu, mon.negative, mon.test)
                if len(bulk.objects) != len(mon.objects) or (bulk.common_address, bulk.cot) != (
                    mon.common_address,
                    mon.cot,
                ):
                    raise Contract("decode_monitor and decode_asdu disagree on the header")
                for a, b in zip(bulk.objects, mon.objects, strict=True):
                    if not all(_same(x, y) for x, y in zip(a, b, strict=True)):
                        raise Contract(f"decode_monitor {b} != decode_asdu {a}")
        command_reply(raw)
        with contextlib.suppress(ValueError):
            c.mirror(raw, c.Cot.ACTIVATION_CON, negative=True)

    def stream_layer(data: bytes, cut: int) -> None:
        batch = c.FrameDecoder()
        frames, error = batch.feed_batch(data[:cut])
        if error is None:
            more, error = batch.feed_batch(data[cut:])
            frames += more
        incremental = c.FrameDecoder()
        got: list[c.Frame] = []
        inc_error: c.FrameError | None = None
        try:
            for part in (data[:cut], data[cut:]):
                got.extend(incremental.feed(part))
        except c.FrameError as exc:
            inc_error = exc
        if got != frames or (error is None) != (inc_error is None):
            raise Contract(f"feed and feed_batch disagree: {got} / {inc_error} vs {frames} / {error}")
        for f in frames:
            wire = c.encode_frame(f)
            if c.decode_apdu(wire) != f:
                raise Contract(f"{f} does not survive encode/decode_apdu")
            if isinstance(f, c.IFrame):
                asdu_layer(f.asdu)

    def one(data: bytes) -> None:
        mode, rest = _mode(data, 2)
        try:
            if mode == 1:
                asdu_layer(rest)
            else:
                stream_layer(rest, (data[0] >> 1) % (len(rest) + 1) if rest else 0)
        except (c.FrameError, c.AsduError):
            pass

    return Harness(one)


# ------------------------------------------------------------------ IEC 104 simulator (server)


class _Transport(asyncio.Transport):
    """Collects what the outstation writes; closing is remembered, nothing goes anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 2404) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _sim_seeds() -> list[bytes]:
    from gateway.config import iec104_address, load_config
    from gateway.points import Quality
    from gateway.protocols.iec104 import codec as c

    cfg = load_config(SIM_CONFIG)
    points = cfg.points_of("ref615")
    out = [b"\x00" + _h("68 04 43 00 00 00 68 04 13 00 00 00 68 04 07 00 00 00 68 04 01 00 00 00")]
    commands: list[bytes] = [_h("64 01 06 00 01 00 00 00 00 14"), _h("64 01 08 00 01 00 00 00 00 14")]
    for p in points:
        a = iec104_address(p)
        t = c.TypeId[a.type]
        if t.is_command:
            element: Any
            if t is c.TypeId.C_DC_NA_1:
                element = c.DoubleCommand(2, select=True)
            elif t is c.TypeId.C_SC_NA_1:
                element = c.SingleCommand(True)
            elif t is c.TypeId.C_SE_NA_1:
                element = c.NormalizedSetpoint(0.1)
            elif t is c.TypeId.C_SE_NB_1:
                element = c.ScaledSetpoint(10)
            else:
                element = c.FloatSetpoint(10.0)
            obj = c.InfoObject(a.ioa, element, None)
            sel = c.encode_asdu(c.Asdu(t, c.Cot.ACTIVATION, 1, (obj,)))
            commands.append(sel)
            if getattr(element, "select", False):
                execute = c.InfoObject(a.ioa, type(element)(element.value, select=False), None)
                commands.append(c.encode_asdu(c.Asdu(t, c.Cot.ACTIVATION, 1, (execute,))))
        else:
            commands.append(c.encode_asdu(c.Asdu(c.TypeId.C_RD_NA_1, c.Cot.REQUEST, 1,
                                                 (c.InfoObject(a.ioa, c.ReadCommand(), None),))))
    t56 = c.Cp56Time(datetime(2024, 3, 15, 12, 34, 56, tzinfo=UTC))
    sync = c.InfoObject(0, c.ClockSync(t56), None)
    commands.append(c.encode_asdu(c.Asdu(c.TypeId.C_CS_NA_1, c.Cot.ACTIVATION, 1, (sync,))))
    commands.append(c.encode_asdu(c.Asdu(c.TypeId.M_SP_NA_1, c.Cot.SPONTANEOUS, 1,
                                         (c.InfoObject(1, c.SinglePointInfo(True, Quality(0)), None),))))
    # mode 1: ASDUs, each as a length octet and its octets, sent as numbered I-frames
    for i in range(0, len(commands), 3):
        out.append(b"\x01" + b"".join(bytes([len(a)]) + a for a in commands[i : i + 3]))
    framed = b"".join(c.encode_frame(c.IFrame(i, 0, a)) for i, a in enumerate(commands[:6]))
    out.append(b"\x00" + _h("68 04 07 00 00 00") + framed)
    return out


def _make_sim() -> Harness:
    from gateway.config import load_config
    from gateway.iedsim.iec104.server import Iec104Outstation, _Session
    from gateway.protocols.iec104 import codec as c

    cfg = load_config(SIM_CONFIG)
    loop = asyncio.new_event_loop()
    startdt = c.encode_frame(c.UFrame(c.UFunction.STARTDT_ACT))

    def frames_of(mode: int, rest: bytes) -> bytes:
        if mode == 0:
            return startdt + rest
        wire = bytearray(startdt)
        pos, seq = 0, 0
        while pos < len(rest):
            n = rest[pos]
            asdu = rest[pos + 1 : pos + 1 + n]
            pos += 1 + n
            if asdu:
                wire += c.encode_frame(c.IFrame(seq, 0, asdu[: c.MAX_ASDU_LENGTH]))
                seq += 1
        return bytes(wire)

    async def session(wire: bytes) -> bytes:
        o = Iec104Outstation(cfg, "ref615", port=0, seed=1)
        o.set_breaker_travel(0.0)
        s = _Session(o)
        t = _Transport()
        s.connection_made(t)
        try:
            for i in range(0, len(wire), 97):  # TCP may cut anywhere
                if t.closing:
                    break
                s.data_received(wire[i : i + 97])
        finally:
            s.connection_lost(None)
        return bytes(t.out)

    def one(data: bytes) -> None:
        mode, rest = _mode(data, 2)
        out = loop.run_until_complete(session(frames_of(mode, rest)))
        frames, error = c.FrameDecoder().feed_batch(out)
        if error is not None:
            raise Contract(f"the outstation wrote a frame its own codec refuses: {error}")
        for f in frames:
            if isinstance(f, c.IFrame):
                negative = len(f.asdu) > 2 and f.asdu[2] & 0x40
                try:
                    c.decode_asdu(f.asdu)
                except c.AsduError as exc:
                    if not negative:  # a negative mirror may carry the client's unknown type
                        raise Contract(f"the outstation sent an ASDU the codec refuses: {exc}") from exc

    return Harness(one, loop.close)


# ------------------------------------------------------------------- IEC 104 client (asyncio)


def _framed(rest: bytes, first: bytes) -> bytes:
    """``first``, then each ``[n, n octets]`` of ``rest`` as an I-frame numbered from 0."""
    from gateway.protocols.iec104 import codec as c

    wire = bytearray(first)
    pos, seq = 0, 0
    while pos < len(rest):
        n = rest[pos]
        asdu = rest[pos + 1 : pos + 1 + n]
        pos += 1 + n
        if asdu:
            wire += c.encode_frame(c.IFrame(seq, 0, asdu[: c.MAX_ASDU_LENGTH]))
            seq += 1
    return bytes(wire)


def _client_seeds() -> list[bytes]:
    """What an outstation sends: the simulator's own answers to a GI, reads and commands
    (replayed from its session), plus the codec's monitor ASDUs of every type."""
    asdus = [a for a in _iec104_asdus() if a[0] < 45 or a[0] in (70, 100, 101, 102, 103, 107)]
    out = [b"\x01" + b"".join(bytes([len(a)]) + a for a in asdus[i : i + 4]) for i in range(0, len(asdus), 4)]
    mirrors = [bytes([a[0], a[1], 0x07 | (a[2] & 0xC0)]) + a[3:] for a in _iec104_asdus() if 45 <= a[0] < 70]
    mirrors += [bytes([a[0], a[1], 0x0A]) + a[3:] for a in _iec104_asdus() if 45 <= a[0] < 70]
    out.append(b"\x01" + b"".join(bytes([len(a)]) + a for a in mirrors))
    out.append(b"\x00" + _h("68 04 0B 00 00 00 68 04 43 00 00 00 68 04 83 00 00 00 68 04 01 00 00 00"))
    return out


def _make_client() -> Harness:
    from gateway.config import load_config
    from gateway.protocols.iec104 import codec as c
    from gateway.protocols.iec104.aio import AsyncIec104Adapter, _EventQueue, _Link

    cfg = load_config(SIM_CONFIG)
    device, points = cfg.devices["ref615"], cfg.points_of("ref615")
    loop = asyncio.new_event_loop()
    startdt_con = c.encode_frame(c.UFrame(c.UFunction.STARTDT_CON))

    async def session(wire: bytes) -> None:
        adapter = AsyncIec104Adapter(device, points, queue_max=10_000)
        adapter._buffer = _EventQueue(10_000)  # what start() makes, without the supervisor
        link = _Link(adapter)
        t = _Transport()
        link.connection_made(t)
        try:
            for i in range(0, len(wire), 97):
                if t.closing:
                    break
                # _receive, not data_received: that one turns any exception into a counted
                # internal error and a closed link; here the exception itself is the finding
                link._receive(wire[i : i + 97])
        finally:
            link.connection_lost(None)
            for fut in (link.started, link.closed):
                if fut.done() and not fut.cancelled():
                    fut.exception()  # retrieved: no "never retrieved" noise

    def one(data: bytes) -> None:
        mode, rest = _mode(data, 2)
        wire = startdt_con + rest if mode == 0 else _framed(rest, startdt_con)
        loop.run_until_complete(session(wire))

    return Harness(one, loop.close)


# ------------------------------------------------------------------------ DLMS simulator side

_DLMS_LAB = """\
lab: {{name: fuzz}}
devices:
  meter1:
    protocol: dlms
    host: 127.0.0.1
    port: 4059
    dlms:
      framing: {framing}
      security: {security}
      block_cipher_key: {ek}
      authentication_key: {ak}
      load_profile: {{capture_period_s: 900, read_period_s: 900, depth: 100}}
points:
  - {{name: meter.voltage.l1, device: meter1, quantity: voltage, unit: V, phase: L1, address: {{obis: 1.0.32.7.0.255}}}}
  - {{name: meter.energy, device: meter1, quantity: active_energy, unit: kWh, address: {{obis: 1.0.1.8.0.255}}}}
"""
# Frames gurux-dlms 1.0.203's client sends (client 16, server 1): tests/protocols/test_dlms_codec.py
_GURUX_SNRM = "7ea0070321930f017e"
_GURUX_AARQ_HDLC = "7ea02b032110fbafe6e600601da109060760857405080101be10040e01000000065f1f0400401e5dffff91237e"
_GURUX_GET_WRAPPER = "000100100001000dc001c100030100200700ff0200"


def _dlms_seeds() -> list[bytes]:
    from gateway.iedsim.dlms import axdr
    from gateway.iedsim.dlms.framing import encode_hdlc, encode_wrapper, hdlc_address

    aarq = _h(_GURUX_AARQ_HDLC)[11:-3]  # the AARQ APDU (after the LLC header, before FCS)
    gets = [
        _h("c001c100030100200700ff0200"),
        _h("c001c100030101080000ff0200"),
        _h("c001c100030101080000ff0300"),
        _h("c001c100080000010000ff0200"),
        _h("c001c100070100630100ff0201") + _h("01") + axdr.encode(axdr.Structure((
            axdr.Structure((axdr.Typed(0x12, 8), _h("0000010000ff"), axdr.Typed(0x0F, 2), axdr.Typed(0x12, 0))),
            axdr.to_cosem_datetime(1.7e9), axdr.to_cosem_datetime(1.8e9), []))),
        _h("c001c100070100630100ff020102") + axdr.encode(axdr.Structure((axdr.Typed(0x06, 1), axdr.Typed(0x06, 5)))),
        _h("c001c100070100630100ff0300"),
        _h("c301c1000f0000280000ff010109111000000000112233445566778899001122"),
        _h("62038001 00"),
    ]
    # an AARQ for high_gmac (mechanism 5, calling title, CtoS); the meter's HLS needs keys
    # that exist only at run time, so past it the fuzzer reaches only the refusals
    body = (_h("a109060760857405080103") + _h("a60a0408") + b"MGMS\x00\x00\x00\x01" + _h("8a020780")
            + _h("8b0760857405080205") + _h("ac128010") + bytes(range(16))
            + _h("be10040e01000000065f1f0400401e5dffff"))
    hls = bytes([0x60, len(body)]) + body
    glo_get = _h("c81e30") + (2).to_bytes(4, "big") + bytes(range(25))
    apdus = [aarq, *gets]
    out: list[bytes] = []
    for sec in (0, 2):  # octet 0: bit 0 framing (0 wrapper, 1 hdlc), bit 1 security (none, high)
        if sec:
            apdus = [hls, glo_get, _h("db08") + b"MGMS\x00\x00\x00\x01" + glo_get[1:], *gets[:2]]
        out.append(bytes([sec]) + b"".join(encode_wrapper(16, 1, a) for a in apdus))
        hdlc = _h(_GURUX_SNRM)
        for i, a in enumerate(apdus):
            hdlc += encode_hdlc(hdlc_address(1), hdlc_address(16), 0x10 | (i % 8) << 1, b"\xe6\xe6\x00" + a)
        out.append(bytes([sec | 1]) + hdlc + encode_hdlc(hdlc_address(1), hdlc_address(16), 0x51)
                   + encode_hdlc(hdlc_address(1), hdlc_address(16), 0x53))
    values = [axdr.Structure((axdr.Typed(0x0F, -2), axdr.Enum(35), b"\x01\x02", [1, 2], 2.5, None, True, "ab")),
              axdr.to_cosem_datetime(1.7e9), [axdr.Typed(0x12, 5), axdr.Typed(0x17, 1.5)]]
    out += [b"\x04" + axdr.encode(v) for v in values]  # octet 0 & 7 == 4: A-XDR alone
    out += [b"\x05" + axdr.to_cosem_datetime(1.7e9), b"\x05" + b"\xff" * 12]  # 5: COSEM date-time
    return out


def _make_dlms() -> Harness:
    from gateway.config import load_config
    from gateway.iedsim.dlms import axdr
    from gateway.iedsim.dlms.server import DlmsMeter

    keys = {"ek": os.urandom(16).hex().upper(), "ak": os.urandom(16).hex().upper()}  # per run
    meters: dict[tuple[str, str], DlmsMeter] = {}
    with tempfile.TemporaryDirectory() as d:
        for framing in ("wrapper", "hdlc"):
            for security in ("none", "high_gmac"):
                path = Path(d) / f"{framing}-{security}.yaml"
                path.write_text(_DLMS_LAB.format(framing=framing, security=security, **keys), encoding="utf-8")
                meters[framing, security] = DlmsMeter(load_config(path), "meter1", port=0, seed=1)
    for m in meters.values():
        for i in range(5):
            m.app.capture(1.7e9 + 900 * i)
    loop = asyncio.new_event_loop()

    class Writer:
        def __init__(self) -> None:
            self.out = bytearray()

        def write(self, data: bytes) -> None:
            self.out += data

        async def drain(self) -> None:
            return None

        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            return None

    async def serve(meter: DlmsMeter, wire: bytes) -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire)
        reader.feed_eof()
        meter.app.client_counters.clear()
        await asyncio.wait_for(meter._serve(reader, Writer()), 5)  # type: ignore[arg-type]

    def one(data: bytes) -> None:
        mode, rest = _mode(data, 8)
        if mode < 4:
            meter = meters["hdlc" if mode & 1 else "wrapper", "high_gmac" if mode & 2 else "none"]
            loop.run_until_complete(serve(meter, rest))  # _serve itself drops FramingError/ProtocolViolation
        elif mode in (4, 6):
            try:
                pos = 0
                for _ in range(8):
                    _, pos = axdr.decode(rest, pos)
            except axdr.AxdrError:
                pass
        else:
            with contextlib.suppress(axdr.AxdrError):
                axdr.from_cosem_datetime(rest[:12])

    return Harness(one, loop.close)


# ------------------------------------------------------------------------------ IEC 61850 SCL


def _scl_seeds() -> list[bytes]:
    icd = ICD.read_bytes()
    small = (
        b'<?xml version="1.0"?><SCL xmlns="http://www.iec.ch/61850/2003/SCL"><IED name="X">'
        b'<AccessPoint name="AP"><Server><LDevice inst="LD0"><LN0 lnClass="LLN0" inst="" lnType="T"/>'
        b'<LN lnClass="XCBR" inst="1" lnType="T"/></LDevice></Server></AccessPoint></IED>'
        b'<DataTypeTemplates><LNodeType id="T" lnClass="LLN0"><DO name="Pos" type="D"/></LNodeType>'
        b'<DOType id="D" cdc="DPC"><DA name="stVal" bType="Dbpos" fc="ST"/><DA name="q" bType="Quality" fc="ST"/>'
        b"</DOType></DataTypeTemplates></SCL>"
    )
    return [icd, small, icd[: len(icd) // 2]]


def _make_scl() -> Harness:
    from gateway.iedsim.iec61850.scl import SclError, load_scl

    path = Path(tempfile.mkdtemp(prefix="mgms-fuzz-scl-")) / "ied.icd"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(SclError):
            load_scl(path)

    return Harness(one, lambda: shutil.rmtree(path.parent, ignore_errors=True))


# ----------------------------------------------------------------------- message envelope


_FIXED_NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@functools.cache
def _participants() -> Any:
    """(receiver's keystore, sender's keystore), one pair per process: the sealed seeds and
    the opener of one run share them."""
    from gateway.semantic.security import Keystore, PrivateIdentity

    # keys made at run time; nothing of them is kept
    me, peer = PrivateIdentity.generate("mgms-lab"), PrivateIdentity.generate("ams")
    return Keystore(me, [peer.public]), Keystore(peer, [me.public])


def _envelopes() -> list[Any]:
    """A few messages of the HEILA types (the samples of tests/semantic/conftest.py)."""
    from gateway.semantic import (
        ActivationNotification,
        BreakerCommand,
        ControlSignal,
        ControlSignals,
        Envelope,
        FlexibilityType,
        Measurements,
        Offer,
        OfferList,
        Reading,
        WeatherForecast,
    )

    t0, h = _FIXED_NOW, timedelta(hours=1)
    up = FlexibilityType.UPWARD
    offer = Offer(identifier="offer-1", flexibility_ref="flex-1", flexibility_type=up, power_kw=40.0,
                  start=t0, stop=t0 + h, price_eur_per_mwh=55.5)
    payloads: list[Any] = [
        Measurements(source="multipower", readings=(
            Reading(point="feeder.voltage.l1", measured_at=t0, voltage_v=231.4),
            Reading(point="feeder.p", measured_at=t0, power_kw=-3.5, reactive_power_kvar=1.25, power_factor=-0.94),
            Reading(point="feeder.breaker.position", measured_at=t0, breaker_closed=True),
        )),
        ControlSignals(signals=(
            ControlSignal(target="feeder.breaker.command", command=BreakerCommand.OPEN),
            ControlSignal(target="bess.setpoint.p", power_kw=-20.0),
        )),
        offer,
        OfferList(location="FI-SE1/feeder-4", offers=(offer,)),
        ActivationNotification(identifier="act-1", reserve_ref="res-1", flexibility_type=up, power_kw=40.0,
                               start=t0, stop=t0 + h),
        WeatherForecast(location="Vaasa", start=t0, stop=t0 + 2 * h, time_step_s=3600,
                        temperature_series_c=(-3.5, -2.0), irradiance_series_w_per_m2=(120.0, 310.5),
                        wind_speed_series_m_per_s=(4.2, 5.0)),
    ]  # fmt: skip
    return [Envelope.create(p, sender="ams", recipient="mgms-lab", topic="mgms/lab/in", now=t0) for p in payloads]


def _opener_seeds() -> list[bytes]:
    """Octet 0 picks: 0 the bytes as received; 1 a JSON document the harness signs (so the
    payload models are reached); 2 a payload the harness signs and encrypts; 3 plaintext the
    harness encrypts as it is (signature octets + payload)."""
    import json

    from gateway.semantic.envelope import canonical_json, to_document
    from gateway.semantic.security import Sealer, SecurityMode

    _mine, theirs = _participants()
    out: list[bytes] = []
    docs = [to_document(e) for e in _envelopes()]
    for doc in docs:
        out.append(b"\x01" + canonical_json(doc))
        out.append(b"\x02" + canonical_json(doc["payload"]))
        out.append(b"\x03" + bytes(64) + canonical_json(doc["payload"]))
    for e in _envelopes()[:4]:
        for mode in (SecurityMode.SIGNED, SecurityMode.ENCRYPTED):
            out.append(b"\x00" + Sealer(theirs, mode=mode).seal(e))
    out.append(b"\x00" + json.dumps({"@context": "x", "a": [1, 2, {"b": None}]}).encode())
    return out


def _make_opener() -> Harness:
    import json

    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from gateway.semantic import security as sec
    from gateway.semantic.envelope import HEADER_FIELDS, canonical_json, load_json
    from gateway.semantic.errors import MessageRejected
    from gateway.semantic.security import Opener, Sealer, SecurityMode, b64encode
    from gateway.semantic.security import _signing_input as signing_input

    mine, theirs = _participants()
    strict = Opener(mine, _NoNonces(), clock=lambda: _FIXED_NOW)
    lenient = Opener(mine, _NoNonces(), clock=lambda: _FIXED_NOW, accept_signed_only=True)
    sealer = Sealer(theirs, mode=SecurityMode.ENCRYPTED)

    def signed(doc: dict[str, Any]) -> bytes:
        """The document with the sender's valid signature over its header and payload."""
        payload = doc.pop("payload", None)
        doc.pop("signature", None)
        doc.pop("ciphertext", None)
        protected = {**doc, "sig_alg": "Ed25519"}
        protected.pop("enc_alg", None)
        try:
            sig = theirs.own.sign_key.sign(signing_input(protected, payload))
            return canonical_json({**protected, "payload": payload, "signature": b64encode(sig)})
        except (ValueError, TypeError):  # not canonical-JSON-able (NaN ...): send as is
            return json.dumps({**protected, "payload": payload}).encode()

    # one valid encrypted header, its key and IV, made once: each input is only encrypted
    header = json.loads(sealer.seal(_envelopes()[0]))
    eph = X25519PrivateKey.generate()
    epk = sec._raw(eph.public_key())
    own_pub = sec._raw(mine.own.public.encrypt_key)
    key = AESGCM(sec._derive_key(eph.exchange(mine.own.public.encrypt_key), epk, own_pub))
    iv = os.urandom(sec._IV_BYTES)
    clear = {k: v for k, v in header.items() if k != "ciphertext"} | {"epk": b64encode(epk), "iv": b64encode(iv)}
    aad = sec._AAD_DOMAIN + canonical_json(clear)
    protected = {k: clear[k] for k in ("@context", *HEADER_FIELDS, "sig_alg", "enc_alg")}

    def encrypted(plain: bytes) -> bytes:
        """A valid encrypted message around arbitrary plaintext (signature octets + payload)."""
        return canonical_json({**clear, "ciphertext": b64encode(key.encrypt(iv, plain, aad))})

    def signed_payload(text: bytes) -> bytes:
        """The payload text behind the sender's valid signature over the fixed header and it."""
        try:
            payload = load_json(text)
            return theirs.own.sign_key.sign(signing_input(protected, payload)) + text  # type: ignore[no-any-return]
        except (MessageRejected, ValueError, TypeError):
            return bytes(64) + text

    def one(data: bytes) -> None:
        mode, rest = _mode(data, 4)
        wire = rest
        if mode == 1:
            try:
                doc = load_json(rest)
            except MessageRejected:
                doc = None
            if doc is not None:
                wire = signed(doc)
        elif mode == 2:
            wire = encrypted(signed_payload(rest))
        elif mode == 3:
            wire = encrypted(rest)
        for opener in (strict, lenient):
            with contextlib.suppress(MessageRejected):
                opener.open_unclaimed(wire)

    return Harness(one)


class _NoNonces:
    async def claim(self, message_id: str, ttl_s: float) -> bool:
        return True


# ---------------------------------------------------------------------------- lab config


def _config_seeds() -> list[bytes]:
    import yaml

    from gateway.config import _read_layered

    data, _ = _read_layered(SIM_CONFIG.resolve())
    flat = yaml.safe_dump(data, sort_keys=False).encode()
    tests = ROOT / "tests"
    layered = SIM_CONFIG.read_bytes().replace(b"multipower.yaml", b"base.yaml")
    out = [flat, b"extends: base.yaml\nlab: {name: x}\n", layered]
    for extra in ("ams.yaml",):
        p = ROOT / "lab_configs" / extra
        if p.exists():
            out.append(p.read_bytes())
    if tests.exists():
        out.append(b"devices:\n  d: {protocol: iec104, host: 127.0.0.1}\npoints: []\n")
    return out


def _make_config() -> Harness:
    import yaml

    from gateway.config import _read_layered, load_config
    from gateway.errors import ConfigError

    d = Path(tempfile.mkdtemp(prefix="mgms-fuzz-config-"))
    data, _ = _read_layered(SIM_CONFIG.resolve())
    data.pop("extends", None)
    (d / "base.yaml").write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    path = d / "lab.yaml"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        with contextlib.suppress(ConfigError):
            load_config(path)

    return Harness(one, lambda: shutil.rmtree(d, ignore_errors=True))


def _files(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(paths)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "iec104",
            "IEC 104 client side: FrameDecoder (feed, feed_batch), decode_apdu, decode_asdu, decode_monitor, "
            "command_reply, mirror; re-encoding and the two ASDU decoders checked against each other",
            _make_iec104,
            _iec104_seeds,
            _files(["gateway/protocols/iec104/codec.py", "gateway/protocols/iec104/common.py"]),
            max_len=1024,
        ),
        Target(
            "iec104-sim",
            "IEC 104 outstation simulator: a client's byte stream into a session (APCI state machine, "
            "ASDU dispatch, commands); its replies must decode",
            _make_sim,
            _sim_seeds,
            _files(["gateway/iedsim/iec104/server.py", "gateway/protocols/iec104/codec.py"]),
            max_len=2048,
        ),
        Target(
            "iec104-client",
            "IEC 104 asyncio client: an outstation's byte stream into the link (APCI, sequence numbers, "
            "windows) and the adapter's receive path (monitor values, confirmations, interrogation ends)",
            _make_client,
            _client_seeds,
            _files(["gateway/protocols/iec104/aio.py", "gateway/protocols/iec104/common.py",
                    "gateway/protocols/iec104/codec.py"]),
            max_len=2048,
        ),
        Target(
            "dlms",
            "DLMS meter simulator: WRAPPER and HDLC framing, AARQ/GET/ACTION parsing, A-XDR, COSEM date-time",
            _make_dlms,
            _dlms_seeds,
            _files(["gateway/iedsim/dlms/framing.py", "gateway/iedsim/dlms/axdr.py", "gateway/iedsim/dlms/meter.py",
                    "gateway/iedsim/dlms/server.py"]),
            max_len=2048,
        ),
        Target(
            "scl",
            "IEC 61850 SCL (ICD/CID) reader: load_scl",
            _make_scl,
            _scl_seeds,
            _files(["gateway/iedsim/iec61850/scl.py"]),
            max_len=32768,
        ),
        Target(
            "opener",
            "message envelope and inbound security pipeline: JSON, header, base64, signature, decryption, "
            "payload models",
            _make_opener,
            _opener_seeds,
            _files(["gateway/semantic/envelope.py", "gateway/semantic/security.py", "gateway/semantic/messages.py"]),
            max_len=8192,
        ),
        Target(
            "config",
            "lab config loader: load_config / _read_layered (YAML, extends, validation)",
            _make_config,
            _config_seeds,
            _files(["gateway/config.py"]),
            max_len=16384,
            timeout_s=5,
        ),
    )
}
