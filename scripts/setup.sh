#!/usr/bin/env bash
# Installs what the gateway needs on a fresh Debian/Ubuntu machine (idempotent, quiet when
# done): redis-server and mosquitto from Debian, the Python side from PyPI into the project's
# own virtual environment (.venv, or $MGMS_VENV), so that a system Python that is externally
# managed (PEP 668) is never touched. Every other script runs .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
BASE="${MGMS_BASE_PYTHON:-python3}"
VENV="${MGMS_VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$(pwd -P)/$VENV" ;; esac
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v "$BASE" >/dev/null 2>&1 || missing+=(python3)
# venv needs ensurepip, which Debian ships apart (python3-venv / python3.X-venv).
if [ ! -x "$VENV/bin/python" ] && command -v "$BASE" >/dev/null 2>&1 \
   && ! "$BASE" -c "import ensurepip, venv" >/dev/null 2>&1; then
  ver="$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
  missing+=(python3-venv "python${ver}-venv")
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (apt-get)" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# Debian starts a system redis-server on 6379 after install; the gateway never uses it
# (it starts its own on a free port), so it is left alone.
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating the project virtual environment $VENV" >&2
  "$BASE" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# (Re)install when a dependency is missing or the installed package is another checkout.
here="$(pwd -P)"
installed="$(cd / && "$PY" -c "import gateway, ams, c104, pyiec61850, gurux_dlms, redis, yaml, pydantic, cryptography, paho.mqtt, pyld, aiohttp, \
dlms_cosem, open61850, highspy, numpy, matplotlib, hypothesis, pytest_asyncio, pytest_timeout, mypy, ruff, os; \
print(os.path.dirname(os.path.dirname(os.path.realpath(gateway.__file__))))" 2>/dev/null || true)"
if [ "$installed" != "$here" ] || [ "${MGMS_REINSTALL:-0}" = 1 ]; then
  echo "installing the gateway and its Python dependencies into $VENV (pip)" >&2
  log="$(mktemp)"
  if ! { "$PY" -m pip install -q --disable-pip-version-check --upgrade pip \
         && "$PY" -m pip install -q --disable-pip-version-check -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup failed: pip install did not succeed" >&2
    exit 1
  fi
  rm -f "$log"
fi
(cd / && "$PY" -c "import gateway, c104, redis") || { echo "setup failed: Python packages missing" >&2; exit 1; }
