"""Memory pressure: high and low watermarks per device.

Admission fills a device only up to its high mark. When usage crosses it anyway (a
foreign process grew on the GPU, or a model measured bigger than its estimate), the
watcher evicts least-recently-used idle copies until usage is back under the low
mark; the gap between the marks keeps it from evicting on every small wobble.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelpool.placement.cluster import ClusterView, CopyView, DeviceView
from modelpool.placement.policy import PlacementRequest, evictable


@dataclass(frozen=True)
class Watermarks:
    """Fractions of a device's total memory, ``0 < low <= high <= 1``."""

    high: float = 0.95
    low: float = 0.85

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high <= 1:
            raise ValueError(
                f"watermarks need 0 < low <= high <= 1 (got low={self.low}, high={self.high})"
            )

    def admit_bytes(self, device: DeviceView) -> int:
        """What loads may fill the device to."""
        return int(device.total_bytes * self.high)


def usage_bytes(view: ClusterView, device: DeviceView) -> int:
    """Everything held on the device: other processes, our copies, our reservations."""
    return device.used_other_bytes + view.committed_bytes(device.device_id)


def pressure_victims(
    view: ClusterView,
    device: DeviceView,
    marks: Watermarks,
    now: float,
    min_residency_s: float = 0.0,
    rank: Callable[[CopyView], Any] | None = None,
) -> tuple[CopyView, ...]:
    """Copies to evict, lowest ``rank`` first (the policy's order; None: oldest use
    first), to bring a device above its high mark down to its low mark; as many as
    can go if the idle ones are not enough. Empty when the device is under its high
    mark."""
    used = usage_bytes(view, device)
    if used <= device.total_bytes * marks.high:
        return ()
    target = device.total_bytes * marks.low
    req = PlacementRequest(model="", version=0, now=now, min_residency_s=min_residency_s)
    candidates = sorted(
        (c for c in view.copies_on(device.device_id) if evictable(c, view, req)),
        key=rank or (lambda c: c.last_used),
    )
    victims = []
    for c in candidates:
        if used <= target:
            break
        victims.append(c)
        used -= c.footprint_bytes
    return tuple(victims)
