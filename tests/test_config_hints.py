"""What the config errors tell the engineer (issue 17 item 9): the unit meant when only its
case is wrong, and a broken ``extends:`` named at the line that points to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LAB = """\
lab: {name: hints}
devices:
  relay: {protocol: iec104, host: 127.0.0.1, port: 2404, common_address: 1}
points:
  - {name: p, device: relay, quantity: active_power, unit: UNIT, address: {ioa: 1, type: M_ME_NC_1}}
"""


def issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    return [str(i) for i in exc.value.issues]


@pytest.mark.parametrize(("typed", "meant"), [("KW", "kW"), ("KWH", "kWh"), ("mvar", "Mvar"), ("hz", "Hz")])
def test_unit_in_the_wrong_case_suggests_the_unit_meant(tmp_path: Path, typed: str, meant: str) -> None:
    f = tmp_path / "lab.yaml"
    f.write_text(LAB.replace("UNIT", typed))
    (issue,) = issues(f)
    assert f"{f}:5: points[0](p).unit: unknown unit {typed!r} (did you mean {meant!r}?)" in issue


def test_extends_of_a_missing_file_names_the_line_that_points_to_it(tmp_path: Path) -> None:
    prof = tmp_path / "profile.yaml"
    prof.write_text("# a profile\nextends: nope.yaml\n")
    assert issues(prof) == [
        f"{prof}:2: extends: 'nope.yaml' ({tmp_path / 'nope.yaml'}): cannot read file: No such file or directory"
    ]
    # two levels: the file whose extends is broken is named, not the one that was loaded
    top = tmp_path / "top.yaml"
    top.write_text("extends: profile.yaml\n")
    assert issues(top) == issues(prof)


def test_extends_of_a_directory_names_the_line(tmp_path: Path) -> None:
    prof = tmp_path / "profile.yaml"
    prof.write_text("extends: .\n")
    (issue,) = issues(prof)
    assert issue == f"{prof}:1: extends: '.' ({tmp_path}): cannot read file: not a regular file"


def test_errors_inside_the_base_file_keep_their_own_file_and_line(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(LAB.replace("UNIT", "kW").replace("port: 2404", "port: 99999"))
    prof = tmp_path / "profile.yaml"
    prof.write_text("extends: base.yaml\n")
    (issue,) = issues(prof)
    assert issue.startswith(f"{base}:3: devices.relay.port:")
