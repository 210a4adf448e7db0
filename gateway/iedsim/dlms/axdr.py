"""A-XDR data (IEC 62056-6-2 ``Data``) and COSEM date-time, encoded and decoded without I/O.

Only what a meter simulator needs: the value types of registers, clocks and profile rows,
and enough decoding to read the parameters of a GET with selective access.
"""

from __future__ import annotations

import datetime as dt
import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AxdrError",
    "Enum",
    "Structure",
    "decode",
    "encode",
    "encode_length",
    "from_cosem_datetime",
    "read_length",
    "to_cosem_datetime",
]


class AxdrError(ValueError):
    """Bytes that are not valid A-XDR data."""


@dataclass(frozen=True, slots=True)
class Enum:
    """An A-XDR ``enum`` (tag 22), kept apart from integers so it encodes with its own tag."""

    value: int


@dataclass(frozen=True, slots=True)
class Structure:
    """An A-XDR ``structure`` (tag 2); a plain list encodes as ``array`` (tag 1)."""

    items: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Typed:
    """A number with an explicit A-XDR tag (e.g. 0x12 long-unsigned, 0x0F integer)."""

    tag: int
    value: int | float


_INT_FORMATS = {
    0x05: ">i",
    0x06: ">I",
    0x0F: ">b",
    0x10: ">h",
    0x11: ">B",
    0x12: ">H",
    0x14: ">q",
    0x15: ">Q",
    0x17: ">f",
    0x18: ">d",
}


def encode_length(n: int) -> bytes:
    """BER-style length as used by A-XDR for variable-length items."""
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return bytes([0x81, n])
    if n < 0x10000:
        return bytes([0x82]) + n.to_bytes(2, "big")
    return bytes([0x84]) + n.to_bytes(4, "big")


def read_length(buf: bytes, pos: int) -> tuple[int, int]:
    """(length, new position) of a BER-style length at ``pos``."""
    if pos >= len(buf):
        raise AxdrError("length missing")
    first = buf[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    if n == 0 or n > 4 or pos + 1 + n > len(buf):
        raise AxdrError("bad length")
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def encode(value: Any) -> bytes:
    """Python value -> A-XDR: None null, bool boolean, int double-long, float float64,
    bytes octet-string, str visible-string, list array, Structure, Enum, Typed."""
    if value is None:
        return b"\x00"
    if isinstance(value, bool):
        return b"\x03" + (b"\x01" if value else b"\x00")
    if isinstance(value, Enum):
        return bytes([0x16, value.value & 0xFF])
    if isinstance(value, Typed):
        return bytes([value.tag]) + struct.pack(_INT_FORMATS[value.tag], value.value)
    if isinstance(value, int):
        return b"\x05" + struct.pack(">i", value)
    if isinstance(value, float):
        return b"\x18" + struct.pack(">d", value)
    if isinstance(value, bytes | bytearray):
        return b"\x09" + encode_length(len(value)) + bytes(value)
    if isinstance(value, str):
        raw = value.encode("ascii")
        return b"\x0a" + encode_length(len(raw)) + raw
    if isinstance(value, Structure):
        return b"\x02" + encode_length(len(value.items)) + b"".join(encode(v) for v in value.items)
    if isinstance(value, list | tuple):
        return b"\x01" + encode_length(len(value)) + b"".join(encode(v) for v in value)
    raise TypeError(f"cannot encode {type(value).__name__} as A-XDR")


#: Deepest array/structure nesting :func:`decode` follows: a meter's data nests two or three
#: levels (profile rows, capture objects); 32 is far beyond, and far below Python's recursion
#: limit, so a client's ``01 01 01 01 ...`` is an AxdrError, not a RecursionError.
MAX_DEPTH = 32


def decode(buf: bytes, pos: int = 0, *, _depth: int = 0) -> tuple[Any, int]:
    """A-XDR -> (Python value, new position); the inverse of :func:`encode` (numbers untyped)."""
    if pos >= len(buf):
        raise AxdrError("data missing")
    tag = buf[pos]
    pos += 1
    if tag == 0x00:
        return None, pos
    if tag in (0x01, 0x02):
        if _depth >= MAX_DEPTH:
            raise AxdrError(f"arrays/structures nested deeper than {MAX_DEPTH}")
        count, pos = read_length(buf, pos)
        items = []
        for _ in range(count):
            item, pos = decode(buf, pos, _depth=_depth + 1)
            items.append(item)
        return (items if tag == 0x01 else Structure(tuple(items))), pos
    if tag in (0x03, 0x16) and pos >= len(buf):
        raise AxdrError(f"tag {tag:#x} without its octet")
    if tag == 0x03:
        return buf[pos] != 0, pos + 1
    if tag in (0x09, 0x0A):
        n, pos = read_length(buf, pos)
        if pos + n > len(buf):
            raise AxdrError("string runs past the end")
        raw = buf[pos : pos + n]
        return (bytes(raw) if tag == 0x09 else raw.decode("ascii", "replace")), pos + n
    if tag == 0x16:
        return Enum(buf[pos]), pos + 1
    fmt = _INT_FORMATS.get(tag)
    if fmt is None:
        raise AxdrError(f"unsupported A-XDR tag {tag:#x}")
    size = struct.calcsize(fmt)
    if pos + size > len(buf):
        raise AxdrError("number runs past the end")
    return struct.unpack_from(fmt, buf, pos)[0], pos + size


def to_cosem_datetime(t: float) -> bytes:
    """Unix time -> 12-octet COSEM date-time in UTC (deviation 0, status OK)."""
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    return (
        d.year.to_bytes(2, "big")
        + bytes([d.month, d.day, d.isoweekday(), d.hour, d.minute, d.second, d.microsecond // 10_000])
        + b"\x00\x00\x00"
    )


def from_cosem_datetime(raw: bytes) -> float | None:
    """12-octet COSEM date-time -> Unix time (UTC, deviation taken into account); None if
    unspecified; AxdrError for a date that does not exist."""
    if len(raw) != 12:
        raise AxdrError("a COSEM date-time has 12 octets")
    year = int.from_bytes(raw[0:2], "big")
    month, day, hour, minute, second, hundredths = raw[2], raw[3], raw[5], raw[6], raw[7], raw[8]
    if year == 0xFFFF or month > 12 or day > 31 or hour > 23 or minute > 59 or second > 59:
        return None
    deviation = int.from_bytes(raw[9:11], "big", signed=True)
    try:
        t = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC).timestamp()
    except (ValueError, OverflowError) as exc:  # month 0, day 0, 30 February, year 0 ...
        raise AxdrError(f"invalid COSEM date-time {raw.hex()}: {exc}") from None
    if hundredths != 0xFF:
        t += hundredths / 100
    if deviation != -0x8000:
        t += deviation * 60  # Blue Book: deviation = UTC - local time, in minutes
    return t
