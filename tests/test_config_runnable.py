"""``check-config`` finds everything ``run`` would refuse, all at once; ``run`` refuses the same
configs before it starts anything (no embedded Redis), with exit 2 and no traceback.

One test per thing the run paths read or check at start (gateway/cli.py ``_run``,
gateway/runtime.py, the adapters, gateway/messaging.py and the transports, ams/cli.py):
hosts the protocol libraries refuse, Redis URLs, secrets from the environment, PEM files,
private and public key files, the peers a config says it talks to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ams.config import load_ams_config
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.iedsim.pki import make_lab_pki
from gateway.preflight import load_runnable_config
from gateway.semantic import write_key_pair

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]

RELAY = """\
lab:
  name: testlab
devices:
  relay:
    protocol: iec104
    host: {host}
    port: 2404
{extra}points:
  - name: u1
    device: relay
    quantity: voltage
    unit: V
    address: {{ioa: 1001, type: M_ME_TF_1}}
"""
HOST_LINE = 6

METER = """\
lab:
  name: meterlab
devices:
  meter:
    protocol: dlms
    host: 127.0.0.1
    port: 4059
    dlms:
      security: high_gmac
      block_cipher_key_env: TEST_METER_EK
      authentication_key_env: TEST_METER_AK
points:
  - name: e
    device: meter
    quantity: active_energy
    unit: kWh
    address: {obis: 1.0.1.8.0.255}
