"""Keeps a worker registered in a shared residency store.

The worker renews its registration every ``interval_s``. When the registration was
missing (first start, heartbeats lapsed, or Redis came back empty after an outage) it
re-announces every copy it holds, so gateways route to them again within one
heartbeat, with no restart of anything.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from modelpool.cache.records import CopyView, WorkerRecord
from modelpool.cache.redis_store import RedisStore
from modelpool.placement.errors import ResidencyStoreError

log = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self,
        store: RedisStore,
        record: WorkerRecord,
        held: Callable[[], list[CopyView]],
        interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.record = record
        self.held = held
        self.interval_s = interval_s

    async def beat(self) -> None:
        if await self.store.heartbeat(self.record):
            copies = self.held()
            for copy in copies:
                await self.store.put_copy(copy)
            log.info("worker %s announced with %d copies", self.record.worker_id, len(copies))

    async def run(self) -> None:
        healthy = True
        while True:
            try:
                await self.beat()
                if not healthy:
                    log.info("worker %s reached the residency store again", self.record.worker_id)
                healthy = True
            except ResidencyStoreError as e:
                if healthy:
                    log.warning("worker %s cannot heartbeat: %s", self.record.worker_id, e)
                healthy = False
            await asyncio.sleep(self.interval_s)
