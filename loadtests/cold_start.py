"""Cold-start floor: request-to-reply for a model that is not resident, against
``torch.jit.load`` + one forward in a bare process, per model size, in one run.

    python -m loadtests.cold_start [--sizes 8,64,256] [--repeats 5] [--device cpu|cuda:0] [--out FILE.json]
        [--no-cold-pipeline | --paired N]

Both sides read the artifact from a warm page cache and have run torch before (one
untimed load and forward first), and the bare side's timer starts after ``import torch``: the comparison is what modelpool adds
to loading and running the model (scheduling, gRPC, measuring the footprint, the
gateway's bookkeeping), not Python start-up. The goal is a ratio of at most 1.2.

Each repeat also times a warm request, the third after the load (TorchScript's
profiling executor still optimizes the graph on its first runs): ``warm ms`` is the
fixed per-request cost (client -> gateway -> worker and back) that a bare
``torch.jit.load`` + forward never pays, so ``cold - warm`` is what the load itself
costs through modelpool. ``--no-cold-pipeline`` runs the gateway with
``MODELPOOL_COLD_PIPELINE=0`` (the infer waits for READY instead of following the
Load RPC at once), for before/after figures. ``--paired N`` instead starts two
servers, pipeline on and off, and alternates N cold requests per size between them,
so both sides see the same machine: on a busy host the difference of two separate
runs is mostly noise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


def _input(client: Any, name: str) -> Any:
    import tritonclient.grpc as tgrpc

    t = client.get_model_metadata(name, as_json=True)["inputs"][0]
    width = int(t["shape"][1])
    x = tgrpc.InferInput(t["name"], [1, width], t["datatype"])
    x.set_data_from_numpy(np.zeros((1, width), np.float32))
    return x


def paired(
    repo: Path, extra: list[str], work: Path, models: list[tuple[str, int, Path]], n: int, out: str
) -> int:
    """Cold requests alternated between a server with the cold pipeline and one
    without (each first in turn), ``n`` each per model: medians and quartiles."""
    import tritonclient.grpc as tgrpc

    modes = {"on": "1", "off": "0"}
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        clients = {}
        for mode, flag in modes.items():
            env = dict(os.environ, MODELPOOL_COLD_PIPELINE=flag)
            server = stack.enter_context(serving(repo, extra, work / f"serve-{mode}.log", env=env))
            clients[mode] = tgrpc.InferenceServerClient(server.grpc_url)
        for name, mb, _path in models:
            x = _input(clients["on"], name)
            for client in clients.values():
                client.infer(name, [x])  # page cache and torch's paths warm on both
            times: dict[str, list[float]] = {mode: [] for mode in modes}
            for r in range(n):
                for mode in ("on", "off") if r % 2 else ("off", "on"):
                    clients[mode].unload_model(name)
                    start = time.perf_counter()
                    clients[mode].infer(name, [x])
                    times[mode].append((time.perf_counter() - start) * 1e3)
            row: dict = {"model": name, "size_mb": mb}
            for mode, v in times.items():
                q = statistics.quantiles(v, n=4)
                row[mode] = {"median_ms": statistics.median(v), "p25_ms": q[0], "p75_ms": q[2]}
                row[f"{mode}_samples_ms"] = v
            rows.append(row)
    print(f"\ncold requests alternated between two servers, {n} each, median (p25-p75) ms")
    print(f"{'model':<16} {'MB':>5} {'pipeline on':>20} {'pipeline off':>20}")
    for row in rows:
        cells = [
            f"{row[m]['median_ms']:.1f} ({row[m]['p25_ms']:.1f}-{row[m]['p75_ms']:.1f})"
            for m in modes
        ]
        print(f"{row['model']:<16} {row['size_mb']:>5} {cells[0]:>20} {cells[1]:>20}")
    Path(out).write_text(json.dumps({"benchmark": "cold_start_paired", "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as tgrpc

    from modelpool.gpu.examples import Example, write_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="8,64,256", help="model sizes in MB")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--out", default="cold_start.json")
    p.add_argument(
        "--no-cold-pipeline", action="store_true",
        help="send a cold request's infer only once its copy is READY (the old path)",
    )  # fmt: skip
    p.add_argument("--paired", type=int, default=0, help="N: cold requests, pipeline on vs off")
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
    if args.paired:
        return paired(repo, extra, work, models, args.paired, args.out)
    rows: list[dict] = []
    env = dict(os.environ, MODELPOOL_COLD_PIPELINE="0") if args.no_cold_pipeline else None
    with serving(repo, extra, work / "serve.log", env=env) as server:
        client = tgrpc.InferenceServerClient(server.grpc_url)
        for name, mb, path in models:
            meta = client.get_model_metadata(name, as_json=True)
            t = meta["inputs"][0]
            width = int(t["shape"][1])
            x = tgrpc.InferInput(t["name"], [1, width], t["datatype"])
            x.set_data_from_numpy(np.zeros((1, width), np.float32))
            client.infer(name, [x])  # first load warms the page cache and torch's paths
            served, warm, bare = [], [], []
            for r in range(args.repeats):
                client.unload_model(name)
                start = time.perf_counter()
                client.infer(name, [x])
                served.append(time.perf_counter() - start)
                # TorchScript optimizes the graph on the first runs after a load:
                # the floor is the third request.
                client.infer(name, [x])
                start = time.perf_counter()
                client.infer(name, [x])
                warm.append(time.perf_counter() - start)
                bare.append(bare_seconds(path, args.device, width, args.threads))
                print(f"  {name}: {r + 1}/{args.repeats}", file=sys.stderr, flush=True)
            s, b = statistics.median(served), statistics.median(bare)
            wm = statistics.median(warm)
            rows.append({"model": name, "size_mb": mb, "modelpool_ms": s * 1e3, "bare_ms": b * 1e3, "ratio": s / b,
                         "warm_ms": wm * 1e3, "cold_minus_warm_ms": (s - wm) * 1e3,
                         "modelpool_samples_ms": [v * 1e3 for v in served], "warm_samples_ms": [v * 1e3 for v in warm],
                         "bare_samples_ms": [v * 1e3 for v in bare]})  # fmt: skip
    pipeline = "off" if args.no_cold_pipeline else "on"
    print(
        f"\ncold start on {args.device}, median of {args.repeats}, {args.threads} torch threads each side, "
        f"cold pipeline {pipeline}"
    )
    print(
        f"{'model':<16} {'MB':>5} {'bare ms':>9} {'modelpool ms':>13} {'ratio':>6} "
        f"{'warm ms':>8} {'cold - warm ms':>15}"
    )
    for row in rows:
        print(
            f"{row['model']:<16} {row['size_mb']:>5} {row['bare_ms']:9.1f} {row['modelpool_ms']:13.1f} "
            f"{row['ratio']:6.2f} {row['warm_ms']:8.1f} {row['cold_minus_warm_ms']:15.1f}"
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "benchmark": "cold_start",
                "device": args.device,
                "cold_pipeline": pipeline,
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