"""


def issues(path: Path, *, runnable: bool = True) -> list[tuple[str, int | None, str]]:
    with pytest.raises(ConfigError) as err:
        load_runnable_config(path) if runnable else load_config(path)
    return [(i.key, i.line, i.reason) for i in err.value.issues]


def relay_lab(tmp_path: Path, host: str, extra: str = "") -> Path:
    p = tmp_path / "lab.yaml"
    p.write_text(RELAY.format(host=host, extra=textwrap.indent(textwrap.dedent(extra), "    ")))
    return p


# ------------------------------------------------------------------------ hosts


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.300", "'127.0.0.300' is not an IPv4 address (four numbers 0..255)"),
        ("127.0.0.1:2404", "'127.0.0.1:2404': no port in host (give it as port: 2404)"),
        ("'[::1]'", "'[::1]': write an IPv6 address without brackets"),
        ("relay_1", "'relay_1' is not an IP address or a host name (letters, digits, '-' and '.'; RFC 1123)"),
        ("''", "empty host: give an IP address or a host name"),
    ],
)
def test_bad_host_is_refused_at_load_with_its_line(tmp_path: Path, host: str, reason: str) -> None:
    # c104 raised "ValueError: IP 127.0.0.300 is invalid!" from `mgms run`, after Redis started
    assert issues(relay_lab(tmp_path, host), runnable=False) == [("devices.relay.host", HOST_LINE, reason)]


@pytest.mark.parametrize("host", ["::1", "relay-1.lab.example", "localhost"])
def test_c104_engine_takes_ipv4_only_the_asyncio_engine_any_host(tmp_path: Path, host: str) -> None:
    assert load_config(relay_lab(tmp_path, host)).devices["relay"].host == host  # asyncio, the default
    c104 = "iec104_engine: c104\n"
    if host == "localhost":  # c104 takes this one name
        assert load_config(relay_lab(tmp_path, host, c104)).devices["relay"].host == host
        return
    ((key, line, reason),) = issues(relay_lab(tmp_path, host, c104), runnable=False)
    assert (key, line) == ("devices.relay.host", HOST_LINE)
    assert "the c104 engine connects to IPv4 addresses only" in reason and "iec104_engine: asyncio" in reason


def test_transport_hosts_are_checked_like_a_device_host(tmp_path: Path) -> None:
    # paho and aiohttp fail on these only when they connect or bind, after Redis started
    keys = tmp_path / "keys"
    write_key_pair("mgms", keys)
    lab = dso_lab(
        tmp_path,
        f"""\
        messaging:
          participant: mgms
          identity_file: {keys / "mgms.key"}
          transports:
            mqtt: {{host: "127.0.0.1:8883", tls: false}}
            https:
              listen_host: lab host
              peers: {{ams: {{url: "https://127.0.0.300:8443", ca_file: ca.crt}}}}
        """,
        flexibility=False,
    )
    assert issues(lab, runnable=False) == [
        ("messaging.transports.mqtt.host", 18, "'127.0.0.1:8883': no port in host (give it as port: 8883)"),
        ("messaging.transports.https.listen_host", 20, "'lab host' is not an IP address or a host name"
         " (letters, digits, '-' and '.'; RFC 1123)"),
        ("messaging.transports.https.peers.ams.url", 21, "'127.0.0.300' is not an IPv4 address (four numbers 0..255)"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("localhost:6379", "'localhost:6379': a Redis URL starts with redis://, rediss:// or unix://"),
        ("redis://127.0.0.1:99999", "'redis://127.0.0.1:99999': Port out of range 0-65535"),
    ],
)
def test_bad_redis_url_is_refused_at_load(tmp_path: Path, url: str, reason: str) -> None:
    # redis-py raised a bare ValueError from `mgms run`
    p = relay_lab(tmp_path, "127.0.0.1")
    p.write_text(p.read_text() + f"redis: {{url: '{url}'}}\n")
    line = p.read_text().count("\n")
    assert issues(p, runnable=False) == [("redis.url", line, reason)]


# ------------------------------------------------------------------------ device secrets and TLS


def test_unset_meter_keys_are_both_named_by_check_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_METER_EK", raising=False)
    monkeypatch.delenv("TEST_METER_AK", raising=False)
    lab = tmp_path / "meter.yaml"
    lab.write_text(METER)
    assert load_config(lab).devices["meter"].dlms.block_cipher_key_env == "TEST_METER_EK"  # watch/command: fine
    assert issues(lab) == [
        ("devices.meter.dlms.block_cipher_key_env", 10, "environment variable TEST_METER_EK is not set"),
        ("devices.meter.dlms.authentication_key_env", 11, "environment variable TEST_METER_AK is not set"),
    ]
    monkeypatch.setenv("TEST_METER_EK", "00" * 16)
    monkeypatch.setenv("TEST_METER_AK", "abc")
    assert issues(lab) == [
        ("devices.meter.dlms.authentication_key_env", 11, "environment variable TEST_METER_AK must be hexadecimal"),
    ]
    monkeypatch.setenv("TEST_METER_AK", "11" * 16)
    assert load_runnable_config(lab).devices["meter"].dlms.secret("authentication_key") == "11" * 16


def test_a_meter_without_the_optional_dlms_package_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # gurux-dlms is an optional extra: `mgms run` died on the adapter's ImportError after Redis
    # started. A unit test: the package is installed here, so its absence is simulated.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gurux_dlms" else real(name, *a))
    monkeypatch.setenv("TEST_METER_EK", "00" * 16)
    monkeypatch.setenv("TEST_METER_AK", "11" * 16)
    lab = tmp_path / "meter.yaml"
    lab.write_text(METER)
    assert issues(lab) == [
        ("devices.meter.protocol", 5, "dlms needs the optional gurux-dlms package: pip install 'mgms-gateway[dlms]'"),
    ]


def test_device_tls_files_that_are_not_pem_are_refused_at_load(tmp_path: Path) -> None:
    pki = make_lab_pki(tmp_path / "pki")
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    tls = f"tls: {{enabled: true, ca_file: {not_pem}, cert_file: {pki.client.cert}, key_file: {pki.server.key}}}\n"
    got = issues(relay_lab(tmp_path, "127.0.0.1", tls), runnable=False)
    assert [(k, line) for k, line, _ in got] == [("devices.relay.tls.ca_file", 8), ("devices.relay.tls.cert_file", 8)]
    assert got[0][2].startswith(f"not a PEM CA certificate: {not_pem}")
    assert "not a usable PEM pair" in got[1][2]  # the client certificate with the server's key


def test_an_encrypted_key_is_named_not_prompted_for(tmp_path: Path) -> None:
    # without a password callback OpenSSL asks for the pass phrase on /dev/tty: check-config
    # (and run) in a terminal waited there for ever
    from cryptography.hazmat.primitives import serialization

    pki = make_lab_pki(tmp_path / "pki")
    key = serialization.load_pem_private_key(Path(pki.client.key).read_bytes(), password=None)
    locked = tmp_path / "locked.key"
    locked.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    tls = f"tls: {{enabled: true, ca_file: {pki.ca}, cert_file: {pki.client.cert}, key_file: {locked}}}\n"
    assert issues(relay_lab(tmp_path, "127.0.0.1", tls), runnable=False) == [
        ("devices.relay.tls.cert_file", 8, f"key {locked} is encrypted: give it unencrypted (mode 0600); no one types a pass phrase"),  # noqa: E501
    ]


def test_iec61850_tls_options_libiec61850_cannot_do_are_refused_at_load(tmp_path: Path) -> None:
    pki = make_lab_pki(tmp_path / "pki")
    lab = tmp_path / "mms.yaml"
    lab.write_text(
        "lab: {name: mms}\n"
        "devices:\n"
        "  ied:\n"
        "    protocol: iec61850\n"
        "    host: 127.0.0.1\n"
        "    port: 10102\n"
        "    ied_name: REF615\n"
        f"    tls: {{enabled: true, ca_file: {pki.ca}, verify: false}}\n"
        "points: []\n"
    )
    assert [(k, line) for k, line, _ in issues(lab, runnable=False)] == [
        ("devices.ied.tls.verify", 8),
        ("devices.ied.tls.check_hostname", 8),
    ]


def ed25519_pair(directory: Path) -> tuple[Path, Path]:
    """A self-signed Ed25519 certificate and key: OpenSSL takes them, mbedtls does not."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.x509.oid import NameOID

    key = Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed25519 gateway")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )  # fmt: skip
    cert_file, key_file = directory / "ed.crt", directory / "ed.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_iec61850_tls_files_mbedtls_cannot_load_are_named_by_check_config(tmp_path: Path) -> None:
    # OpenSSL (the loader's parse) takes an Ed25519 pair; libiec61850's mbedtls refused it when
    # the adapter started, after the embedded Redis
    pki = make_lab_pki(tmp_path / "pki")
    cert, key = ed25519_pair(tmp_path)
    lab = tmp_path / "mms.yaml"
    tls = f"{{enabled: true, ca_file: {pki.ca}, check_hostname: false, cert_file: {cert}, key_file: {key}}}"
    lab.write_text(
        "lab: {name: mms}\n"
        "devices:\n"
        "  ied: {protocol: iec61850, host: 127.0.0.1, port: 10102, ied_name: REF615,\n"
        f"        tls: {tls}}}\n"
        "points: []\n"
    )
    assert load_config(lab).devices["ied"].tls.cert_file == str(cert)
    assert issues(lab) == [
        ("devices.ied.tls.cert_file", 4, f"libiec61850 (mbedtls): cannot load certificate {cert} (PEM expected)"),
    ]
    lab.write_text(lab.read_text().replace(f"cert_file: {cert}, key_file: {key}", f"cert_file: {pki.client.cert},"
                                           f" key_file: {pki.client.key}"))  # fmt: skip
    assert load_runnable_config(lab).devices["ied"].tls.key_file == str(pki.client.key)


