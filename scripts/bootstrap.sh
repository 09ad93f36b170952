#!/usr/bin/env bash
# Creates .venv and installs modelpool into it. Sourced by serve.sh and test.sh.
# torch is installed first and pinned to the CPU wheel this machine keeps on disk:
# asking pip for a bare "torch" would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "==> installing torch (CPU build)"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q "torch==2.13.0"
fi
echo "==> installing modelpool ${EXTRAS:-}"
.venv/bin/pip install -q -e ".${EXTRAS:-}"
