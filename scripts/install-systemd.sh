#!/usr/bin/env bash
# Writes the systemd units of deploy/systemd/ (mgms@.service, ams@.service) with this
# checkout's path in place of the /opt/mgms placeholder and the account that runs them, then
# checks them with systemd-analyze verify and reloads systemd. docs/deployment.md has the rest.
#
#   sudo bash scripts/install-systemd.sh [--user mgms] [--dest /etc/systemd/system] [--no-reload]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
DEST=/etc/systemd/system
RUN_AS=mgms
RELOAD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="$2"; shift 2 ;;
    --user) RUN_AS="$2"; shift 2 ;;
    --no-reload) RELOAD=0; shift ;;
    -h|--help) sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install-systemd: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$ROOT$RUN_AS" in *'|'*|*' '*) echo "install-systemd: path or user with '|' or a space: not supported" >&2; exit 2 ;; esac
for exe in mgms ams; do
  if [ ! -x "$ROOT/.venv/bin/$exe" ]; then
    echo "install-systemd: $ROOT/.venv/bin/$exe missing: run bash scripts/setup.sh first" >&2
    exit 2
  fi
done
GROUP="$(id -gn "$RUN_AS" 2>/dev/null || echo "$RUN_AS")"
mkdir -p "$DEST"
written=()
for unit in deploy/systemd/*.service; do
  out="$DEST/$(basename "$unit")"
  sed -e "s|/opt/mgms|$ROOT|g" -e "s|^User=mgms$|User=$RUN_AS|" -e "s|^Group=mgms$|Group=$GROUP|" "$unit" > "$out.tmp"
  chmod 0644 "$out.tmp"
  mv "$out.tmp" "$out"
  written+=("$out")
done
if command -v systemd-analyze >/dev/null 2>&1; then
  systemd-analyze verify "${written[@]}"
fi
if [ "$RELOAD" = 1 ] && [ "$DEST" = /etc/systemd/system ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
printf 'wrote %s\n' "${written[@]}"
echo "next: systemctl enable --now mgms@LAB (reads /etc/mgms/LAB.yaml), ams@NAME (/etc/ams/NAME.yaml)"
