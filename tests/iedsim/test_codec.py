"""IEC 104 codec against byte vectors written out by hand from IEC 60870-5-101/104.

Every expected byte string below was composed octet by octet from the standard's field
layout (comments name the fields), not produced by the encoder under test.
"""

from __future__ import annotations

import random
import struct
from datetime import UTC, datetime

import pytest

from gateway.points import Quality
from gateway.protocols.iec104.codec import (
    MAX_ASDU_LENGTH,
    Asdu,
    AsduError,
    BinaryCounterReading,
    ClockSync,
    Cot,
    CounterInterrogation,
    Cp56Time,
    DoubleCommand,
    DoublePointInfo,
    Element,
    EndOfInit,
    FloatInfo,
    FloatSetpoint,
    FrameDecoder,
    FrameError,
    IFrame,
    InfoObject,
    Interrogation,
    NormalizedInfo,
    NormalizedSetpoint,
    ReadCommand,
    ScaledInfo,
    ScaledSetpoint,
    SFrame,
    SingleCommand,
    SinglePointInfo,
    TypeId,
    UFrame,
    UFunction,
    asdu_size,
    decode_apdu,
    decode_asdu,
    decode_cp56,
    encode_asdu,
    encode_cp56,
    encode_frame,
    mirror,
)
from gateway.protocols.iec104.codec import (
    TestCommand as TsCommand,
)

H = bytes.fromhex

# 2024-03-15 (a Friday, day of week 5) 12:34:56.789 UTC:
#   ms 56789 = 0xDDD5 -> D5 DD; minute 34 = 0x22; hour 12 = 0x0C;
#   day 15 | (5 << 5) = 0xAF; month 3; year 24 = 0x18
T_2024 = Cp56Time(datetime(2024, 3, 15, 12, 34, 56, 789000, tzinfo=UTC))
T_2024_BYTES = H("D5 DD 22 0C AF 03 18")


# -- APCI ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("function", "wire"),
    [
        (UFunction.STARTDT_ACT, "68 04 07 00 00 00"),
        (UFunction.STARTDT_CON, "68 04 0B 00 00 00"),
        (UFunction.STOPDT_ACT, "68 04 13 00 00 00"),
        (UFunction.STOPDT_CON, "68 04 23 00 00 00"),
        (UFunction.TESTFR_ACT, "68 04 43 00 00 00"),
        (UFunction.TESTFR_CON, "68 04 83 00 00 00"),
    ],
)
def test_u_frames_match_the_standard(function: UFunction, wire: str) -> None:
    assert encode_frame(UFrame(function)) == H(wire)
    assert decode_apdu(H(wire)) == UFrame(function)


def test_s_frame_carries_receive_sequence_shifted_left() -> None:
    # N(R) = 5 -> (5 << 1) = 0x0A; N(R) = 300 -> 600 = 0x0258
    assert encode_frame(SFrame(5)) == H("68 04 01 00 0A 00")
    assert encode_frame(SFrame(300)) == H("68 04 01 00 58 02")
    assert decode_apdu(H("68 04 01 00 58 02")) == SFrame(300)


def test_i_frame_sequence_numbers_use_15_bits() -> None:
    frame = IFrame(send_seq=32767, recv_seq=1, asdu=b"\x01")
    # N(S) 32767 -> 0xFFFE -> FE FF; N(R) 1 -> 02 00
    assert encode_frame(frame) == H("68 05 FE FF 02 00 01")
    assert decode_apdu(encode_frame(frame)) == frame
    with pytest.raises(ValueError):
        encode_frame(IFrame(32768, 0, b"\x01"))


def test_general_interrogation_activation() -> None:
    # C_IC_NA_1 (100 = 0x64), VSQ 1, COT 6 act, OA 0, CA 1, IOA 0, QOI 20 (0x14)
    wire = H("68 0E 00 00 00 00 64 01 06 00 01 00 00 00 00 14")
    asdu = Asdu(TypeId.C_IC_NA_1, Cot.ACTIVATION, 1, (InfoObject(0, Interrogation(20)),))
    assert encode_frame(IFrame(0, 0, encode_asdu(asdu))) == wire
    frame = decode_apdu(wire)
    assert isinstance(frame, IFrame)
    assert decode_asdu(frame.asdu) == asdu


