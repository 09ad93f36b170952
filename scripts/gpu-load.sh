#!/usr/bin/env bash
# Many models on one GPU: 64 example models (about 830 MB) behind a 512 MiB budget,
# driven for 30 s at 200 req/s with a Zipf(1.1) popularity, once per policy, each
# without and then with the workers' host-RAM tier (HOST_TIERS, default "0 2GiB":
# --host-memory-budget per worker; 0 is off). Prints the load generator's tables and
# the loads by source; reports land in $OUT/load-<policy>-host<budget>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
HOST_TIERS=${HOST_TIERS:-0 2GiB}
# DEVICE=cpu DURATION=5 tries the script itself on a machine without a GPU.
DEVICE=${DEVICE:-cuda:0} DURATION=${DURATION:-30}
mkdir -p "$OUT"
# modelpool is not installed there: typecheck/modelpool (links to the folders) gives
# them their installed names.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/typecheck:$PWD
else
  export PYTHONPATH=$PWD/typecheck:$PWD
fi
export PYTHONUNBUFFERED=1
python3 -m modelpool.gateway.cli examples --out /tmp/models64 --count 64 2>/dev/null | tail -1
for host in $HOST_TIERS; do
  for policy in lru gdsf; do
    run=$policy-host$host
    python3 -m modelpool.gateway.cli serve --model-repository /tmp/models64 --devices "$DEVICE" \
      --device-memory-budget 512MiB --host-memory-budget "$host" --policy "$policy" --host 127.0.0.1 \
      --http-port 18000 --grpc-port 18001 --metrics-port 18002 > "/tmp/serve-$run.out" 2> "$OUT/serve-$run.log" &
    pid=$!
    for _ in $(seq 60); do grep -q "modelpool ready" "/tmp/serve-$run.out" && break; sleep 1; done
    echo "== policy $policy, host-memory-budget $host"
    timeout 90 python3 -m modelpool.loadtests run --url 127.0.0.1:18001 --protocol grpc --metrics-url 127.0.0.1:18002 \
      --duration "$DURATION" --rate 200 --zipf 1.1 --quiet --out "$OUT/load-$run" 2>&1 | head -18
    # Loads by source and their p50/p99 times, from the gateway's counters (the
    # soak's own report of them).
    python3 - <<'EOF' | tee "$OUT/load-$run/loads_by_source.txt"
import urllib.request
from modelpool.loadtests.soak import format_loads_by_source, loads_by_source, parse_server_metrics
text = urllib.request.urlopen("http://127.0.0.1:18002/metrics", timeout=10).read().decode()
rows = loads_by_source(parse_server_metrics(text), parse_server_metrics(""))
print("loads by source: " + format_loads_by_source(rows))
EOF
    kill -INT $pid; wait $pid
  done
done
