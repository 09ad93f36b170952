"""Triton's statistics extension: per model version counts and cumulative durations,
as ``perf_analyzer`` and Triton tooling read them.
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_statistics.md

What each figure means here (every duration is counted once per request, so the
``count`` of success, queue, compute_input, compute_infer and compute_output move
together, which perf_analyzer requires):

- ``success``: arrival at the gateway until the worker's reply is back.
- ``queue``: waiting before compute: for a copy (a load, capacity), the tenant's turn
  at the model, then inside the worker for a batch or a free inference thread. Its
  gateway part (arrival until the worker is called) is exactly what
  ``modelpool_queue_wait_seconds`` observes and ``modelpool_model_queue_depth`` counts.
- ``compute_infer``: the model's forward, as the worker timed it.
- ``compute_output``: encoding the request's outputs in the worker.
- ``compute_input``: the rest of the worker call: moving the request and the reply
  between gateway and worker, decoding the inputs.
- ``fail``: requests that ended in an error, arrival to the error.
- ``execution_count``: forwards. With dynamic batching several requests share one;
  the worker marks one of them its lead (``gpu/execution.py``) and only the lead's
  gateway counts it. ``batch_stats`` has one entry per forward batch size, with the
  lead's compute durations.
- ``cache_hit`` and ``cache_miss``: always zero; there is no response cache.

All of it is this gateway's own: with several gateways each reports what it served.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu import execution as worker_execution
from modelpool.gpu.execution import Execution

_INFERENCE_FIELDS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)
_BATCH_FIELDS = ("compute_input", "compute_infer", "compute_output")


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += max(0, int(seconds * 1e9))


@dataclass
class BatchStats:
    """Forwards of one batch size."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Cumulative since the gateway started; see the module docstring."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch: dict[int, BatchStats] = field(default_factory=dict)


Reply: TypeAlias = "Execution | pb.ModelInferResponse | bytes | None"


def execution_of(reply: Reply) -> Execution | None:
    """The execution a worker's reply reports (the data plane passes it already read,
    as it strips the reply). A parsed reply loses the parameters, since the gateway
    renders it for the client itself; raw bytes are only read."""
    if isinstance(reply, Execution):
        return reply
    if isinstance(reply, bytes):
        return worker_execution.read_raw(reply)
    if reply is not None:
        return worker_execution.read(reply, strip=True)
    return None


class Statistics:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], VersionStats] = {}

    def of(self, model: str, version: int) -> VersionStats:
        return self._by_key.setdefault((model, version), VersionStats())

    def record_success(
        self,
        model: str,
        version: int,
        batch: int,
        *,
        started: float,
        compute_started: float,
        done: float,
        reply: Reply,
    ) -> None:
        """One answered request. ``started``, ``compute_started`` (a copy acquired, the
        worker called) and ``done`` are ``time.monotonic()`` readings; ``batch`` is the
        request's rows; ``reply`` the worker's reply, which says which forward it ran
        in (a reply without that counts as a forward of its own, all worker time
        being compute_infer). No await: every figure moves in the same step."""
        ran = execution_of(reply)
        forward_s = done - compute_started
        if ran is None:
            ran = Execution(rows=batch, lead=True, queue_s=0.0, infer_s=forward_s)
        input_s = max(0.0, forward_s - ran.queue_s - ran.infer_s - ran.output_s)
        s = self.of(model, version)
        s.success.add(done - started)
        s.queue.add(compute_started - started + ran.queue_s)
        s.compute_input.add(input_s)
        s.compute_infer.add(ran.infer_s)
        s.compute_output.add(ran.output_s)
        s.inference_count += batch
        if ran.lead:
            s.execution_count += 1
            b = s.batch.setdefault(ran.rows, BatchStats())
            b.compute_input.add(input_s)
            b.compute_infer.add(ran.infer_s)
            b.compute_output.add(ran.output_s)
        s.last_inference_ms = int(time.time() * 1000)

    def record_failure(self, model: str, version: int, total_s: float) -> None:
        self.of(model, version).fail.add(total_s)

    def response(self, versions: list[tuple[str, int]]) -> pb.ModelStatisticsResponse:
        """Statistics for the given (model, version) pairs; ones never called are zero."""
        resp = pb.ModelStatisticsResponse()
        for model, version in versions:
            s = self._by_key.get((model, version), VersionStats())
            m = resp.model_stats.add(
                name=model,
                version=str(version),
                last_inference=s.last_inference_ms,
                inference_count=s.inference_count,
                execution_count=s.execution_count,
            )
            for name in _INFERENCE_FIELDS:
                d: Duration = getattr(s, name)
                getattr(m.inference_stats, name).count = d.count
                getattr(m.inference_stats, name).ns = d.ns
            for size in sorted(s.batch):
                b = m.batch_stats.add(batch_size=size)
                for name in _BATCH_FIELDS:
                    getattr(b, name).count = getattr(s.batch[size], name).count
                    getattr(b, name).ns = getattr(s.batch[size], name).ns
        return resp


def statistics_json(resp: pb.ModelStatisticsResponse) -> dict[str, Any]:
    """The REST rendering, as Triton's: every field present, zeros included, and 64-bit
    integers as numbers. perf_analyzer reads e.g. ``cache_hit.count`` unconditionally,
    so protobuf's JSON mapping (which leaves zeros out) would crash it."""
    models = []
    for m in resp.model_stats:
        inference = {
            name: {"count": getattr(m.inference_stats, name).count,
                   "ns": getattr(m.inference_stats, name).ns}
            for name in _INFERENCE_FIELDS
        }  # fmt: skip
        batches = [
            {"batch_size": b.batch_size}
            | {name: {"count": getattr(b, name).count, "ns": getattr(b, name).ns}
               for name in _BATCH_FIELDS}
            for b in m.batch_stats
        ]  # fmt: skip
        models.append(
            {
                "name": m.name,
                "version": m.version,
                "last_inference": m.last_inference,
                "inference_count": m.inference_count,
                "execution_count": m.execution_count,
                "inference_stats": inference,
                "batch_stats": batches,
                "memory_usage": [],
                "response_stats": {},
            }
        )
    return {"model_stats": models}
