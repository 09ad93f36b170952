#!/usr/bin/env bash
# Installs modelpool with its test tools and the services the tests start
# (redis-server, promtool) and the peer it is compared with (Ray Serve), then
# runs lint, types and the test suite.
# Extra arguments go to pytest, e.g. ./scripts/test.sh -m gpu
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="[test,plots,peers,onnx,s3,tracing]" source scripts/bootstrap.sh
scripts/install-services.sh
scripts/install-perf-analyzer.sh >/dev/null
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
# The folders install as modelpool.<folder>; mypy finds them under that name through
# typecheck/modelpool (links; mypy_path in pyproject.toml).
.venv/bin/mypy -p modelpool
echo "==> pytest"
# Two test processes, each taking whole files (module-scoped servers stay shared);
# PYTEST_WORKERS=0 runs in one process.
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
