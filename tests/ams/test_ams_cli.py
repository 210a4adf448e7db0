"""``ams`` and the DSO lab config: example files validate once their secrets exist; errors
name file, line and key; the state commands work against a Redis."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.iedsim.pki import make_lab_pki
from gateway.semantic import write_key_pair
from gateway.services import RedisServer

pytestmark = pytest.mark.timeout(60)
LAB = Path(__file__).resolve().parents[2] / "lab_configs"


def ams(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ams.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


@pytest.fixture
def lab_dir(tmp_path: Path) -> Path:
    """A copy of lab_configs with the secrets the example configs name made up on the spot."""
    d = tmp_path / "lab"
    shutil.copytree(LAB, d, ignore=shutil.ignore_patterns("keys", "pki"))
    pki = make_lab_pki(d / "pki", client_names=("mgms",))
    shutil.copy(pki.server.cert, d / "pki" / "ams.crt")
    shutil.copy(pki.server.key, d / "pki" / "ams.key")
    shutil.copy(pki.clients["mgms"].cert, d / "pki" / "mgms.crt")
    shutil.copy(pki.clients["mgms"].key, d / "pki" / "mgms.key")
    write_key_pair("ams", d / "keys" / "ams")
    write_key_pair("mgms-multipower", d / "keys" / "mgms")
    (d / "keys" / "ams" / "peers").mkdir()
    (d / "keys" / "mgms" / "peers").mkdir()
    shutil.copy(d / "keys" / "mgms" / "mgms-multipower.pub", d / "keys" / "ams" / "peers")
    shutil.copy(d / "keys" / "ams" / "ams.pub", d / "keys" / "mgms" / "peers")
    return d


def test_example_ams_config_validates_with_its_secrets(lab_dir: Path) -> None:
    r = ams("check-config", "-c", str(lab_dir / "ams.yaml"), env={"AMS_MQTT_PASSWORD": "x"})
    assert r.returncode == 0, r.stderr
    assert "OK - AMS 'ams', transports mqtt, https, 1 microgrid(s)" in r.stdout


def test_example_dso_lab_config_validates_with_its_secrets(lab_dir: Path) -> None:
    cfg = load_config(lab_dir / "multipower-dso.yaml")
    assert cfg.messaging is not None and cfg.flexibility is not None
    assert cfg.messaging.identity_file == str(lab_dir / "keys" / "mgms" / "mgms-multipower.key")
    assert cfg.messaging.transports["mqtt"]["ca_file"] == str(lab_dir / "pki" / "ca.crt")
    secrets = {"MGMS_MQTT_PASSWORD": "x", "MGMS_METER1_EK": "00" * 16, "MGMS_METER1_AK": "11" * 16}
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "check-config", str(lab_dir / "multipower-dso.yaml")],
        capture_output=True, text=True, timeout=30, env={**os.environ, **secrets},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "messaging: participant mgms-multipower, encrypted, transports mqtt, https (ams via mqtt)" in r.stdout
    assert "flexibility: feeder (upward, feeder.p) to ams, every 60 s" in r.stdout


def test_missing_keys_and_bad_values_are_reported_with_lines(tmp_path: Path) -> None:
    bad = tmp_path / "ams.yaml"
    bad.write_text(
        "messaging:\n"
        "  participant: ams\n"
        "  identity_file: nowhere/ams.key\n"
        "  transports:\n"
        "    mqtt: {port: 99999}\n"
        "    carrier_pigeon: {}\n"
    )
    r = ams("check-config", "-c", str(bad))
    assert r.returncode == 2
    err = r.stderr
    assert f"{bad}:3: messaging.identity_file: not found" in err
    assert f"{bad}:5: messaging.transports.mqtt.port:" in err
    assert f"{bad}:6: messaging.transports.carrier_pigeon: unknown transport" in err
    # model errors, all of them at once, with the checks of the parts that are valid by themselves
    bad.write_text(
        "messaging: {participant: ams, identity_file: x, transports: {}}\n"
        "verification: {tolerance_pct: 150}\n"
        "market: {auto_clearing: true}\n"
    )
    r = ams("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert f"{bad}:2: verification.tolerance_pct:" in r.stderr
    assert f"{bad}:3: market.auto_clearing: unknown key" in r.stderr


def test_flexibility_block_names_unknown_and_wrong_points(lab_dir: Path) -> None:
    f = lab_dir / "bad-dso.yaml"
    f.write_text(
        "extends: multipower-dso.yaml\n"
        "flexibility:\n"
        "  aggregator: ams\n"
        "  resources:\n"
        "    - name: feeder\n"
        "      flexibility_type: upward\n"
        "      power_point: feeder.voltage.l1\n"
        "      activate: [{point: feeder.brekaer.command, value: open}]\n"
    )
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        load_config(f)
    text = str(exc.value)
    assert "bad-dso.yaml:7: flexibility.resources[0](feeder).power_point: 'feeder.voltage.l1' is not" in text
    assert "did you mean" in text and "feeder.breaker.command" in text


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def test_register_request_and_status_against_redis(lab_dir: Path, redis_server: RedisServer) -> None:
    cfg = ["-c", str(lab_dir / "ams.yaml"), "--redis-url", redis_server.client_url("ams")]
    env = {"AMS_MQTT_PASSWORD": "x"}
    r = ams("register", *cfg, "mgms-other", "FI-Oulu/feeder-1", env=env)
    assert r.returncode == 0, r.stderr
    r = ams("request", *cfg, "--type", "upward", "--power-kw", "25", "--duration-s", "60", "--wait-s", "0", env=env)
    assert r.returncode == 0 and r.stdout.startswith("req-"), r.stderr
    r = ams("request", *cfg, "--type", "upward", "--power-kw", "25", "--wait-s", "0.5", env=env)
    assert r.returncode == 1 and "no AMS worker cleared it within 0.5 s" in r.stdout, r.stderr
    r = ams("status", *cfg, "--json", env=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["microgrids"]["mgms-other"]["location"] == "FI-Oulu/feeder-1"
    assert data["microgrids"]["mgms-other"]["reliability"] == 1.0 and data["activations"] == []
    assert data["messaging"]["unsent"] == 0 and data["messaging"]["awaiting_receipt"] == 0  # the outbox, visible
    r = ams("status", *cfg, env=env)
    assert "mgms-other" in r.stdout and "open offers (merit order): 0" in r.stdout
    assert "activations (newest 0):" in r.stdout
    assert "outbox: 0 unsent (oldest 0.0 s), 0 awaiting a receipt" in r.stdout


def test_check_config_takes_the_file_as_every_other_command_does(lab_dir: Path) -> None:
    """`ams check-config -c F` (the form of every command) and `ams check-config F` (as mgms's older form)."""
    env = {"AMS_MQTT_PASSWORD": "x"}
    for form in (["-c", str(lab_dir / "ams.yaml")], [str(lab_dir / "ams.yaml")]):
        r = ams("check-config", *form, env=env)
        assert r.returncode == 0 and "OK - AMS 'ams'" in r.stdout, (form, r.stderr)
    r = ams("check-config", env=env)
    assert r.returncode == 2 and "--config/-c FILE" in r.stderr


def test_status_without_redis_is_a_clear_service_error(lab_dir: Path, tmp_path: Path) -> None:
    r = ams("status", "-c", str(lab_dir / "ams.yaml"), "--data-dir", str(tmp_path / "none"),
            env={"AMS_MQTT_PASSWORD": "x"})  # fmt: skip
    assert r.returncode == 3
    assert "no Redis" in r.stderr


def test_ams_run_serves_until_sigterm_with_its_own_redis(tmp_path: Path) -> None:
    """`ams run` on an embedded Redis and a TLS broker: up, found by `ams status`, clean exit."""
    import signal
    import time

    import yaml

    from ams.sandbox import DsoSandbox

    with DsoSandbox(tmp_path / "dso", mgms=["mgms-x"]) as box:
        settings = box.messaging("ams", transport="mqtt")
        cfg_file = tmp_path / "ams.yaml"
        cfg_file.write_text(yaml.safe_dump({
            "messaging": settings.model_dump(mode="json"),
            "microgrids": [{"participant": "mgms-x", "location": "L1"}],
        }))  # fmt: skip
        data = tmp_path / "state"
        proc = subprocess.Popen(
            [sys.executable, "-m", "ams.cli", "run", "-c", str(cfg_file), "--data-dir", str(data)],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 20
            while not (data / "ams" / "redis.url").exists():
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "ams run did not start its Redis"
                time.sleep(0.05)
            status = ""
            while "mgms-x" not in status:  # the worker registers the configured microgrids
                assert time.monotonic() < deadline, status
                status = ams("status", "-c", str(cfg_file), "--data-dir", str(data)).stdout
                time.sleep(0.1)
            assert "L1" in status
            # a request the worker clears against no open offer: the outcome, not just the id
            r = ams("request", "-c", str(cfg_file), "--data-dir", str(data), "--type", "upward", "--power-kw", "25",
                    "--wait-s", "15")  # fmt: skip
            assert r.returncode == 1 and r.stdout.startswith("req-"), (r.stdout, r.stderr)
            assert "nothing cleared - no open offer fits (upward 25 kW at *)" in r.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "AMS ams running" in err
        assert not (data / "ams" / "redis.url").exists()
