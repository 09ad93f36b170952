"""The gateway's periodic work, once per ``poll_interval_s``:

- reap workers whose heartbeats lapsed (shared stores);
- read device memory from one worker per device and publish it;
- evict down to the low watermark on devices above the high one (a foreign process
  grew, or a model measured bigger than its estimate);
- load models whose ``min_copies`` wants them resident, replicate hot models and
  shrink cooled ones;
- write this gateway's last-use times to the store in one batch.

Decisions come from placement/ (``pressure_victims``, ``plan_replication``); this
module only gathers the inputs and carries the plans out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from modelpool.cache.records import CopyState, CopyView, DeviceRecord
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.placer import Placer
from modelpool.gateway.workers import WorkerClients
from modelpool.gpu.protocol import DeviceMemory
from modelpool.placement.errors import ModelpoolError
from modelpool.placement.pressure import pressure_victims
from modelpool.placement.replication import Replicate, ReplicationConfig, Shrink, plan_replication

log = logging.getLogger(__name__)

#: Weight of the newest interval in the request-rate average: about a 5 s memory at a
#: 1 s tick, quick enough to catch a burst, slow enough not to flap on one.
RATE_ALPHA = 0.3


def device_record(device_id: str, m: DeviceMemory, ours: int) -> DeviceRecord:
    """What placement should believe of a device, from a worker's reading and the
    bytes our copies on that device hold."""
    if m.source == "budget":
        # The budget is the whole device on CPU, and nothing else shares it.
        return DeviceRecord(
            device_id, m.total_bytes, ours, max(0, m.total_bytes - ours), ours, m.source
        )
    others = max(0, m.used_bytes - ours)
    if m.budget_bytes is not None and m.budget_bytes < m.total_bytes:
        # Our share is the budget; others count only once they eat into it:
        # room = min(budget - ours, device free) = budget - ours - other_bytes.
        total = m.budget_bytes
        other = max(0, others - (m.total_bytes - m.budget_bytes))
    else:
        total, other = m.total_bytes, others
    return DeviceRecord(device_id, total, m.used_bytes, m.free_bytes, ours, m.source, other)


class Housekeeper:
    def __init__(
        self,
        store: ResidencyStore,
        view: ResidencyView,
        clients: WorkerClients,
        placer: Placer,
        metrics: Metrics,
        replication: ReplicationConfig | None,
        min_residency_s: float,
    ) -> None:
        self.store = store
        self.view = view
        self.clients = clients
        self.placer = placer
        self.metrics = metrics
        self.replication = replication
        self.min_residency_s = min_residency_s
        self.rates: dict[tuple[str, int], float] = {}
        self._counted: dict[tuple[str, int], int] = {}
        self._last_tick = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._preloading: set[tuple[str, int]] = set()

    async def tick(self) -> None:
        await self.store.reap_expired()
        await self.refresh_devices()
        await self.relieve_pressure()
        self._update_rates()
        if self.view.workers:
            self.preload()
        if self.replication is not None:
            await self.replicate(self.replication)
        if self.view.last_used:
            await self.store.touch(dict(self.view.last_used))

    async def refresh_devices(self) -> None:
        seen: set[str] = set()
        for w in list(self.view.workers.values()):
            if w.device_id in seen:
                continue
            try:
                status = await self.clients.get(w.worker_id, w.address).status(timeout_s=5.0)
            except ModelpoolError:
                continue
            ours = sum(
                c.footprint_bytes
                for c in self.view.all_copies()
                if c.worker_id in self.view.workers
                and self.view.workers[c.worker_id].device_id == w.device_id
                and c.state != CopyState.LOADING
            )
            record = device_record(w.device_id, status.memory, ours)
            seen.add(w.device_id)
            if self.view.devices.get(w.device_id) != record:
                await self.store.put_device(record)

    async def relieve_pressure(self) -> None:
        view = self.placer.cluster_view("", None, admission=False)
        now = time.time()
        for device in view.devices:
            victims = pressure_victims(
                view, device, self.placer.watermarks, now, self.min_residency_s
            )
            if not victims:
                continue
            log.warning(
                "device %s above its high watermark; evicting %s",
                device.device_id, ", ".join(v.model for v in victims),
            )  # fmt: skip
            for victim in victims:
                claimed = self.placer.claim_victims((victim,))
                if claimed:
                    with contextlib.suppress(ModelpoolError):
                        await self.placer.evict(claimed[0], reason="pressure")

    def _update_rates(self) -> None:
        now = time.monotonic()
        elapsed = max(1e-3, now - self._last_tick)
        self._last_tick = now
        counts = self.placer.requests_by_model
        for key, total in counts.items():
            fresh = (total - self._counted.get(key, 0)) / elapsed
            self._counted[key] = total
            self.rates[key] = RATE_ALPHA * fresh + (1 - RATE_ALPHA) * self.rates.get(key, fresh)

    def preload(self) -> None:
        """Load models whose ``min_copies`` wants them resident and that have no copy
        yet (at start, or after a worker loss), through the normal cold path."""
        resident = {(c.model, c.version) for c in self.view.all_copies()}
        for spec in self.placer.repository.specs():
            if (
                spec.error is None
                and spec.min_copies > 0
                and (spec.name, spec.latest) not in resident
            ):
                if (spec.name, spec.latest) not in self._preloading:
                    self._preloading.add((spec.name, spec.latest))
                    self._spawn(self._preload(spec.name, spec.latest))

    async def _preload(self, model: str, version: int) -> None:
        try:
            got = await self.placer.acquire(model, version)
            self.placer.release(got)
        except ModelpoolError as e:
            log.info("preload of model=%s skipped for now: %s", model, e)
        finally:
            self._preloading.discard((model, version))

    async def replicate(self, config: ReplicationConfig) -> None:
        view = self.placer.cluster_view("", None)
        for action in plan_replication(view, self.rates, config, time.time(), self.min_residency_s):
            match action:
                case Replicate():
                    self._spawn(self._add_copy(action))
                case Shrink(copy=copy):
                    claimed = self.placer.claim_victims((copy,))
                    if claimed:
                        with contextlib.suppress(ModelpoolError):
                            await self.placer.evict(claimed[0], reason="cooled")

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_copy(self, action: Replicate) -> None:
        """Load one more copy in the background, under the model's load lock so it
        never races a cold load of the same model."""
        worker = self.view.workers.get(action.worker_id)
        if worker is None:
            return
        now = time.time()
        reservation = CopyView(
            action.model, action.version, action.worker_id, CopyState.LOADING,
            action.reserve_bytes, last_used=now, loaded_at=now,
        )  # fmt: skip
        try:
            async with self.store.load_lock(action.model, action.version, timeout_s=1.0) as fence:
                capacity = self.placer.admit_bytes(action.device_id)
                if not await self.store.reserve(
                    reservation, action.device_id, capacity, fence=fence
                ):
                    return
                log.info("replicating hot model=%s to worker %s", action.model, action.worker_id)
                await self.placer.load_reserved(reservation, worker.worker_id, worker.address)
                self.metrics.replications.labels(action.model).inc()
        except ModelpoolError as e:
            log.info("replication of model=%s skipped: %s", action.model, e)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
