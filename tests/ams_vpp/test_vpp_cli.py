"""The plan / coalition / balance subcommands: tables, JSON, PNG, exit codes 0 / 2 / 3."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from ams.vpp.cli import add_vpp_commands, main

LAB = Path(__file__).resolve().parents[2] / "lab_configs" / "vpp"
PORTFOLIO = str(LAB / "portfolio.yaml")


def test_hook_registers_three_commands() -> None:
    parser = argparse.ArgumentParser(prog="ams")
    sub = parser.add_subparsers(dest="command", required=True)
    add_vpp_commands(sub)
    args = parser.parse_args(["coalition", PORTFOLIO, "r.yaml", "--method", "heuristic"])
    assert callable(args.func) and args.method == "heuristic"
    for cmd in ("plan", "balance"):
        assert callable(parser.parse_args([cmd, PORTFOLIO, "r.yaml"]).func)


def test_plan_writes_table_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", PORTFOLIO, str(LAB / "request-dayahead.yaml"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "day-ahead plan: optimal" in out and "bid kW" in out
    data = json.loads((tmp_path / "plan.json").read_text())
    assert len(data["bid_kw"]) == 24
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"


def test_coalition_compare_reports_gap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["coalition", PORTFOLIO, str(LAB / "request-capacity.yaml"), "--out", str(tmp_path), "--method", "compare"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "heuristic gap:" in out and "target kW" in out
    data = json.loads((tmp_path / "coalition.json").read_text())
    assert data["gap"]["gap"] >= 0
    assert (tmp_path / "coalition.png").exists()


def test_balance_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["balance", PORTFOLIO, str(LAB / "request-balance.yaml"), "--out", str(tmp_path)]) == 0
    assert "system cost (real time): centralised" in capsys.readouterr().out
    data = json.loads((tmp_path / "balance.json").read_text())
    assert data["privacy_cost_eur"] >= -1e-6
    assert (tmp_path / "balance.png").exists()


def test_infeasible_request_exit_3_names_constraint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coalition", PORTFOLIO, str(LAB / "request-infeasible.yaml"), "--out", str(tmp_path)]) == 3
    assert "binding constraint: capacity target" in capsys.readouterr().err


def test_bad_input_exit_2_names_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("service: capacity\nstart: 2026-06-01T17:00:00Z\nperiods: 4\ntarget_kw: -5\n")
    assert main(["coalition", PORTFOLIO, str(bad), "--out", str(tmp_path)]) == 2
    assert "capacity.target_kw" in capsys.readouterr().err
    late = tmp_path / "late.yaml"
    late.write_text("service: capacity\nstart: 2026-06-01T22:00:00Z\nperiods: 4\ntarget_kw: 5\n")
    assert main(["coalition", PORTFOLIO, str(late), "--out", str(tmp_path)]) == 2
    assert "start/periods" in capsys.readouterr().err
