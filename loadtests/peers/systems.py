"""The systems under test: how each is started on 127.0.0.1 with the same budget, which
protocols it is driven over, and where its own count of model loads comes from.

- modelpool: ``modelpool serve --device-memory-budget B --workers R``; HTTP and gRPC.
  Cold starts: ``modelpool_model_loads_total`` (loads it started) from its /metrics.
- ray: Ray Serve with ``@serve.multiplexed`` (``ray_app``), R replicas holding
  ``budget.map_budget(B, sizes, R).max_models_per_replica`` models each; HTTP only,
  since Ray Serve's gRPC proxy serves user-compiled services, not KServe v2's.
  Cold starts: Ray's own ``ray_serve_multiplexed_models_load_counter_total`` from the
  cluster's Prometheus export port.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelpool.gateway.server import READY_RE as MODELPOOL_READY
from modelpool.loadtests.peers.processes import ServerProcess

SYSTEMS = ("modelpool", "ray")
PROTOCOLS: dict[str, tuple[str, ...]] = {"modelpool": ("http", "grpc"), "ray": ("http",)}
#: The counter each system's /metrics exposes for model loads, summed over labels.
LOAD_COUNTERS: dict[str, str] = {
    "modelpool": "modelpool_model_loads_total",
    "ray": "ray_serve_multiplexed_models_load_counter_total",
}
#: Systems whose metrics are pushed periodically rather than read live: their final
#: count is read once it settles.
PUSHED_METRICS = frozenset({"ray"})
#: Ray's multiplexed routing header, on every request to it.
MODEL_HEADERS: dict[str, str | None] = {"modelpool": None, "ray": "serve_multiplexed_model_id"}

RAY_READY = re.compile(r"ray peer ready http=(\d+) metrics=(\d+)")

#: Seconds a system may take to become ready; Ray starts a whole cluster.
STARTUP_TIMEOUT_S = 240.0
#: Seconds a system gets to shut down cleanly before it is killed.
SHUTDOWN_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Started:
    system: str
    process: ServerProcess
    #: protocol -> HOST:PORT
    urls: dict[str, str]
    metrics_url: str
    #: A string in the command line of every daemon it spawned (Ray's session root),
    #: so they are found even when orphaned.
    marker: str | None = None

    def stop(self) -> list[int]:
        """Stop it and everything it spawned; returns pids that had to be killed."""
        killed = self.process.stop(SHUTDOWN_TIMEOUT_S, self.marker)
        if self.marker is not None:
            shutil.rmtree(self.marker, ignore_errors=True)
        return killed


def free_port() -> int:
    # The port is free when we look; the server binds it a moment later. Another
    # process could take it in between, which would fail the start loudly, not silently.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_modelpool(
    repo: Path,
    budget_bytes: int,
    replicas: int,
    logs: Path,
    policy: str = "gdsf",
    extra_args: tuple[str, ...] = (),
) -> Started:
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "serve", "--model-repository", str(repo),
        "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--device-memory-budget", str(budget_bytes), "--workers", str(replicas),
        "--policy", policy, "--no-warm-restart", *extra_args,
    ]  # fmt: skip
    proc = ServerProcess(cmd, logs / "modelpool.log")
    try:
        m = proc.wait_ready(MODELPOOL_READY, STARTUP_TIMEOUT_S)
    except BaseException:
        proc.stop(SHUTDOWN_TIMEOUT_S)
        raise
    return Started(
        "modelpool",
        proc,
        {"http": f"127.0.0.1:{m[1]}", "grpc": f"127.0.0.1:{m[2]}"},
        f"127.0.0.1:{m[3]}",
    )


def start_ray(repo: Path, budget_bytes: int, replicas: int, logs: Path) -> Started:
    http_port, metrics_port = free_port(), free_port()
    # Short on purpose: Ray puts unix sockets under it, and their paths are limited
    # to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")
    cmd = [
        sys.executable, "-m", "modelpool.loadtests.peers.ray_server", "--model-repository", str(repo),
        "--budget", str(budget_bytes), "--replicas", str(replicas),
        "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    proc = ServerProcess(cmd, logs / "ray.log", env=env)
    try:
        m = proc.wait_ready(RAY_READY, STARTUP_TIMEOUT_S)
    except BaseException:
        proc.stop(SHUTDOWN_TIMEOUT_S, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return Started("ray", proc, {"http": f"127.0.0.1:{m[1]}"}, f"127.0.0.1:{m[2]}", marker=temp_dir)


def start(
    system: str,
    repo: Path,
    budget_bytes: int,
    replicas: int,
    logs: Path,
    policy: str = "gdsf",
    modelpool_args: tuple[str, ...] = (),
) -> Started:
    if system == "modelpool":
        return start_modelpool(repo, budget_bytes, replicas, logs, policy, modelpool_args)
    if system == "ray":
        return start_ray(repo, budget_bytes, replicas, logs)
    raise ValueError(f"unknown system {system!r} (known: {', '.join(SYSTEMS)})")
