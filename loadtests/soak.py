"""Soak: many models several times the device budget, minutes of Zipf traffic, a
foreign process taking device memory, and a worker killed with -9, in one run.

    python -m loadtests.soak [--device cpu|cuda:N] [--sizes-mb 8,16,32,64] [--count N]
        [--budget SIZE] [--rate R] [--duration S] [--deadline-s S] [--out soak.json]

It writes a repository of TorchScript MLPs (at least three times the budget in all),
starts the real ``modelpool serve`` (two workers per device) and drives it open loop
over gRPC with the load generator's driver (``run_load``). At 30% of the run a foreign
process takes half the budget's share of the GPU for 20 s, grabbing memory as modelpool
frees it, then exits (CUDA only: a CPU budget has no foreign memory, so that event is
reported as skipped); at 60% one worker process gets SIGKILL. It scrapes /metrics every second (the worker gauge; device memory on
CPU), reads NVML every half second on CUDA, prints a progress line every few seconds,
and ends with a table, a JSON report and a verdict:

PASS when at least 99% of requests succeed, every failure is a 503 that carried
Retry-After (gRPC UNAVAILABLE with ``retry-after`` in the trailing metadata, as
``gateway/grpc_server.py`` sends it) or the client's own deadline (DEADLINE_EXCEEDED),
the gateway never saw zero workers for longer than a restart (30 s), and the killed
worker was replaced within that time.

Everything is bounded: the schedule ends at ``--duration``, each request has a deadline
(``--deadline-s``, else a safety timeout), every event and poller stops with the run,
and all traffic is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import serialize_byte_tensor

from modelpool.loadtests.client import GrpcAdapter, ModelInfo, RequestFailed, random_inputs
from modelpool.loadtests.options import LoadOptions
from modelpool.loadtests.report import Report
from modelpool.loadtests.runner import run_load
from modelpool.loadtests.servers import Serve, child_pids, start_serve, stop
from modelpool.placement.units import parse_size

log = logging.getLogger(__name__)

#: Error kind of a gRPC UNAVAILABLE that carried ``retry-after``: the gateway's 503.
UNAVAILABLE_RETRY = "UNAVAILABLE+retry-after"
#: Failures the verdict accepts: back-pressure the client was told to retry, and the
#: client's own deadline.
ACCEPTED_FAILURES = frozenset({UNAVAILABLE_RETRY, "DEADLINE_EXCEEDED"})
#: Share of requests that must succeed for PASS.
PASS_SUCCESS_RATE = 0.99
#: Models must total at least this many times the budget, so the pool must evict.
MIN_OVERCOMMIT = 3.0
#: Without --deadline-s, a request unanswered after this many seconds counts as a
#: ``timeout`` failure (not excused: the client set no deadline).
SAFETY_TIMEOUT_S = 60.0
FORCE_CPU = "MODELPOOL_FORCE_CPU"


@dataclass(frozen=True)
class DeviceDefaults:
    sizes_mb: tuple[int, ...]
    budget: str
    rate: float
    threads: int | None


# CPU defaults fit a 2-core, 24 GiB machine; CUDA's are the 32-512 MB of the spec.
CPU_DEFAULTS = DeviceDefaults((8, 16, 32, 64), "192MiB", 20.0, 1)
CUDA_DEFAULTS = DeviceDefaults((32, 64, 128, 256, 512), "1.25GiB", 80.0, None)


@dataclass(frozen=True)
class SoakConfig:
    """One soak run. Times are seconds after traffic starts; sizes are bytes unless
    named ``_mb`` (10^6 bytes, as ``gpu.examples`` sizes its models)."""

    device: str  # cpu or cuda:N
    sizes_mb: tuple[int, ...]
    count: int
    budget_bytes: int
    rate: float
    duration_s: float
    zipf: float
    #: Per-request gRPC deadline; None: no deadline, SAFETY_TIMEOUT_S bounds a request.
    deadline_s: float | None
    workers: int
    threads: int | None
    seed: int
    foreign_at_s: float
    foreign_hold_s: float
    #: Bytes the foreign process allocates; None: enough to take ``foreign_share`` of
    #: the budget's share of the device (see ``foreign_target_bytes``).
    foreign_bytes: int | None
    foreign_share: float
    kill_at_s: float
    restart_limit_s: float
    progress_s: float
    serve_args: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.device != "cpu" and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ValueError(f"--device must be cpu or cuda:N, not {self.device!r}")
        if not self.sizes_mb or min(self.sizes_mb) < 1:
            raise ValueError("--sizes-mb must list model sizes of at least 1 MB: 8,16,32,64")
        if self.count < 1:
            raise ValueError("--count must be at least 1")
        if self.budget_bytes < 1:
            raise ValueError("--budget must be positive: 192MiB, 1.25GiB")
        if self.repository_bytes < MIN_OVERCOMMIT * self.budget_bytes:
            need = count_for(self.sizes_mb, MIN_OVERCOMMIT * self.budget_bytes)
            raise ValueError(
                f"{self.count} models of {_csv(self.sizes_mb)} MB total "
                f"{self.repository_bytes / 1e6:.0f} MB, under {MIN_OVERCOMMIT:g}x the budget "
                f"({MIN_OVERCOMMIT * self.budget_bytes / 1e6:.0f} MB): pass --count {need} or "
                "more, or a smaller --budget"
            )
        if self.deadline_s is not None and self.deadline_s <= 0:
            raise ValueError("--deadline-s must be positive")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if not 0 < self.foreign_share < 1:
            raise ValueError("--foreign-share must be in (0, 1)")
        if self.restart_limit_s <= 0 or self.progress_s <= 0 or self.foreign_hold_s <= 0:
            raise ValueError(
                "--restart-limit-s, --progress-s and --foreign-hold-s must be positive"
            )
        # The load generator's own checks (rate, duration ceilings) apply too.
        self.load_options(1, "127.0.0.1:1")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda:")

    def size_of(self, index: int) -> int:
        return self.sizes_mb[index % len(self.sizes_mb)]

    @property
    def repository_bytes(self) -> int:
        return sum(self.size_of(i) for i in range(self.count)) * 1_000_000

    @property
    def request_timeout_s(self) -> float:
        """The client-side bound of one request: past the gRPC deadline, so that fires first."""
        return SAFETY_TIMEOUT_S if self.deadline_s is None else self.deadline_s + 5.0

    def load_options(self, grpc_port: int, metrics_url: str) -> LoadOptions:
        return LoadOptions(
            url=f"127.0.0.1:{grpc_port}",
            protocol="grpc",
            duration=self.duration_s,
            rate=self.rate,
            zipf=self.zipf,
            seed=self.seed,
            metrics_url=metrics_url,
            timeout=self.request_timeout_s,
        )

    def serve_command_args(self) -> list[str]:
        extra = ["--workers", str(self.workers), "--device-memory-budget", str(self.budget_bytes)]
        if self.threads:
            extra += ["--threads", str(self.threads)]
        if self.cuda:
            extra += ["--devices", self.device]
        return [*extra, *self.serve_args]

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["sizes_mb"] = list(self.sizes_mb)
        doc["serve_args"] = self.serve_command_args()
        doc["repository_bytes"] = self.repository_bytes
        return doc


def count_for(sizes_mb: Sequence[int], total_bytes: float) -> int:
    """The fewest models, cycling through ``sizes_mb``, that total ``total_bytes``."""
    n, acc = 0, 0
    while acc < total_bytes:
        acc += sizes_mb[n % len(sizes_mb)] * 1_000_000
        n += 1
    return n


def _csv(values: Sequence[object]) -> str:
    return ",".join(str(v) for v in values)


# -- the repository ---------------------------------------------------------------


def write_repository(
    repo: Path, cfg: SoakConfig, jobs: int, seed: int = 0
) -> list[tuple[str, int]]:
    """Write ``cfg.count`` MLPs cycling through ``cfg.sizes_mb``; returns (name, bytes of
    model.pt). A model already there is kept: its name fixes its index and size, and
    ``gpu.examples`` writes the same bytes for the same (seed, index)."""
    from modelpool.gpu.examples import Example, write_model

    todo = []
    for i in range(cfg.count):
        ex = Example(i, "mlp", cfg.size_of(i))
        if not (repo / ex.name / "1" / "model.pt").is_file():
            todo.append(ex)
    if todo:
        _progress(f"writing {len(todo)} models ({sum(e.size_mb for e in todo)} MB) to {repo}")
    if jobs > 1 and len(todo) > 1:
        # spawn, not fork: the parent has run torch, and its thread pools do not fork.
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(write_model, repo, ex, seed) for ex in todo]
            for n, f in enumerate(futures, start=1):
                f.result()
                if n % 4 == 0 or n == len(futures):
                    _progress(f"  {n}/{len(futures)} written")
    else:
        for n, ex in enumerate(todo, start=1):
            write_model(repo, ex, seed)
            if n % 4 == 0 or n == len(todo):
                _progress(f"  {n}/{len(todo)} written")
    out = []
    for i in range(cfg.count):
        name = Example(i, "mlp", cfg.size_of(i)).name
        out.append((name, (repo / name / "1" / "model.pt").stat().st_size))
    return out


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# -- the client: gRPC with trailing metadata --------------------------------------


@dataclass
class Tally:
    """Running counts for the progress line (the report counts from the outcomes)."""

    sent: int = 0
    ok: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    #: Retry-After values (seconds, as sent) seen on 503s.
    retry_after: Counter[str] = field(default_factory=Counter)


def error_kind(code: grpc.StatusCode, trailing: Sequence[tuple[str, Any]] | None) -> str:
    """The gRPC code's name; an UNAVAILABLE with ``retry-after`` in its trailing metadata
    (the gateway's 503) is told apart from one without (a dead channel, say)."""
    if code == grpc.StatusCode.UNAVAILABLE and retry_after_value(trailing) is not None:
        return UNAVAILABLE_RETRY
    return str(code.name)


def retry_after_value(trailing: Sequence[tuple[str, Any]] | None) -> str | None:
    for key, value in trailing or ():
        if key.lower() == "retry-after":
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def infer_request(info: ModelInfo, seed: int) -> pb.ModelInferRequest:
    """A ModelInferRequest with random inputs in raw_input_contents, built once per model."""
    req = pb.ModelInferRequest(model_name=info.name)
    arrays = random_inputs(info, seed)
    for spec in info.inputs:
        a = arrays[spec.name]
        req.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(a.shape))
        if spec.datatype == "BYTES":
            serialized = serialize_byte_tensor(a)
            raw = serialized.item() if serialized.size > 0 else b""
        else:
            raw = np.ascontiguousarray(a).tobytes()
        req.raw_input_contents.append(raw)
    return req