def test_measured_float_with_time_tag() -> None:
    # N(S) 3, N(R) 2; M_ME_TF_1 (36 = 0x24), VSQ 1, COT 3 spont, CA 1, IOA 1001 = E9 03 00,
    # 230.5 = 0x43668000 -> 00 80 66 43, QDS 0, then CP56Time2a
    wire = H("68 19 06 00 04 00 24 01 03 00 01 00 E9 03 00 00 80 66 43 00") + T_2024_BYTES
    asdu = Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, (InfoObject(1001, FloatInfo(230.5), T_2024),))
    assert encode_frame(IFrame(3, 2, encode_asdu(asdu))) == wire
    frame = decode_apdu(wire)
    assert isinstance(frame, IFrame) and (frame.send_seq, frame.recv_seq) == (3, 2)
    assert decode_asdu(frame.asdu) == asdu


def test_double_command_select() -> None:
    # C_DC_NA_1 (46 = 0x2E), COT 6, CA 1, IOA 3001 = B9 0B 00, DCO: S/E 0x80 | ON 2 = 0x82
    asdu = Asdu(TypeId.C_DC_NA_1, Cot.ACTIVATION, 1, (InfoObject(3001, DoubleCommand(2, select=True)),))
    assert encode_asdu(asdu) == H("2E 01 06 00 01 00 B9 0B 00 82")
    # the outstation's negative confirmation: COT 7 | P/N 0x40 = 0x47, all else mirrored
    assert mirror(encode_asdu(asdu), Cot.ACTIVATION_CON, negative=True) == H("2E 01 47 00 01 00 B9 0B 00 82")
    # unknown IOA: COT 47 = 0x2F | 0x40 = 0x6F
    assert mirror(encode_asdu(asdu), Cot.UNKNOWN_IOA, negative=True) == H("2E 01 6F 00 01 00 B9 0B 00 82")


def test_double_point_with_time_and_quality() -> None:
    # M_DP_TB_1 (31 = 0x1F), COT 3, OA 5, CA 0x1234 -> 34 12, IOA 2001 = D1 07 00,
    # DIQ: IV 0x80 | OFF 1 = 0x81
    asdu = Asdu(
        TypeId.M_DP_TB_1,
        Cot.SPONTANEOUS,
        0x1234,
        (InfoObject(2001, DoublePointInfo(1, Quality.INVALID), T_2024),),
        originator=5,
    )
    assert encode_asdu(asdu) == H("1F 01 03 05 34 12 D1 07 00 81") + T_2024_BYTES
    assert decode_asdu(encode_asdu(asdu)) == asdu


def test_float_setpoint_select() -> None:
    # C_SE_NC_1 (50 = 0x32), IOA 3011 = C3 0B 00, 50000.0 = 0x47435000, QOS S/E = 0x80
    asdu = Asdu(TypeId.C_SE_NC_1, Cot.ACTIVATION, 1, (InfoObject(3011, FloatSetpoint(50000.0, select=True)),))
    assert encode_asdu(asdu) == H("32 01 06 00 01 00 C3 0B 00 00 50 43 47 80")


def test_scaled_and_normalized_values_keep_quality_bits() -> None:
    # M_ME_NB_1 (11 = 0x0B): SVA -2 = FE FF, QDS IV|OV = 0x81
    scaled = Asdu(
        TypeId.M_ME_NB_1,
        Cot.INTERROGATED_BY_STATION,
        1,
        (InfoObject(7, ScaledInfo(-2, Quality.INVALID | Quality.OVERFLOW)),),
    )
    assert encode_asdu(scaled) == H("0B 01 14 00 01 00 07 00 00 FE FF 81")
    # M_ME_NA_1 (9): NVA 0.5 = 0x4000 -> 00 40, QDS NT|SB|BL = 0x70
    norm = Asdu(
        TypeId.M_ME_NA_1,
        Cot.PERIODIC,
        1,
        (InfoObject(8, NormalizedInfo(0.5, Quality.NOT_TOPICAL | Quality.SUBSTITUTED | Quality.BLOCKED)),),
    )
    assert encode_asdu(norm) == H("09 01 01 00 01 00 08 00 00 00 40 70")
    assert decode_asdu(encode_asdu(norm)) == norm
    assert decode_asdu(encode_asdu(scaled)) == scaled


