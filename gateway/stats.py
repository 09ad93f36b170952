"""Triton's statistics extension: per model version counts and cumulative durations,
as ``perf_analyzer`` and Triton tooling read them.
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_statistics.md
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tritonclient.grpc import service_pb2 as pb


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.ns += int(seconds * 1e9)


@dataclass
class VersionStats:
    """Cumulative since the gateway started. ``queue`` is the time before compute
    (waiting for a copy or a load); ``compute_infer`` the forwarded call to the worker."""

    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0


class Statistics:
    def __init__(self) -> None:
        self._by_key: dict[tuple[str, int], VersionStats] = {}

    def of(self, model: str, version: int) -> VersionStats:
        return self._by_key.setdefault((model, version), VersionStats())

    def record_success(
        self, model: str, version: int, batch: int, total_s: float, queue_s: float, compute_s: float
    ) -> None:
        s = self.of(model, version)
        s.success.add(total_s)
        s.queue.add(queue_s)
        s.compute_infer.add(compute_s)
        s.inference_count += batch
        s.execution_count += 1
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
            for name in ("success", "fail", "queue", "compute_infer"):
                d: Duration = getattr(s, name)
                getattr(m.inference_stats, name).count = d.count
                getattr(m.inference_stats, name).ns = d.ns
        return resp
