"""Inputs the fuzzers found (bench/fuzz.py, docs/fuzzing.md), each now a typed rejection.

Every test is one crashing input, minimised by hand, fed to the parser directly: the parser
must raise its documented error (AsduError, FrameError, AxdrError, SclError ...) or answer
as the protocol says, never IndexError, ValueError from deep inside, LookupError or
RecursionError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import LabConfig
from gateway.iedsim.dlms.axdr import MAX_DEPTH, AxdrError, decode, from_cosem_datetime
from gateway.iedsim.iec61850.scl import SclError, load_scl
from gateway.protocols.iec104.codec import (
    MAX_APDU_LENGTH,
    AsduError,
    FrameDecoder,
    FrameError,
    IFrame,
    decode_asdu,
    decode_cp56,
    decode_monitor,
    encode_frame,
)

H = bytes.fromhex

# -- IEC 104 ---------------------------------------------------------------------------------

# M_SP_TB_1, one object, CP56Time2a with the year octet 0x69 (2105): a valid datetime, but
# outside the 2000..2099 that Cp56Time accepts. decode_asdu raised its plain ValueError.
YEAR_105 = H("1E 01 03 00 01 00 01 00 00 01 00 00 00 00 01 01 69")


def test_cp56_year_past_2099_is_an_asdu_error() -> None:
    with pytest.raises(AsduError, match="CP56Time2a"):
        decode_cp56(YEAR_105[-7:])
    with pytest.raises(AsduError, match="CP56Time2a"):
        decode_asdu(YEAR_105)
    with pytest.raises(AsduError):  # the bulk decoder refused it already; both agree now
        decode_monitor(YEAR_105)


def test_apdu_length_octet_254_is_refused_by_feed_batch_as_by_feed() -> None:
    """feed_batch waited for 254 octets and returned an I-frame with a 252-octet ASDU
    (the standard's APDU is at most 253 octets); feed refused the length octet."""
    stream = encode_frame(IFrame(0, 0, b"\x01\x01\x03\x00\x01\x00\x01\x00\x00\x01")) + b"\x68\xfe" + bytes(254)
    frames, error = FrameDecoder().feed_batch(stream)
    assert len(frames) == 1 and isinstance(error, FrameError)
    assert f"outside 4..{MAX_APDU_LENGTH}" in str(error)
    with pytest.raises(FrameError, match="length octet 254"):
        list(FrameDecoder().feed(stream))


def test_simulator_answers_a_clock_sync_of_year_2105_without_an_exception() -> None:
    """The outstation's session caught only AsduError around decode_asdu: the ValueError of
    a C_CS_NA_1 dated 2105 came out of data_received."""
    from gateway.bench.fuzz_targets import TARGETS

    clock_sync = H("67 01 06 00 01 00 00 00 00 00 00 00 00 01 01 69")
    with TARGETS["iec104-sim"].make() as one:
        one(b"\x01" + bytes([len(clock_sync)]) + clock_sync)  # raises on a contract breach


# -- DLMS (meter simulator) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x03", id="boolean-without-octet"),
        pytest.param(b"\x16", id="enum-without-octet"),
        pytest.param(b"\x02\x02\x11\x05\x03", id="boolean-last-in-structure"),
        pytest.param(b"\x01\x01" * (MAX_DEPTH + 1) + b"\x00", id="nested-arrays"),
        pytest.param(b"\x01\x01" * 2000 + b"\x00", id="nested-past-recursion-limit"),
    ],
)
def test_axdr_truncated_or_nested_data_is_an_axdr_error(data: bytes) -> None:
    with pytest.raises(AxdrError):
        decode(data)


def test_axdr_nesting_up_to_the_limit_decodes() -> None:
    value, pos = decode(b"\x01\x01" * MAX_DEPTH + b"\x00")
    assert pos == 2 * MAX_DEPTH + 1
    for _ in range(MAX_DEPTH):
        assert isinstance(value, list) and len(value) == 1
        value = value[0]
    assert value is None


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(H("07EA 00 01 FF 00 00 00 00 0000 00"), id="month-0"),
        pytest.param(H("07EA 02 1E FF 00 00 00 00 0000 00"), id="30-february"),
        pytest.param(H("0000 01 01 FF 00 00 00 00 0000 00"), id="year-0"),
    ],
)
def test_cosem_date_that_does_not_exist_is_an_axdr_error(raw: bytes) -> None:
    with pytest.raises(AxdrError, match="invalid COSEM date-time"):
        from_cosem_datetime(raw)


def _dlms_meter(tmp_path: Path) -> object:
    from gateway.config import load_config
    from gateway.iedsim.dlms.server import DlmsMeter

    lab = tmp_path / "lab.yaml"
    lab.write_text(
        "lab: {name: t}\n"
        "devices:\n"
        "  meter1: {protocol: dlms, host: 127.0.0.1, port: 4059,\n"
        "           dlms: {load_profile: {capture_period_s: 900, read_period_s: 900, depth: 10}}}\n"
        "points:\n"
        "  - {name: e, device: meter1, quantity: active_energy, unit: kWh, address: {obis: 1.0.1.8.0.255}}\n",
        encoding="utf-8",
    )
    cfg: LabConfig = load_config(lab)
    return DlmsMeter(cfg, "meter1", port=0, seed=1)


