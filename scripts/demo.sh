#!/usr/bin/env bash
# The lab demo on simulators: installs what is missing, then runs `mgms demo`, which starts
# Redis and the REF615/COM600 simulator, runs the gateway, operates the breaker and the
# set-point, prints what happened with timings, and exits by itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${MGMS_VENV:-.venv}/bin/python" -m gateway.cli demo "$@"