# ------------------------------------------------------------------------ messaging


FEEDER = """\
  - {name: p, device: relay, quantity: active_power, unit: kW, address: {ioa: 2001, type: M_ME_NC_1}}
  - {name: brk, device: relay, quantity: breaker_position, unit: "1", address: {ioa: 3001, type: M_DP_NA_1}}
  - {name: brk.cmd, device: relay, quantity: breaker_command, unit: "1", direction: control, status_point: brk,
     address: {ioa: 3002, type: C_DC_NA_1}}
flexibility:
  aggregator: ams
  resources:
    - {name: r, flexibility_type: upward, power_point: p, activate: [{point: brk.cmd, value: open}]}
"""


def dso_lab(tmp_path: Path, messaging: str, flexibility: bool = True) -> Path:
    """The relay lab with, when asked, the feeder points and a flexibility block, then ``messaging``."""
    lab = tmp_path / "dso.yaml"
    text = RELAY.format(host="127.0.0.1", extra="") + (FEEDER if flexibility else "") + textwrap.dedent(messaging)
    lab.write_text(text)
    return lab


def test_private_key_problems_are_named_with_the_identity_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_pair("someone-else", keys)
    (keys / "someone-else.key").chmod(0o644)
    lab = dso_lab(
        tmp_path,
        f"""\
        messaging:
          participant: mgms
          identity_file: {keys / "someone-else.key"}
          transports: {{mqtt: {{tls: false, port: 1883}}}}
        """,
        flexibility=False,
    )
    ((key, line, reason),) = issues(lab)
    assert (key, line) == ("messaging.identity_file", 16)
    assert "accessible by others (mode 644); chmod 600 it" in reason
    (keys / "someone-else.key").chmod(0o600)
    ((key, _, reason),) = issues(lab)
    assert key == "messaging.identity_file" and "is the key of 'someone-else', not of participant 'mgms'" in reason