class SoakAdapter(GrpcAdapter):
    """Inference straight over grpc.aio, so a failure's trailing metadata can be read
    (tritonclient's exception keeps only the code and message); the index and model
    metadata go through tritonclient as in every other load run.

    Args:
        deadline_s: gRPC deadline of each inference; None sends none.
        timeout_s: the client-side bound of each call (a ``timeout`` failure).
    """

    def __init__(self, url: str, deadline_s: float | None, timeout_s: float) -> None:
        super().__init__(url, timeout_s)
        self.deadline_s = deadline_s
        self.tally = Tally()
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self._channel = grpc.aio.insecure_channel(url, options=unlimited)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def prepare(self, info: ModelInfo, seed: int) -> pb.ModelInferRequest:
        return infer_request(info, seed)

    async def infer(self, model: str, prepared: Any) -> None:
        self.tally.sent += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._stub.ModelInfer(prepared, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as e:
            trailing = e.trailing_metadata()
            kind = error_kind(e.code(), trailing)
            self.tally.failed[kind] += 1
            if kind == UNAVAILABLE_RETRY:
                self.tally.retry_after[retry_after_value(trailing) or "?"] += 1
            raise RequestFailed(kind, f"{model}: {e.details()}") from None
        except TimeoutError:
            self.tally.failed["timeout"] += 1
            raise RequestFailed("timeout", f"{model}: no reply in {self.timeout_s:g} s") from None
        self.tally.ok += 1

    async def close(self) -> None:
        await self._channel.close()
        await super().close()


# -- what the server says ---------------------------------------------------------


@dataclass(frozen=True)
class ServerSample:
    """One scrape of the gateway's /metrics."""

    workers: float | None
    #: device -> kind (total, used, free, reserved, ours) -> bytes.
    memory: dict[str, dict[str, float]]
    loads: dict[str, float]  # by outcome
    evictions: dict[str, float]  # by reason
    recycles: float
    requests: dict[str, float]  # by outcome
    cold_starts: float
    #: Successful loads by source (disk, host).
    loads_by_source: dict[str, float] = field(default_factory=dict)
    #: The load-duration histogram by source, summed over models: le -> cumulative count.
    load_buckets: dict[str, dict[float, float]] = field(default_factory=dict)

    def memory_sum(self, kind: str) -> float | None:
        values = [kinds[kind] for kinds in self.memory.values() if kind in kinds]
        return sum(values) if values else None


def parse_server_metrics(text: str) -> ServerSample:
    workers: float | None = None
    memory: dict[str, dict[str, float]] = {}
    # Counters summed over the other labels, by the one label named here.
    by_label: dict[str, tuple[str, dict[str, float]]] = {
        "modelpool_model_loads_total": ("outcome", {}),
        "modelpool_model_evictions_total": ("reason", {}),
        "modelpool_requests_total": ("outcome", {}),
        # Absent from gateways that predate it: read as 0.
        "modelpool_worker_recycles_total": ("", {}),
        "modelpool_cold_starts_total": ("", {}),
    }
    by_source: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "modelpool_workers":
                workers = s.value
            elif s.name == "modelpool_model_load_duration_seconds_bucket":
                by_le = buckets.setdefault(s.labels.get("source", "disk"), {})
                le = float(s.labels["le"])
                by_le[le] = by_le.get(le, 0.0) + s.value
            elif s.name == "modelpool_device_memory_bytes":
                kinds = memory.setdefault(s.labels.get("device", ""), {})
                kinds[s.labels.get("kind", "")] = s.value
            elif s.name in by_label:
                label, sums = by_label[s.name]
                key = s.labels.get(label, "")
                sums[key] = sums.get(key, 0.0) + s.value
                if s.name == "modelpool_model_loads_total" and key == "success":
                    source = s.labels.get("source", "disk")
                    by_source[source] = by_source.get(source, 0.0) + s.value

    def total(name: str) -> float:
        return sum(by_label[name][1].values())

    return ServerSample(
        workers=workers,
        memory=memory,
        loads=by_label["modelpool_model_loads_total"][1],
        evictions=by_label["modelpool_model_evictions_total"][1],
        recycles=total("modelpool_worker_recycles_total"),
        requests=by_label["modelpool_requests_total"][1],
        cold_starts=total("modelpool_cold_starts_total"),
        loads_by_source=by_source,
        load_buckets=buckets,
    )


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram (le -> count), interpolated within its
    bucket as Prometheus' ``histogram_quantile`` does; None when it counted nothing.
    One in the +Inf bucket is reported as the largest finite bound."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if le == float("inf"):
                return lower
            inside = count - below
            return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = le, count
    return lower


def loads_by_source(after: ServerSample, before: ServerSample) -> dict[str, dict[str, Any]]:
    """Loads during the run by source, with their p50 and p99 durations (seconds,
    from the gateway's histogram): what a cold start cost from disk and from host RAM."""
    out: dict[str, dict[str, Any]] = {}
    for source in sorted(set(after.loads_by_source) | set(after.load_buckets)):
        was = before.load_buckets.get(source, {})
        delta = {le: n - was.get(le, 0.0) for le, n in after.load_buckets.get(source, {}).items()}
        loads = after.loads_by_source.get(source, 0.0) - before.loads_by_source.get(source, 0.0)
        out[source] = {
            "loads": round(loads),
            "p50_s": bucket_quantile(delta, 0.5),
            "p99_s": bucket_quantile(delta, 0.99),
        }
    return out


def format_loads_by_source(rows: dict[str, dict[str, Any]] | None) -> str:
    """``loads_by_source`` on one line: "disk 12 (p50 40 ms, p99 90 ms), host ..."."""
    return (
        ", ".join(
            f"{src} {v['loads']} (p50 {_ms(v['p50_s'])}, p99 {_ms(v['p99_s'])})"
            for src, v in (rows or {}).items()
        )
        or "-"
    )


def counter_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0.0)) for k, v in sorted(after.items())}


