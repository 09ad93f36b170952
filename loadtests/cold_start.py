"""Cold-start floor: request-to-reply for a model that is not resident, against
``torch.jit.load`` + one forward in a bare process, per model size, in one run.

    python -m loadtests.cold_start [--sizes 8,64,256] [--repeats 5] [--device cpu|cuda:0] [--out FILE.json]

Both sides read the artifact from a warm page cache and have run torch before (one
untimed load and forward first), and the bare side's timer starts after ``import torch``: the comparison is what modelpool adds
to loading and running the model (scheduling, gRPC, measuring the footprint, the
gateway's bookkeeping), not Python start-up. The goal is a ratio of at most 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelpool.loadtests.servers import serving

BARE = r"""
import sys, time, torch
path, device, width = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.zeros(1, width)
# One untimed load and forward: the page cache, torch's thread pools and kernels are
# warm in a server that has run before, so they are warm here too.
with torch.inference_mode():
    torch.jit.load(path, map_location=device)(x.to(device))
t = time.perf_counter()
m = torch.jit.load(path, map_location=device)
m.eval()
with torch.inference_mode():
    y = m(x.to(device))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    y.cpu()
print(time.perf_counter() - t)
"""


def bare_seconds(path: Path, device: str, width: int, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(
        [sys.executable, "-c", BARE, str(path), device, str(width)],
        capture_output=True, text=True, check=True, env=env, timeout=600,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as tgrpc

    from modelpool.gpu.examples import Example, write_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,64,256", help="model sizes in MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--out", default="cold_start.json")
    args = p.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mp-cold-"))
    repo = work / "models"
    models = []
    for i, mb in enumerate(sizes):
        ex = Example(i, "mlp", mb)
        print(f"writing {ex.name}", file=sys.stderr, flush=True)
        models.append((ex.name, mb, write_model(repo, ex, seed=0)))
    budget = f"{max(sizes) * 4}MB"
    extra = ["--device-memory-budget", budget, "--threads", str(args.threads), "--max-copies", "1"]
    if args.device != "cpu":
        extra += ["--devices", args.device]
    rows: list[dict] = []
    with serving(repo, extra, work / "serve.log") as server:
        client = tgrpc.InferenceServerClient(server.grpc_url)
        for name, mb, path in models:
            meta = client.get_model_metadata(name, as_json=True)
            t = meta["inputs"][0]
            width = int(t["shape"][1])
            x = tgrpc.InferInput(t["name"], [1, width], t["datatype"])
            x.set_data_from_numpy(np.zeros((1, width), np.float32))
            client.infer(name, [x])  # first load warms the page cache and torch's paths
            served, bare = [], []
            for r in range(args.repeats):
                client.unload_model(name)
                start = time.perf_counter()
                client.infer(name, [x])
                served.append(time.perf_counter() - start)
                bare.append(bare_seconds(path, args.device, width, args.threads))
                print(f"  {name}: {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            s, b = statistics.median(served), statistics.median(bare)
            rows.append({"model": name, "size_mb": mb, "modelpool_ms": s * 1e3, "bare_ms": b * 1e3, "ratio": s / b,
                         "modelpool_samples_ms": [v * 1e3 for v in served], "bare_samples_ms": [v * 1e3 for v in bare]})  # fmt: skip
    print(
        f"\ncold start on {args.device}, median of {args.repeats}, {args.threads} torch threads each side"
    )
    print(f"{'model':<16} {'MB':>5} {'bare ms':>9} {'modelpool ms':>13} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['model']:<16} {row['size_mb']:>5} {row['bare_ms']:9.1f} {row['modelpool_ms']:13.1f} {row['ratio']:6.2f}"
        )
    Path(args.out).write_text(
        json.dumps({"benchmark": "cold_start", "device": args.device, "rows": rows}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