def test_profile_read_with_a_nonexistent_from_date_is_refused_with_a_data_access_result(tmp_path: Path) -> None:
    from gateway.iedsim.dlms.meter import DAR_OTHER, Association

    meter = _dlms_meter(tmp_path)
    app = meter.app  # type: ignore[attr-defined]
    assoc = Association(16)
    assoc.associated = assoc.authenticated = True
    bad_from = H("07EA 02 1E FF 00 00 00 00 0000 00")  # 30 February 2026
    clock_column = H("0204 120008 09060000010000ff 0f02 120000")
    params = H("0204") + clock_column + b"\x09\x0c" + bad_from + b"\x09\x0c" + bad_from + b"\x01\x00"
    get = H("c001c1 0007 0100630100ff 02 01 01") + params
    reply = app.handle(assoc, get)
    assert reply == bytes([0xC4, 0x01, 0xC1, 0x01, DAR_OTHER])


def _associated(tmp_path: Path) -> tuple[object, object]:
    from gateway.iedsim.dlms.meter import Association

    app = _dlms_meter(tmp_path).app  # type: ignore[attr-defined]
    assoc = Association(16)
    assoc.associated = assoc.authenticated = True
    return app, assoc


@pytest.mark.parametrize(
    ("apdu", "reason"),
    [
        pytest.param(H("c001c100030100200700ff0201"), "selective access without selector", id="get-selector-missing"),
        pytest.param(H("c301c1000f0000280000"), "ACTION request too short", id="action-short"),
        pytest.param(H("c001c100070100630100ff020101 02 02 09 84"), "bad length", id="selective-access-bad-length"),
    ],
)
def test_meter_refuses_truncated_requests_as_protocol_violations(tmp_path: Path, apdu: bytes, reason: str) -> None:
    """IndexError (apdu[13], apdu[11]) came out of _get/_action for these."""
    from gateway.iedsim.dlms.meter import ProtocolViolation

    app, assoc = _associated(tmp_path)
    with pytest.raises(ProtocolViolation, match=reason):
        app.handle(assoc, apdu)  # type: ignore[attr-defined]


def test_aarq_with_a_bad_length_inside_a_field_is_a_protocol_violation(tmp_path: Path) -> None:
    """read_length on the AARQ's authentication value raised AxdrError past _serve."""
    from gateway.iedsim.dlms.meter import Association, ProtocolViolation

    app = _dlms_meter(tmp_path).app  # type: ignore[attr-defined]
    aarq = H("60 0a ac 03 80 85 00 be 03 04 01 00")  # auth value 80 85: a 5-octet length
    with pytest.raises(ProtocolViolation, match="bad length"):
        app.handle(Association(16), aarq)


def test_aarq_with_an_empty_mechanism_name_is_taken_as_no_mechanism(tmp_path: Path) -> None:
    """``fields[0x8B][-1]`` of an empty mechanism name was an IndexError."""
    from gateway.iedsim.dlms.meter import Association

    app = _dlms_meter(tmp_path).app  # type: ignore[attr-defined]
    aarq = H("60 1a a1 09 06 07 60 85 74 05 08 01 01 8b 00 be 0a 04 08 01 00 00 00 06 5f 1f 04")
    with pytest.raises(Exception, match="initiate"):  # too short an initiate: refused, after the mechanism
        app.handle(Association(16), aarq)


def test_profile_read_by_entry_with_non_integer_bounds_is_refused(tmp_path: Path) -> None:
    """``int(params.items[0])`` of an octet string was a ValueError/TypeError."""
    from gateway.iedsim.dlms.meter import DAR_OTHER

    app, assoc = _associated(tmp_path)
    get = H("c001c1 0007 0100630100ff 02 01 02 0202 0903414243 00")
    assert app.handle(assoc, get) == bytes([0xC4, 0x01, 0xC1, 0x01, DAR_OTHER])  # type: ignore[attr-defined]


def test_hls_aarq_with_a_calling_title_not_of_8_octets_is_refused(tmp_path: Path) -> None:
    """The calling AP title is the first part of the GCM nonce (title + invocation counter):
    a 1-octet title was accepted, and cryptography's ValueError ("Nonce must be between 8
    and 128 bytes") came out of the next ciphered GET. Found by the 10-minute reference run."""
    import os

    from gateway.config import load_config
    from gateway.iedsim.dlms.meter import DIAG_CALLING_AP_TITLE_NOT_RECOGNISED, Association
    from gateway.iedsim.dlms.server import DlmsMeter

    lab = tmp_path / "lab.yaml"
    keys = f"block_cipher_key: {os.urandom(16).hex()}, authentication_key: {os.urandom(16).hex()}"
    lab.write_text(
        "lab: {name: t}\n"
        "devices:\n"
        f"  meter1: {{protocol: dlms, host: 127.0.0.1, port: 4059, dlms: {{security: high_gmac, {keys}}}}}\n"
        "points:\n"
        "  - {name: v, device: meter1, quantity: voltage, unit: V, address: {obis: 1.0.32.7.0.255}}\n",
        encoding="utf-8",
    )
    app = DlmsMeter(load_config(lab), "meter1", port=0, seed=1).app
    body = (
        H("a109060760857405080103")
        + H("a603 0401 4d")  # calling AP title: one octet
        + H("8a020780 8b0760857405080205 ac128010")
        + bytes(16)
        + H("be10040e01000000065f1f0400401e5dffff")
    )
    aare = app.handle(Association(1), bytes([0x60, len(body)]) + body)
    assert aare is not None and aare[0] == 0x61
    assert H("a203020101") in aare  # result: rejected-permanent
    assert bytes([0xA3, 0x05, 0xA1, 0x03, 0x02, 0x01, DIAG_CALLING_AP_TITLE_NOT_RECOGNISED]) in aare
    assert app.counters["associations_refused"] == 1


