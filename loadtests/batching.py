"""Dynamic batching: throughput of one model with and without Triton's
``dynamic_batching`` under concurrent requests, in one run.

    python -m loadtests.batching [--model-size-mb 32] [--requests 2000] [--concurrency 16] [--out FILE.json]

The same example model is written twice, once with ``dynamic_batching {}`` in its
config; both are served by one ``modelpool serve`` and driven in turn by the same
closed loop of gRPC requests (batch 1 each), warm. Prints requests/s and the ratio,
and the worker's own count of forward calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from modelpool.loadtests.closed_loop import drive
from modelpool.loadtests.servers import holder_address, serving


async def closed_loop(url: str, model: str, width: int, total: int, concurrency: int) -> float:
    import tritonclient.grpc.aio as tgrpc

    client = tgrpc.InferenceServerClient(url)
    x = tgrpc.InferInput("input", [1, width], "FP32")
    x.set_data_from_numpy(np.random.default_rng(0).standard_normal((1, width)).astype(np.float32))
    try:
        await client.infer(model, [x])  # load it
        return await drive(client, [(model, [x])], total, concurrency, label=f"{model}: ")
    finally:
        await client.close()


async def worker_counts(http_url: str) -> dict[str, tuple[int, int]]:
    from modelpool.gateway.workers import WorkerClient

    client = WorkerClient("w", await asyncio.to_thread(holder_address, http_url))
    try:
        status = await client.status(timeout_s=10)
    finally:
        await client.close()
    return {c.model: (c.inferences, c.executions) for c in status.copies}


def main(argv: list[str] | None = None) -> int:
    from modelpool.gpu.examples import Example, write_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-size-mb", type=int, default=32)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--delay-us", type=int, default=0, help="max_queue_delay_microseconds")
    p.add_argument("--out", default="batching.json")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for modelpool serve"
    )
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mp-batching-"))
    repo = work / "models"
    ex = Example(0, "mlp", args.model_size_mb)
    write_model(repo, ex, seed=0)
    plain, batched = repo / "plain", repo / "batched"
    (repo / ex.name).rename(plain)
    shutil.copytree(plain, batched)
    for d in (plain, batched):
        cfg = d / "config.pbtxt"
        cfg.write_text(cfg.read_text().replace(f'name: "{ex.name}"', f'name: "{d.name}"'))
    cfg = batched / "config.pbtxt"
    cfg.write_text(
        cfg.read_text() + f"dynamic_batching {{ max_queue_delay_microseconds: {args.delay_us} }}\n"
    )
    width = 64
    results: dict[str, dict] = {}
    with serving(repo, ["--max-copies", "1", *args.serve_arg], work / "serve.log") as s:
        for model in ("plain", "batched"):
            rps = asyncio.run(
                closed_loop(s.grpc_url, model, width, args.requests, args.concurrency)
            )
            results[model] = {"throughput_rps": rps}
        counts = asyncio.run(worker_counts(s.http_url))
    for model, (inferences, executions) in counts.items():
        results[model].update(inferences=inferences, executions=executions)
    ratio = results["batched"]["throughput_rps"] / results["plain"]["throughput_rps"]
    print(
        f"\ndynamic batching: {ex.size_mb} MB MLP, {args.requests} requests of batch 1, concurrency {args.concurrency}"
    )
    print(f"{'config':<9} {'req/s':>9} {'forwards':>9} {'rows/forward':>13} {'ratio':>6}")
    for model, r in results.items():
        per = r["inferences"] / max(1, r["executions"])
        print(f"{model:<9} {r['throughput_rps']:9.1f} {r['executions']:9d} {per:13.2f} "
              f"{r['throughput_rps'] / results['plain']['throughput_rps']:6.2f}")  # fmt: skip
    Path(args.out).write_text(
        json.dumps({"benchmark": "batching", "results": results, "ratio": ratio}, indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