def test_sequence_of_single_points_sends_one_address() -> None:
    # M_SP_NA_1, VSQ SQ=1 | 3 = 0x83, IOA 100 = 64 00 00, SIQ: on; off; IV|on
    objs = (
        InfoObject(100, SinglePointInfo(True)),
        InfoObject(101, SinglePointInfo(False)),
        InfoObject(102, SinglePointInfo(True, Quality.INVALID)),
    )
    asdu = Asdu(TypeId.M_SP_NA_1, Cot.SPONTANEOUS, 1, objs, sequence=True)
    wire = H("01 83 03 00 01 00 64 00 00 01 00 81")
    assert encode_asdu(asdu) == wire
    assert decode_asdu(wire) == asdu
    with pytest.raises(ValueError, match="consecutive"):
        encode_asdu(Asdu(TypeId.M_SP_NA_1, Cot.SPONTANEOUS, 1, (objs[0], objs[2]), sequence=True))


def test_single_command_pulse_qualifier_and_test_bit() -> None:
    # C_SC_NA_1 (45 = 0x2D), COT 6 | T 0x80 = 0x86, SCO: QU 1 (short pulse) << 2 | on = 0x05
    asdu = Asdu(TypeId.C_SC_NA_1, Cot.ACTIVATION, 1, (InfoObject(5, SingleCommand(True, qualifier=1)),), test=True)
    assert encode_asdu(asdu) == H("2D 01 86 00 01 00 05 00 00 05")
    assert decode_asdu(encode_asdu(asdu)) == asdu


def test_clock_sync_as_c104_sends_it() -> None:
    # Captured from c104 2.2.1: broadcast CA FFFF, day of week left 0.
    # ms 0xDBB8 = 56248, min 14, hour 3, day 22, month 11, year 26
    raw = H("67 01 06 00 FF FF 00 00 00 B8 DB 0E 03 16 0B 1A")
    asdu = decode_asdu(raw)
    assert asdu.type_id is TypeId.C_CS_NA_1 and asdu.common_address == 0xFFFF
    element = asdu.objects[0].element
    assert isinstance(element, ClockSync)
    assert element.time.time == datetime(2026, 11, 22, 3, 14, 56, 248000, tzinfo=UTC)


def test_integrated_totals_and_counter_interrogation() -> None:
    # M_IT_NA_1 (15 = 0x0F), COT 37 requested by general counter interrogation, ioa 3001:
    # BCR 123456789 = 0x075BCD15 little-endian, then SQ 3 | CY 0x20 = 0x23
    bcr = BinaryCounterReading(123456789, 3, carry=True)
    it = Asdu(TypeId.M_IT_NA_1, Cot.REQUESTED_BY_GENERAL_COUNTER, 1, (InfoObject(3001, bcr),))
    assert encode_asdu(it) == H("0F 01 25 00 01 00 B9 0B 00 15 CD 5B 07 23")
    # a negative counter with CA 0x40 and IV 0x80, time-tagged M_IT_TB_1 (37 = 0x25)
    flagged = BinaryCounterReading(-2, adjusted=True, invalid=True)
    tb = Asdu(TypeId.M_IT_TB_1, Cot.SPONTANEOUS, 1, (InfoObject(1, flagged, T_2024),))
    assert encode_asdu(tb) == H("25 01 03 00 01 00 01 00 00 FE FF FF FF C0") + T_2024_BYTES
    # C_CI_NA_1 (101 = 0x65): QCC RQT 5 (general) | FRZ 1 << 6 (freeze without reset) = 0x45
    ci = Asdu(TypeId.C_CI_NA_1, Cot.ACTIVATION, 1, (InfoObject(0, CounterInterrogation(5, 1)),))
    assert encode_asdu(ci) == H("65 01 06 00 01 00 00 00 00 45")
    for a in (it, tb, ci):
        assert decode_asdu(encode_asdu(a)) == a
    with pytest.raises(ValueError, match="sequence number 32"):
        encode_asdu(Asdu(TypeId.M_IT_NA_1, Cot.SPONTANEOUS, 1, (InfoObject(1, BinaryCounterReading(0, 32)),)))
    with pytest.raises(struct.error):
        encode_asdu(Asdu(TypeId.M_IT_NA_1, Cot.SPONTANEOUS, 1, (InfoObject(1, BinaryCounterReading(2**31)),)))


