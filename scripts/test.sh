#!/usr/bin/env bash
# The test suite, exactly as CI runs it: lint, then unit and HIL tests (simulators, real
# redis-server on free loopback ports). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MGMS_VENV:-.venv}/bin/python"
"$PY" -m ruff check .
"$PY" -m mypy
exec "$PY" -m pytest "$@"
