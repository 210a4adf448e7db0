"""Pure helpers of the IEC 61850 adapter: data set member names and quality mapping."""

from __future__ import annotations

from gateway.points import Quality
from gateway.protocols.iec61850.adapter import map_quality, member_key


def test_member_key_both_notations() -> None:
    assert member_key("REF615LD0/MMXU1.PhV.phsA[MX]", "REF615") == ("LD0/MMXU1.PhV.phsA", "MX")
    assert member_key("REF615LD0/XCBR1$ST$Pos", "REF615") == ("LD0/XCBR1.Pos", "ST")


def test_quality_mapping() -> None:
    assert map_quality(0) == Quality.GOOD
    assert map_quality(0x2) == Quality.INVALID
    assert map_quality(0x3) == Quality.QUESTIONABLE
    assert map_quality(0x2 | 0x80) == Quality.INVALID | Quality.NOT_TOPICAL
    assert map_quality(0x400 | 0x1000 | 0x4) == Quality.SUBSTITUTED | Quality.BLOCKED | Quality.OVERFLOW
