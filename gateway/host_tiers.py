"""What this gateway last heard of each worker's host tier (``gpu/host_tier.py``):
copies evicted from a device and kept in the worker's pinned host memory.

Informational, per gateway, never in the residency store: the housekeeper records
each worker status it reads, the status endpoint lists the host copies, and the copy
manager knows which workers could load a model from host memory. A worker that left
the view is forgotten; a stale entry costs at most a disk load instead of a host one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from modelpool.gpu.protocol import HostCopyStatus, WorkerStatus


@dataclass(frozen=True)
class HostTierReport:
    """One worker's host tier as its last status said: budget and bytes held, and its
    copies (model, version, bytes, last use)."""

    budget_bytes: int
    used_bytes: int
    copies: tuple[HostCopyStatus, ...]


class HostTiers:
    """Worker id -> its last reported host tier."""

    def __init__(self) -> None:
        self._reports: dict[str, HostTierReport] = {}

    def record(self, worker_id: str, status: WorkerStatus) -> None:
        self._reports[worker_id] = HostTierReport(
            status.host_budget_bytes, status.host_used_bytes, status.host_copies
        )

    def prune(self, live: Iterable[str]) -> None:
        """Forget workers not in ``live`` (they left, their host memory with them)."""
        keep = set(live)
        for worker_id in [w for w in self._reports if w not in keep]:
            del self._reports[worker_id]

    def enabled(self, worker_id: str) -> bool | None:
        """Whether the worker's tier is on; None when it has not reported yet."""
        report = self._reports.get(worker_id)
        return None if report is None else report.budget_bytes > 0

    def report(self, worker_id: str) -> HostTierReport | None:
        return self._reports.get(worker_id)

    def copies(self) -> list[tuple[str, HostCopyStatus]]:
        """(worker id, host copy) for every host copy, by worker."""
        return [(w, c) for w, r in sorted(self._reports.items()) for c in r.copies]

    def holders(self, model: str, version: int) -> frozenset[str]:
        """Workers holding (model, version) in their host tier."""
        return frozenset(
            w
            for w, r in self._reports.items()
            if any(c.model == model and c.version == version for c in r.copies)
        )
