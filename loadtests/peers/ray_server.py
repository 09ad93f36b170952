"""Run the Ray Serve peer in this process until told to stop:

    python -m loadtests.peers.ray_server --model-repository DIR --budget BYTES \\
        --replicas 1 --http-port P --metrics-port M --temp-dir /tmp/rp-xyz

Starts a private local Ray cluster bound to 127.0.0.1 (no dashboard, no usage stats),
serves ``ray_app`` on the given port and prints one ``ray peer ready ...`` line.
SIGINT, SIGTERM or EOF on stdin (the parent died) shut Serve and Ray down, so no
raylet or GCS outlives the run; ``processes.stop`` reaps whatever still does.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

#: Seconds for each of serve.shutdown() and ray.shutdown() before giving up on it.
SHUTDOWN_TIMEOUT_S = 30.0
#: Ray pushes metrics every 10 s by default; once a second lets a run read its final
#: load count a second after the last request instead of ten.
METRICS_REPORT_INTERVAL_MS = 1000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.peers.ray_server")
    p.add_argument("--model-repository", type=Path, required=True)
    p.add_argument("--budget", type=int, required=True, help="bytes")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--temp-dir", required=True, help="Ray's session root (short: socket paths)")
    p.add_argument("--max-ongoing-requests", type=int, default=100)
    return p.parse_args(argv)


def _bounded(what: str, fn: object) -> None:
    """Run a shutdown step in a thread and stop waiting after SHUTDOWN_TIMEOUT_S."""
    assert callable(fn)
    started = time.monotonic()
    t = threading.Thread(target=fn, name=what, daemon=True)
    t.start()
    t.join(SHUTDOWN_TIMEOUT_S)
    took = time.monotonic() - started
    if t.is_alive():
        print(f"ray peer: {what} did not finish in {took:.1f} s", file=sys.stderr, flush=True)
    else:
        print(f"ray peer: {what} took {took:.1f} s", file=sys.stderr, flush=True)


def _watch_stdin(stop: threading.Event) -> None:
    # EOF means the parent is gone (or closed the pipe to stop us). A raw read: a
    # daemon thread blocked inside sys.stdin's buffered reader holds its lock, and the
    # interpreter aborts at exit when it cannot take it.
    while os.read(sys.stdin.fileno(), 4096):
        pass
    stop.set()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray swaps a 127.0.0.1 node address for the machine's routable one unless it
    # thinks it is on a laptop (a single-node "cluster"); with this, its daemons and
    # workers listen on loopback only (all but the Serve replica's internal gRPC
    # server, which ray/serve/_private/replica.py binds to [::] unconditionally).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import torch

    # torch's default in a fresh process, as modelpool's workers get; read before Ray
    # sets OMP_NUM_THREADS for its workers.
    threads = torch.get_num_threads()

    import ray
    from ray import serve

    from modelpool.loadtests.peers.budget import map_budget
    from modelpool.loadtests.peers.ray_app import build_app
    from modelpool.loadtests.peers.signatures import read_signatures

    signatures = read_signatures(args.model_repository)
    mapping = map_budget(
        args.budget, [s.artifact_bytes for s in signatures.values()], args.replicas
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=_watch_stdin, args=(stop,), daemon=True).start()

    started = time.monotonic()
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        num_cpus=os.cpu_count() or 1,
        _temp_dir=args.temp_dir,
        _metrics_export_port=args.metrics_port,
        _system_config={"metrics_report_interval_ms": METRICS_REPORT_INTERVAL_MS},
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.http_port})
        serve.run(
            build_app(signatures, mapping, args.max_ongoing_requests, threads),
            name="modelpool-peer",
            route_prefix="/",
        )
        print(
            f"ray peer ready http={args.http_port} metrics={args.metrics_port} "
            f"replicas={mapping.replicas} max_models_per_replica={mapping.max_models_per_replica} "
            f"ray={ray.__version__} startup_s={time.monotonic() - started:.1f}",
            flush=True,
        )
        stop.wait()
    finally:
        _bounded("serve.shutdown", serve.shutdown)
        _bounded("ray.shutdown", ray.shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
