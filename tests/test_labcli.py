"""``mgms pki``, ``mgms peers add``, ``mgms broker config``, ``iedsim all`` and the simulators' ``help``.

The end-to-end use of these (a TLS broker, HTTPS, a settlement) is the README path in
hil_tests/test_readme_path.py; here each command's own rules: what it writes, what it refuses.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.cli import main
from gateway.iedsim.control import LineControlServer
from gateway.iedsim.iec104.server import ControlChannel
from gateway.iedsim.iec61850.control import MmsControlChannel
from gateway.iedsim.pki import make_lab_pki
from gateway.semantic.security import write_key_pair
from gateway.services import free_port

pytestmark = pytest.mark.timeout(30)

LAB = Path(__file__).resolve().parents[1] / "lab_configs"


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_make_lab_pki_takes_a_str(tmp_path: Path) -> None:
    pki = make_lab_pki(str(tmp_path / "pki"))  # as docs/configuration.md shows it
    assert pki.ca == tmp_path / "pki" / "ca.crt" and pki.server.cert.exists()


def test_pki_init_then_issue_server_and_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "init", "--dir", d]) == 0
    assert stat.S_IMODE((tmp_path / "pki" / "ca.key").stat().st_mode) == 0o600
    assert main(["pki", "issue", "broker", "--host", "127.0.0.1", "--host", "localhost", "--dir", d]) == 0
    assert main(["pki", "issue", "mgms", "--cn", "mgms-multipower", "--dir", d]) == 0
    ca = cert(tmp_path / "pki" / "ca.crt")
    broker, client = cert(tmp_path / "pki" / "broker.crt"), cert(tmp_path / "pki" / "mgms.crt")
    for leaf in (broker, client):
        leaf.verify_directly_issued_by(ca)
    san = broker.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = set(broker.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert set(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.CLIENT_AUTH
    }
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mgms-multipower"
    assert stat.S_IMODE((tmp_path / "pki" / "mgms.key").stat().st_mode) == 0o600


def test_pki_refuses_what_would_lose_certificates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "pki")
    assert main(["pki", "issue", "ams", "--dir", d]) == 2
    assert "run `mgms pki init --dir" in capsys.readouterr().err
    assert main(["pki", "init", "--dir", d]) == 0
    before = (tmp_path / "pki" / "ca.crt").read_bytes()
    assert main(["pki", "init", "--dir", d]) == 2  # a second CA would orphan every certificate issued
    assert (tmp_path / "pki" / "ca.crt").read_bytes() == before
    assert main(["pki", "issue", "ams", "--dir", d]) == 0
    assert main(["pki", "issue", "ams", "--dir", d]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["pki", "issue", "ams", "--dir", d, "--force"]) == 0


def test_peers_add_trusts_a_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_key_pair("ams", tmp_path / "ams")
    peers = tmp_path / "mgms" / "peers"
    assert main(["peers", "add", str(tmp_path / "ams" / "ams.pub"), "--peers-dir", str(peers)]) == 0
    assert (peers / "ams.pub").read_bytes() == (tmp_path / "ams" / "ams.pub").read_bytes()
    assert main(["peers", "add", str(tmp_path / "ams" / "ams.pub"), "--peers-dir", str(peers)]) == 0  # same key: fine
    write_key_pair("ams", tmp_path / "other")  # someone else calling itself ams
    assert main(["peers", "add", str(tmp_path / "other" / "ams.pub"), "--peers-dir", str(peers)]) == 2
    assert "different key for ams" in capsys.readouterr().err
    assert main(["peers", "add", str(tmp_path / "ams" / "ams.key"), "--peers-dir", str(peers)]) == 2
    junk = tmp_path / "junk.pub"
    junk.write_text("not a key\n")
    assert main(["peers", "add", str(junk), "--peers-dir", str(peers)]) == 2
    assert sorted(p.name for p in peers.iterdir()) == ["ams.pub"]


def test_keys_make_the_peers_dir_the_configs_name(tmp_path: Path) -> None:
    assert main(["keys", "ams", "-o", str(tmp_path / "keys" / "ams")]) == 0
    assert (tmp_path / "keys" / "ams" / "peers").is_dir()


@pytest.fixture
def dso_lab(tmp_path: Path) -> Path:
    """The shipped DSO sim profile and AMS config with their keys and PKI made by the CLI."""
    import shutil

    d = tmp_path / "lab"
    shutil.copytree(LAB, d, ignore=shutil.ignore_patterns("keys", "pki", "broker"))
    pki = str(d / "pki")
    for argv in (
        ["pki", "init", "--dir", pki],
        ["pki", "issue", "broker", "--host", "127.0.0.1", "--dir", pki],
        ["pki", "issue", "ams", "--host", "127.0.0.1", "--dir", pki],
        ["pki", "issue", "mgms", "--cn", "mgms-multipower", "--dir", pki],
        ["keys", "mgms-multipower", "-o", str(d / "keys" / "mgms")],
        ["keys", "ams", "-o", str(d / "keys" / "ams")],
    ):
        assert main(argv) == 0, argv
    return d


def test_broker_config_writes_users_acls_and_secrets(
    dso_lab: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AMS_MQTT_PASSWORD", "given-by-the-operator")
    monkeypatch.delenv("MGMS_MQTT_PASSWORD", raising=False)
    out = dso_lab / "broker"
    argv = ["broker", "config", "-c", str(dso_lab / "multipower-dso-sim.yaml"), "-c", str(dso_lab / "ams.yaml")]
    assert main([*argv, "-o", str(out)]) == 0
    conf = (out / "mosquitto.conf").read_text()
    assert "listener 8883 127.0.0.1" in conf and "allow_anonymous false" in conf
    assert f"certfile {dso_lab / 'pki' / 'broker.crt'}" in conf
    assert (out / "acl").read_text() == (
        "user mgms-multipower\n"
        "topic write heila/v1/to/+/from/mgms-multipower/#\n"
        "topic read heila/v1/to/mgms-multipower/#\n"
        "topic write heila/v1/clock/to/+/from/mgms-multipower/#\n"  # mgms bench --lab --clock-mqtt
        "topic read heila/v1/clock/to/mgms-multipower/#\n\n"
        "user ams\n"
        "topic write heila/v1/to/+/from/ams/#\n"
        "topic read heila/v1/to/ams/#\n"
        "topic write heila/v1/clock/to/+/from/ams/#\n"
        "topic read heila/v1/clock/to/ams/#\n\n"
    )
    secrets_env = (out / "secrets.env").read_text()
    assert stat.S_IMODE((out / "secrets.env").stat().st_mode) == 0o600
    assert "export AMS_MQTT_PASSWORD=given-by-the-operator\n" in secrets_env  # a set variable is kept
    made = re.search(r"^export MGMS_MQTT_PASSWORD=(\S{20,})$", secrets_env, re.M)
    assert made is not None  # an unset one gets a new random password
    hashed = (out / "passwords").read_text()
    assert stat.S_IMODE((out / "passwords").stat().st_mode) == 0o600
    assert hashed.startswith("mgms-multipower:$") and made.group(1) not in hashed  # mosquitto_passwd hashed it


def test_broker_config_refuses_missing_certificate_and_two_brokers(
    dso_lab: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lab, ams = str(dso_lab / "multipower-dso-sim.yaml"), str(dso_lab / "ams.yaml")
    (dso_lab / "pki" / "broker.key").unlink()
    assert main(["broker", "config", "-c", lab, "-c", ams, "-o", str(dso_lab / "b")]) == 2
    assert "mgms pki issue broker" in capsys.readouterr().err
    text = (dso_lab / "ams.yaml").read_text().replace("port: 8883", "port: 8884")
    (dso_lab / "ams.yaml").write_text(text)
    assert main(["broker", "config", "-c", lab, "-c", ams, "-o", str(dso_lab / "b")]) == 2
    assert "different brokers" in capsys.readouterr().err


# -- the control channels' help ---------------------------------------------------------------


@pytest.mark.parametrize("channel", [ControlChannel, MmsControlChannel])
def test_help_lists_every_command_and_describes_each(channel: type[LineControlServer]) -> None:
    listed = channel.help_text(["help"])
    assert listed.startswith("ok commands: ")
    usages = listed.removeprefix("ok commands: ").split(" | ")
    assert usages == [u for u, _ in (*channel.COMMANDS, *channel.BUILTIN)]
    for usage in usages:
        name = usage.split()[0]
        assert channel.help_text(["help", name]).startswith(f"ok {usage}: ")
    assert channel.help_text(["help", "nonsense"]).startswith("err ")
    # the table and the code that runs the commands name the same commands (no drift)
    handled = set(re.findall(r'cmd == "([\w-]+)"', inspect.getsource(channel)))
    assert handled == {u.split()[0] for u, _ in channel.COMMANDS}


# -- iedsim all ---------------------------------------------------------------------------


def free_port_profile(tmp_path: Path) -> Path:
    """The shipped simulator lab with every simulator on a free port."""
    p = tmp_path / "lab.yaml"
    p.write_text(
        f"extends: {LAB / 'multipower-sim.yaml'}\n"
        "devices:\n"
        + "".join(f"  {dev}:\n    port: {free_port()}\n" for dev in ("ref615", "ref615_mms", "meter1"))
    )
    return p


async def ask(port: int, line: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(line.encode() + b"\n")
        async with asyncio.timeout(5):
            return (await reader.readline()).decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def test_iedsim_all_starts_every_device_and_stops_on_sigint(tmp_path: Path) -> None:
    lab = free_port_profile(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.iedsim.cli", "--log-level", "WARNING", "all", "--config", str(lab),
        "--control-port-base", "0", "--duration-s", "25",
        stdout=asyncio.subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(20):
            while not (lines and lines[-1].startswith("all ")):
                line = (await proc.stdout.readline()).decode()
                assert line, f"iedsim all exited: {lines}"
                lines.append(line.strip())
        assert lines[-1] == "all 3 simulators ready: ref615, ref615_mms, meter1"
        assert any(x.startswith("iec104 simulator ref615 listening") for x in lines)
        assert any(x.startswith("dlms simulator meter1 listening") for x in lines)
        controls = {
            m.group(1): int(m.group(2))
            for x in lines
            if (m := re.match(r"control channel of (\S+) listening on 127\.0\.0\.1:(\d+)", x))
        }
        assert set(controls) == {"ref615", "ref615_mms"}  # the meter has no control channel
        assert (await ask(controls["ref615"], "help")).startswith("ok commands: stall | resume")
        assert (await ask(controls["ref615_mms"], "help interlock")).startswith("ok interlock on|off: ")
        assert (await ask(controls["ref615"], "travel 0.01")) == "ok"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            code = await proc.wait()
    assert code == 0


def test_iedsim_all_refuses_a_config_without_simulated_devices(tmp_path: Path) -> None:
    lab = tmp_path / "empty.yaml"
    lab.write_text("lab: {name: empty}\ndevices: {}\npoints: []\nredis: {url: null}\n")
    r = subprocess.run(
        [sys.executable, "-m", "gateway.iedsim.cli", "all", "--config", str(lab)],
        capture_output=True, text=True, timeout=20,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr


def test_broker_config_names_a_config_without_messaging(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["broker", "config", "-c", str(LAB / "multipower-sim.yaml"), "-o", str(tmp_path / "b")]) == 2
    assert "messaging: missing" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_peers_add_finds_the_peers_dir_in_a_lab_or_an_ams_config(dso_lab: Path) -> None:
    keys = dso_lab / "keys"
    assert main(["peers", "add", str(keys / "ams" / "ams.pub"), "-c", str(dso_lab / "multipower-dso-sim.yaml")]) == 0
    assert main(["peers", "add", str(keys / "mgms" / "mgms-multipower.pub"), "-c", str(dso_lab / "ams.yaml")]) == 0
    assert (keys / "mgms" / "peers" / "ams.pub").exists()
    assert (keys / "ams" / "peers" / "mgms-multipower.pub").exists()
