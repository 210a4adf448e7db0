"""Every ``<!-- runnable -->`` block of docs/*.md runs as written (issue 17 item 9).

The marker is README.md's (``hil_tests/test_readme_path.py`` runs README's blocks, services
and all; docs/lab-setup.md, "Runnable blocks"). The blocks in docs/ are one-shot commands that
need no lab running: each line runs in a temporary directory holding a copy of
``lab_configs/``, with the project's ``.venv/bin`` first on PATH, and must exit 0, or the code
its comment names (``# exit 3``). A service ("until Ctrl-C") has no place in a docs block:
those belong in README.md, whose runner starts and stops them.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"


def blocks(path: Path) -> list[tuple[int, list[str]]]:
    """(line of the block's first command, its lines) for each block after a marker."""
    lines = path.read_text().splitlines()
    found: list[tuple[int, list[str]]] = []
    for i, line in enumerate(lines):
        if line.strip() == MARKER:
            assert i + 1 < len(lines) and lines[i + 1].strip() == "```sh", (
                f"{path.name}:{i + 2}: the marker must precede a ```sh block"
            )
            end = lines.index("```", i + 2)
            found.append((i + 3, lines[i + 2 : end]))
    return found


def commands() -> list[tuple[str, str, int]]:
    """(file:line, command line, expected exit code) of every runnable docs line."""
    out: list[tuple[str, str, int]] = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for first, lines in blocks(doc):
            for n, line in enumerate(lines):
                command, _, comment = line.partition("#")
                if not command.strip():
                    continue
                assert "until Ctrl-C" not in comment, f"{doc.name}:{first + n}: services go in README.md's blocks"
                m = re.search(r"\bexit (\d+)\b", comment)
                out.append((f"{doc.name}:{first + n}", command.strip(), int(m.group(1)) if m else 0))
    return out


CASES = commands()


def test_docs_mark_some_blocks_runnable() -> None:
    assert any(where.startswith("vpp.md:") for where, _, _ in CASES), "docs/vpp.md's commands should be marked"


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs-clone")
    shutil.copytree(ROOT / "lab_configs", root / "lab_configs", ignore=shutil.ignore_patterns("keys", "pki", "broker"))
    return root


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "command", "code"), CASES, ids=[w for w, _, _ in CASES])
def test_docs_command_runs_as_written(where: str, command: str, code: int, clone: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MGMS_", "AMS_"))}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    r = subprocess.run(shlex.split(command), cwd=clone, env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode == code, f"{where}: `{command}` exited {r.returncode}, not {code}:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, f"{where}: {r.stderr}"
