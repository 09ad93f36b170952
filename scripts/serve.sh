#!/usr/bin/env bash
# Installs modelpool, writes the example models and serves them:
#   REST :8000, gRPC :8001, metrics :8002 (Triton's ports), on 127.0.0.1 only. Extra
#   arguments go to `modelpool serve`, e.g. ./scripts/serve.sh --device-memory-budget 64MB;
#   to serve other hosts: ./scripts/serve.sh --host 0.0.0.0 --auth-config auth.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bootstrap.sh
MODELS=${MODELS:-models}
if [ ! -d "$MODELS" ]; then
  .venv/bin/modelpool examples --out "$MODELS"
fi
exec .venv/bin/modelpool serve --model-repository "$MODELS" "$@"
