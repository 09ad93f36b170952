"""Values the residency store holds and publishes. Frozen; copies reuse placement's
``CopyView`` so the view hands placement exactly what the store holds."""

from __future__ import annotations

from dataclasses import dataclass

from modelpool.placement.cluster import CopyState, CopyView

__all__ = [
    "CopyKey",
    "CopyRemoved",
    "CopyState",
    "CopyUpserted",
    "CopyView",
    "DevicePut",
    "DeviceRecord",
    "Resynced",
    "StoreEvent",
    "WorkerDown",
    "WorkerRecord",
    "WorkerUp",
]

CopyKey = tuple[str, int, str]  # (model, version, worker_id)


@dataclass(frozen=True)
class WorkerRecord:
    """A live worker. ``address`` is host:port for gRPC; ``device_id`` names the device
    it shares with other workers (``node/cpu``, ``node/cuda:0``)."""

    worker_id: str
    address: str
    device_id: str
    node: str
    pid: int = 0


@dataclass(frozen=True)
class DeviceRecord:
    """A device's memory as last measured, in bytes. ``source``: nvml, torch or budget.

    ``total_bytes`` is what our models may use: the budget when one is set, else the
    device. ``used_bytes``/``free_bytes`` are the device's own figures (on CPU: our
    copies against the budget). ``other_bytes`` is what other processes hold that
    cuts into ``total_bytes``: with a budget below the device's size, a foreign job
    only counts once it eats into the budget's share.
    """

    device_id: str
    total_bytes: int
    used_bytes: int = 0
    free_bytes: int = 0
    ours_bytes: int = 0
    source: str = "budget"
    other_bytes: int = 0

    @property
    def used_other_bytes(self) -> int:
        return self.other_bytes


@dataclass(frozen=True)
class WorkerUp:
    worker: WorkerRecord


@dataclass(frozen=True)
class WorkerDown:
    worker_id: str


@dataclass(frozen=True)
class CopyUpserted:
    copy: CopyView


@dataclass(frozen=True)
class CopyRemoved:
    key: CopyKey


@dataclass(frozen=True)
class DevicePut:
    device: DeviceRecord


@dataclass(frozen=True)
class Resynced:
    """The store (re)connected: replace the whole local view with this state."""

    workers: tuple[WorkerRecord, ...]
    devices: tuple[DeviceRecord, ...]
    copies: tuple[CopyView, ...]


StoreEvent = WorkerUp | WorkerDown | CopyUpserted | CopyRemoved | DevicePut | Resynced
