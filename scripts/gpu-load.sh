#!/usr/bin/env bash
# Many models on one GPU: 64 example models (about 830 MB) behind a 512 MiB budget,
# driven for 30 s at 200 req/s with a Zipf(1.1) popularity, once per policy. Prints the
# load generator's tables; reports land in $OUT/load-<policy>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
python3 -m modelpool.gateway.cli examples --out /tmp/models64 --count 64 2>/dev/null | tail -1
for policy in lru gdsf; do
  python3 -m modelpool.gateway.cli serve --model-repository /tmp/models64 --devices cuda:0 \
    --device-memory-budget 512MiB --policy "$policy" --host 127.0.0.1 \
    --http-port 18000 --grpc-port 18001 --metrics-port 18002 > /tmp/serve-$policy.out 2> "$OUT/serve-$policy.log" &
  pid=$!
  for _ in $(seq 60); do grep -q "modelpool ready" /tmp/serve-$policy.out && break; sleep 1; done
  echo "== policy $policy"
  timeout 90 python3 -m modelpool.loadtests run --url 127.0.0.1:18001 --protocol grpc --metrics-url 127.0.0.1:18002 \
    --duration 30 --rate 200 --zipf 1.1 --quiet --out "$OUT/load-$policy" 2>&1 | head -18
  kill -INT $pid; wait $pid
done
