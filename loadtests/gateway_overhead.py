"""Gateway overhead: warm small-tensor latency through the gateway (REST and gRPC)
against calling the worker that holds the model directly, in one run.

    python -m loadtests.gateway_overhead [--requests N] [--model NAME] [--out FILE.json]

Starts its own ``modelpool serve`` over the example models (or --model-repository),
warms the model, then times N sequential requests per path and prints p50/p99 with
ratios against the direct worker call. Ratios, not absolute figures, are the result:
these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from modelpool.loadtests.servers import holder_address, start_serve, stop


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.array(samples) * 1000.0
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def time_interleaved(paths: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Time ``n`` calls of every path, taking turns call by call, so a noisy moment on
    this shared machine lands on all paths alike instead of on one block."""
    for call in paths.values():
        for _ in range(min(50, n)):
            call()  # warm connections and the model's first-run paths
    out: dict[str, list[float]] = {label: [] for label in paths}
    step = max(1, n // 10)
    for i in range(n):
        for label, call in paths.items():
            t = time.perf_counter()
            call()
            out[label].append(time.perf_counter() - t)
        if (i + 1) % step == 0:
            print(f"  {i + 1}/{n} rounds", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", default=None, help="default: generate the example models")
    p.add_argument("--model", default="mlp_00_2mb")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--batch", type=int, default=1, help="rows per request (payload size)")
    p.add_argument("--out", default="gateway_overhead.json")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for modelpool serve"
    )
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mp-overhead-"))
    repo = Path(args.model_repository) if args.model_repository else work / "models"
    if args.model_repository is None:
        from modelpool.gpu.examples import write_examples

        write_examples(repo, count=8)
    server = start_serve(repo, args.serve_arg, work / "serve.log")
    http_port, grpc_port = server.http_port, server.grpc_port
    try:
        http = thttp.InferenceServerClient(f"127.0.0.1:{http_port}")
        grpc = tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        meta = grpc.get_model_metadata(args.model, as_json=True)
        t = meta["inputs"][0]
        shape = [args.batch] + [int(d) if int(d) > 0 else 1 for d in t["shape"][1:]]
        data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        grpc.load_model(args.model)
        address = holder_address(f"127.0.0.1:{http_port}", args.model)
        direct = tgrpc.InferenceServerClient(address)

        def g_input(mod):
            x = mod.InferInput(t["name"], shape, t["datatype"])
            x.set_data_from_numpy(data)
            return [x]

        h_in, g_in = g_input(thttp), g_input(tgrpc)
        paths = {
            "worker grpc (direct)": lambda: direct.infer(args.model, g_in, model_version="1"),
            "gateway grpc": lambda: grpc.infer(args.model, g_in),
            "gateway http": lambda: http.infer(args.model, h_in),
        }
        samples = time_interleaved(paths, args.requests)
        results = {label: percentiles(v) for label, v in samples.items()}
    finally:
        stop(server.proc)

    base = results["worker grpc (direct)"]
    rows = []
    for label, r in results.items():
        r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
        r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
        r["p50_added_ms"] = r["p50_ms"] - base["p50_ms"]
        rows.append((label, r))
    print(
        f"\ngateway overhead: model {args.model}, input {shape} FP32, {args.requests} sequential requests"
    )
    print(f"{'path':<22} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>7} {'p99 x':>7} {'p50 +ms':>8}")
    for label, r in rows:
        print(
            f"{label:<22} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['p50_ratio']:7.2f} "
            f"{r['p99_ratio']:7.2f} {r['p50_added_ms']:8.3f}"
        )
    doc = {
        "benchmark": "gateway_overhead",
        "model": args.model,
        "requests": args.requests,
        "cpu_count": os.cpu_count(),
        "paths": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