# -- IEC 61850 SCL --------------------------------------------------------------------------

_SCL = (
    '<?xml version="1.0" encoding="{enc}"?><SCL xmlns="http://www.iec.ch/61850/2003/SCL"><IED name="X"/>'
    '<DataTypeTemplates><EnumType id="E"><EnumVal ord="{ord}">on</EnumVal></EnumType></DataTypeTemplates></SCL>'
)


@pytest.mark.parametrize(
    ("enc", "reason"),
    [pytest.param("UTFS8", "unknown encoding", id="unknown"), pytest.param("UTF-7", "cannot decode", id="multi-byte")],
)
def test_scl_in_an_encoding_expat_cannot_read_is_an_scl_error(tmp_path: Path, enc: str, reason: str) -> None:
    path = tmp_path / "x.icd"
    path.write_bytes(_SCL.format(enc=enc, ord="1").encode("ascii"))
    with pytest.raises(SclError, match=reason) as err:
        load_scl(path)
    assert str(path) in str(err.value)


def test_scl_enum_value_with_a_non_integer_ord_is_an_scl_error(tmp_path: Path) -> None:
    path = tmp_path / "x.icd"
    path.write_bytes(_SCL.format(enc="UTF-8", ord="T").encode("ascii"))
    with pytest.raises(SclError, match="ord='T' is not an integer") as err:
        load_scl(path)
    assert err.value.line == 1




def test_sq1_asdu_whose_addresses_run_past_24_bits_is_an_asdu_error() -> None:
    """M_SP_NA_1, SQ=1, 3 objects from ioa 0xFFFFFF: decode_asdu made ioas 16777216 and
    16777217, which encode_asdu (rightly) refuses."""
    raw = H("01 83 03 00 01 00 FF FF FF 01 00 01")
    with pytest.raises(AsduError, match="runs past ioa 16777215"):
        decode_asdu(raw)
    with pytest.raises(AsduError, match="runs past"):
        decode_monitor(raw)
    assert [o.ioa for o in decode_asdu(H("01 82 03 00 01 00 FE FF FF 01 00")).objects] == [0xFFFFFE, 0xFFFFFF]


# -- files that never end (found by hand while writing the config target's contract) -------


def test_lab_file_extending_dev_zero_is_a_config_error_not_a_hang(tmp_path: Path) -> None:
    from gateway.config import load_config
    from gateway.errors import ConfigError

    lab = tmp_path / "lab.yaml"
    lab.write_text("extends: /dev/zero\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(lab)


def test_lab_file_that_is_a_fifo_is_a_config_error_not_a_hang(tmp_path: Path) -> None:
    import os

    from gateway.config import load_config
    from gateway.errors import ConfigError

    fifo = tmp_path / "lab.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_oversized_lab_file_is_refused_before_parsing(tmp_path: Path) -> None:
    from gateway.config import MAX_CONFIG_BYTES, load_config
    from gateway.errors import ConfigError

    lab = tmp_path / "lab.yaml"
    lab.write_bytes(b"# " + b"x" * MAX_CONFIG_BYTES + b"\n")
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        load_config(lab)


def test_scl_file_that_never_ends_is_an_scl_error() -> None:
    with pytest.raises(SclError, match="not a regular file"):
        load_scl("/dev/zero")


@pytest.mark.parametrize(
    ("text", "kind", "line"),
    [
        pytest.param("lab: {name: x}\ndevices: {[1, 2]: {protocol: iec104}}\n", "list", 2, id="flow-list-key"),
        pytest.param("lab:\n  ? {a: 1}\n  : x\n", "mapping", 2, id="complex-mapping-key"),
    ],
)
def test_lab_file_with_a_collection_as_key_is_a_config_error(tmp_path: Path, text: str, kind: str, line: int) -> None:
    """The composer's walk used the key node's value as a dict key: a list there was a
    TypeError (unhashable). Found by the config target's 10-minute run."""
    from gateway.config import load_config
    from gateway.errors import ConfigError

    lab = tmp_path / "lab.yaml"
    lab.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"a key must be text, not a {kind}") as err:
        load_config(lab)
    assert err.value.issues[0].line == line
