"""``python -m loadtests compare``: modelpool against its peers, one table.

    python -m loadtests compare --scenario steady_zipf --out results/compare \\
        --budget 64MiB --models-count 8

Writes an example repository, then starts each system in turn on 127.0.0.1 (ephemeral
ports) with the same memory budget over the same models, drives it with the same
open-loop Zipf workload (same seed, so the same arrivals and bodies) over HTTP, and
over gRPC where it has KServe v2 gRPC, stops it and everything it spawned, and writes
DIR/compare.json, DIR/compare.md and DIR/compare.png. Every system starts empty and is
restarted for each protocol, so each run pays its own cold starts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import platform
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from modelpool.loadtests.client import Adapter, RequestFailed, connect
from modelpool.loadtests.options import LoadOptions, load_scenario, merge
from modelpool.loadtests.peers import installed
from modelpool.loadtests.peers.budget import BudgetMapping, map_budget
from modelpool.loadtests.peers.counters import read_counter, settled_counter
from modelpool.loadtests.peers.http_adapter import V2JsonAdapter
from modelpool.loadtests.peers.signatures import Signature, read_signatures
from modelpool.loadtests.peers.systems import (
    LOAD_COUNTERS,
    MODEL_HEADERS,
    PROTOCOLS,
    PUSHED_METRICS,
    SYSTEMS,
    Started,
    start,
)
from modelpool.loadtests.peers.table import Row, to_json, to_markdown
from modelpool.loadtests.peers.timing import SlowCounter
from modelpool.loadtests.runner import run_load
from modelpool.placement.units import parse_size

log = logging.getLogger("loadtests.compare")

DEFAULT_BUDGET = "64MiB"
DEFAULT_MODELS = 8
#: A request slower than this counts as "slow" (felt a load, or queued behind one):
#: warm requests to these models take a few ms here, loads tens to hundreds.
DEFAULT_SLOW_MS = 100.0
#: Seconds between "still starting" lines while a system comes up.
STARTING_TICK_S = 5.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class CompareOptions:
    scenario: str
    out: Path
    budget_bytes: int
    models_count: int = DEFAULT_MODELS
    #: modelpool's --workers and Ray's num_replicas.
    replicas: int = 1
    #: Systems asked for; peers that are not installed are skipped and said so.
    systems: tuple[str, ...] = SYSTEMS
    slow_ms: float = DEFAULT_SLOW_MS
    #: Workload overrides of the scenario (None: the scenario's, or the default).
    duration: float | None = None
    rate: float | None = None
    seed: int | None = None
    #: modelpool's eviction policy (``--policy`` of ``modelpool serve``).
    policy: str = "gdsf"
    #: Further ``modelpool serve`` flags, e.g. ("--min-residency", "0.5").
    modelpool_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.budget_bytes <= 0:
            raise ValueError("budget must be positive")
        if self.models_count < 1:
            raise ValueError("models-count must be at least 1")
        if self.replicas < 1:
            raise ValueError("replicas must be at least 1")
        if self.slow_ms <= 0:
            raise ValueError("slow-ms must be positive")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or "modelpool" not in self.systems:
            raise ValueError(f"systems must include modelpool and be among {SYSTEMS}")

    def workload(self, url: str, protocol: str, metrics_url: str) -> LoadOptions:
        flags = {"duration": self.duration, "rate": self.rate, "seed": self.seed}
        target = {"url": url, "protocol": protocol, "metrics_url": metrics_url}
        return merge(target, load_scenario(self.scenario), flags)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", required=True, help="JSON file, or a name in loadtests/scenarios")
    p.add_argument("--out", required=True, type=Path, help="directory for compare.{json,md,png}")
    p.add_argument(
        "--budget",
        default=DEFAULT_BUDGET,
        help=f"memory budget per system (default {DEFAULT_BUDGET})",
    )
    p.add_argument(
        "--models-count",
        type=int,
        default=DEFAULT_MODELS,
        help=f"example models to generate (default {DEFAULT_MODELS})",
    )
    p.add_argument(
        "--replicas", type=int, default=1, help="modelpool workers = Ray replicas (default 1)"
    )
    p.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated (default {','.join(SYSTEMS)})",
    )
    p.add_argument(
        "--slow-ms",
        type=float,
        default=DEFAULT_SLOW_MS,
        help=f"a slower answer counts as slow (default {DEFAULT_SLOW_MS:g})",
    )
    p.add_argument("--duration", type=float, default=None, help="override the scenario's seconds")
    p.add_argument("--rate", type=float, default=None, help="override the scenario's rate")
    p.add_argument("--seed", type=int, default=None, help="override the scenario's seed")
    p.add_argument(
        "--policy", choices=["lru", "gdsf"], default="gdsf", help="modelpool's eviction policy"
    )
    p.add_argument(
        "--modelpool-args",
        default="",
        help="further `modelpool serve` flags, one string (e.g. '--min-residency 0.5')",
    )
    p.add_argument("--log-level", default="INFO")


def options_from(args: argparse.Namespace) -> CompareOptions:
    options = CompareOptions(
        scenario=args.scenario,
        out=args.out,
        budget_bytes=parse_size(args.budget),
        models_count=args.models_count,
        replicas=args.replicas,
        systems=tuple(s.strip() for s in args.systems.split(",") if s.strip()),
        slow_ms=args.slow_ms,
        duration=args.duration,
        rate=args.rate,
        seed=args.seed,
        policy=args.policy,
        modelpool_args=tuple(shlex.split(args.modelpool_args)),
    )
    # Fail on a bad scenario now, not after generating models and starting servers.
    options.workload("127.0.0.1:1", "http", "127.0.0.1:1")
    return options


def _adapter(
    system: str, protocol: str, load: LoadOptions, signatures: dict[str, Signature]
) -> Adapter:
    if protocol == "http":
        return V2JsonAdapter(
            load.url, signatures, load.timeout, load.max_outstanding, MODEL_HEADERS[system]
        )
    return connect(protocol, load.url, load.timeout, load.max_outstanding)


class _Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> str:
        return f"{time.monotonic() - self.t0:5.0f}s"


async def _start(
    system: str, options: CompareOptions, repo: Path, logs: Path, say: Progress
) -> tuple[Started, float]:
    """Start in a thread (it blocks on the ready line) while saying it is still going."""
    t0 = time.monotonic()
    task = asyncio.create_task(
        asyncio.to_thread(
            start,
            system,
            repo,
            options.budget_bytes,
            options.replicas,
            logs,
            options.policy,
            options.modelpool_args,
        )
    )
    while not task.done():
        await asyncio.wait({task}, timeout=STARTING_TICK_S)
        if not task.done():
            say(f"{system}: still starting ({time.monotonic() - t0:.0f} s)")
    return task.result(), time.monotonic() - t0


async def run_system(
    system: str,
    protocol: str,
    options: CompareOptions,
    repo: Path,
    signatures: dict[str, Signature],
    say: Progress,
    stop: asyncio.Event,
) -> Row:
    logs = options.out / "logs" / f"{system}-{protocol}"
    logs.mkdir(parents=True, exist_ok=True)
    say(f"{system} {protocol}: starting")
    started, startup_s = await _start(system, options, repo, logs, say)
    killed: list[int] = []
    try:
        say(f"{system} {protocol}: ready in {startup_s:.1f} s at {started.urls[protocol]}")
        counter = LOAD_COUNTERS[system]
        before = await read_counter(started.metrics_url, counter)
        load = options.workload(started.urls[protocol], protocol, started.metrics_url)
        load = dataclasses.replace(load, models=load.models or tuple(sorted(signatures)))
        adapter = SlowCounter(
            _adapter(system, protocol, load, signatures), options.slow_ms / 1000.0
        )
        report = await run_load(
            load,
            progress=lambda line: say(f"{system} {protocol}: {line}"),
            stop=stop,
            adapter=adapter,
        )
        # Each run's own report (per-model rows, the per-second series) for digging.
        report.write(options.out / "runs" / f"{system}-{protocol}")
        if system in PUSHED_METRICS:
            after = await settled_counter(started.metrics_url, counter)
        else:
            after = await read_counter(started.metrics_url, counter)
    finally:
        say(f"{system} {protocol}: stopping")
        # Synchronous on purpose: even when the run is being cancelled, no process
        # may be left behind.
        killed = started.stop()
        if killed:
            log.warning(
                "%s: killed %d processes left after shutdown: %s", system, len(killed), killed
            )
    return Row(
        system=system,
        protocol=protocol,
        requests=report.requests,
        errors=report.errors,
        errors_by_kind=report.errors_by_kind,
        offered_rps=report.offered_rps,
        throughput_rps=report.throughput_rps,
        p50_ms=report.latency_ms.p50,
        p95_ms=report.latency_ms.p95,
        p99_ms=report.latency_ms.p99,
        cold_starts=None if after is None else after - (before or 0.0),
        cold_start_source=counter,
        slow_requests=adapter.slow,
        startup_s=round(startup_s, 1),
        killed_after_stop=len(killed),
    )


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _setup(
    options: CompareOptions,
    signatures: dict[str, Signature],
    mapping: BudgetMapping,
    skipped: dict[str, str],
) -> dict[str, Any]:
    load = options.workload("127.0.0.1:1", "http", "127.0.0.1:1")
    return {
        "command": " ".join(["python -m loadtests", *sys.argv[1:]]),
        "scenario": options.scenario,
        "budget_bytes": options.budget_bytes,
        "replicas": options.replicas,
        "policy": options.policy,
        "modelpool_args": list(options.modelpool_args),
        "models": {n: s.artifact_bytes for n, s in sorted(signatures.items())},
        "ray_mapping": {
            **dataclasses.asdict(mapping),
            "models_held": mapping.models_held,
            "evicts": mapping.evicts,
        },
        "workload": {
            k: load.to_dict()[k]
            for k in ("duration", "rate", "zipf", "tenants", "arrival", "seed", "timeout")
        },
        "slow_ms": options.slow_ms,
        "skipped": skipped,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": _version("torch"),
            "ray": _version("ray"),
            "modelpool": _version("modelpool"),
        },
    }


def plan_runs(systems: tuple[str, ...]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    runs, skipped = [], {}
    for system in systems:
        if system != "modelpool" and not installed(system):
            skipped[system] = "not installed (pip install -e '.[peers]')"
            continue
        runs += [(system, protocol) for protocol in PROTOCOLS[system]]
    return runs, skipped


async def compare(options: CompareOptions, repo: Path, say: Progress) -> dict[str, Any]:
    signatures = read_signatures(repo)
    mapping = map_budget(
        options.budget_bytes, [s.artifact_bytes for s in signatures.values()], options.replicas
    )
    runs, skipped = plan_runs(options.systems)
    for system, why in skipped.items():
        say(f"{system}: skipped, {why}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Ctrl-C ends the current run early; its partial row and the table are still written.
    loop.add_signal_handler(signal.SIGINT, stop.set)
    rows: list[Row] = []
    try:
        for i, (system, protocol) in enumerate(runs, start=1):
            if stop.is_set():
                skipped[f"{system} {protocol}"] = "interrupted"
                continue
            say(f"run {i}/{len(runs)}: {system} over {protocol}")
            try:
                rows.append(
                    await run_system(system, protocol, options, repo, signatures, say, stop)
                )
            except (RuntimeError, RequestFailed) as e:
                if system == "modelpool":
                    raise
                # A peer that cannot start is a finding, not a reason to lose the table.
                skipped[f"{system} {protocol}"] = f"failed: {e}"
                say(f"{system} {protocol}: failed: {e}")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return {"rows": rows, "setup": _setup(options, signatures, mapping, skipped)}


def write_outputs(rows: list[Row], setup: dict[str, Any], options: CompareOptions) -> list[Path]:
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(to_json(rows, setup) + "\n")
    (out / "compare.md").write_text(to_markdown(rows, options.slow_ms) + "\n")
    written = [out / "compare.json", out / "compare.md"]
    try:
        from modelpool.loadtests.peers.plot import write_plot
    except ImportError as e:
        log.warning("no compare.png: %s (pip install -e '.[plots]')", e)
        return written
    w = setup["workload"]
    title = (
        f"{w['duration']:g} s at {w['rate']:g} rps, zipf {w['zipf']:g}, "
        f"{len(setup['models'])} models, budget {options.budget_bytes / 2**20:g} MiB"
    )
    written.append(write_plot(rows, out / "compare.png", title))
    return written


def main(args: argparse.Namespace) -> int:
    try:
        options = options_from(args)
    except (ValueError, TypeError) as e:
        print(f"loadtests compare: {e}", file=sys.stderr)
        return 2
    clock = _Clock()

    def say(line: str) -> None:
        print(f"[compare {clock()}] {line}", file=sys.stderr, flush=True)

    from modelpool.gpu.examples import write_examples  # imports torch: only when comparing

    with tempfile.TemporaryDirectory(prefix="mp-compare-") as tmp:
        repo = Path(tmp) / "models"
        say(f"writing {options.models_count} example models to {repo}")
        write_examples(repo, options.models_count)
        try:
            result = asyncio.run(compare(options, repo, say))
        except (RuntimeError, RequestFailed) as e:
            print(f"loadtests compare: {e}", file=sys.stderr)
            return 1
    paths = write_outputs(result["rows"], result["setup"], options)
    print(to_markdown(result["rows"], options.slow_ms))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
