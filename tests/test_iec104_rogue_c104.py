"""The c104 engine against the rogue outstation, only ever in a child process.

Why not in this process: c104 2.2.1 takes the whole process down with SIGSEGV on some of
the rogue's garbage (docs/protocol-notes.md, "Rogue outstation"), and pytest would go with
it. ``bench/rogue104.py`` runs the rogue and the judging in its own process and the engine
in a child per run, and records how each run ended; these tests run it small, check that
its own side survives whatever the child does, and that a crash is recorded as one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "rogue104.py"


def bench(tmp_path: Path, *args: str, timeout_s: float) -> list[dict[str, Any]]:
    out = tmp_path / "runs.json"
    r = subprocess.run(
        [sys.executable, str(BENCH), *args, "--json", str(out)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]  # our side (rogue + judge) survived every child
    assert "| engine | scenario | runs | linked | crashed |" in r.stdout
    runs: list[dict[str, Any]] = json.loads(out.read_text())
    for run in runs:  # every run ends with the child's exit status: 0, a signal, or killed when hung (None)
        code = run["returncode"]
        assert run["crashed"] == (code not in (0, None)), run
        if run["crashed"]:
            assert code < 0 and "Fatal Python error" in run["stderr_tail"], run
    return runs


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_c104_engine_meets_the_rogue_in_a_child_process(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    scenarios = ["garbage", "ns_gap", "unknown_type"]
    args = ("--engines", "c104", "--scenarios", ",".join(scenarios), "--delay-s", "0.3", "--close-window-s", "5")
    runs = bench(tmp_path, *args, timeout_s=110)
    assert [r["scenario"] for r in runs] == scenarios
    # c104 is recorded, not held to the standard: in the bench it failed to report the link
    # up, closed late, did not reconnect or closed for no reason in some runs of every
    # scenario (docs/protocol-notes.md has the counts); what is checked is that each run
    # ended in a known way and this process outlived it
    for r in runs:
        outcome = "crashed" if r["crashed"] else "no link" if not r["linked"] else "closed" if r["closed"] else "up"
        record_property(f"c104_{r['scenario']}", f"{outcome} (exit {r['returncode']})")
        assert r["linked"] or not r["closed"], r  # a run never linked was not judged


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_child_killed_by_sigsegv_is_recorded_and_the_runs_go_on(tmp_path: Path) -> None:
    # --inject-crash: the child SIGSEGVs itself as the scenario starts, as c104 does
    runs = bench(tmp_path, "--engines", "asyncio", "--scenarios", "garbage,unknown_type", "--inject-crash",
                 timeout_s=50)  # fmt: skip
    assert [(r["scenario"], r["crashed"], r["returncode"], r["crash_phase"]) for r in runs] == [
        ("garbage", True, -11, "scenario"),
        ("unknown_type", True, -11, "scenario"),
    ]
    assert all(r["linked"] and not r["as_standard"] for r in runs)
