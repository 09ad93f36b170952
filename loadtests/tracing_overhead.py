"""Tracing overhead: warm small-tensor gRPC latency with OpenTelemetry tracing off,
on at 1% sampling and (for information) on at 100%, in one run.

    python -m modelpool.loadtests.tracing_overhead [--requests N] [--out FILE.json]

Starts three ``modelpool serve`` over the same example model side by side: one with
no OTEL_* variables (off: no tracer at all), two exporting over OTLP/gRPC to a small
trace receiver this process runs (so the export path is the real one), sampling with
``parentbased_traceidratio`` at 0.01 and 1.0. Requests carry no ``traceparent``: each
starts its own trace, sampled by the ratio. Calls take turns server by server
(``time_rotated``), and the table gives p50/p99 with ratios against tracing off.
Ratios, not absolute figures, are the result: these machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import numpy as np

from modelpool.loadtests.gateway_overhead import percentiles
from modelpool.loadtests.servers import Serve, start_serve, stop

#: label -> the OTEL_* variables of its server (None: tracing off, no OTEL_* at all).
SETUPS: dict[str, dict[str, str] | None] = {
    "off": None,
    "on, 1% sampled": {"OTEL_TRACES_SAMPLER_ARG": "0.01"},
    "on, 100% sampled": {"OTEL_TRACES_SAMPLER_ARG": "1"},
}


class SpanSink:
    """An OTLP/gRPC trace receiver that only counts the spans it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def start(self) -> tuple[Any, str]:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tsvc_grpc

        sink = self

        class Servicer(tsvc_grpc.TraceServiceServicer):
            def Export(self, request: Any, context: Any) -> Any:
                n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
                with sink._lock:
                    sink.spans += n
                return tsvc.ExportTraceServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        tsvc_grpc.add_TraceServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, f"http://127.0.0.1:{port}"


def time_rotated(paths: dict[str, Callable[[], object]], n: int) -> dict[str, list[float]]:
    """Time ``n`` calls of every path, taking turns call by call, each round starting
    at the next path: a noisy moment lands on all alike, and no path always goes first
    (differences of a few percent are what this benchmark looks for)."""
    labels = list(paths)
    for call in paths.values():
        for _ in range(min(50, n)):
            call()  # warm connections and the model's first-run paths
    out: dict[str, list[float]] = {label: [] for label in labels}
    step = max(1, n // 10)
    for i in range(n):
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            t = time.perf_counter()
            paths[label]()
            out[label].append(time.perf_counter() - t)
        if (i + 1) % step == 0:
            print(f"  {i + 1}/{n} rounds", file=sys.stderr, flush=True)
    return out


def _env(endpoint: str, label: str, otel: dict[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    if otel is not None:
        env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_SERVICE_NAME=f"bench-{label.replace(' ', '').replace(',', '-')}",
            **otel,
        )
    return env


def main(argv: list[str] | None = None) -> int:
    import tritonclient.grpc as tgrpc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", default=None, help="default: generate the example models")
    p.add_argument("--model", default="mlp_00_2mb")
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--out", default="tracing_overhead.json")
    p.add_argument(
        "--serve-arg", action="append", default=[], help="extra argument for modelpool serve"
    )
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mp-tracing-"))
    repo = Path(args.model_repository) if args.model_repository else work / "models"
    if args.model_repository is None:
        from modelpool.gpu.examples import write_examples

        write_examples(repo, count=1)
    sink = SpanSink()
    receiver, endpoint = sink.start()
    servers: dict[str, Serve] = {}
    try:
        with futures.ThreadPoolExecutor(len(SETUPS)) as pool:
            starting = {
                label: pool.submit(
                    start_serve,
                    repo,
                    args.serve_arg,
                    work / f"serve-{i}.log",
                    env=_env(endpoint, label, otel),
                )
                for i, (label, otel) in enumerate(SETUPS.items())
            }
            for label, f in starting.items():
                servers[label] = f.result()
        clients = {label: tgrpc.InferenceServerClient(s.grpc_url) for label, s in servers.items()}
        meta = next(iter(clients.values())).get_model_metadata(args.model, as_json=True)
        t = meta["inputs"][0]
        shape = [1] + [int(d) if int(d) > 0 else 1 for d in t["shape"][1:]]
        data = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        x = tgrpc.InferInput(t["name"], shape, t["datatype"])
        x.set_data_from_numpy(data)

        def call(client: Any) -> Callable[[], object]:
            return lambda: client.infer(args.model, [x])

        paths = {label: call(c) for label, c in clients.items()}
        samples = time_rotated(paths, args.requests)
        results = {label: percentiles(v) for label, v in samples.items()}
    finally:
        for s in servers.values():
            stop(s.proc)  # flushes each one's spans on the way out
        receiver.stop(grace=None)

    base = results["off"]
    for r in results.values():
        r["p50_ratio"] = r["p50_ms"] / base["p50_ms"]
        r["p99_ratio"] = r["p99_ms"] / base["p99_ms"]
    print(
        f"\ntracing overhead: model {args.model}, input {shape} FP32, {args.requests} "
        f"sequential gRPC requests per server, {sink.spans} spans received"
    )
    print(f"{'tracing':<18} {'p50 ms':>8} {'p99 ms':>8} {'p50 x':>7} {'p99 x':>7}")
    for label, r in results.items():
        print(
            f"{label:<18} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} "
            f"{r['p50_ratio']:7.3f} {r['p99_ratio']:7.3f}"
        )
    doc = {
        "benchmark": "tracing_overhead",
        "model": args.model,
        "requests": args.requests,
        "cpu_count": os.cpu_count(),
        "spans_received": sink.spans,
        "setups": {label: otel for label, otel in SETUPS.items()},
        "paths": results,
    }
    Path(args.out).write_text(json.dumps(doc, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