def test_test_command_with_time_and_end_of_init_and_read() -> None:
    # C_TS_TA_1 (107 = 0x6B): TSC 0x1234 -> 34 12, then CP56Time2a
    ts = Asdu(TypeId.C_TS_TA_1, Cot.ACTIVATION, 1, (InfoObject(0, TsCommand(0x1234, T_2024)),))
    assert encode_asdu(ts) == H("6B 01 06 00 01 00 00 00 00 34 12") + T_2024_BYTES
    # M_EI_NA_1 (70 = 0x46), COT 4 initialised, COI 0
    ei = Asdu(TypeId.M_EI_NA_1, Cot.INITIALIZED, 1, (InfoObject(0, EndOfInit(0)),))
    assert encode_asdu(ei) == H("46 01 04 00 01 00 00 00 00 00")
    # C_RD_NA_1 (102 = 0x66), COT 5 request: the address only
    rd = Asdu(TypeId.C_RD_NA_1, Cot.REQUEST, 1, (InfoObject(1001, ReadCommand()),))
    assert encode_asdu(rd) == H("66 01 05 00 01 00 E9 03 00")
    for a in (ts, ei, rd):
        assert decode_asdu(encode_asdu(a)) == a


# -- round trips of every type -----------------------------------------------------------

_EXAMPLES: dict[TypeId, Element] = {
    TypeId.M_SP_NA_1: SinglePointInfo(True, Quality.BLOCKED),
    TypeId.M_SP_TB_1: SinglePointInfo(False, Quality.INVALID),
    TypeId.M_DP_NA_1: DoublePointInfo(3),
    TypeId.M_DP_TB_1: DoublePointInfo(0, Quality.NOT_TOPICAL),
    TypeId.M_ME_NA_1: NormalizedInfo(-0.25),
    TypeId.M_ME_TD_1: NormalizedInfo(-1.0, Quality.OVERFLOW),
    TypeId.M_ME_NB_1: ScaledInfo(32767),
    TypeId.M_ME_TE_1: ScaledInfo(-32768, Quality.SUBSTITUTED),
    TypeId.M_ME_NC_1: FloatInfo(-1.5),
    TypeId.M_ME_TF_1: FloatInfo(50.0, Quality.INVALID | Quality.OVERFLOW),
    TypeId.M_IT_NA_1: BinaryCounterReading(-(2**31), sequence=31, carry=True),
    TypeId.M_IT_TB_1: BinaryCounterReading(2**31 - 1, adjusted=True, invalid=True),
    TypeId.C_CI_NA_1: CounterInterrogation(5, 3),
    TypeId.M_EI_NA_1: EndOfInit(2),
    TypeId.C_SC_NA_1: SingleCommand(False, select=True, qualifier=31),
    TypeId.C_SC_TA_1: SingleCommand(True),
    TypeId.C_DC_NA_1: DoubleCommand(1),
    TypeId.C_DC_TA_1: DoubleCommand(2, select=True, qualifier=3),
    TypeId.C_SE_NA_1: NormalizedSetpoint(0.75, qualifier=127),
    TypeId.C_SE_TA_1: NormalizedSetpoint(-0.5, select=True),
    TypeId.C_SE_NB_1: ScaledSetpoint(-1234),
    TypeId.C_SE_TB_1: ScaledSetpoint(1234, select=True),
    TypeId.C_SE_NC_1: FloatSetpoint(0.125),
    TypeId.C_SE_TC_1: FloatSetpoint(-7.5, select=True),
    TypeId.C_IC_NA_1: Interrogation(21),
    TypeId.C_RD_NA_1: ReadCommand(),
    TypeId.C_CS_NA_1: ClockSync(T_2024),
    TypeId.C_TS_TA_1: TsCommand(65535, T_2024),
}
_TIMED = {
    "M_IT_TB_1",
    "M_SP_TB_1",
    "M_DP_TB_1",
    "M_ME_TD_1",
    "M_ME_TE_1",
    "M_ME_TF_1",
    "C_SC_TA_1",
    "C_DC_TA_1",
    "C_SE_TA_1",
    "C_SE_TB_1",
    "C_SE_TC_1",
}