# -- device memory on CUDA --------------------------------------------------------


class Nvml:
    """NVML used memory of one GPU, read directly (other processes included)."""

    def __init__(self, device: str) -> None:
        from modelpool.gpu.memory import NvmlProbe

        self._probe = NvmlProbe(device, int(device.split(":")[1]))

    def used_total(self) -> tuple[int, int]:
        m = self._probe.read(0)
        return m.used_bytes, m.total_bytes


# A foreign tenant on the GPU. It starts CUDA, then for ``hold`` seconds takes device
# memory as it becomes free (never the last ``floor`` bytes) until it holds ``target``
# (its own CUDA context included when ``with_context``), so modelpool has to give up
# what it held there; exiting frees it all. It says "started" when CUDA is up and, at
# the end, what it held. argv: cuda index, target, hold, with_context (1/0), floor.
FOREIGN = r"""
import sys, time
index, target, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
with_context, floor = sys.argv[4] == "1", int(sys.argv[5])
import pynvml, torch
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(index)
before = pynvml.nvmlDeviceGetMemoryInfo(handle).used
device = torch.device("cuda", index)
torch.zeros(1, device=device)
context = max(0, pynvml.nvmlDeviceGetMemoryInfo(handle).used - before)
want = max(0, target - (context if with_context else 0))
print("started", context, want, flush=True)
chunks, held, full_after = [], 0, -1.0
start = time.monotonic()
while time.monotonic() - start < hold:
    free, _ = torch.cuda.mem_get_info(index)
    n = min(want - held, free - floor)
    if n >= 2 << 20:
        try:
            chunks.append(torch.empty(n, dtype=torch.uint8, device=device))
            held += n
        except RuntimeError:  # out of memory: someone took it first; try again
            pass
    if full_after < 0 and held >= want:
        full_after = time.monotonic() - start
    time.sleep(0.25)
print("held", held, round(full_after, 2), flush=True)
"""