def test_bad_public_key_and_missing_aggregator_key_are_listed_together(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    write_key_pair("mgms", keys)
    peers = keys / "peers"
    peers.mkdir()
    (peers / "broken.pub").write_text("{}\n")
    lab = dso_lab(
        tmp_path,
        f"""\
        messaging:
          participant: mgms
          identity_file: {keys / "mgms.key"}
          peers_dir: {peers}
          transports: {{mqtt: {{tls: false, port: 1883}}}}
        """,
    )
    got = issues(lab)
    assert [k for k, _, _ in got] == ["messaging.peers_dir", "flexibility.aggregator"]
    assert got[0][2].startswith(f"{peers / 'broken.pub'}: ")
    assert got[1][2].startswith("no public key of 'ams' in messaging.peers_dir")


def test_transport_secrets_and_files_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("TEST_MQTT_PW", "TEST_TOKEN", "TEST_ACCEPT"):
        monkeypatch.delenv(var, raising=False)
    keys = tmp_path / "keys"
    write_key_pair("mgms", keys)
    write_key_pair("ams", tmp_path / "ams")
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("nope\n")
    lab = dso_lab(
        tmp_path,
        f"""\
        messaging:
          participant: mgms
          identity_file: {keys / "mgms.key"}
          peer_files: [{tmp_path / "ams" / "ams.pub"}]
          transports:
            mqtt: {{password_env: TEST_MQTT_PW, ca_file: {not_pem}}}
            https:
              bearer_token_env: TEST_TOKEN
              accept_token_env: {{TEST_ACCEPT: ams}}
              listen_port: 0
              client_auth: token
              server_cert_file: {tmp_path / "gone.crt"}
              server_key_file: {tmp_path / "gone.key"}
              peers: {{ams: {{url: "https://127.0.0.1:8443", ca_file: {tmp_path / "gone-ca.crt"}}}}}
          routes: {{ams: mqtt}}
        """,
    )
    got = [(k, r) for k, _, r in issues(lab)]
    assert got == [
        ("messaging.transports.mqtt.password_env", "environment variable TEST_MQTT_PW is not set"),
        ("messaging.transports.mqtt.ca_file", f"not a PEM CA certificate: {not_pem} (NO_CERTIFICATE_OR_CRL_FOUND)"),
        ("messaging.transports.https.bearer_token_env", "environment variable TEST_TOKEN is not set or empty"),
        ("messaging.transports.https.peers.ams.ca_file", f"file not found: {tmp_path / 'gone-ca.crt'}"),
        ("messaging.transports.https.accept_token_env.TEST_ACCEPT", "environment variable TEST_ACCEPT is not set or empty"),  # noqa: E501
        ("messaging.transports.https.server_cert_file", f"file not found: {tmp_path / 'gone.crt'}"),
        ("messaging.transports.https.server_key_file", f"file not found: {tmp_path / 'gone.key'}"),
    ]


def test_ams_microgrid_without_public_key_is_named(tmp_path: Path) -> None:
    write_key_pair("ams", tmp_path / "keys")
    cfg = tmp_path / "ams.yaml"
    cfg.write_text(
        "messaging:\n"
        "  participant: ams\n"
        f"  identity_file: {tmp_path / 'keys' / 'ams.key'}\n"
        "  transports: {mqtt: {tls: false, port: 1883}}\n"
        "microgrids:\n"
        "  - {participant: mgms-a, location: here}\n"
    )
    assert load_ams_config(cfg).microgrids[0].participant == "mgms-a"  # status/register: fine
    with pytest.raises(ConfigError) as err:
        load_ams_config(cfg, runnable=True)
    ((issue),) = err.value.issues
    assert (issue.key, issue.line) == ("microgrids[0].participant", 6)
    assert issue.reason.startswith("no public key of 'mgms-a'")


# ------------------------------------------------------------------------ one pass


def test_a_field_error_does_not_hide_what_run_would_refuse_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a bad port on one device, an unset key on the meter: one report, not two rounds
    monkeypatch.delenv("TEST_METER_EK", raising=False)
    monkeypatch.setenv("TEST_METER_AK", "11" * 16)
    lab = tmp_path / "lab.yaml"
    lab.write_text(METER.replace("devices:\n", "devices:\n  relay: {protocol: iec104, host: 127.0.0.1, port: 99999}\n"))
    assert [(k, line) for k, line, _ in issues(lab)] == [
        ("devices.relay.port", 4),
        ("devices.meter.dlms.block_cipher_key_env", 11),
    ]


def test_ams_field_error_and_unset_password_in_one_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_AMS_PW", raising=False)
    write_key_pair("ams", tmp_path)
    cfg = tmp_path / "ams.yaml"
    cfg.write_text(
        "messaging:\n"
        "  participant: ams\n"
        f"  identity_file: {tmp_path / 'ams.key'}\n"
        "  transports: {mqtt: {tls: false, password_env: TEST_AMS_PW}}\n"
        "market: {auto_clearing: true}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_ams_config(cfg, runnable=True)
    assert [(i.key, i.line) for i in err.value.issues] == [
        ("market.auto_clearing", 5),
        ("messaging.transports.mqtt.password_env", 4),
    ]


# ------------------------------------------------------------------------ the commands


def run_cli(module: str, *args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TEST_")}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True, text=True, timeout=30, env={**clean, **env, "PYTHONPATH": str(ROOT)}, cwd=cwd,
    )  # fmt: skip


def test_mgms_check_config_and_run_refuse_the_same_problems_before_redis(tmp_path: Path) -> None:
    lab = tmp_path / "lab.yaml"
    text = METER.replace("devices:\n", "devices:\n  relay: {protocol: iec104, host: 127.0.0.1:2404, port: 2404}\n")
    lab.write_text(text)
    data = tmp_path / "data"
    check = run_cli("gateway.cli", "check-config", str(lab), env={}, cwd=tmp_path)
    run = run_cli("gateway.cli", "run", "-c", str(lab), "--data-dir", str(data), env={}, cwd=tmp_path)
    for r in (check, run):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert f"{lab}:4: devices.relay.host: '127.0.0.1:2404': no port in host" in r.stderr
    assert not data.exists()  # no embedded Redis was started (its data dir is made first)
    text = text.replace("host: 127.0.0.1:2404", "host: 127.0.0.1")
    lab.write_text(text)
    check = run_cli("gateway.cli", "check-config", str(lab), env={"TEST_METER_AK": "11" * 16}, cwd=tmp_path)
    run = run_cli("gateway.cli", "run", "-c", str(lab), "--data-dir", str(data), env={"TEST_METER_AK": "11" * 16},
                  cwd=tmp_path)  # fmt: skip
    for r in (check, run):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert f"{lab}:11: devices.meter.dlms.block_cipher_key_env: environment variable TEST_METER_EK is not set" in (
            r.stderr
        )
    assert check.stderr == run.stderr
    assert not data.exists()


def test_ams_check_config_and_run_list_every_problem_before_redis(tmp_path: Path) -> None:
    cfg = tmp_path / "ams.yaml"
    cfg.write_text(
        "messaging:\n"
        "  participant: ams\n"
        "  identity_file: ams.key\n"
        "  peers_dir: peers\n"
        "  transports:\n"
        "    mqtt: {password_env: TEST_AMS_PW, ca_file: pki/ca.crt}\n"
        "microgrids:\n"
        "  - {participant: mgms-a, location: here}\n"
    )
    write_key_pair("ams", tmp_path)
    (tmp_path / "peers").mkdir()
    data = tmp_path / "data"
    check = run_cli("ams.cli", "check-config", "-c", str(cfg), env={}, cwd=tmp_path)
    run = run_cli("ams.cli", "run", "-c", str(cfg), "--data-dir", str(data), env={}, cwd=tmp_path)
    for r in (check, run):
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert "config error (3 issues)" in r.stderr
        assert f"{cfg}:8: microgrids[0].participant: no public key of 'mgms-a'" in r.stderr
        assert f"{cfg}:6: messaging.transports.mqtt.password_env: environment variable TEST_AMS_PW is not set" in (
            r.stderr
        )
        assert f"{cfg}:6: messaging.transports.mqtt.ca_file: file not found: {tmp_path / 'pki' / 'ca.crt'}" in r.stderr
    assert not data.exists()


@pytest.mark.parametrize("module", ["gateway.cli", "ams.cli"])
def test_a_bad_redis_url_argument_is_a_usage_error(tmp_path: Path, module: str) -> None:
    # redis-py's ValueError came out of `run` as a traceback
    r = run_cli(module, "run", "-c", str(tmp_path / "any.yaml"), "--redis-url", "localhost:6379", env={}, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --redis-url: 'localhost:6379': a Redis URL starts with redis://, rediss:// or unix://" in r.stderr


# ------------------------------------------------------------------- redis user


def test_redis_user_and_secret_need_a_url(tmp_path: Path) -> None:
    p = relay_lab(tmp_path, "127.0.0.1")
    p.write_text(p.read_text() + "redis: {user: gateway, password_env: X}\n")
    [(key, _, reason)] = issues(p, runnable=False)
    assert key == "redis" and reason.startswith("user, password_env: only with url")


def test_redis_secret_from_file_or_env_is_checked_by_check_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The secret's variable unset, its file readable by others: named, as run would fail on them."""
    monkeypatch.delenv("TEST_REDIS_SECRET", raising=False)
    p = relay_lab(tmp_path, "127.0.0.1")
    base = p.read_text()
    p.write_text(base + "redis: {url: 'redis://127.0.0.1:6379/0', user: gateway, password_env: TEST_REDIS_SECRET}\n")
    unset = ("redis.password_env", "environment variable TEST_REDIS_SECRET is not set")
    assert [(k, r) for k, _, r in issues(p)] == [unset]
    monkeypatch.setenv("TEST_REDIS_SECRET", "s3cret")
    assert load_runnable_config(p).redis.password() == "s3cret"

    secret = tmp_path / "gw.secret"  # relative to the lab file, as the TLS files are
    secret.write_text("from-file\n")
    secret.chmod(0o644)
    p.write_text(base + "redis: {url: 'redis://127.0.0.1:6379/0', user: gateway, password_file: gw.secret}\n")
    [(key, _, reason)] = issues(p)
    assert key == "redis.password_file" and "readable by others (mode 0644)" in reason
    secret.chmod(0o600)
    cfg = load_runnable_config(p)
    assert cfg.redis.password_file == str(secret) and cfg.redis.password() == "from-file"
    both = "redis: {url: 'redis://127.0.0.1:6379/0', password_env: A, password_file: gw.secret}\n"
    p.write_text(base + both)
    assert [r for _, _, r in issues(p, runnable=False)] == ["give password_file or password_env, not both"]
