"""scripts/setup.sh on an externally managed system Python (PEP 668), as a stock Debian 12 /
Ubuntu 24.04 has: the README's set-up must work there, inside the project venv, and never
touch the system interpreter.

The test uses the machine's own Debian Python (``/usr/bin/python3`` with its
``EXTERNALLY-MANAGED`` marker) as the base of a fresh venv; where that interpreter is absent
(a machine that is not Debian-like) there is nothing to show and it is skipped with the
reason. CI runs on Debian 12, where it runs.
"""

from __future__ import annotations

import glob
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def _externally_managed() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    stdlib = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    return bool(glob.glob(os.path.join(stdlib, "EXTERNALLY-MANAGED")))


@pytest.mark.skipif(not _externally_managed(), reason="no externally managed system Python (/usr/bin/python3) here")
def test_setup_makes_a_working_venv_on_an_externally_managed_python(tmp_path: Path) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    # the premise: this interpreter refuses pip installs outside a venv
    refused = subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "pip", "install", "--dry-run", "six"], capture_output=True, text=True, env=env
    )
    if "No module named pip" not in refused.stderr:
        assert refused.returncode != 0 and "externally-managed-environment" in refused.stderr, refused.stderr
    venv = tmp_path / "venv"
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup.sh")],
        capture_output=True, text=True, timeout=580, env={**env, "MGMS_VENV": str(venv)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    base = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sys; print(sys.base_prefix, sys.prefix)"],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert base == ["/usr", str(venv)]  # Debian's interpreter, our venv
    for script in ("mgms", "ams", "iedsim"):  # the console scripts the README shows
        out = subprocess.run([str(venv / "bin" / script), "--version"], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.strip(), (script, out.stderr)
