"""Executes placement plans: finds a copy for a request, loading one if need be.

Policy lives in placement/; this module turns a plan into worker calls and store
writes, and keeps the invariants policy relies on:

- one load per model version, however many requests ask at once: a per-model
  single flight here, and the store's load lock across gateways (check, lock,
  re-check, as Ray Serve's multiplexer does);
- a copy with requests in flight is never unloaded: acquiring a copy increments its
  in-flight count in the same event-loop step that chose it, and an eviction marks the
  copy UNLOADING in the same step that checked it idle, so no request can slip in
  between.

Timeline of a cold request while another is already loading the same model::

    t0 A: no READY copy -> becomes the single-flight leader, takes the store lock
    t1 B: no READY copy -> awaits A's flight
    t2 A: plan = Load(worker w, evict [x]) -> unload x, reserve, load, put READY
    t3 A, B: pick the READY copy, in-flight += 1 each, forward
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from modelpool.cache.records import CopyState, CopyView
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.workers import WorkerClient, WorkerClients
from modelpool.gpu.repository import ModelRepository
from modelpool.placement import policy as pol
from modelpool.placement.cluster import ClusterView, DeviceView, ModelInfo, WorkerView
from modelpool.placement.errors import (
    DoesNotFit,
    ModelLoadError,
    ModelpoolError,
    OutOfMemory,
    Unavailable,
    WorkerUnavailable,
)
from modelpool.placement.policies import Evicted, Loaded, PolicyState, Requested, make_policy
from modelpool.placement.pressure import Watermarks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Acquired:
    """A copy this request may use; release it exactly once."""

    copy: CopyView
    client: WorkerClient
    cold: bool


@dataclass(frozen=True)
class LoadFailure:
    reason: str
    artifact_mtime: float


class Placer:
    def __init__(
        self,
        repository: ModelRepository,
        store: ResidencyStore,
        view: ResidencyView,
        clients: WorkerClients,
        metrics: Metrics,
        *,
        load_timeout_s: float,
        acquire_timeout_s: float,
        min_residency_s: float = 0.0,
        watermarks: Watermarks | None = None,
        retained_limit_bytes: int = 256 << 20,
        on_memory_retained: Callable[[str], None] | None = None,
        policy: PolicyState | None = None,
    ) -> None:
        self.repository = repository
        self.store = store
        self.view = view
        self.clients = clients
        self.metrics = metrics
        self.load_timeout_s = load_timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        self.min_residency_s = min_residency_s
        self.watermarks = watermarks or Watermarks()
        #: An unload that leaves more than this on the device gets its worker recycled.
        self.retained_limit_bytes = retained_limit_bytes
        self.on_memory_retained = on_memory_retained
        #: The placement policy (lru, gdsf): decides, and hears what happened.
        self.policy: PolicyState = policy or make_policy("lru")
        self._flights: dict[tuple[str, int], asyncio.Future[None]] = {}
        #: Plans are computed and their reservations made one at a time per gateway,
        #: so two cold models never both count the same free bytes.
        self._plan_lock = asyncio.Lock()
        #: Peak bytes and load seconds measured on the last load of each model version.
        self.measured: dict[tuple[str, int], tuple[int, float]] = {}
        self.failures: dict[tuple[str, int], LoadFailure] = {}
        #: Requests routed per model version since start; the housekeeper turns
        #: these into rates for replication.
        self.requests_by_model: collections.Counter[tuple[str, int]] = collections.Counter()
        self._copy_changed = asyncio.Event()
        store.subscribe(lambda _event: self._copy_changed.set())

    # -- request path ----------------------------------------------------------------
    def try_acquire(self, model: str, version: int) -> Acquired | None:
        """The warm path: a READY copy, in-flight already counted. No awaits."""
        ready = self.view.ready_copies(model, version)
        if not ready:
            return None
        copy = pol.choose_route(ready)
        worker = self.view.workers[copy.worker_id]
        self.requests_by_model[(model, version)] += 1
        self.view.inflight[copy.key] += 1
        self.view.last_used[copy.key] = time.time()
        return Acquired(copy, self.clients.get(worker.worker_id, worker.address), cold=False)

    def release(self, acquired: Acquired) -> None:
        key = acquired.copy.key
        n = self.view.inflight.get(key, 0) - 1
        if n <= 0:
            self.view.inflight.pop(key, None)
        else:
            self.view.inflight[key] = n
        self.view.last_used[key] = time.time()
        self._copy_changed.set()

    async def acquire(self, model: str, version: int) -> Acquired:
        """A copy of ``model``/``version`` to send a request to, loading one if needed.

        Raises:
            DoesNotFit: the model is bigger than any device.
            Unavailable: no capacity within ``acquire_timeout_s`` (Retry-After).
            ModelLoadError: the artifact cannot be loaded.
        """
        self.policy.observe(Requested(model, version, time.time()))
        got = self.try_acquire(model, version)
        if got is not None:
            return got
        self.check_failed(model, version)
        deadline = time.monotonic() + self.acquire_timeout_s
        while True:
            await self._ensure_loaded(model, version, deadline)
            got = self.try_acquire(model, version)
            if got is not None:
                return dataclasses.replace(got, cold=True)
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"model '{model}': no copy became ready in time", retry_after_s=2.0
                )

    def check_failed(self, model: str, version: int) -> None:
        failure = self.failures.get((model, version))
        if failure is None:
            return
        spec = self.repository.get(model)
        path = spec.artifacts.get(version)
        # A replaced artifact deserves another try; an unchanged broken one fails fast.
        if path is not None and path.exists() and path.stat().st_mtime != failure.artifact_mtime:
            del self.failures[(model, version)]
            return
        raise ModelLoadError(failure.reason)

    async def _ensure_loaded(self, model: str, version: int, deadline: float) -> None:
        """Single flight: the first caller loads; the others await its result."""
        key = (model, version)
        flight = self._flights.get(key)
        if flight is not None:
            await asyncio.wait_for(asyncio.shield(flight), max(0.0, deadline - time.monotonic()))
            return
        flight = asyncio.get_running_loop().create_future()
        self._flights[key] = flight
        try:
            await self._load_leader(model, version, deadline)
            flight.set_result(None)
        except BaseException as e:
            flight.set_exception(e)
            # Followers get the exception; keep asyncio from warning when none awaited.
            flight.exception()
            raise
        finally:
            del self._flights[key]

    async def _load_leader(self, model: str, version: int, deadline: float) -> None:
        remaining = max(0.1, deadline - time.monotonic())
        ooms = 0
        async with self.store.load_lock(model, version, timeout_s=remaining) as fence:
            while time.monotonic() < deadline:
                if self.view.ready_copies(model, version):
                    return
                async with self._plan_lock:
                    plan = self.policy.plan(
                        self.cluster_view(model, version), self._request(model, version)
                    )
                    victims: list[CopyView] = []
                    if isinstance(plan, pol.Load):
                        claimed = self.claim_victims(plan.evict)
                        if claimed is None:
                            continue  # a victim got a request meanwhile; plan again
                        victims = claimed
                match plan:
                    case pol.Route():
                        return
                    case pol.Reject(reason=reason, retryable=False):
                        raise DoesNotFit(reason)
                    case pol.Reject(reason=reason) if not self.view.workers:
                        # Nothing to wait for in this request's lifetime: say so now.
                        raise Unavailable(f"model '{model}': {reason}", retry_after_s=2.0)
                    case pol.Reject() | pol.Wait():
                        await self._wait_for_change(deadline)
                    case pol.Load():
                        try:
                            if await self._execute_load(model, version, plan, victims, fence):
                                return
                            # Another model's load took the room we freed: plan again.
                        except OutOfMemory:
                            ooms += 1
                            if ooms > 2:
                                raise
                            # The estimate was short: ask for half as much again.
                            need = int(plan.reserve_bytes * 1.5)
                            self.measured[(model, version)] = (need, self.load_timeout_s)
            raise Unavailable(
                f"model '{model}': no room on any device before the deadline; "
                "copies are busy or loading",
                retry_after_s=2.0,
            )

    async def _wait_for_change(self, deadline: float) -> None:
        self._copy_changed.clear()
        timeout = min(1.0, max(0.0, deadline - time.monotonic()))
        try:
            await asyncio.wait_for(self._copy_changed.wait(), timeout)
        except TimeoutError:
            pass

    # -- plan execution ----------------------------------------------------------------
    def claim_victims(self, victims: tuple[CopyView, ...]) -> list[CopyView] | None:
        """Mark victims UNLOADING in the local view, in this same event-loop step in
        which they were checked idle, so no request can acquire them. None if any is
        busy now."""
        if any(self.view.inflight.get(v.key, 0) for v in victims):
            return None
        claimed = []
        for v in victims:
            copy = dataclasses.replace(self.view.copies[v.key], state=CopyState.UNLOADING)
            self.view.put(copy)
            claimed.append(copy)
        return claimed

    async def _execute_load(
        self,
        model: str,
        version: int,
        plan: pol.Load,
        victims: list[CopyView],
        fence: int,
    ) -> bool:
        """Unload the victims, reserve, load, publish READY. False when the device
        filled up between plan and reservation (the caller plans again)."""
        for victim in victims:
            await self.evict(victim, reason="capacity")
        worker = self.view.workers.get(plan.worker_id)
        if worker is None:
            return False
        now = time.time()
        reservation = CopyView(
            model=model,
            version=version,
            worker_id=plan.worker_id,
            state=CopyState.LOADING,
            footprint_bytes=plan.reserve_bytes,
            last_used=now,
            loaded_at=now,
        )
        if not await self.store.reserve(
            reservation, plan.device_id, self.admit_bytes(plan.device_id), fence=fence
        ):
            return False
        await self.load_reserved(reservation, worker.worker_id, worker.address)
        return True

    async def load_reserved(self, reservation: CopyView, worker_id: str, address: str) -> None:
        """Load a copy whose bytes are reserved; on failure the reservation goes."""
        model, version = reservation.model, reservation.version
        client = self.clients.get(worker_id, address)
        started = time.monotonic()
        try:
            result = await client.load(model, version, timeout_s=self.load_timeout_s)
        except BaseException as e:
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(reservation.key)
            self.metrics.loads.labels(model, "failure").inc()
            if isinstance(e, ModelLoadError):
                spec = self.repository.get(model)
                path = spec.artifacts.get(version)
                mtime = path.stat().st_mtime if path is not None and path.exists() else 0.0
                self.failures[(model, version)] = LoadFailure(e.message, mtime)
            log.warning("load failed model=%s worker=%s: %s", model, worker_id, e)
            raise
        elapsed = time.monotonic() - started
        self.metrics.loads.labels(model, "success").inc()
        self.metrics.load_duration.labels(model).observe(elapsed)
        self.policy.observe(Loaded(reservation, time.time()))
        self.measured[(model, version)] = (result.peak_bytes, result.load_seconds)
        now = time.time()
        await self.store.put_copy(
            dataclasses.replace(
                reservation,
                state=CopyState.READY,
                footprint_bytes=result.footprint_bytes,
                last_used=now,
                loaded_at=now,
            )
        )
        log.info(
            "placed model=%s version=%d worker=%s footprint=%d load_s=%.3f",
            model, version, worker_id, result.footprint_bytes, elapsed,
        )  # fmt: skip

    def admit_bytes(self, device_id: str) -> int:
        """What our copies may commit on a device: up to the high watermark, less what
        other processes hold."""
        device = self.view.devices.get(device_id)
        if device is None:
            return 0
        return int(device.total_bytes * self.watermarks.high) - device.used_other_bytes

    async def evict(self, copy: CopyView, reason: str) -> None:
        """Unload a copy already marked UNLOADING; a refusal (busy on the worker) puts
        it back READY."""
        worker = self.view.workers.get(copy.worker_id)
        if worker is None:
            await self.store.remove_copy(copy.key)
            return
        await self.store.put_copy(copy)
        client = self.clients.get(worker.worker_id, worker.address)
        try:
            result = await client.unload(copy.model, copy.version, timeout_s=self.load_timeout_s)
        except WorkerUnavailable:
            result = None  # the worker is gone; its memory went with it
        except ModelpoolError:
            await self.store.put_copy(dataclasses.replace(copy, state=CopyState.READY))
            raise
        if result is not None and result.retained_bytes > self.retained_limit_bytes:
            log.warning(
                "worker %s kept %d bytes after unloading model=%s; recycling it",
                worker.worker_id, result.retained_bytes, copy.model,
            )  # fmt: skip
            if self.on_memory_retained is not None:
                self.on_memory_retained(worker.worker_id)
        await self.store.remove_copy(copy.key)
        self.metrics.evictions.labels(copy.model, reason).inc()
        self.policy.observe(Evicted(copy, time.time(), chosen=reason == "capacity"))
        log.info(
            "evicted model=%s version=%d worker=%s reason=%s",
            copy.model,
            copy.version,
            copy.worker_id,
            reason,
        )

    async def unload_model(self, model: str, timeout_s: float) -> int:
        """Unload every copy of ``model`` once its requests finish (Triton's unload)."""
        deadline = time.monotonic() + timeout_s
        count = 0
        while True:
            mine = [c for c in self.view.all_copies() if c.model == model]
            if not mine:
                return count
            idle = [
                c for c in mine if c.state == CopyState.READY and not self.view.inflight.get(c.key)
            ]
            for c in idle:
                claimed = self.claim_victims((c,))
                if claimed:
                    await self.evict(claimed[0], reason="unload")
                    count += 1
            if len(idle) < len(mine):
                if time.monotonic() > deadline:
                    raise Unavailable(f"model '{model}': copies still busy after {timeout_s:.0f}s")
                await self._wait_for_change(deadline)

    # -- views -------------------------------------------------------------------------
    def _request(self, model: str, version: int) -> pol.PlacementRequest:
        return pol.PlacementRequest(
            model, version, now=time.time(), min_residency_s=self.min_residency_s
        )

    def model_info(self, model: str, version: int) -> ModelInfo:
        spec = self.repository.get(model)
        measured = self.measured.get((model, version))
        return ModelInfo(
            name=model,
            estimated_bytes=spec.estimated_bytes(version) if version in spec.artifacts else 0,
            measured_bytes=measured[0] if measured else None,
            load_seconds=measured[1] if measured else None,
            pinned=spec.pinned,
            min_copies=spec.min_copies,
        )

    def cluster_view(self, model: str, version: int | None, admission: bool = True) -> ClusterView:
        """The view placement decides on. With ``admission`` each device's total is cut
        to its high watermark, so loads never fill past it."""
        copies = tuple(self.view.all_copies())
        infos = {c.model: self.model_info(c.model, c.version) for c in copies}
        if version is not None:
            infos[model] = self.model_info(model, version)
        high = self.watermarks.high if admission else 1.0
        return ClusterView(
            devices=tuple(
                DeviceView(d.device_id, int(d.total_bytes * high), d.used_other_bytes)
                for d in self.view.devices.values()
            ),
            workers=tuple(WorkerView(w.worker_id, w.device_id) for w in self.view.workers.values()),
            copies=copies,
            models=infos,
        )

    async def copy_lost(self, acquired: Acquired, worker_gone: bool) -> None:
        """A forward found the copy gone. Stop routing to it at once; if the worker
        itself does not answer, drop it from the store, unless it has since been
        replaced at another address (a restarted local worker keeps its id). A live
        worker dropped by mistake re-announces itself on its next heartbeat."""
        key = acquired.copy.key
        self.view.drop(key)
        worker = self.view.workers.get(acquired.copy.worker_id)
        if not worker_gone or worker is None or worker.address != acquired.client.address:
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(key)
            return
        try:
            await acquired.client.status(timeout_s=1.0)
            return  # it answers: only this request's connection failed
        except ModelpoolError:
            pass
        with contextlib.suppress(ModelpoolError):
            dropped = await self.store.remove_worker(worker.worker_id)
            self.clients.drop(worker.worker_id)
            for c in dropped:
                self.metrics.evictions.labels(c.model, "worker_lost").inc()
