"""The fuzz harness (bench/fuzz.py) in short: every target for 1.5 s, and the harness
itself on planted bugs.

The reference runs (ten minutes per target, coverage-guided with atheris) are in
docs/fuzzing.md; here the point is that each target's set-up, seeds and contract keep
working as the parsers change, and that a crash or a hang is caught, saved and replayed.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import pytest

from gateway.bench.fuzz import atheris_available, random_fuzz, replay, run_target
from gateway.bench.fuzz_targets import TARGETS, Harness, Target


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_survives_its_mutated_seeds(name: str, tmp_path: Path) -> None:
    target = TARGETS[name]
    result = random_fuzz(target, 1.5, tmp_path)
    assert result.crashes == {} and result.hangs == {}
    assert result.executions > len(target.seeds())  # the seeds ran, then mutations of them


def test_seeds_are_within_the_contract(tmp_path: Path) -> None:
    """Every seed of every target runs through its contract (no seed is itself a crash)."""
    for name, target in TARGETS.items():
        paths = []
        for i, data in enumerate(target.seeds()):
            p = tmp_path / f"{name}-{i}"
            p.write_bytes(data)
            paths.append(p)
        assert replay(target, paths) == [], name


def _planted() -> Harness:
    def one(data: bytes) -> None:
        if data.startswith(b"IX"):
            _ = data[100]  # IndexError: a crash (PLANTED_LINE)
        if data.startswith(b"HANG"):
            time.sleep(10)  # past the 1 s limit: a hang
        if data.startswith(b"V"):
            raise ValueError("the documented rejection")

    def guarded(data: bytes) -> None:
        with contextlib.suppress(ValueError):
            one(data)

    return Harness(guarded)


PLANTED = Target(
    "planted", "a parser with two planted bugs", _planted, lambda: [b"IX", b"HANG", b"V", b"ok"], (), timeout_s=1
)


def test_crash_and_hang_are_caught_saved_and_replayed(tmp_path: Path) -> None:
    result = random_fuzz(PLANTED, 1.5, tmp_path)
    line = next(i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1) if "(PLANTED_LINE)" in text)
    assert list(result.crashes) == [f"IndexError at tests/{Path(__file__).name}:{line}"]
    assert list(result.hangs) == ["hang in planted"]
    crash = Path(result.crashes[next(iter(result.crashes))])
    assert crash.read_bytes().startswith(b"IX")
    assert replay(PLANTED, [crash]) == [(crash, result.crashes and next(iter(result.crashes)))]


@pytest.mark.skipif(not atheris_available(), reason="atheris not installed (pip install -e '.[fuzz]')")
def test_atheris_engine_reports_executions_and_coverage(tmp_path: Path) -> None:
    result = run_target(TARGETS["iec104"], 3, tmp_path, engine="atheris", echo=lambda s: None)
    assert result.crashes == {} and result.hangs == {}
    assert result.executions > 1000
    assert result.cov is not None and result.cov > 50 and result.ft is not None
    assert (tmp_path / "iec104" / "corpus").is_dir()
