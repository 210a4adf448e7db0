"""DLMS/COSEM pieces without sockets: golden frames from gurux's client, A-XDR, units, AES-GCM."""

from __future__ import annotations

import os
import time

import pytest
from gurux_dlms.enums import Security
from gurux_dlms.GXDLMSChipperingStream import GXDLMSChipperingStream

from gateway.iedsim.dlms.axdr import Enum, Structure, Typed, decode, encode, from_cosem_datetime, to_cosem_datetime
from gateway.iedsim.dlms.framing import (
    SNRM,
    FramingError,
    crc16,
    decode_hdlc,
    decode_wrapper,
    encode_hdlc,
    encode_wrapper,
    hdlc_address,
)
from gateway.iedsim.dlms.meter import gmac_tag
from gateway.protocols.dlms.adapter import unit_factor
from gateway.protocols.dlms.fastgcm import FastGcmStream

# Frames gurux-dlms 1.0.203's client sends (client 16, server 1): golden vectors.
GURUX_SNRM = bytes.fromhex("7ea0070321930f017e")
GURUX_AARQ_HDLC = bytes.fromhex(
    "7ea02b032110fbafe6e600601da109060760857405080101be10040e01000000065f1f0400401e5dffff91237e"
)
GURUX_GET_WRAPPER = bytes.fromhex("000100100001000dc001c100030100200700ff0200")


def test_hdlc_frames_from_gurux_decode() -> None:
    used, frame = decode_hdlc(GURUX_SNRM)
    assert used == len(GURUX_SNRM) and frame is not None
    assert (frame.destination, frame.source, frame.control) == (1, 16, SNRM)
    used, frame = decode_hdlc(GURUX_AARQ_HDLC + b"\x7e\xa0")  # a partial next frame stays
    assert used == len(GURUX_AARQ_HDLC) and frame is not None and frame.is_information
    assert frame.info.startswith(b"\xe6\xe6\x00\x60")


def test_hdlc_round_trip_and_damage_is_refused() -> None:
    raw = encode_hdlc(hdlc_address(16), hdlc_address(1), 0x10, b"\xe6\xe7\x00hello", segmented=True)
    _, frame = decode_hdlc(raw)
    assert frame is not None and frame.info.endswith(b"hello") and frame.segmented
    bad = bytearray(raw)
    bad[12] ^= 0x01
    with pytest.raises(FramingError, match="check sequence"):
        decode_hdlc(bytes(bad))
    assert decode_hdlc(raw[:-3]) == (0, None), "incomplete: wait for more bytes"
    assert crc16(b"123456789") == 0x906E  # CRC-16/X.25 check value


def test_wrapper_round_trip() -> None:
    used, frame = decode_wrapper(GURUX_GET_WRAPPER)
    assert used == len(GURUX_GET_WRAPPER) and frame is not None
    assert (frame.source, frame.destination) == (16, 1) and frame.apdu[:2] == b"\xc0\x01"
    assert encode_wrapper(16, 1, frame.apdu) == GURUX_GET_WRAPPER
    with pytest.raises(FramingError):
        decode_wrapper(b"\x00\x02" + GURUX_GET_WRAPPER[2:])


def test_axdr_round_trip() -> None:
    value = Structure((Typed(0x0F, -2), Enum(35), b"\x01\x02", [1, 2], 2.5, None, True, "ab"))
    decoded, end = decode(encode(value))
    assert end == len(encode(value))
    assert decoded == Structure((-2, Enum(35), b"\x01\x02", [1, 2], 2.5, None, True, "ab"))


def test_cosem_datetime() -> None:
    t = 1_795_000_000.0
    raw = to_cosem_datetime(t)
    assert len(raw) == 12 and from_cosem_datetime(raw) == t
    assert from_cosem_datetime(b"\xff" * 12) is None


@pytest.mark.parametrize(
    ("dlms_unit", "point_unit", "factor"),
    [(35, "V", 1.0), (35, "kV", 1e-3), (30, "kWh", 1e-3), (27, "kW", 1e-3), (29, "kvar", 1e-3), (255, "1", 1.0)],
)
def test_meter_units_convert_into_point_units(dlms_unit: int, point_unit: str, factor: float) -> None:
    assert unit_factor(dlms_unit, point_unit) == pytest.approx(factor)


def test_mismatched_units_are_refused() -> None:
    assert unit_factor(27, "kWh") is None  # W is not Wh
    assert unit_factor(35, "A") is None
    assert unit_factor(999, "V") is None


@pytest.mark.parametrize("security", [Security.AUTHENTICATION, Security.AUTHENTICATION_ENCRYPTION])
def test_fast_gcm_matches_gurux_and_is_fast(security: int) -> None:
    key, iv, aad, text = os.urandom(16), os.urandom(12), os.urandom(40), os.urandom(30)
    ours, theirs = (
        FastGcmStream(security, True, key, aad, iv, None),
        GXDLMSChipperingStream(security, True, key, aad, iv, None),
    )
    if security != Security.AUTHENTICATION:
        ours.write(text)
        theirs.write(text)
    assert bytes(ours.flushFinalBlock()) == bytes(theirs.flushFinalBlock())
    assert bytes(ours.tag) == bytes(theirs.tag)
    n = 200
    t = time.perf_counter()
    for _ in range(n):
        s = FastGcmStream(security, True, key, aad, iv, None)
        s.write(text)
        s.flushFinalBlock()
    assert (time.perf_counter() - t) / n < 0.001, "well under a millisecond per operation"


def test_simulator_gmac_tag_verifies_with_gurux_stream() -> None:
    ek, ak, title, data = os.urandom(16), os.urandom(16), b"MGMS\x00\x00\x00\x01", b"\xc0\x01\xc1"
    tag = gmac_tag(ek, title, 7, ak, data)
    gurux = GXDLMSChipperingStream(
        Security.AUTHENTICATION, True, ek, b"\x10" + ak + data, title + b"\x00\x00\x00\x07", None
    )
    gurux.flushFinalBlock()
    assert bytes(gurux.tag) == tag
