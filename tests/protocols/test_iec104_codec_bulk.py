"""The codec's bulk paths (used by the asyncio 104 client) agree with the per-object ones.

``decode_monitor`` against ``decode_asdu``, ``cp56_timestamp`` against ``decode_cp56``, and
``FrameDecoder.feed_batch`` against ``feed``, on random and hand-written inputs.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from gateway.points import Quality
from gateway.protocols.iec104.codec import (
    MONITOR_TYPE_IDS,
    Asdu,
    AsduError,
    Cot,
    Cp56Time,
    DoublePointInfo,
    Element,
    FloatInfo,
    FrameDecoder,
    FrameError,
    IFrame,
    InfoObject,
    NormalizedInfo,
    ScaledInfo,
    SFrame,
    SinglePointInfo,
    TypeId,
    UFrame,
    UFunction,
    cp56_timestamp,
    decode_asdu,
    decode_cp56,
    decode_monitor,
    encode_asdu,
    encode_cp56,
    encode_frame,
)

RNG = random.Random(104)
ELEMENTS: dict[TypeId, Callable[[], Element]] = {
    TypeId.M_SP_NA_1: lambda: SinglePointInfo(RNG.random() < 0.5, Quality(RNG.choice((0, 0x10, 0x80)))),
    TypeId.M_SP_TB_1: lambda: SinglePointInfo(RNG.random() < 0.5),
    TypeId.M_DP_NA_1: lambda: DoublePointInfo(RNG.randrange(4), Quality.NOT_TOPICAL),
    TypeId.M_DP_TB_1: lambda: DoublePointInfo(RNG.randrange(4)),
    TypeId.M_ME_NA_1: lambda: NormalizedInfo(RNG.uniform(-1, 0.999), Quality.OVERFLOW),
    TypeId.M_ME_TD_1: lambda: NormalizedInfo(RNG.uniform(-1, 0.999)),
    TypeId.M_ME_NB_1: lambda: ScaledInfo(RNG.randrange(-32768, 32768)),
    TypeId.M_ME_TE_1: lambda: ScaledInfo(RNG.randrange(-32768, 32768), Quality.INVALID | Quality.OVERFLOW),
    TypeId.M_ME_NC_1: lambda: FloatInfo(RNG.uniform(-1e6, 1e6)),
    TypeId.M_ME_TF_1: lambda: FloatInfo(RNG.uniform(-1e6, 1e6), Quality.SUBSTITUTED),
}


def random_asdu(type_id: TypeId) -> bytes:
    timed = type_id.name[5] == "T"
    n = RNG.randrange(1, 8)
    sequence = RNG.random() < 0.3
    first = RNG.randrange(1, 1 << 23)
    objects = tuple(
        InfoObject(
            first + i if sequence else RNG.randrange(1, 1 << 24),
            ELEMENTS[type_id](),
            Cp56Time.from_timestamp(RNG.uniform(946_684_800, 4_102_444_799)) if timed else None,
        )
        for i in range(n)
    )
    return encode_asdu(Asdu(type_id, RNG.choice(list(Cot)[:4]), RNG.randrange(1, 65535), objects, sequence=sequence))


def test_every_handled_monitor_type_is_covered() -> None:
    assert {int(t) for t in ELEMENTS} == MONITOR_TYPE_IDS


@pytest.mark.parametrize("type_id", list(ELEMENTS), ids=lambda t: t.name)
def test_decode_monitor_equals_decode_asdu(type_id: TypeId) -> None:
    for _ in range(200):
        raw = random_asdu(type_id)
        full, bulk = decode_asdu(raw), decode_monitor(raw)
        assert (bulk.type_id, bulk.cot, bulk.common_address) == (full.type_id, full.cot, full.common_address)
        expected = [
            (o.ioa, o.element.value, int(o.element.quality), o.time.timestamp() if o.time else None)  # type: ignore[union-attr]
            for o in full.objects
        ]
        assert bulk.objects == expected
        assert [type(o[1]) for o in bulk.objects] == [type(e[1]) for e in expected]


def test_decode_monitor_refuses_what_decode_asdu_refuses() -> None:
    raw = random_asdu(TypeId.M_ME_TF_1)
    for bad in (raw[:-1], raw + b"\x00", raw[:5], bytes((36, 0)) + raw[2:]):
        with pytest.raises(AsduError):
            decode_asdu(bad)
        with pytest.raises(AsduError):
            decode_monitor(bad)
    with pytest.raises(AsduError) as err:
        decode_monitor(bytes((45, 1, 7, 0, 1, 0, 1, 0, 0, 1)))  # a command is not a monitor type
    assert err.value.reply_cot is Cot.UNKNOWN_TYPE_ID


def test_cp56_timestamp_equals_decode_cp56() -> None:
    for _ in range(2000):
        t = Cp56Time.from_timestamp(RNG.uniform(946_684_800, 4_102_444_799), invalid=RNG.random() < 0.1)
        b = encode_cp56(t)
        fast = cp56_timestamp(b[0] | b[1] << 8, b[2], b[3], b[4], b[5], b[6])
        assert fast == decode_cp56(b).timestamp()
    # 29 February exists in 2024 only; minute 60, hour 24, 60 s are not times
    assert cp56_timestamp(0, 0, 0, 29, 2, 24) == 1_709_164_800.0
    for octets in ((0, 0, 0, 29, 2, 23), (0, 60, 0, 1, 1, 24), (0, 0, 24, 1, 1, 24), (60_000, 0, 0, 1, 1, 24)):
        with pytest.raises(AsduError):
            cp56_timestamp(*octets)
        with pytest.raises(AsduError):
            decode_cp56(bytes((octets[0] & 0xFF, octets[0] >> 8, *octets[1:])))


def test_feed_batch_equals_feed_in_any_split() -> None:
    frames = [IFrame(i, 3, random_asdu(TypeId.M_ME_TF_1)) for i in range(20)]
    frames[5:5] = [SFrame(7), UFrame(UFunction.TESTFR_ACT)]
    stream = b"".join(encode_frame(f) for f in frames)
    for _ in range(20):
        cuts = sorted(RNG.sample(range(1, len(stream)), 8))
        decoder, got = FrameDecoder(), []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            batch, error = decoder.feed_batch(stream[a:b])
            assert error is None
            got.extend(batch)
        assert got == frames and decoder.buffered == 0


def test_feed_batch_returns_the_frames_before_garbage_and_the_error() -> None:
    good = encode_frame(IFrame(0, 0, random_asdu(TypeId.M_SP_NA_1)))
    for garbage, message in (
        (b"\x67\x04\x01\x00\x00\x00", "start octet"),
        (b"\x68\x02\x00\x00", "length octet 2"),
        (b"\x68\x04\x01\x02\x00\x00", "S-frame control field"),
        (b"\x68\x04\x03\x00\x00\x00", "U-frame function"),
        # longer than 253: read as an I-frame with a 251-octet ASDU before this was checked
        (b"\x68\xff" + bytes(255), "length octet 255 outside 4..253"),
        (b"\x68\xfe" + bytes(254), "length octet 254 outside 4..253"),
    ):
        frames, error = FrameDecoder().feed_batch(good + garbage + good)
        assert len(frames) == 1 and isinstance(error, FrameError) and message in str(error), (garbage, error)
