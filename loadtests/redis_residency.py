"""Redis on the warm path: commands per warm request (from Redis' own command
statistics) and gateway throughput with the Redis store against the in-memory store,
in one run.

    python -m loadtests.redis_residency [--requests N] [--concurrency C] [--out FILE.json]

The goal is 0 Redis commands per warm request apart from batched last-use writes and
heartbeats, which run on timers whatever the traffic. The benchmark therefore measures
an idle window and a loaded window of the same length: what the load adds, divided by
the requests, is what the request path costs Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from modelpool.loadtests.closed_loop import drive
from modelpool.loadtests.servers import redis_server, serving


def command_calls(url: str) -> dict[str, int]:
    import redis

    stats = redis.Redis.from_url(url).info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


async def closed_loop(url: str, models: list[dict], total: int, concurrency: int) -> float:
    """Send ``total`` requests with ``concurrency`` in flight; returns requests/second."""
    import tritonclient.grpc.aio as tgrpc

    client = tgrpc.InferenceServerClient(url)
    payloads = []
    for m in models:
        inputs = []
        for t in m["inputs"]:
            shape = [1] + [int(d) if int(d) > 0 else 1 for d in t["shape"][1:]]
            dtype = np.float32 if t["datatype"] == "FP32" else np.int64
            x = tgrpc.InferInput(t["name"], shape, t["datatype"])
            x.set_data_from_numpy(np.ones(shape, dtype=dtype))
            inputs.append(x)
        payloads.append((m["name"], inputs))
    try:
        return await drive(client, payloads, total, concurrency)
    finally:
        await client.close()


def model_metadata(url: str) -> list[dict]:
    import tritonclient.grpc as tgrpc

    client = tgrpc.InferenceServerClient(url)
    names = [m.name for m in client.get_model_repository_index().models]
    return [client.get_model_metadata(n, as_json=True) for n in names]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default="redis_residency.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mp-redis-"))
    from modelpool.gpu.examples import write_examples

    repo = work / "models"
    write_examples(repo, count=8)
    results: dict[str, dict] = {}
    with redis_server(work) as url:
        for mode, extra in (("in-memory", []), ("redis", ["--redis-url", url])):
            print(f"{mode}: starting modelpool serve", file=sys.stderr)
            with serving(repo, [*extra, "--threads", "1"], work / f"{mode}.log") as s:
                models = model_metadata(s.grpc_url)
                asyncio.run(closed_loop(s.grpc_url, models, len(models) * 5, 1))  # all warm
                if mode == "redis":
                    window_start = time.monotonic()
                    idle_before = command_calls(url)
                rps = asyncio.run(closed_loop(s.grpc_url, models, args.requests, args.concurrency))
                entry: dict = {"throughput_rps": rps}
                if mode == "redis":
                    loaded = diff(command_calls(url), idle_before)
                    seconds = time.monotonic() - window_start
                    idle_before = command_calls(url)
                    time.sleep(seconds)  # the same window, no traffic: the timers' share
                    idle = diff(command_calls(url), idle_before)
                    added = {k: v - idle.get(k, 0) for k, v in loaded.items()}
                    entry.update(
                        window_s=seconds,
                        commands_loaded=loaded,
                        commands_idle=idle,
                        commands_per_request=sum(loaded.values()) / args.requests,
                        added_commands_per_request=max(0, sum(added.values())) / args.requests,
                    )
                results[mode] = entry
    ratio = results["redis"]["throughput_rps"] / results["in-memory"]["throughput_rps"]
    r = results["redis"]
    print(f"\nwarm requests: {args.requests}, concurrency {args.concurrency}, 8 example models")
    print(f"{'store':<10} {'req/s':>9} {'ratio':>6}")
    for mode, e in results.items():
        print(
            f"{mode:<10} {e['throughput_rps']:9.1f} {e['throughput_rps'] / results['in-memory']['throughput_rps']:6.2f}"
        )
    print(f"\nredis commands in a {r['window_s']:.1f}s loaded window: {r['commands_loaded']}")
    print(f"redis commands in an idle window of the same length: {r['commands_idle']}")
    print(f"commands per warm request, all:          {r['commands_per_request']:.4f}")
    print(f"commands per warm request, beyond idle:  {r['added_commands_per_request']:.4f}")
    doc = {
        "benchmark": "redis_residency",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "results": results,
        "throughput_ratio_redis_vs_memory": ratio,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