def test_every_type_id_has_an_example() -> None:
    assert set(_EXAMPLES) == set(TypeId)


def test_type_names_match_the_config_vocabulary() -> None:
    from gateway.config import IEC104_TYPES

    assert set(IEC104_TYPES) <= {t.name for t in TypeId}


@pytest.mark.parametrize("type_id", list(TypeId), ids=lambda t: t.name)
def test_round_trip(type_id: TypeId) -> None:
    element = _EXAMPLES[type_id]
    time = T_2024 if type_id.name in _TIMED else None
    asdu = Asdu(
        type_id,
        Cot.ACTIVATION,
        65535,
        (InfoObject(0xFFFFFF, element, time), InfoObject(1, element, time)),
        negative=True,
        originator=255,
    )
    raw = encode_asdu(asdu)
    assert len(raw) == asdu_size(type_id, 2)
    assert decode_asdu(raw) == asdu


def test_encoder_refuses_inconsistent_asdus() -> None:
    with pytest.raises(ValueError, match="carries"):
        encode_asdu(Asdu(TypeId.M_ME_NC_1, Cot.SPONTANEOUS, 1, (InfoObject(1, ScaledInfo(1)),)))
    with pytest.raises(ValueError, match="time tag"):
        encode_asdu(Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, (InfoObject(1, FloatInfo(1.0)),)))
    with pytest.raises(ValueError, match="time tag"):
        encode_asdu(Asdu(TypeId.M_ME_NC_1, Cot.SPONTANEOUS, 1, (InfoObject(1, FloatInfo(1.0), T_2024),)))
    with pytest.raises(ValueError, match=r"1\.\.127"):
        encode_asdu(Asdu(TypeId.M_ME_NC_1, Cot.SPONTANEOUS, 1, ()))
    too_many = tuple(InfoObject(i, FloatInfo(0.0), T_2024) for i in range(17))  # 6 + 17 * 15 > 249
    with pytest.raises(ValueError, match=str(MAX_ASDU_LENGTH)):
        encode_asdu(Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, too_many))
    assert len(encode_asdu(Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, too_many[:16]))) == 246


def test_decoder_names_the_negative_answer() -> None:
    with pytest.raises(AsduError) as unknown_type:
        decode_asdu(H("7F 01 06 00 01 00 00 00 00 00"))
    assert unknown_type.value.reply_cot is Cot.UNKNOWN_TYPE_ID
    with pytest.raises(AsduError) as unknown_cot:
        decode_asdu(H("64 01 00 00 01 00 00 00 00 14"))  # cause 0 is not defined
    assert unknown_cot.value.reply_cot is Cot.UNKNOWN_COT
    with pytest.raises(AsduError) as short:
        decode_asdu(H("64 01 06 00 01 00 00 00 00"))  # QOI missing
    assert short.value.reply_cot is None
    with pytest.raises(AsduError):
        decode_asdu(H("64 00 06 00 01 00"))  # no object
    with pytest.raises(AsduError):
        decode_asdu(H("64 01 06"))


# -- CP56Time2a ----------------------------------------------------------------------------


def test_cp56_encodes_fields_and_flags() -> None:
    assert encode_cp56(T_2024) == T_2024_BYTES
    flagged = Cp56Time(T_2024.time, invalid=True, summer=True)
    assert encode_cp56(flagged) == H("D5 DD A2 8C AF 03 18")  # IV 0x80 on minute, SU 0x80 on hour
    assert decode_cp56(encode_cp56(flagged)) == flagged


