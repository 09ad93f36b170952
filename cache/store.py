"""The residency store interface, and its in-memory implementation.

Shaped for a shared backend (Redis): every change is an event that gateways apply to
their local view; reservations are atomic check-and-add so two gateways cannot commit
more memory than a device has; a per-model load lock carries a fencing token so a
stale holder's writes can be told apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

from modelpool.cache.records import (
    CopyKey,
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    DevicePut,
    DeviceRecord,
    Footprint,
    FootprintKey,
    FootprintPut,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
)
from modelpool.placement.errors import Unavailable

Listener = Callable[[StoreEvent], None]


@dataclass(frozen=True)
class Snapshot:
    workers: list[WorkerRecord]
    devices: list[DeviceRecord]
    copies: list[CopyView]
    footprints: list[Footprint] = field(default_factory=list)


class ResidencyStore(ABC):
    """Shared residency truth. Methods raise ``ResidencyStoreError`` (never a backend's
    own exception) when the backend cannot be reached."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every change, this process's and (for shared stores)
        other processes'. Listeners must not block."""
        self._listeners.append(listener)

    def _publish(self, event: StoreEvent) -> None:
        for listener in self._listeners:
            listener(event)

    async def start(self) -> None:
        """Begin delivering other processes' changes (shared stores); no-op here."""
        return None

    @abstractmethod
    async def snapshot(self) -> Snapshot: ...

    async def reap_expired(self) -> list[str]:
        """Remove workers whose heartbeat lapsed; returns their ids. Shared stores only."""
        return []

    async def gateway_heartbeat(self, gateway_id: str, ttl_s: float) -> int:
        """Say this gateway is alive for ``ttl_s`` more seconds; returns how many
        gateways are alive (this one included). One gateway per process here."""
        return 1

    async def gateway_leave(self, gateway_id: str) -> None:
        """Say this gateway is gone (a drained shutdown): the others take its share of
        tenant limits at once instead of after its heartbeat lapses."""
        return None

    @abstractmethod
    async def register_worker(self, worker: WorkerRecord) -> None: ...

    @abstractmethod
    async def remove_worker(self, worker_id: str) -> list[CopyView]:
        """Forget a worker and every copy on it; returns the copies dropped."""

    @abstractmethod
    async def put_device(self, device: DeviceRecord) -> None: ...

    @abstractmethod
    async def reserve(
        self, copy: CopyView, device_id: str, capacity_bytes: int, fence: int | None = None
    ) -> bool:
        """Atomically record ``copy`` (LOADING, footprint = bytes reserved) if the bytes
        already committed on ``device_id`` plus its footprint stay within
        ``capacity_bytes``. False, and nothing written, otherwise. ``fence`` is the
        load-lock token: a holder whose lock lapsed gets Unavailable instead."""

    @abstractmethod
    async def put_copy(self, copy: CopyView) -> None: ...

    @abstractmethod
    async def remove_copy(self, key: CopyKey) -> None: ...

    @abstractmethod
    async def touch(self, last_used: Mapping[CopyKey, float]) -> None:
        """Record last-use times (seconds since the epoch), batched by the caller."""

    @abstractmethod
    async def record_footprint(self, footprint: Footprint) -> None:
        """Keep what a load measured, replacing the last measurement of the same model
        version on the same device kind, and tell every gateway (``FootprintPut``)."""

    @abstractmethod
    async def footprints(self) -> list[Footprint]:
        """Every recorded measurement (also in ``snapshot``)."""

    @abstractmethod
    def load_lock(
        self, model: str, version: int, timeout_s: float
    ) -> contextlib.AbstractAsyncContextManager[int]:
        """Hold the cluster-wide load lock of a model version; yields a fencing token
        that grows with every acquisition. Raises Unavailable after ``timeout_s``."""

    async def close(self) -> None:
        return None


class InMemoryStore(ResidencyStore):
    """One process's store (``modelpool serve``): dicts behind no lock, since every
    method runs on the one event loop and none awaits between check and write."""

    def __init__(self) -> None:
        super().__init__()
        self._workers: dict[str, WorkerRecord] = {}
        self._devices: dict[str, DeviceRecord] = {}
        self._copies: dict[CopyKey, CopyView] = {}
        self._footprints: dict[FootprintKey, Footprint] = {}
        self._locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._tokens = itertools.count(1)

    async def snapshot(self) -> Snapshot:
        return Snapshot(
            list(self._workers.values()),
            list(self._devices.values()),
            list(self._copies.values()),
            list(self._footprints.values()),
        )

    async def register_worker(self, worker: WorkerRecord) -> None:
        self._workers[worker.worker_id] = worker
        self._publish(WorkerUp(worker))

    async def remove_worker(self, worker_id: str) -> list[CopyView]:
        self._workers.pop(worker_id, None)
        dropped = [c for k, c in self._copies.items() if k[2] == worker_id]
        for c in dropped:
            del self._copies[c.key]
        self._publish(WorkerDown(worker_id))
        return dropped

    async def put_device(self, device: DeviceRecord) -> None:
        self._devices[device.device_id] = device
        self._publish(DevicePut(device))

    def _committed(self, device_id: str) -> int:
        workers = {w.worker_id for w in self._workers.values() if w.device_id == device_id}
        return sum(
            c.footprint_bytes
            for c in self._copies.values()
            if c.worker_id in workers and c.state != CopyState.FAILED
        )

    async def reserve(
        self, copy: CopyView, device_id: str, capacity_bytes: int, fence: int | None = None
    ) -> bool:
        if self._committed(device_id) + copy.footprint_bytes > capacity_bytes:
            return False
        self._copies[copy.key] = copy
        self._publish(CopyUpserted(copy))
        return True

    async def put_copy(self, copy: CopyView) -> None:
        self._copies[copy.key] = copy
        self._publish(CopyUpserted(copy))

    async def remove_copy(self, key: CopyKey) -> None:
        if self._copies.pop(key, None) is not None:
            self._publish(CopyRemoved(key))

    async def touch(self, last_used: Mapping[CopyKey, float]) -> None:
        for key, t in last_used.items():
            c = self._copies.get(key)
            if c is not None and t > c.last_used:
                self._copies[key] = dataclasses.replace(c, last_used=t)

    async def record_footprint(self, footprint: Footprint) -> None:
        self._footprints[footprint.key] = footprint
        self._publish(FootprintPut(footprint))

    async def footprints(self) -> list[Footprint]:
        return list(self._footprints.values())

    @contextlib.asynccontextmanager
    async def load_lock(self, model: str, version: int, timeout_s: float) -> AsyncIterator[int]:
        lock = self._locks.setdefault((model, version), asyncio.Lock())
        try:
            await asyncio.wait_for(lock.acquire(), timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"model '{model}' version {version}: another load held the lock for {timeout_s:.0f}s",
                retry_after_s=1.0,
            ) from None
        try:
            yield next(self._tokens)
        finally:
            lock.release()
