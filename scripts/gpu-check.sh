#!/usr/bin/env bash
# The GPU checks, as run on a lent GPU machine (no package index there): the GPU
# tests, then the cold-start and gateway-overhead benchmarks on cuda:0. Wheels the
# image lacks travel in .whl/ (see docs/performance.md, "GPU runs"). Results go to
# $OUT (or ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, grpc, google.protobuf as p; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'grpc', grpc.__version__, 'protobuf', p.__version__)"
} 2>&1 | tee "$OUT/env.txt"
echo "== pytest -m modelpool.gpu"
timeout 240 python3 -m pytest -m modelpool.gpu tests/test_gpu.py -q -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/pytest_gpu.txt" | tail -25
echo "== cold start on cuda:0"
timeout 150 python3 -m modelpool.loadtests.cold_start --device cuda:0 --sizes 64,256,1024 --repeats 3 --out "$OUT/cold_start_gpu.json" 2>&1 | grep -v "^  " | tee "$OUT/cold_start_gpu.txt"
echo "== gateway overhead on cuda:0"
timeout 120 python3 -m modelpool.loadtests.gateway_overhead --requests 1000 --serve-arg=--devices --serve-arg=cuda:0 --out "$OUT/overhead_gpu.json" 2>&1 | grep -v rounds | tee "$OUT/overhead_gpu.txt"
echo "== dynamic batching on cuda:0"
timeout 120 python3 -m modelpool.loadtests.batching --requests 3000 --concurrency 32 --model-size-mb 256 --serve-arg=--devices --serve-arg=cuda:0 --out "$OUT/batching_gpu.json" 2>&1 | grep -v "^  " | tee "$OUT/batching_gpu.txt"