def test_cp56_round_trip_truncates_to_the_millisecond() -> None:
    rng = random.Random(104)
    lo = datetime(2000, 1, 1, tzinfo=UTC).timestamp()
    hi = datetime(2099, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    for _ in range(2000):
        t = rng.uniform(lo, hi)
        c = Cp56Time.from_timestamp(t)
        back = decode_cp56(encode_cp56(c))
        assert back == c
        assert 0 <= t - back.timestamp() < 0.001 + 1e-6


def test_cp56_refuses_what_it_cannot_carry() -> None:
    with pytest.raises(ValueError):
        Cp56Time(datetime(2024, 1, 1))  # naive
    with pytest.raises(ValueError):
        Cp56Time(datetime(2100, 1, 1, tzinfo=UTC))
    with pytest.raises(AsduError):
        decode_cp56(H("00 00 00 00 00 0D 18"))  # month 13, day 0
    with pytest.raises(AsduError):
        decode_cp56(H("00 00 00 00"))


# -- stream decoder ----------------------------------------------------------------------


def _stream() -> tuple[bytes, list[object]]:
    frames: list[object] = [
        UFrame(UFunction.STARTDT_ACT),
        IFrame(0, 0, encode_asdu(Asdu(TypeId.C_IC_NA_1, Cot.ACTIVATION, 1, (InfoObject(0, Interrogation()),)))),
        SFrame(7),
        IFrame(
            1, 7, encode_asdu(Asdu(TypeId.M_ME_TF_1, Cot.SPONTANEOUS, 1, (InfoObject(1001, FloatInfo(1.0), T_2024),)))
        ),
        UFrame(UFunction.TESTFR_CON),
    ]
    return b"".join(encode_frame(f) for f in frames), frames  # type: ignore[arg-type]


def test_stream_decoder_handles_concatenated_frames() -> None:
    data, frames = _stream()
    assert list(FrameDecoder().feed(data)) == frames


def test_stream_decoder_handles_every_split_point() -> None:
    data, frames = _stream()
    for cut in range(len(data) + 1):
        d = FrameDecoder()
        got = list(d.feed(data[:cut])) + list(d.feed(data[cut:]))
        assert got == frames
        assert d.buffered == 0


def test_stream_decoder_byte_by_byte() -> None:
    data, frames = _stream()
    d = FrameDecoder()
    got = [f for i in range(len(data)) for f in d.feed(data[i : i + 1])]
    assert got == frames


def test_stream_decoder_keeps_a_partial_frame() -> None:
    d = FrameDecoder()
    assert list(d.feed(H("68 04 07 00"))) == []
    assert d.buffered == 4
    assert list(d.feed(H("00 00 68"))) == [UFrame(UFunction.STARTDT_ACT)]
    assert d.buffered == 1


def test_stream_decoder_yields_valid_frames_before_garbage() -> None:
    d = FrameDecoder()
    it = d.feed(H("68 04 43 00 00 00 55 68 04 43 00 00 00"))
    assert next(it) == UFrame(UFunction.TESTFR_ACT)
    with pytest.raises(FrameError, match="start octet"):
        next(it)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        ("16 04 07 00 00 00", "start octet"),
        ("68 03 07 00 00", "length"),
        ("68 FE" + " 00" * 254, "length"),
        ("68 FF" + " 00" * 255, "length"),
        ("68 04 00 00 00 00", "without ASDU"),
        ("68 05 07 00 00 00 00", "length 5"),
        ("68 04 0F 00 00 00", "unknown U-frame"),
        ("68 04 07 00 01 00", "U-frame control"),
        ("68 04 01 01 00 00", "S-frame control"),
        ("68 05 00 00 01 00 01", "I-frame control"),
    ],
)
def test_stream_decoder_rejects_garbage(wire: str, reason: str) -> None:
    with pytest.raises(FrameError, match=reason):
        list(FrameDecoder().feed(H(wire)))


def test_largest_apdu_is_accepted() -> None:
    wire = H("68 FD 00 00 00 00") + bytes(249)
    (frame,) = FrameDecoder().feed(wire)
    assert isinstance(frame, IFrame) and len(frame.asdu) == 249
    with pytest.raises(ValueError):
        encode_frame(IFrame(0, 0, bytes(250)))