#: Bytes the foreign process leaves free on the device whatever its target.
FOREIGN_FLOOR_BYTES = 256 << 20


def foreign_target_bytes(total: int, budget: int, others: int, share: float) -> int:
    """Bytes a foreign process must hold, its CUDA context included, to take ``share``
    of the budget's part of the device; ``others`` is what is used now that is not
    modelpool's models (NVML used less the gateway's ``ours``: CUDA contexts too).

    As the gateway counts it (``gateway/housekeeping.py``), a budget below the device's
    size counts others' memory only once it eats into the budget's share: others may
    use ``total - budget`` for free. Worked example, an H200 (150.7 GB by NVML) with a
    1.25 GiB (1.34 GB) budget, 1.5 GB of others now, share 0.5: 150.7 - 1.34 + 0.67 -
    1.5 = 148.5 GB, leaving modelpool 0.67 GB.
    """
    return max(0, total - budget + int(budget * share) - others)


# -- the run ------------------------------------------------------------------------


@dataclass
class Observed:
    """What the pollers and events saw, in seconds since traffic started."""

    workers: list[tuple[float, float | None]] = field(default_factory=list)
    #: Gateway gauges (every device summed): t, used, ours, total.
    gateway_memory: list[tuple[float, float | None, float | None, float | None]] = field(
        default_factory=list
    )
    nvml: list[tuple[float, int]] = field(default_factory=list)
    nvml_baseline: int | None = None
    nvml_total: int | None = None
    last: ServerSample | None = None
    serve_exit: int | None = None
    events: dict[str, dict[str, Any]] = field(default_factory=dict)

    def workers_now(self) -> float | None:
        return self.workers[-1][1] if self.workers else None


