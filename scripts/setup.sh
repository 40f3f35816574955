#!/usr/bin/env bash
# Install everything mmdisagg needs into ./.venv (and Debian packages it needs, when missing),
# the mooncake data plane's library included, so that its tests run for real.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# libibverbs1 and libnl-route-3-200: Mooncake Transfer Engine loads them even for its tcp protocol.
DEBIAN_PACKAGES=(libibverbs1 libnl-route-3-200 ${MMDISAGG_DEBIAN_PACKAGES:-})

missing=()
if command -v dpkg >/dev/null; then
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
else
  echo "setup: not a Debian system; install the equivalents of ${DEBIAN_PACKAGES[*]} yourself"
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.mmdisagg-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python packages (torch 2.13.0 CPU from local disk, then the rest)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e '.[test,mooncake]'
  echo "$want" >"$stamp"
fi
