"""The gateway's periodic work, once per ``poll_interval_s``:

- reap workers whose heartbeats lapsed (shared stores);
- read device memory from one worker per device and publish it;
- evict down to the low watermark on devices above the high one (a foreign process
  grew, or a model measured bigger than its estimate), in the policy's order;
- unload copies of models whose files left the repository;
- load models whose ``min_copies`` wants them resident, replicate hot models and
  shrink cooled ones;
- write this gateway's last-use times to the store in one batch.

Decisions come from placement/ (``pressure_victims``, ``plan_replication``); this
module only gathers the inputs and asks the copy manager to carry the plans out: it
never writes residency state itself. Each step runs on its own, so one step's error
(a worker that does not answer, a store outage, a bug) is logged and the others and
the next tick still run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from modelpool.cache.records import CopyState, DeviceRecord
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.copies import CopyManager, WorkerPool
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.limits import TenantLimiter
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
        clients: WorkerPool,
        manager: CopyManager,
        replication: ReplicationConfig | None,
        min_residency_s: float,
        limiter: TenantLimiter | None = None,
        gateway_id: str = "",
        poll_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.view = view
        self.clients = clients
        self.manager = manager
        self.replication = replication
        self.min_residency_s = min_residency_s
        self.rates: dict[tuple[str, int], float] = {}
        self._counted: dict[tuple[str, int], int] = {}
        self._last_tick = time.monotonic()
        self._tasks: set[asyncio.Task[None]] = set()
        self._preloading: set[tuple[str, int]] = set()
        self.limiter = limiter
        self.gateway_id = gateway_id
        self.poll_interval_s = poll_interval_s

    async def tick(self) -> None:
        """One round of every step; a step that fails is logged and skipped."""
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("reap", self.store.reap_expired),
            ("gateways", self.count_gateways),
            ("devices", self.refresh_devices),
            ("pressure", self.relieve_pressure),
            ("removed models", self.retire_removed),
            ("rates", self._async(self._update_rates)),
            ("preload", self._async(self.preload)),
            ("replication", self.replicate),
            ("last use", self._touch),
        ]
        for name, step in steps:
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except ModelpoolError as e:
                log.warning("housekeeping step %s failed: %s", name, e)
            except Exception:
                log.exception("housekeeping step %s failed", name)

    async def count_gateways(self) -> None:
        """Heartbeat this gateway and split tenant limits across the live ones."""
        if self.limiter is None or not self.gateway_id:
            return
        live = await self.store.gateway_heartbeat(self.gateway_id, 3 * self.poll_interval_s)
        self.limiter.set_share(1.0 / live)

    @staticmethod
    def _async(fn: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            fn()

        return run

    async def _touch(self) -> None:
        last_used = self.manager.last_used()
        if last_used:
            await self.store.touch(last_used)

    async def refresh_devices(self) -> None:
        """Device memory from one worker per device; every worker's host tier too, so
        other workers of a device are asked as well while their tier is on (or before
        they first answered)."""
        seen: set[str] = set()
        tiers = self.manager.host_tiers
        tiers.prune(self.view.workers)
        for w in list(self.view.workers.values()):
            if w.device_id in seen and tiers.enabled(w.worker_id) is False:
                continue
            try:
                status = await self.clients.get(w.worker_id, w.address).status(timeout_s=5.0)
            except ModelpoolError:
                continue
            tiers.record(w.worker_id, status)
            if w.device_id in seen:
                continue
            ours = sum(
                c.footprint_bytes
                for c in self.view.all_copies()
                if self.view.workers[c.worker_id].device_id == w.device_id
                and c.state != CopyState.LOADING
            )
            record = device_record(w.device_id, status.memory, ours)
            seen.add(w.device_id)
            if self.view.devices.get(w.device_id) != record:
                await self.store.put_device(record)

    async def relieve_pressure(self) -> None:
        view = self.manager.cluster_view("", None, admission=False)
        now = time.time()
        rank = self.manager.policy.eviction_rank(view, now)
        for device in view.devices:
            victims = pressure_victims(
                view, device, self.manager.config.watermarks, now, self.min_residency_s, rank
            )
            if not victims:
                continue
            log.warning(
                "device %s above its high watermark; evicting %s",
                device.device_id, ", ".join(v.model for v in victims),
            )  # fmt: skip
            for victim in victims:
                await self.manager.evict(victim, reason="pressure")

    async def retire_removed(self) -> None:
        """Unload idle copies of models that left the repository or whose files broke:
        they can no longer serve, and their memory is better spent on others."""
        for copy in self.view.all_copies():
            if copy.state != CopyState.READY:
                continue
            try:
                spec = self.manager.repository.get(copy.model)
                gone = spec.error is not None or copy.version not in spec.artifacts
            except ModelpoolError:
                gone = True
            if gone:
                await self.manager.evict(copy, reason="removed")

    def _update_rates(self) -> None:
        now = time.monotonic()
        elapsed = max(1e-3, now - self._last_tick)
        self._last_tick = now
        counts = self.manager.requests_by_model
        for key, total in counts.items():
            fresh = (total - self._counted.get(key, 0)) / elapsed
            self._counted[key] = total
            self.rates[key] = RATE_ALPHA * fresh + (1 - RATE_ALPHA) * self.rates.get(key, fresh)

    def preload(self) -> None:
        """Load models whose ``min_copies`` wants them resident and that have no copy
        yet (at start, or after a worker loss), through the normal cold path."""
        if not self.view.workers:
            return
        resident = {(c.model, c.version) for c in self.view.all_copies()}
        for spec in self.manager.repository.specs():
            key = (spec.name, spec.latest) if spec.error is None else None
            if key is None or spec.min_copies <= 0 or key in resident:
                continue
            if key not in self._preloading:
                self._preloading.add(key)
                self._spawn(self._preload(*key))

    async def _preload(self, model: str, version: int) -> None:
        try:
            deadline = Deadline.after(self.manager.config.placement_timeout_s, client_set=False)
            lease = await self.manager.acquire(model, version, deadline)
            self.manager.release(lease)
        except ModelpoolError as e:
            log.info("preload of model=%s skipped for now: %s", model, e)
        finally:
            self._preloading.discard((model, version))

    async def replicate(self) -> None:
        if self.replication is None:
            return
        view = self.manager.cluster_view("", None)
        actions = plan_replication(
            view, self.rates, self.replication, time.time(), self.min_residency_s
        )
        for action in actions:
            match action:
                case Replicate():
                    self._spawn(self._add_copy(action))
                case Shrink(copy=copy):
                    await self.manager.evict(copy, reason="cooled")

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _add_copy(self, action: Replicate) -> None:
        try:
            await self.manager.replicate(
                action.model, action.version, action.worker_id, action.device_id,
                action.reserve_bytes,
            )  # fmt: skip
        except ModelpoolError as e:
            log.info("replication of model=%s skipped: %s", action.model, e)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
