"""The cluster as placement sees it: frozen values, built fresh for every decision.

Sizes are bytes, times are seconds on the caller's clock (the gateway passes
``time.time()``; the simulator passes trace time). Nothing here reads a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CopyState(StrEnum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


@dataclass(frozen=True)
class DeviceView:
    """One device's memory. ``total_bytes`` is what models may use on it (the budget on
    CPU, NVML's total on a GPU); ``used_other_bytes`` is held by processes that are not
    our models (a foreign job, CUDA contexts)."""

    device_id: str
    total_bytes: int
    used_other_bytes: int = 0


@dataclass(frozen=True)
class WorkerView:
    """A live worker. One that is not ``accepting`` (being drained for a restart)
    still holds its copies' memory on its device but takes no new copies."""

    worker_id: str
    device_id: str
    accepting: bool = True


@dataclass(frozen=True)
class CopyView:
    """One resident (or loading) copy of a model version on a worker.

    ``footprint_bytes`` is measured after the load, or the reservation while LOADING.
    """

    model: str
    version: int
    worker_id: str
    state: CopyState
    footprint_bytes: int
    last_used: float = 0.0
    loaded_at: float = 0.0
    inflight: int = 0

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.model, self.version, self.worker_id)


@dataclass(frozen=True)
class ModelInfo:
    """What is known of a model before placing it.

    ``estimated_bytes`` is the guess before a first load (artifact size plus headroom);
    ``measured_bytes`` the peak footprint seen on its last load, None until then.
    """

    name: str
    estimated_bytes: int
    measured_bytes: int | None = None
    load_seconds: float | None = None
    pinned: bool = False
    #: Copies kept resident whatever the demand: eviction never takes the model below
    #: this, and replication adds copies up to it when there is room.
    min_copies: int = 0
    #: Recent demand in requests, exponentially decayed to the decision's ``now``. Fed in
    #: by a stateful policy's wrapper (GDSF); 0 when the caller does not track it.
    frequency: float = 0.0
    #: A stateful policy's floor under the value of this model's copies, fed in by its
    #: wrapper: GDSF's aging clock L at the model's last request. 0 when not tracked.
    priority_base: float = 0.0

    @property
    def need_bytes(self) -> int:
        return self.measured_bytes if self.measured_bytes is not None else self.estimated_bytes


@dataclass(frozen=True)
class ClusterView:
    devices: tuple[DeviceView, ...]
    workers: tuple[WorkerView, ...]
    copies: tuple[CopyView, ...] = ()
    models: dict[str, ModelInfo] = field(default_factory=dict)

    def device_of(self, worker_id: str) -> str | None:
        for w in self.workers:
            if w.worker_id == worker_id:
                return w.device_id
        return None

    def live_devices(self) -> list[DeviceView]:
        """Devices with a worker that takes loads (draining workers do not)."""
        live = {w.device_id for w in self.workers if w.accepting}
        return [d for d in self.devices if d.device_id in live]

    def copies_on(self, device_id: str) -> list[CopyView]:
        workers = {w.worker_id for w in self.workers if w.device_id == device_id}
        return [c for c in self.copies if c.worker_id in workers]

    def committed_bytes(self, device_id: str) -> int:
        """Bytes our copies hold or have reserved on a device (FAILED ones hold none)."""
        return sum(
            c.footprint_bytes for c in self.copies_on(device_id) if c.state != CopyState.FAILED
        )

    def free_bytes(self, device: DeviceView) -> int:
        return device.total_bytes - device.used_other_bytes - self.committed_bytes(device.device_id)
