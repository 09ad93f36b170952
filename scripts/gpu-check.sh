#!/usr/bin/env bash
# The GPU checks, as run on a lent GPU machine (no package index there): the GPU
# tests, then the cold-start, gateway-overhead and batching benchmarks on cuda:0, then
# the soak (SOAK_DURATION seconds of traffic, default 300; 0 skips it). Wheels the
# image lacks travel in .whl/ (see docs/performance.md, "GPU runs"). Results go to
# $OUT (or ./gpu-out). A device call runs at most 10 minutes: run it in two calls,
# PART=checks (tests and benchmarks, ~8 min) then PART=soak (~9 min); PART=all does both.
# PART=tier: the host-RAM tier's reload against pinned H2D bandwidth (256 MB, 1 GB,
# 4 GB models; ~6 min, most of it writing them). PART=soak-tier: the soak again with
# each worker's host-RAM tier on (--host-memory-budget 8GiB), to set beside PART=soak.
set -uo pipefail
PART=${PART:-all}
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# modelpool is not installed there: typecheck/modelpool (links to the folders, also
# what mypy reads) gives them their installed names.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/typecheck:$PWD
else
  export PYTHONPATH=$PWD/typecheck:$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'grpc', grpc.__version__, 'protobuf', p.__version__)"
} 2>&1 | tee "$OUT/env.txt"
if [ "$PART" = all ] || [ "$PART" = checks ]; then
echo "== pytest -m gpu"
timeout 240 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
echo "== cold start on cuda:0"
timeout 150 python3 -m modelpool.loadtests.cold_start --device cuda:0 --sizes 64,256,1024 --repeats 3 --out "$OUT/cold_start_gpu.json" 2>&1 | grep -v "^  " | tee "$OUT/cold_start_gpu.txt"
echo "== gateway overhead on cuda:0"
timeout 120 python3 -m modelpool.loadtests.gateway_overhead --requests 1000 --serve-arg=--devices --serve-arg=cuda:0 --out "$OUT/overhead_gpu.json" 2>&1 | grep -v rounds | tee "$OUT/overhead_gpu.txt"
echo "== dynamic batching on cuda:0"
timeout 120 python3 -m modelpool.loadtests.batching --requests 3000 --concurrency 32 --model-size-mb 256 --serve-arg=--devices --serve-arg=cuda:0 --out "$OUT/batching_gpu.json" 2>&1 | grep -v "^  " | tee "$OUT/batching_gpu.txt"
fi
if [ "$PART" = tier ]; then
  echo "== host-tier reload on cuda:0"
  timeout 500 python3 -m modelpool.loadtests.host_tier --device cuda:0 --sizes 256,1024,4096 --rounds 3 --out "$OUT/host_tier_gpu.json" 2>&1 | grep -v "^  " | tee "$OUT/host_tier_gpu.txt"
  exit 0
fi
SOAK_DURATION=${SOAK_DURATION:-300}
SOAK=soak_gpu SOAK_ARGS=()
if [ "$PART" = soak-tier ]; then
  SOAK=soak_tier_gpu SOAK_ARGS=(--serve-arg=--host-memory-budget --serve-arg=8GiB)
fi
if [ "$PART" != checks ] && [ "$SOAK_DURATION" != 0 ]; then
  # 24 MLPs of 32-512 MB (about 4.7 GB, 3.5x a 1.25 GiB budget), Zipf 1.1 at 80 rps with
  # a 10 s client deadline; a foreign process takes half the budget's share of the GPU
  # at 30%, a worker gets kill -9 at 60%. The timeout covers writing the models (~1 min),
  # starting serve and draining.
  echo "== soak on cuda:0, $SOAK_DURATION s"
  timeout -k 60 $((SOAK_DURATION + 240)) python3 -m modelpool.loadtests.soak --device cuda:0 --sizes-mb 32,64,128,256,512 --count 24 --budget 1.25GiB --rate 80 --duration "$SOAK_DURATION" --deadline-s 10 "${SOAK_ARGS[@]}" --out "$OUT/$SOAK.json" 2>&1 | grep -v "^  " | tee "$OUT/$SOAK.txt"
  gzip -f "$OUT/$SOAK.serve.log" 2>/dev/null
fi
