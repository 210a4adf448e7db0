"""The simulator mode's options that change what a run means: the Redis fsync policy it runs
with, and ``--ams-remote`` (the one-host estimate applied to the cross-host routes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(100)
def test_fsync_everysec_and_ams_remote_are_recorded_and_applied(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", "--routes", "messages", "--n", "3", "--fsync", "everysec",
         "--ams-remote", "--out", str(out)],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode in (0, 1), r.stderr[-3000:]
    data = json.loads((out / "report.json").read_text())
    assert data["mode"] == "simulators" and data["redis_appendfsync"] == "everysec"  # as the servers report it
    clock = data["clock"]
    assert clock["applied"] is True and {e["method"] for e in data["clock_estimates"]} == {"https", "mqtt"}
    assert abs(clock["offset_ms"]) <= clock["uncertainty_ms"] + 0.5  # one host: ~0
    routes = {x["key"]: x for x in data["routes"]}
    flex, act = routes["flex_mqtt_signed"], routes["activation_mqtt_signed"]
    assert flex["cross_host"] and flex["clock_hosts"] == "mgms->ams"
    assert flex["offset_applied_ms"] == clock["offset_ms"] and flex["offset_uncertainty_ms"] == clock["uncertainty_ms"]
    assert act["cross_host"] and act["offset_applied_ms"] == -clock["offset_ms"]
    assert set(data["hop_clock_corrections"]) == {
        "hop_flex_https_signed_created_to_received", "hop_flex_mqtt_signed_created_to_received",
        "hop_activation_mqtt_signed_created_to_received", "hop_flex_https_encrypted_created_to_received",
        "hop_flex_mqtt_encrypted_created_to_received", "hop_activation_mqtt_encrypted_created_to_received",
    }  # fmt: skip
    md = (out / "report.md").read_text()
    assert "appendfsync everysec" in md and "| mgms->ams | yes |" in md
    assert "clock offset (" in r.stdout and "applied to cross-host routes" in r.stdout
