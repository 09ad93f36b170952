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
    "Footprint",
    "FootprintKey",
    "FootprintPut",
    "Resynced",
    "StoreEvent",
    "WorkerDown",
    "WorkerRecord",
    "WorkerUp",
    "device_kind",
]

CopyKey = tuple[str, int, str]  # (model, version, worker_id)
FootprintKey = tuple[str, int, str]  # (model, version, device kind)


def device_kind(device_id: str) -> str:
    """The kind of device a device id names: ``node/cuda:1`` -> ``cuda``, ``node/cpu``
    -> ``cpu``. Footprints are shared per kind, not per device: a model's tensors take
    the same bytes on every GPU, so one load's measurement prices it on all of them."""
    device = device_id.rsplit("/", 1)[-1]
    return device.split(":", 1)[0] or "cpu"


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
class Footprint:
    """What the last load of a model version measured on a kind of device.

    ``footprint_bytes``: what the copy held once loaded; ``peak_bytes``: the most it
    held during load and warm-up (what admission reserves next time); ``load_seconds``:
    the worker's load time; ``measured_at``: epoch seconds of the load.
    """

    model: str
    version: int
    device_kind: str
    footprint_bytes: int
    peak_bytes: int
    load_seconds: float
    measured_at: float = 0.0

    @property
    def key(self) -> FootprintKey:
        return (self.model, self.version, self.device_kind)


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
class FootprintPut:
    footprint: Footprint


@dataclass(frozen=True)
class Resynced:
    """The store (re)connected: replace the whole local view with this state.
    ``footprints`` are merged, not replaced: a measurement stays true when a store
    comes back empty."""

    workers: tuple[WorkerRecord, ...]
    devices: tuple[DeviceRecord, ...]
    copies: tuple[CopyView, ...]
    footprints: tuple[Footprint, ...] = ()


StoreEvent = (
    WorkerUp | WorkerDown | CopyUpserted | CopyRemoved | DevicePut | FootprintPut | Resynced
)
