"""DLMS/COSEM transport framing without I/O: the TCP WRAPPER and HDLC (IEC 62056-46).

``decode(buffer) -> (used, frame | None)``: the caller keeps unconsumed bytes and feeds them
again with more data, so the same code serves the simulator's stream reader and tests with
golden byte vectors. HDLC here is the server (secondary station) side of the profile meters
use: SNRM/UA, I-frames with the LLC header, RR, DISC, segmented replies.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "FramingError",
    "HdlcFrame",
    "WrapperFrame",
    "crc16",
    "decode_hdlc",
    "decode_wrapper",
    "encode_hdlc",
    "encode_wrapper",
    "hdlc_address",
]

WRAPPER_VERSION = 1
WRAPPER_HEADER = 8
HDLC_FLAG = 0x7E
LLC_REQUEST = b"\xe6\xe6\x00"
LLC_RESPONSE = b"\xe6\xe7\x00"
# Control field values (poll/final bit 0x10 set)
SNRM = 0x93
DISC = 0x53
UA = 0x73
DM = 0x1F
FRMR = 0x97


class FramingError(ValueError):
    """Bytes that cannot be a frame (bad version, bad check sequence, bad format)."""


@dataclass(frozen=True, slots=True)
class WrapperFrame:
    source: int  # wPort of the sender
    destination: int
    apdu: bytes


def encode_wrapper(source: int, destination: int, apdu: bytes) -> bytes:
    return (
        WRAPPER_VERSION.to_bytes(2, "big")
        + source.to_bytes(2, "big")
        + destination.to_bytes(2, "big")
        + len(apdu).to_bytes(2, "big")
        + apdu
    )


def decode_wrapper(buf: bytes) -> tuple[int, WrapperFrame | None]:
    if len(buf) < WRAPPER_HEADER:
        return 0, None
    version = int.from_bytes(buf[0:2], "big")
    if version != WRAPPER_VERSION:
        raise FramingError(f"WRAPPER version {version}, expected 1")
    length = int.from_bytes(buf[6:8], "big")
    if len(buf) < WRAPPER_HEADER + length:
        return 0, None
    frame = WrapperFrame(int.from_bytes(buf[2:4], "big"), int.from_bytes(buf[4:6], "big"), bytes(buf[8 : 8 + length]))
    return WRAPPER_HEADER + length, frame


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x8408 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes) -> int:
    """CRC-16/X.25 (the HDLC frame check sequence), as an int to be sent little-endian."""
    crc = 0xFFFF
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFF


def hdlc_address(value: int) -> bytes:
    """An HDLC address field: 7 bits per octet, the last octet's low bit set."""
    if value < 0x80:
        return bytes([(value << 1) | 1])
    return bytes([(value >> 7) << 1, ((value & 0x7F) << 1) | 1])


def _read_address(buf: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(4):
        if pos + i >= len(buf):
            raise FramingError("address runs past the frame")
        b = buf[pos + i]
        value = (value << 7) | (b >> 1)
        if b & 1:
            return value, pos + i + 1
    raise FramingError("address longer than 4 octets")


@dataclass(frozen=True, slots=True)
class HdlcFrame:
    destination: int  # server address (upper/logical part for 1-octet addresses)
    source: int  # client address
    control: int
    info: bytes
    segmented: bool = False

    @property
    def is_information(self) -> bool:
        return self.control & 0x01 == 0

    @property
    def is_rr(self) -> bool:
        return self.control & 0x0F == 0x01

    @property
    def send_sequence(self) -> int:
        return (self.control >> 1) & 0x07

    @property
    def receive_sequence(self) -> int:
        return (self.control >> 5) & 0x07


def encode_hdlc(destination: bytes, source: bytes, control: int, info: bytes = b"", segmented: bool = False) -> bytes:
    """One HDLC frame (format type 3) with HCS and FCS; addresses as :func:`hdlc_address` gives them."""
    body_len = 2 + len(destination) + len(source) + 1 + 2 + (len(info) + 2 if info else 0)
    if body_len > 0x7FF:
        raise FramingError("HDLC frame too long")
    fmt = 0xA000 | (0x0800 if segmented else 0) | body_len
    header = fmt.to_bytes(2, "big") + destination + source + bytes([control])
    frame = header + crc16(header).to_bytes(2, "little")
    if info:
        frame += info
        frame += crc16(frame).to_bytes(2, "little")
    return bytes([HDLC_FLAG]) + frame + bytes([HDLC_FLAG])


def decode_hdlc(buf: bytes) -> tuple[int, HdlcFrame | None]:
    """Find one frame in ``buf``; bytes before a flag are skipped (counted as used)."""
    start = buf.find(bytes([HDLC_FLAG]))
    if start < 0:
        return len(buf), None
    if len(buf) - start < 3:
        return start, None
    fmt = int.from_bytes(buf[start + 1 : start + 3], "big")
    if fmt & 0xF000 != 0xA000:
        raise FramingError(f"HDLC frame format {fmt >> 12:#x}, expected type 3 (0xA)")
    length = fmt & 0x7FF
    end = start + 1 + length
    if len(buf) < end + 1:
        return start, None
    if buf[end] != HDLC_FLAG:
        raise FramingError("HDLC frame does not end with a flag")
    body = buf[start + 1 : end]
    dest, pos = _read_address(body, 2)
    src, pos = _read_address(body, pos)
    if pos + 3 > len(body):
        raise FramingError("HDLC frame too short")
    control = body[pos]
    pos += 1
    if int.from_bytes(body[pos : pos + 2], "little") != crc16(body[:pos]):
        raise FramingError("HDLC header check sequence wrong")
    pos += 2
    info = b""
    if pos < len(body):
        if len(body) - pos < 2 or int.from_bytes(body[-2:], "little") != crc16(body[:-2]):
            raise FramingError("HDLC frame check sequence wrong")
        info = bytes(body[pos:-2])
    return end + 1, HdlcFrame(dest, src, control, info, bool(fmt & 0x0800))
