"""Reload from the host-RAM tier against the pinned host-to-device bandwidth, per
model size, in one run.

    python -m loadtests.host_tier --device cuda:0 [--sizes 256,1024,4096] [--rounds 3] [--out FILE.json]

Per size, two models that do not fit on the device together take turns through a real
``modelpool serve --host-memory-budget``: each request evicts the other model to host
RAM and promotes its own from there. The figure is the worker's own promote time (the
``source="host"`` load duration the gateway records), against ``bytes / bandwidth``
with the bandwidth of a pinned ``non_blocking`` copy of as many bytes measured on the
same device beforehand; the goal is at most 1.25x that plus 50 ms. A disk load of the
same model (the first round) is shown beside it.

On a CPU there is no device copy to measure: ``--device cpu`` runs the same traffic
with the test hook ``MODELPOOL_FAKE_HOST_TIER=1`` (promotion keeps the module), which
shows that loads come from the host tier, not how fast.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np

from modelpool.loadtests.servers import serving

BANDWIDTH = r"""
import sys, time, torch
n, device = int(sys.argv[1]), sys.argv[2]
src = torch.empty(n, dtype=torch.uint8, pin_memory=True)
dst = torch.empty(n, dtype=torch.uint8, device=device)
dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
times = []
for _ in range(5):
    t = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
times.sort()
print(n / times[len(times) // 2])
"""


def pinned_h2d_bytes_per_s(nbytes: int, device: str) -> float | None:
    """Median bandwidth of a pinned non_blocking copy of ``nbytes`` to ``device``
    (None on a CPU)."""
    if not device.startswith("cuda"):
        return None
    out = subprocess.run(
        [sys.executable, "-c", BANDWIDTH, str(nbytes), device],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def load_seconds(metrics_url: str, model: str, source: str) -> tuple[float, int]:
    """(sum, count) of the gateway's load-duration histogram for one model and source."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    total, count = 0.0, 0
    for family in text_string_to_metric_families(text):
        if family.name != "modelpool_model_load_duration_seconds":
            continue
        for s in family.samples:
            if s.labels.get("model") != model or s.labels.get("source") != source:
                continue
            if s.name.endswith("_sum"):
                total = float(s.value)
            elif s.name.endswith("_count"):
                count = int(s.value)
    return total, count


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as tgrpc

    from modelpool.gpu.examples import Example, write_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="256,1024,4096", help="model sizes in MB")
    p.add_argument("--rounds", type=int, default=3, help="host reloads per model")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--out", default="host_tier.json")
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mp-hosttier-"))
    rows: list[dict] = []
    env = dict(os.environ)
    if args.device == "cpu":
        env["MODELPOOL_FAKE_HOST_TIER"] = "1"
    for i, mb in enumerate(sizes):
        repo = work / f"models-{mb}"
        pair = [Example(2 * i, "mlp", mb), Example(2 * i + 1, "mlp", mb)]
        for ex in pair:
            print(f"writing {ex.name}", file=sys.stderr, flush=True)
            write_model(repo, ex, seed=0)
        # Room for one copy of the pair on the device, both in host RAM.
        extra = [
            "--device-memory-budget", f"{int(mb * 1.6)}MB",
            "--host-memory-budget", f"{mb * 3}MB",
            "--min-residency", "0", "--admission-window", "0", "--max-copies", "1",
            "--devices", args.device,
        ]  # fmt: skip
        with serving(repo, extra, work / f"serve-{mb}.log", env=env) as server:
            client = tgrpc.InferenceServerClient(server.grpc_url)
            inputs = {}
            for ex in pair:
                t = client.get_model_metadata(ex.name, as_json=True)["inputs"][0]
                x = tgrpc.InferInput(t["name"], [1, int(t["shape"][1])], t["datatype"])
                x.set_data_from_numpy(np.zeros((1, int(t["shape"][1])), np.float32))
                inputs[ex.name] = x
            metrics = f"127.0.0.1:{server.metrics_port}"
            for r in range(args.rounds + 1):
                for ex in pair:
                    client.infer(ex.name, [inputs[ex.name]])
                print(f"  {mb} MB: round {r + 1}/{args.rounds + 1}", file=sys.stderr, flush=True)
            for ex in pair:
                disk_sum, disk_n = load_seconds(metrics, ex.name, "disk")
                host_sum, host_n = load_seconds(metrics, ex.name, "host")
                rows.append({"model": ex.name, "size_mb": mb, "disk_loads": disk_n,
                             "host_loads": host_n,
                             "disk_ms": disk_sum / disk_n * 1e3 if disk_n else None,
                             "host_ms": host_sum / host_n * 1e3 if host_n else None})  # fmt: skip
        bandwidth = pinned_h2d_bytes_per_s(mb * 1_000_000, args.device)
        for row in rows[-2:]:
            row["h2d_gb_s"] = bandwidth / 1e9 if bandwidth else None
            row["bound_ms"] = mb * 1_000_000 / bandwidth * 1e3 if bandwidth else None
            row["goal_ms"] = row["bound_ms"] * 1.25 + 50 if bandwidth else None
            row["ratio"] = (
                row["host_ms"] / row["bound_ms"] if bandwidth and row["host_ms"] else None
            )

    def cell(value: float | None, fmt: str) -> str:
        return "-".rjust(int(fmt.split(".")[0])) if value is None else format(value, fmt)

    print(
        f"\nhost-tier reload on {args.device}: the worker's promote time, mean of each model's host loads"
    )
    print(f"{'model':<16} {'MB':>5} {'H2D GB/s':>9} {'bound ms':>9} {'host ms':>9} {'disk ms':>9} {'x bound':>8} {'goal ms':>8}")  # fmt: skip
    for row in rows:
        print(
            f"{row['model']:<16} {row['size_mb']:>5} {cell(row['h2d_gb_s'], '9.1f')} "
            f"{cell(row['bound_ms'], '9.1f')} {cell(row['host_ms'], '9.1f')} "
            f"{cell(row['disk_ms'], '9.1f')} {cell(row['ratio'], '8.2f')} {cell(row['goal_ms'], '8.1f')}"
        )
    summary = {
        "benchmark": "host_tier",
        "device": args.device,
        "rows": rows,
        "median_ratio": statistics.median([r["ratio"] for r in rows if r["ratio"]])
        if any(r["ratio"] for r in rows)
        else None,
    }
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