class Soak:
    def __init__(self, cfg: SoakConfig, server: Serve, nvml: Nvml | None) -> None:
        self.cfg = cfg
        self.server = server
        self.nvml = nvml
        self.seen = Observed()
        self.stop = asyncio.Event()
        self.t0 = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._foreign: asyncio.subprocess.Process | None = None

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.t0

    async def _until(self, t: float) -> bool:
        """Sleep until ``t`` s into the run; False if the run stopped first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), max(0.0, t - self.now()))
        return not self.stop.is_set()

    async def scrape(self) -> ServerSample | None:
        assert self._session is not None
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        try:
            async with self._session.get(url) as resp:
                resp.raise_for_status()
                return parse_server_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            log.debug("scrape failed: %s", e)
            return None

    async def run(self) -> tuple[Report, ServerSample | None, ServerSample | None, Tally]:
        loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        # Ctrl-C or a TERM (``timeout``) ends the traffic early; the report is still written.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        adapter = SoakAdapter(self.server.grpc_url, self.cfg.deadline_s, self.cfg.request_timeout_s)
        options = self.cfg.load_options(
            self.server.grpc_port, f"127.0.0.1:{self.server.metrics_port}"
        )
        helpers: list[asyncio.Task[None]] = []
        try:
            before = await self.scrape()
            self.t0 = loop.time()
            load = asyncio.create_task(
                run_load(options, progress=None, stop=self.stop, adapter=adapter), name="soak-load"
            )
            helpers = [
                asyncio.create_task(self._poll_metrics(), name="soak-metrics"),
                asyncio.create_task(self._print_progress(adapter.tally), name="soak-progress"),
                asyncio.create_task(self._foreign_memory(), name="soak-foreign"),
                asyncio.create_task(self._kill_worker(), name="soak-kill"),
            ]
            if self.nvml is not None:
                helpers.append(asyncio.create_task(self._poll_nvml(), name="soak-nvml"))
            report = await load
            self.stop.set()
            # Serve may be gone (a TERM reaches its process group too): keep the last.
            after = await self.scrape() or self.seen.last
            # Events finish on their own once stop is set; give them a moment, then cancel.
            await asyncio.wait(helpers, timeout=5.0)
        finally:
            self.stop.set()
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self._foreign is not None and self._foreign.returncode is None:
                self._foreign.kill()
                await self._foreign.wait()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self._session.close()
        return report, before, after, adapter.tally

    async def _poll_metrics(self) -> None:
        """Every second: the worker gauge, the memory gauges, and whether serve lives."""
        tick = 0
        while not self.stop.is_set():
            sample = await self.scrape()
            t = self.now()
            if sample is not None:
                self.seen.last = sample
            self.seen.workers.append((round(t, 2), None if sample is None else sample.workers))
            if sample is not None:
                self.seen.gateway_memory.append(
                    (
                        round(t, 2),
                        sample.memory_sum("used"),
                        sample.memory_sum("ours"),
                        sample.memory_sum("total"),
                    )
                )
            code = self.server.proc.poll()
            if code is not None:
                self.seen.serve_exit = code
                log.error("modelpool serve exited with code %s; ending the run", code)
                self.stop.set()
                return
            tick += 1
            await self._until(tick)

    async def _poll_nvml(self) -> None:
        assert self.nvml is not None
        tick = 0
        while not self.stop.is_set():
            used, _ = self.nvml.used_total()
            self.seen.nvml.append((round(self.now(), 2), used))
            tick += 1
            await self._until(tick * 0.5)

    async def _print_progress(self, tally: Tally) -> None:
        step = self.cfg.progress_s
        n = 1
        while await self._until(n * step):
            n += 1
            errors = sum(tally.failed.values())
            kinds = ", ".join(f"{k} {v}" for k, v in tally.failed.most_common(3))
            workers = self.seen.workers_now()
            last = self.seen.last
            mem = "-"
            if self.seen.nvml and self.seen.nvml_baseline is not None:
                mem = f"{_mib(self.seen.nvml[-1][1] - self.seen.nvml_baseline)} over baseline"
            elif last is not None and last.memory_sum("used") is not None:
                mem = f"{_mib(last.memory_sum('used'))}/{_mib(last.memory_sum('total'))}"
            loads = sum(last.loads.values()) if last else 0
            evictions = sum(last.evictions.values()) if last else 0
            _progress(
                f"[{self.now():6.1f}s] sent={tally.sent} ok={tally.ok} errors={errors}"
                + (f" ({kinds})" if kinds else "")
                + f" workers={_num(workers)} mem={mem} loads={loads:.0f} evictions={evictions:.0f}"
            )

    async def _foreign_memory(self) -> None:
        cfg = self.cfg
        if not await self._until(cfg.foreign_at_s):
            self.seen.events["foreign_memory"] = {"skipped": "the run ended first"}
            return
        at = self.now()
        if not cfg.cuda:
            self.seen.events["foreign_memory"] = {
                "skipped": "CPU: a budget on the CPU has no foreign memory to take",
                "at_s": round(at, 2),
            }
            _progress(f"[{at:6.1f}s] event: foreign memory skipped (a CPU budget has none)")
            return
        with_context = cfg.foreign_bytes is None
        if cfg.foreign_bytes is not None:
            target = cfg.foreign_bytes
        else:
            assert self.nvml is not None
            used, total = self.nvml.used_total()
            ours = self.seen.last.memory_sum("ours") if self.seen.last is not None else None
            target = foreign_target_bytes(
                total, cfg.budget_bytes, used - int(ours or 0), cfg.foreign_share
            )
        event: dict[str, Any] = {"at_s": round(at, 2), "target_bytes": target}
        self.seen.events["foreign_memory"] = event
        index = cfg.device.split(":")[1]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FOREIGN, index, str(target), str(cfg.foreign_hold_s),
            "1" if with_context else "0", str(FOREIGN_FLOOR_BYTES),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self._foreign = proc
        event["pid"] = proc.pid
        assert proc.stdout is not None and proc.stderr is not None
        try:
            async with asyncio.timeout(120.0):
                line = (await proc.stdout.readline()).decode().split()
            if line[:1] == ["started"]:
                event["context_bytes"], event["wanted_bytes"] = int(line[1]), int(line[2])
                event["started_at_s"] = round(self.now(), 2)
                _progress(
                    f"[{self.now():6.1f}s] event: a foreign process takes up to "
                    f"{int(line[2]) / 2**30:.2f} GiB on {cfg.device} for {cfg.foreign_hold_s:g} s"
                )
            async with asyncio.timeout(cfg.foreign_hold_s + 60.0):
                line = (await proc.stdout.readline()).decode().split()
                await proc.wait()
            if line[:1] == ["held"]:
                event["held_bytes"], event["full_after_s"] = int(line[1]), float(line[2])
        except TimeoutError:
            event["error"] = "the foreign process did not finish in time; killed"
            proc.kill()
            await proc.wait()
        event["released_at_s"] = round(self.now(), 2)
        event["exit_code"] = proc.returncode
        if proc.returncode != 0:
            err = (await proc.stderr.read()).decode(errors="replace").strip().splitlines()
            event.setdefault("error", err[-1] if err else f"exit code {proc.returncode}")
        _progress(
            f"[{self.now():6.1f}s] event: the foreign process exited, having held "
            f"{event.get('held_bytes', 0) / 2**30:.2f} GiB"
        )

    async def _kill_worker(self) -> None:
        cfg = self.cfg
        if not await self._until(cfg.kill_at_s):
            self.seen.events["worker_kill"] = {"skipped": "the run ended first"}
            return
        before = child_pids(self.server.proc.pid)
        workers_before = self.seen.workers_now() or float(cfg.workers)
        victim = await self._pick_victim(before)
        t_kill = self.now()
        event: dict[str, Any] = {
            "at_s": round(t_kill, 2),
            "children_before": before,
            "workers_before": workers_before,
        }
        self.seen.events["worker_kill"] = event
        if victim is None:
            event["skipped"] = "modelpool serve has no child process to kill"
            return
        os.kill(victim, signal.SIGKILL)
        event["pid"] = victim
        _progress(f"[{t_kill:6.1f}s] event: kill -9 worker pid {victim}")
        # Recovered: a new child exists, and a scrape after it appeared counts the
        # workers there were before. Bounded by the restart limit (three times over).
        t_new: float | None = None
        limit = t_kill + 3 * cfg.restart_limit_s
        while self.now() < limit and not self.stop.is_set():
            await asyncio.sleep(0.5)
            if t_new is None:
                new = sorted(set(child_pids(self.server.proc.pid)) - set(before))
                if new:
                    t_new, event["new_pid"] = self.now(), new[0]
                continue
            counts = [w for t, w in self.seen.workers if t > t_new and w is not None]
            if counts and counts[-1] >= workers_before:
                event["recovered_after_s"] = round(self.now() - t_kill, 2)
                _progress(
                    f"[{self.now():6.1f}s] event: worker replaced (pid {event['new_pid']}), "
                    f"{_num(counts[-1])} workers again after {event['recovered_after_s']} s"
                )
                break
        gauge = [w for t, w in self.seen.workers if t >= t_kill and w is not None]
        event["min_workers_after"] = min(gauge) if gauge else None
        event["observed_for_s"] = round(self.now() - t_kill, 2)
        event.setdefault("recovered_after_s", None)

    async def _pick_victim(self, children: list[int]) -> int | None:
        """The child worker holding the most READY copies (from the status endpoint), so
        the kill loses models; else the first child."""
        assert self._session is not None
        if not children:
            return None
        try:
            url = f"http://{self.server.http_url}/v2/modelpool/status"
            async with self._session.get(url) as resp:
                status = await resp.json()
            held = Counter(c["worker_id"] for c in status["copies"] if c["state"] == "READY")
            pids = {
                int(w["pid"]): held[w["worker_id"]]
                for w in status["workers"]
                if int(w.get("pid") or 0) in children
            }
            if pids:
                return max(pids, key=lambda p: pids[p])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
            log.warning("cannot read the status endpoint (%s); killing the first child", e)
        return children[0]


# -- the verdict and the report -----------------------------------------------------


def longest_zero_s(series: Sequence[tuple[float, float | None]]) -> float:
    """Longest time the gauge read 0, from its first zero sample to the next non-zero
    one (or the last sample). Failed scrapes (None) neither start nor end a stretch."""
    longest, start = 0.0, None
    for t, w in series:
        if w is None:
            continue
        if w == 0:
            start = t if start is None else start
        elif start is not None:
            longest, start = max(longest, t - start), None
    if start is not None and series:
        longest = max(longest, series[-1][0] - start)
    return longest


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]


def judge(
    requests: int,
    successes: int,
    errors_by_kind: dict[str, int],
    zero_s: float,
    final_workers: float | None,
    kill: dict[str, Any] | None,
    restart_limit_s: float,
    serve_exit: int | None,
) -> Verdict:
    """PASS or FAIL, with every reason it failed. Pure: figures in, verdict out."""
    reasons = []
    rate = successes / requests if requests else 0.0
    if requests == 0:
        reasons.append("no requests were sent")
    elif rate < PASS_SUCCESS_RATE:
        reasons.append(f"success rate {rate:.2%} < {PASS_SUCCESS_RATE:.0%}")
    other = {k: n for k, n in errors_by_kind.items() if k not in ACCEPTED_FAILURES}
    if other:
        reasons.append(
            "failures other than 503+Retry-After or DEADLINE_EXCEEDED: "
            + ", ".join(f"{k} {n}" for k, n in sorted(other.items()))
        )
    if zero_s > restart_limit_s:
        reasons.append(f"workers stayed at 0 for {zero_s:.1f} s (> {restart_limit_s:g} s)")
    if final_workers is None or final_workers <= 0:
        reasons.append(f"workers at the end: {_num(final_workers)}")
    if kill is not None and "pid" in kill:
        back = kill.get("recovered_after_s")
        # A kill too near the end to watch a whole restart is not held against the run.
        watched = kill.get("observed_for_s", 0.0) >= restart_limit_s
        if (back is None and watched) or (back is not None and back > restart_limit_s):
            reasons.append(
                f"the worker killed with -9 was not replaced within {restart_limit_s:g} s"
            )
    if serve_exit is not None:
        reasons.append(f"modelpool serve exited during the run (code {serve_exit})")
    return Verdict(not reasons, tuple(reasons))


def memory_figures(cfg: SoakConfig, seen: Observed) -> dict[str, Any]:
    """Peak device memory against the budget: NVML on CUDA (over the baseline before
    serve started; outside the foreign process's window too), the gateway's gauges always."""
    doc: dict[str, Any] = {"budget_bytes": cfg.budget_bytes}
    used = [u for _, u, _, _ in seen.gateway_memory if u is not None]
    ours = [o for _, _, o, _ in seen.gateway_memory if o is not None]
    total = [t for _, _, _, t in seen.gateway_memory if t is not None]
    doc["gateway"] = {
        "peak_used_bytes": max(used) if used else None,
        "peak_ours_bytes": max(ours) if ours else None,
        "total_bytes": max(total) if total else None,
        "peak_used_fraction_of_budget": max(used) / cfg.budget_bytes if used else None,
        "series": [list(p) for p in seen.gateway_memory],
    }
    doc["source"] = "gateway"
    if seen.nvml and seen.nvml_baseline is not None:
        base = seen.nvml_baseline
        foreign = seen.events.get("foreign_memory", {})
        lo, hi = foreign.get("at_s"), foreign.get("released_at_s")

        def outside(t: float) -> bool:
            return lo is None or t < lo or (hi is not None and t > hi + 1.0)

        peak = max(u for _, u in seen.nvml)
        peak_out = max((u for t, u in seen.nvml if outside(t)), default=None)
        doc["source"] = "nvml"
        doc["nvml"] = {
            "baseline_used_bytes": base,
            "total_bytes": seen.nvml_total,
            "peak_used_bytes": peak,
            "peak_over_baseline_bytes": peak - base,
            # What modelpool held (models and its workers' CUDA contexts), the foreign
            # process's window left out.
            "peak_over_baseline_outside_foreign_bytes": (
                None if peak_out is None else peak_out - base
            ),
            "peak_over_baseline_fraction_of_budget": (
                None if peak_out is None else (peak_out - base) / cfg.budget_bytes
            ),
            "series": [list(p) for p in seen.nvml],
        }
    return doc


def serve_log_summary(path: Path, keep: int = 10) -> dict[str, Any]:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [ln for ln in lines if " ERROR " in ln or "Traceback" in ln]
    warnings = [ln for ln in lines if " WARNING " in ln]
    return {
        "lines": len(lines),
        "errors": len(errors),
        "warnings": len(warnings),
        "first_errors": errors[:keep],
        "first_warnings": warnings[:keep],
    }


def build_result(
    cfg: SoakConfig,
    report: Report,
    before: ServerSample | None,
    after: ServerSample | None,
    tally: Tally,
    seen: Observed,
    repository: list[tuple[str, int]],
) -> dict[str, Any]:
    requests = report.requests
    successes = requests - report.errors
    kinds = dict(sorted(report.errors_by_kind.items()))
    unavailable_plain = kinds.get("UNAVAILABLE", 0)
    workers = [w for _, w in seen.workers if w is not None]
    final = (after.workers if after is not None else None) or seen.workers_now()
    zero = longest_zero_s(seen.workers)
    kill = seen.events.get("worker_kill")
    verdict = judge(
        requests, successes, kinds, zero, final, kill, cfg.restart_limit_s, seen.serve_exit
    )
    server: dict[str, Any] = {}
    if after is not None:
        b = before or parse_server_metrics("")
        server = {
            "loads": counter_delta(after.loads, b.loads),
            "evictions": counter_delta(after.evictions, b.evictions),
            "worker_recycles": round(after.recycles - b.recycles),
            "requests": counter_delta(after.requests, b.requests),
            "cold_starts": round(after.cold_starts - b.cold_starts),
            "loads_by_source": loads_by_source(after, b),
        }
    lat = report.latency_ms
    return {
        "benchmark": "soak",
        "device": cfg.device,
        "config": cfg.to_dict(),
        "repository": {
            "models": len(repository),
            "bytes": sum(b for _, b in repository),
            "overcommit": sum(b for _, b in repository) / cfg.budget_bytes,
        },
        "elapsed_s": report.elapsed_s,
        "requests": requests,
        "successes": successes,
        "success_rate": successes / requests if requests else 0.0,
        "errors": report.errors,
        "errors_by_kind": kinds,
        "unavailable": {
            "with_retry_after": kinds.get(UNAVAILABLE_RETRY, 0),
            "without_retry_after": unavailable_plain,
            "retry_after_values_s": dict(tally.retry_after),
        },
        # 503s: as the client saw them (UNAVAILABLE with Retry-After) and as the
        # gateway counted them (modelpool_requests_total{outcome="unavailable"}).
        "http_503": {
            "client": kinds.get(UNAVAILABLE_RETRY, 0),
            "server": server.get("requests", {}).get("unavailable"),
        },
        "loads": sum(server.get("loads", {}).values()) if server else None,
        # disk / host (the host-RAM tier): count, p50_s, p99_s of the load durations.
        "loads_by_source": server.get("loads_by_source"),
        "evictions": sum(server.get("evictions", {}).values()) if server else None,
        "worker_recycles": server.get("worker_recycles"),
        "server": server,
        "latency_ms": dataclasses.asdict(lat),
        "throughput_rps": report.throughput_rps,
        "cold_start_rate": report.cold_start_rate,
        "memory": memory_figures(cfg, seen),
        "workers": {
            "min": min(workers) if workers else None,
            "max": max(workers) if workers else None,
            "final": final,
            "longest_zero_s": zero,
            "series": [list(p) for p in seen.workers],
        },
        "events": seen.events,
        "serve_exit_code": seen.serve_exit,
        "verdict": "PASS" if verdict.passed else "FAIL",
        "verdict_reasons": list(verdict.reasons),
        "load_report": report.to_dict(),
    }


def table(doc: dict[str, Any]) -> str:
    cfg = doc["config"]
    lat = doc["latency_ms"]
    mem = doc["memory"]
    workers = doc["workers"]
    ev = doc["events"]
    if mem["source"] == "nvml":
        n = mem["nvml"]
        peak = n["peak_over_baseline_outside_foreign_bytes"]
        memory = (
            f"NVML peak over baseline {_mib(peak)} outside the foreign window "
            f"({_mib(n['peak_over_baseline_bytes'])} with it), budget {_mib(mem['budget_bytes'])}"
        )
    else:
        g = mem["gateway"]
        memory = (
            f"gateway gauge peak used {_mib(g['peak_used_bytes'])} of budget "
            f"{_mib(mem['budget_bytes'])}"
        )
    foreign = ev.get("foreign_memory", {})
    kill = ev.get("worker_kill", {})
    rows = [
        f"modelpool soak on {doc['device']}: {doc['repository']['models']} models "
        f"({doc['repository']['bytes'] / 1e6:.0f} MB, {doc['repository']['overcommit']:.1f}x the "
        f"budget), {cfg['duration_s']:g} s at {cfg['rate']:g} rps, zipf {cfg['zipf']:g}, "
        f"{cfg['workers']} workers, deadline {cfg['deadline_s'] or 'none'}",
        f"{'requests':<22}{doc['requests']}",
        f"{'successes':<22}{doc['successes']} ({doc['success_rate']:.2%})",
        f"{'errors by kind':<22}"
        + (", ".join(f"{k} {v}" for k, v in doc["errors_by_kind"].items()) or "none"),
        f"{'503s':<22}client {doc['http_503']['client']} (with Retry-After), "
        f"server {_num(doc['http_503']['server'])}; UNAVAILABLE without Retry-After "
        f"{doc['unavailable']['without_retry_after']}",
        f"{'loads / evictions':<22}{_num(doc['loads'])} / {_num(doc['evictions'])} "
        f"{doc['server'].get('evictions', {})}",
        f"{'loads by source':<22}{format_loads_by_source(doc['loads_by_source'])}",
        f"{'cold-start rate':<22}"
        + ("-" if doc["cold_start_rate"] is None else f"{doc['cold_start_rate']:.2%}"),
        f"{'worker recycles':<22}{_num(doc['worker_recycles'])}",
        f"{'latency ms':<22}p50 {_num(lat['p50'])}  p99 {_num(lat['p99'])}  max {_num(lat['max'])}",
        f"{'device memory':<22}{memory}",
        f"{'workers':<22}min {_num(workers['min'])}  max {_num(workers['max'])}  final "
        f"{_num(workers['final'])}  longest at 0: {workers['longest_zero_s']:.1f} s",
        f"{'foreign memory':<22}"
        + (
            foreign["skipped"]
            if "skipped" in foreign
            else f"{foreign.get('held_bytes', 0) / 2**30:.2f} GiB from {foreign.get('started_at_s')} s "
            f"to {foreign.get('released_at_s')} s"
            + (f" ({foreign['error']})" if "error" in foreign else "")
        ),
        f"{'kill -9':<22}"
        + (
            kill.get("skipped", "")
            if "pid" not in kill
            else f"pid {kill['pid']} at {kill['at_s']} s, workers min {_num(kill.get('min_workers_after'))}, "
            f"back to {_num(kill['workers_before'])} after {_num(kill.get('recovered_after_s'))} s"
        ),
        f"{'verdict':<22}{doc['verdict']}"
        + ("" if not doc["verdict_reasons"] else ": " + "; ".join(doc["verdict_reasons"])),
    ]
    return "\n".join(rows)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.0f} ms"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}MiB"


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


# -- the command --------------------------------------------------------------------


@contextlib.contextmanager
def serve_environment(device: str) -> Iterator[None]:
    """CPU runs force CPU workers even on a GPU machine (MODELPOOL_FORCE_CPU, as the
    tests do); CUDA runs must not inherit that."""
    saved = {k: os.environ.get(k) for k in (FORCE_CPU, "PYTHONUNBUFFERED")}
    if device == "cpu":
        os.environ[FORCE_CPU] = "1"
    else:
        os.environ.pop(FORCE_CPU, None)
    os.environ["PYTHONUNBUFFERED"] = "1"
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _sizes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MB like 8,16,32,64, not {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.soak", description=__doc__.splitlines()[0]
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda:N")
    p.add_argument("--sizes-mb", type=_sizes, default=None,
                   help="model sizes in MB, cycled (default 8,16,32,64 on cpu, 32,64,128,256,512 on cuda)")  # fmt: skip
    p.add_argument("--count", type=int, default=None,
                   help=f"models (default: enough for {MIN_OVERCOMMIT:g}x the budget, at least 24)")  # fmt: skip
    p.add_argument("--budget", default=None, help="device memory budget (default 192MiB on cpu, 1.25GiB on cuda)")  # fmt: skip
    p.add_argument("--rate", type=float, default=None, help="requests per second (default 20 on cpu, 80 on cuda)")  # fmt: skip
    p.add_argument("--duration", type=float, default=300.0, help="seconds of traffic (default 300)")
    p.add_argument("--zipf", type=float, default=1.1, help="popularity exponent (default 1.1)")
    p.add_argument("--deadline-s", type=float, default=None,
                   help=f"gRPC deadline per request (default none; {SAFETY_TIMEOUT_S:g} s then counts as a timeout)")  # fmt: skip
    p.add_argument("--workers", type=int, default=2, help="workers per device (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default 1 on cpu)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--foreign-at-s", type=float, default=None, help="default 30%% of the duration")
    p.add_argument("--foreign-hold-s", type=float, default=None, help="default 20 s (at most 20%% of the duration)")  # fmt: skip
    p.add_argument("--foreign-gib", type=float, default=None,
                   help="GiB the foreign process allocates (default: enough to take --foreign-share of the budget)")  # fmt: skip
    p.add_argument("--foreign-share", type=float, default=0.5, help="default 0.5")
    p.add_argument("--kill-at-s", type=float, default=None, help="default 60%% of the duration")
    p.add_argument("--restart-limit-s", type=float, default=30.0,
                   help="longest a restart may take: workers at 0, or the killed one not back (default 30)")  # fmt: skip
    p.add_argument("--progress-s", type=float, default=5.0, help="seconds between progress lines")
    p.add_argument("--repo", type=Path, default=None,
                   help="model repository to write into and keep (default: a temporary one)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 2)),
                   help="processes writing models")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("soak.json"), help="JSON report (default soak.json)")  # fmt: skip
    p.add_argument("--serve-arg", action="append", default=[], help="extra argument for modelpool serve")  # fmt: skip
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from(args: argparse.Namespace) -> SoakConfig:
    defaults = CPU_DEFAULTS if args.device == "cpu" else CUDA_DEFAULTS
    sizes = args.sizes_mb or defaults.sizes_mb
    budget = parse_size(args.budget or defaults.budget)
    duration = args.duration
    count = args.count
    if count is None:
        count = max(24, count_for(sizes, MIN_OVERCOMMIT * budget))
    return SoakConfig(
        device=args.device,
        sizes_mb=sizes,
        count=count,
        budget_bytes=budget,
        rate=args.rate if args.rate is not None else defaults.rate,
        duration_s=duration,
        zipf=args.zipf,
        deadline_s=args.deadline_s,
        workers=args.workers,
        threads=args.threads if args.threads is not None else defaults.threads,
        seed=args.seed,
        foreign_at_s=args.foreign_at_s if args.foreign_at_s is not None else 0.3 * duration,
        foreign_hold_s=args.foreign_hold_s or min(20.0, max(1.0, 0.2 * duration)),
        foreign_bytes=None if args.foreign_gib is None else int(args.foreign_gib * 2**30),
        foreign_share=args.foreign_share,
        kill_at_s=args.kill_at_s if args.kill_at_s is not None else 0.6 * duration,
        restart_limit_s=args.restart_limit_s,
        progress_s=args.progress_s,
        serve_args=tuple(args.serve_arg),
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        cfg = config_from(args)
    except ValueError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    nvml = None
    if cfg.cuda:
        try:
            nvml = Nvml(cfg.device)
        except Exception as e:  # pynvml.NVMLError, ImportError: no driver here
            print(f"soak: cannot read NVML for {cfg.device}: {e}", file=sys.stderr)
            return 2
    # Outside the event loop a TERM unwinds too, so serve is stopped and files removed.
    signal.signal(signal.SIGTERM, _exit_on_term)
    work = Path(tempfile.mkdtemp(prefix="mp-soak-"))
    repo = args.repo or work / "models"
    out: Path = args.out
    serve_log = out.with_name(out.stem + ".serve.log")
    try:
        started = time.monotonic()
        repository = write_repository(repo, cfg, args.jobs)
        _progress(
            f"repository: {len(repository)} models, {sum(b for _, b in repository) / 1e6:.0f} MB "
            f"in {time.monotonic() - started:.0f} s; starting modelpool serve "
            f"({' '.join(cfg.serve_command_args())})"
        )
        baseline = nvml.used_total() if nvml is not None else None
        out.parent.mkdir(parents=True, exist_ok=True)
        with serve_environment(cfg.device):
            server = start_serve(repo, cfg.serve_command_args(), serve_log)
        try:
            soak = Soak(cfg, server, nvml)
            if baseline is not None:
                soak.seen.nvml_baseline, soak.seen.nvml_total = baseline
            report, before, after, tally = asyncio.run(soak.run())
        finally:
            stop(server.proc)
    except RuntimeError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 1
    finally:
        # Holds the repository unless --repo named one to keep.
        shutil.rmtree(work, ignore_errors=True)
    doc = build_result(cfg, report, before, after, tally, soak.seen, repository)
    doc["serve_log"] = {"path": str(serve_log), **serve_log_summary(serve_log)}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))
    print(f"wrote {out} (serve log: {serve_log})")
    return 0


def _exit_on_term(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
