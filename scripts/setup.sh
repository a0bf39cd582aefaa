#!/usr/bin/env bash
# Create .venv with odeflux installed (editable) and the extras named in $1 (default: app).
# Keeps the torch a machine already has; where there is none, installs the CPU build torch==2.13.0
# first, because an unpinned torch requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-app}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  if "$PY" -c 'import torch' >/dev/null 2>&1; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
if ! .venv/bin/python -c 'import torch' >/dev/null 2>&1; then
  .venv/bin/python -m pip install -q torch==2.13.0
fi
stamp=".venv/.odeflux-$extras-$(cat pyproject.toml | cksum | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi
