"""A gateway's local copy of residency, applied from store events.

Reads are plain dict lookups: the warm path (route a request to a READY copy) never
waits on the store. Last use and in-flight counts are this gateway's own and are
merged into the copies it hands to placement.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

from cache.records import (
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
        self.inflight: defaultdict[CopyKey, int] = defaultdict(int)
        self.last_used: dict[CopyKey, float] = {}

    def reset(
        self,
        workers: list[WorkerRecord],
        devices: list[DeviceRecord],
        copies: list[CopyView],
    ) -> None:
        """Replace everything with a snapshot (start-up, reconnect to the store)."""
        self.workers = {w.worker_id: w for w in workers}
        self.devices = {d.device_id: d for d in devices}
        self.copies = {c.key: c for c in copies}

    def apply(self, event: StoreEvent) -> None:
        match event:
            case WorkerUp(worker=w):
                self.workers[w.worker_id] = w
            case WorkerDown(worker_id=wid):
                self.workers.pop(wid, None)
                for key in [k for k in self.copies if k[2] == wid]:
                    del self.copies[key]
            case CopyUpserted(copy=c):
                self.copies[c.key] = c
            case CopyRemoved(key=key):
                self.copies.pop(key, None)
            case DevicePut(device=d):
                self.devices[d.device_id] = d
            case Resynced(workers=workers, devices=devices, copies=copies):
                self.reset(list(workers), list(devices), list(copies))

    def merged(self, copy: CopyView) -> CopyView:
        """The stored copy with this gateway's in-flight count and latest use."""
        key = copy.key
        last = max(copy.last_used, self.last_used.get(key, 0.0))
        return dataclasses.replace(copy, inflight=self.inflight.get(key, 0), last_used=last)

    def ready_copies(self, model: str, version: int) -> list[CopyView]:
        return [
            self.merged(c)
            for c in self.copies.values()
            if c.model == model
            and c.version == version
            and c.state == CopyState.READY
            and c.worker_id in self.workers
        ]

    def all_copies(self) -> list[CopyView]:
        return [self.merged(c) for c in self.copies.values() if c.worker_id in self.workers]
