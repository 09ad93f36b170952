"""Replication: a hot model gets another copy where there is room without evicting
anything; copies shrink back when it cools. A model below its ``min_copies`` gets
copies whatever its rate, and never shrinks below them.

Rates are requests per second per model version, measured by the caller. A model is
hot when each of its copies serves more than ``hot_rps_per_copy``; it has cooled when
one copy fewer would still serve under ``cool_rps_per_copy`` each. The gap between the
two thresholds is the hysteresis that stops a copy from flapping.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from modelpool.placement.cluster import ClusterView, CopyState, CopyView
from modelpool.placement.policy import PlacementRequest, evictable


@dataclass(frozen=True)
class ReplicationConfig:
    hot_rps_per_copy: float = 50.0
    cool_rps_per_copy: float = 10.0
    max_copies: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.cool_rps_per_copy < self.hot_rps_per_copy:
            raise ValueError("replication needs 0 <= cool_rps_per_copy < hot_rps_per_copy")
        if self.max_copies < 1:
            raise ValueError("max_copies must be at least 1")


@dataclass(frozen=True)
class Replicate:
    """Load one more copy of ``model``/``version`` on ``worker_id``."""

    model: str
    version: int
    worker_id: str
    device_id: str
    reserve_bytes: int


@dataclass(frozen=True)
class Shrink:
    """Unload this extra copy: the model has cooled."""

    copy: CopyView


def plan_replication(
    view: ClusterView,
    rates: Mapping[tuple[str, int], float],
    config: ReplicationConfig,
    now: float,
    min_residency_s: float = 0.0,
) -> list[Replicate | Shrink]:
    """At most one action per model per call, so a burst grows copies one at a time."""
    actions: list[Replicate | Shrink] = []
    by_model: dict[tuple[str, int], list[CopyView]] = {}
    for c in view.copies:
        if c.state in (CopyState.READY, CopyState.LOADING):
            by_model.setdefault((c.model, c.version), []).append(c)
    req = PlacementRequest(model="", version=0, now=now, min_residency_s=min_residency_s)
    for (model, version), copies in sorted(by_model.items()):
        rate = rates.get((model, version), 0.0)
        n = len(copies)
        loading = any(c.state == CopyState.LOADING for c in copies)
        info = view.models.get(model)
        floor = info.min_copies if info is not None else 0
        below_floor = n < floor
        hot = rate / n > config.hot_rps_per_copy and n < config.max_copies
        if (hot or below_floor) and not loading:
            target = _room_for(view, model, copies)
            if target is not None:
                worker_id, device_id, need = target
                actions.append(Replicate(model, version, worker_id, device_id, need))
        elif n > max(1, floor) and rate / (n - 1) < config.cool_rps_per_copy:
            idle = sorted((c for c in copies if evictable(c, view, req)), key=lambda c: c.last_used)
            if idle:
                actions.append(Shrink(idle[0]))
    return actions


def _room_for(view: ClusterView, model: str, copies: list[CopyView]) -> tuple[str, str, int] | None:
    """A worker without a copy whose device has room for one, preferring devices that
    hold no copy yet (another device is real parallel capacity), then the most free."""
    info = view.models.get(model)
    need = info.need_bytes if info is not None else max(c.footprint_bytes for c in copies)
    holders = {c.worker_id for c in copies}
    devices_with_copy = {view.device_of(w) for w in holders}
    best: tuple[tuple[bool, int], str, str] | None = None
    for d in view.devices:
        free = view.free_bytes(d)
        if free < need:
            continue
        for w in view.workers:
            if w.device_id != d.device_id or w.worker_id in holders or not w.accepting:
                continue
            score = (d.device_id in devices_with_copy, -free)
            if best is None or score < best[0]:
                best = (score, w.worker_id, d.device_id)
    return None if best is None else (best[1], best[2], need)
