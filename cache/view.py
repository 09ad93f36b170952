"""A gateway's local mirror of the residency store, applied from store events.

Reads are plain dict lookups: the warm path (route a request to a READY copy) never
waits on the store. The mirror holds exactly what the store holds and is written only
by ``apply`` (store events); what is this gateway's own (in-flight counts, last use,
claims, draining workers) belongs to ``gateway.copies.CopyManager``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from modelpool.cache.records import (
    CopyKey,
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    DevicePut,
    DeviceRecord,
    Resynced,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
)


class ResidencyView:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerRecord] = {}
        self.devices: dict[str, DeviceRecord] = {}
        self.copies: dict[CopyKey, CopyView] = {}
        #: Copy keys by (model, version): the warm path looks up one model's copies
        #: without scanning every copy of every model.
        self._by_model: defaultdict[tuple[str, int], set[CopyKey]] = defaultdict(set)

    def put(self, copy: CopyView) -> None:
        """Record a copy (mutate the view only through ``put`` and ``drop``)."""
        self.copies[copy.key] = copy
        self._by_model[(copy.model, copy.version)].add(copy.key)

    def drop(self, key: CopyKey) -> None:
        if self.copies.pop(key, None) is not None:
            keys = self._by_model.get((key[0], key[1]))
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_model[(key[0], key[1])]

    def reset(
        self,
        workers: list[WorkerRecord],
        devices: list[DeviceRecord],
        copies: list[CopyView],
    ) -> None:
        """Replace everything with a snapshot (start-up, reconnect to the store)."""
        self.workers = {w.worker_id: w for w in workers}
        self.devices = {d.device_id: d for d in devices}
        self.copies = {}
        self._by_model.clear()
        for c in copies:
            self.put(c)

    def apply(self, event: StoreEvent) -> None:
        match event:
            case WorkerUp(worker=w):
                self.workers[w.worker_id] = w
            case WorkerDown(worker_id=wid):
                self.workers.pop(wid, None)
                for key in [k for k in self.copies if k[2] == wid]:
                    self.drop(key)
            case CopyUpserted(copy=c):
                self.put(c)
            case CopyRemoved(key=key):
                self.drop(key)
            case DevicePut(device=d):
                self.devices[d.device_id] = d
            case Resynced(workers=workers, devices=devices, copies=copies):
                self.reset(list(workers), list(devices), list(copies))

    def copies_of(self, model: str, version: int) -> Iterable[CopyView]:
        """Every copy of one model version whose worker is alive, in any state."""
        for k in self._by_model.get((model, version), ()):
            c = self.copies[k]
            if c.worker_id in self.workers:
                yield c

    def ready_copies(self, model: str, version: int) -> list[CopyView]:
        return [c for c in self.copies_of(model, version) if c.state == CopyState.READY]

    def all_copies(self) -> list[CopyView]:
        """Every copy whose worker is alive."""
        return [c for c in self.copies.values() if c.worker_id in self.workers]
