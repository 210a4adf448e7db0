"""The three console scripts behave alike (issue 17 item 7): every argument has help, the config
is ``--config/-c`` everywhere, ``--version`` works, a closed stdout ends a command quietly, and
every command quoted in the shipped lab files parses."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ams.cli import build_parser as ams_parser
from gateway import __version__
from gateway.cli import build_parser as mgms_parser
from gateway.cli import command_line
from gateway.cliutil import EXIT_BROKEN_PIPE
from gateway.iedsim.cli import _parser as iedsim_parser
from gateway.store import CommandRecord, CommandResult

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {"mgms": mgms_parser, "ams": ams_parser, "iedsim": iedsim_parser}


def walk(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subparser below it, each with its command path (``mgms bench``)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, f"{path} {name}")


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_argument_and_subcommand_has_help(prog: str) -> None:
    missing: list[str] = []
    for path, parser in walk(PARSERS[prog](), prog):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{path} {name} (subcommand)" for name in action.choices if name not in helped]
            elif not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, "arguments without help: " + ", ".join(missing)


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_version(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        PARSERS[prog]().parse_args(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"{prog} {__version__}"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_config_is_dash_c_or_double_dash_config_wherever_a_command_takes_one(prog: str) -> None:
    for path, parser in walk(PARSERS[prog](), prog):
        for action in parser._actions:
            if "--config" in action.option_strings:
                assert "-c" in action.option_strings, f"{path}: --config without -c"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_data_dir_says_the_state_is_one_level_below_it(prog: str) -> None:
    """``--data-dir DIR`` puts a lab's state in DIR/<lab name> (so labs can share DIR); the help says so."""
    for path, parser in walk(PARSERS[prog](), prog):
        for action in parser._actions:
            if "--data-dir" in action.option_strings:
                assert action.metavar == "DIR" and "DIR/<" in str(action.help), f"{path}: {action.help}"


def test_check_config_takes_dash_c_and_the_older_positional_form() -> None:
    ap = mgms_parser()
    assert ap.parse_args(["check-config", "-c", "x.yaml"]).config == "x.yaml"
    assert ap.parse_args(["check-config", "x.yaml"]).file == "x.yaml"
    a = ams_parser()
    assert a.parse_args(["check-config", "-c", "x.yaml"]).config == "x.yaml"
    assert a.parse_args(["check-config", "x.yaml"]).file == "x.yaml"


def quoted_commands() -> list[tuple[str, str]]:
    """Whole commands in backquotes in the lab files' comments: ``mgms ...``, ``ams ...`` or
    ``iedsim ...`` naming a config or a participant (fragments such as `iedsim iec104` aside)."""
    found: list[tuple[str, str]] = []
    for f in sorted((ROOT / "lab_configs").rglob("*.yaml")):
        for line in f.read_text().splitlines():
            if line.lstrip().startswith("#"):
                found += [(f.name, m) for m in re.findall(r"`((?:mgms|ams|iedsim) [^`]+)`", line)]
    return [(f, c) for f, c in found if re.search(r"(^| )(-c|--config|keys|check-config) ", c)]


@pytest.mark.parametrize(("where", "command"), quoted_commands())
def test_commands_quoted_in_the_lab_files_parse(where: str, command: str) -> None:
    """A comment that tells the engineer what to type names options that exist (it said `-c`
    for `mgms check-config` when only a positional file worked)."""
    prog, *argv = shlex.split(command)
    PARSERS[prog]().parse_args(argv)  # SystemExit(2) on an unknown option


def test_the_lab_files_quote_commands() -> None:
    assert any(c.startswith("mgms check-config") for _, c in quoted_commands())


def test_command_prints_one_line_for_a_person() -> None:
    ok = CommandRecord("r1", "feeder.breaker.command", "open", "cli", CommandResult.CONFIRMED, duration_ms=63.21)
    assert command_line(ok) == "feeder.breaker.command open -> confirmed in 63.2 ms"
    no = CommandRecord("r2", "feeder.breaker.command", "close", "cli", CommandResult.REJECTED,
                       reason="negative confirmation", duration_ms=3.04)  # fmt: skip
    assert command_line(no) == "feeder.breaker.command close -> rejected in 3.0 ms: negative confirmation"
    bad = CommandRecord("r3", "feeder.p_limit.setpoint", "999", "cli", CommandResult.INVALID, reason="above the max")
    assert command_line(bad) == "feeder.p_limit.setpoint 999 -> invalid: above the max"


def test_unknown_point_gets_did_you_mean_and_the_control_points(tmp_path: Path) -> None:
    cfg = str(ROOT / "lab_configs" / "multipower-sim.yaml")
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "command", "feeder.braker.command", "open", "-c", cfg,
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2
    assert "no point 'feeder.braker.command'" in r.stderr and "(did you mean 'feeder.breaker.command'?)" in r.stderr
    assert "control points: feeder.breaker.command, feeder.autoreclose.command, feeder.p_limit.setpoint" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "command", "feeder.p", "5", "-c", cfg, "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert r.returncode == 2 and "feeder.p is a monitored point, not a control point" in r.stderr
    assert "control points: feeder.breaker.command" in r.stderr


SIM = "lab_configs/multipower-sim.yaml"


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["gateway.cli", "check-config", "-c", SIM], EXIT_BROKEN_PIPE),
        (["gateway.iedsim.cli", "iec104", "-c", SIM, "--port", "0", "--duration-s", "0.2"], EXIT_BROKEN_PIPE),
        (["gateway.cli", "--help"], 0),  # argparse drops a failed help write itself
        (["ams.cli", "--help"], 0),
    ],
    ids=["mgms-check-config", "iedsim-ready-line", "mgms-help", "ams-help"],
)
def test_a_reader_that_closed_the_pipe_ends_the_command_quietly(argv: list[str], code: int) -> None:
    """As ``mgms check-config ... | head -0``: the reading end is closed before the first write;
    the command ends with 141 (what a shell shows for a tool SIGPIPE ended), no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", *argv], stdout=write_end, stderr=subprocess.PIPE, text=True,
                           timeout=30, cwd=ROOT)  # fmt: skip
    finally:
        os.close(write_end)
    assert "BrokenPipeError" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode == code, r.stderr
