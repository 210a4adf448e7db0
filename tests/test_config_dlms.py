"""DLMS/COSEM parts of the lab config: addresses, association settings, secrets from the environment."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import DlmsAddress, load_config
from gateway.errors import ConfigError

METER = """\
lab:
  name: meterlab
devices:
  meter1:
    protocol: dlms
    host: 127.0.0.1
    port: 4059
    dlms:
      framing: hdlc
      security: low
      password_env: MGMS_TEST_METER_PW
      poll_period_s: 5
      load_profile: {obis: 1.0.99.1.0.255, capture_period_s: 900, read_period_s: 60}
points:
  - {name: meter.voltage.l1, device: meter1, quantity: voltage, unit: V, phase: L1,
     address: {obis: 1.0.32.7.0.255, class_id: 3, attribute: 2}}
  - {name: meter.energy, device: meter1, quantity: active_energy, unit: kWh,
     address: {obis: 1.0.1.8.0.255, class_id: 3}}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "meter.yaml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def issues_of(path: Path) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as err:
        load_config(path)
    return [(i.key, i.reason) for i in err.value.issues]


def test_meter_config_loads_with_dlms_addresses(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, METER))
    dev = cfg.devices["meter1"]
    assert dev.dlms.framing == "hdlc" and dev.dlms.security == "low"
    assert dev.dlms.client_sap == 17, "low security defaults to the reading client"
    assert dev.dlms.load_profile is not None and dev.dlms.load_profile.read_period_s == 60
    addr = cfg.point("meter.voltage.l1").address
    assert isinstance(addr, DlmsAddress)
    assert (addr.obis, addr.class_id, addr.attribute) == ("1.0.32.7.0.255", 3, 2)
    assert addr.kind == "measured" and not addr.is_control
    assert addr.key == ("1.0.32.7.0.255", 2) and "1.0.32.7.0.255" in addr.describe()


def test_password_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dlms = load_config(write(tmp_path, METER)).devices["meter1"].dlms
    monkeypatch.delenv("MGMS_TEST_METER_PW", raising=False)
    with pytest.raises(LookupError, match="MGMS_TEST_METER_PW"):
        dlms.secret("password")
    monkeypatch.setenv("MGMS_TEST_METER_PW", "s3cret")
    assert dlms.secret("password") == "s3cret"


@pytest.mark.parametrize(
    ("old", "new", "key", "reason"),
    [
        (
            "1.0.32.7.0.255, class_id: 3, attribute: 2",
            "1.0.32.7.0.256, class_id: 3, attribute: 2",
            "points[0](meter.voltage.l1).address.obis",
            "every group must be 0..255",
        ),
        (
            "1.0.32.7.0.255, class_id: 3, attribute: 2",
            "1.0.32.7.0.255, class_id: 7, attribute: 2",
            "points[0](meter.voltage.l1).address.class_id",
            "not supported",
        ),
        (
            "obis: 1.0.1.8.0.255, class_id: 3",
            "obis: 1.0.32.7.0.255, class_id: 3",
            "points[1](meter.energy).address.obis",
            "duplicate address",
        ),
        ("password_env: MGMS_TEST_METER_PW", "poll_period_s: 1", "devices.meter1.dlms", "needs password"),
        ("security: low", "security: high_gmac", "devices.meter1.dlms", "needs block_cipher_key"),
        ("framing: hdlc", "framing: serial", "devices.meter1.dlms.framing", "'wrapper' or 'hdlc'"),
    ],
)
def test_bad_meter_configs_name_the_key(tmp_path: Path, old: str, new: str, key: str, reason: str) -> None:
    assert old in METER
    found = issues_of(write(tmp_path, METER.replace(old, new, 1)))
    assert any(k == key and reason in r for k, r in found), found


def test_hls_keys_are_checked(tmp_path: Path) -> None:
    text = METER.replace(
        "security: low\n      password_env: MGMS_TEST_METER_PW",
        "security: high_gmac\n      block_cipher_key: 000102030405060708090A0B0C0D0E0F\n"
        "      authentication_key: D0D1D2D3",
    )
    found = issues_of(write(tmp_path, text))
    assert any(k == "devices.meter1.dlms.authentication_key" and "16 octets" in r for k, r in found), found


def test_dlms_address_on_an_iec104_device_is_refused(tmp_path: Path) -> None:
    text = METER.replace("protocol: dlms", "protocol: iec104")
    found = issues_of(write(tmp_path, text))
    assert any(k.endswith(".address") and "speaks iec104" in r for k, r in found), found
