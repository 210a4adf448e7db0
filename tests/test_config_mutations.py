"""The config loader on broken files: only a ConfigError (exit 2 from check-config) ever comes out.

A lab file is edited by hand, copied between machines and sometimes damaged on the way; a
traceback from `mgms check-config` tells the engineer nothing. These tests feed the loader
the three mutation classes that once gave tracebacks (invalid UTF-8, a 5,000-digit integer,
deeply nested brackets) and a seeded set of random mutations of the shipped lab files.
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LABS = ("multipower-sim.yaml", "multipower-dso.yaml")


@pytest.fixture
def labdir(tmp_path: Path) -> Path:
    """A copy of lab_configs, so that mutated files keep their ``extends:`` parents."""
    dst = tmp_path / "labs"
    shutil.copytree(ROOT / "lab_configs", dst, ignore=shutil.ignore_patterns("keys", "pki"))
    return dst


def _check(path: Path) -> ConfigError | None:
    try:
        load_config(path)
    except ConfigError as exc:
        return exc
    return None


def test_invalid_utf8_names_file_and_line(labdir: Path) -> None:
    f = labdir / "multipower-sim.yaml"
    lines = f.read_bytes().split(b"\n")
    lines[5] = lines[5] + b" \xff\xfe"
    f.write_bytes(b"\n".join(lines))
    exc = _check(f)
    assert exc is not None
    assert exc.first.file == str(f) and exc.first.line == 6
    assert "UTF-8" in exc.first.reason


def test_huge_integer_is_a_config_error(labdir: Path) -> None:
    f = labdir / "multipower-sim.yaml"
    f.write_text(f.read_text() + "\nhuge: " + "7" * 5000 + "\n")
    exc = _check(f)
    assert exc is not None and "too long" in exc.first.reason
    assert exc.first.key == "huge" and exc.first.line is not None


@pytest.mark.parametrize("depth", [100, 5000, 50_000])
def test_deep_nesting_is_a_config_error(labdir: Path, depth: int) -> None:
    f = labdir / "multipower-sim.yaml"
    f.write_text(f.read_text() + "\nnest: " + "[" * depth + "]" * depth + "\n")
    exc = _check(f)
    assert exc is not None and "nested" in exc.first.reason


def test_check_config_cli_exits_2_without_traceback(labdir: Path) -> None:
    f = labdir / "multipower-sim.yaml"
    f.write_bytes(f.read_bytes() + b"\nx: [" + b"[" * 20000 + b"\n\xff " + b"9" * 5000 + b"\n")
    for variant in (f.read_bytes(), b"lab: " + b"9" * 5000 + b"\n", b"lab: {a: \xc3\x28}\n"):
        f.write_bytes(variant)
        proc = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "check-config", str(f)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert str(f) in proc.stderr + proc.stdout


_INSERTS = (
    b"\xff", b"\xc3\x28", b"9" * 5000, b"[" * 3000, b"{" * 3000,
    b": : :", b"\t", b"\x00", b"&a *a", b"!!python/object:os.system",
)


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(5)
    pos = rng.randrange(len(data) + 1)
    if kind == 0:  # flip a byte
        b = bytearray(data)
        b[min(pos, len(b) - 1)] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # truncate
        return data[:pos]
    if kind == 2:  # insert one of the known-bad fragments
        return data[:pos] + rng.choice(_INSERTS) + data[pos:]
    if kind == 3:  # random bytes
        return data[:pos] + rng.randbytes(rng.randrange(1, 40)) + data[pos:]
    lines = data.split(b"\n")  # swap two lines
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


def test_480_mutations_give_only_config_errors(labdir: Path) -> None:
    rng = random.Random(20261207)
    errors = 0
    for n in range(480):
        name = LABS[n % len(LABS)]
        original = (ROOT / "lab_configs" / name).read_bytes()
        f = labdir / name
        f.write_bytes(_mutate(original, rng))
        try:
            exc = _check(f)  # anything but ConfigError propagates and fails the test
        finally:
            f.write_bytes(original)
        if exc is not None:
            errors += 1
            assert all(i.file for i in exc.issues)
    assert errors > 100  # the mutations really break files (the loader is not just lenient)
