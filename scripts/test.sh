#!/usr/bin/env bash
# The test suite, exactly as CI runs it: lint, then unit and HIL tests (simulators, real
# redis-server on free loopback ports). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${MGMS_VENV:-.venv}/bin/python"
"$PY" -m ruff check .
# The layer rule docs/architecture.md states: field-protocol libraries only in the adapters
# and the simulators; paho-mqtt and aiohttp only in the transports (and the bench's floors,
# which time the bare libraries).
imports='^[[:space:]]*(import|from)[[:space:]]+'
bad="$(grep -rnE --include='*.py' "${imports}(c104|pyiec61850|gurux_dlms|open61850|dlms_cosem)\b" gateway ams \
  | grep -vE '^gateway/(protocols|iedsim)/' || true)"
bad+="$(grep -rnE --include='*.py' "${imports}(paho|aiohttp)\b" gateway ams \
  | grep -vE '^gateway/(transport|bench)/' || true)"
if [ -n "$bad" ]; then
  printf 'layer rule broken (docs/architecture.md, "Layers and who may import what"):\n%s\n' "$bad" >&2
  exit 1
fi
"$PY" -m mypy
exec "$PY" -m pytest "$@"
