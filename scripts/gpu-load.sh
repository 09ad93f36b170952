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
    # Loads by source and their mean time, from the gateway's counters.
    python3 - <<'EOF' | tee "$OUT/load-$run/loads_by_source.txt"
import urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen("http://127.0.0.1:18002/metrics", timeout=10).read().decode()
n, s = {}, {}
for family in text_string_to_metric_families(text):
    for x in family.samples:
        src = x.labels.get("source")
        if x.name == "modelpool_model_loads_total" and x.labels.get("outcome") == "success":
            n[src] = n.get(src, 0) + x.value
        elif x.name == "modelpool_model_load_duration_seconds_sum":
            s[src] = s.get(src, 0) + x.value
print("loads by source: " + (", ".join(
    f"{k} {v:.0f} (mean {1e3 * s.get(k, 0) / v:.0f} ms)" for k, v in sorted(n.items()) if v
) or "none"))
EOF
    kill -INT $pid; wait $pid
  done
done
