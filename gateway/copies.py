"""The copy manager: the one owner of this gateway's mutable residency state.

Policy lives in placement/ (pure plans); the residency store holds the shared truth
and the local ``ResidencyView`` mirrors it. Everything else that changes while
requests run is written here and nowhere else:

=====================  ==========================================================
state                  written by
=====================  ==========================================================
store copies           ``_load_copy`` (reserve, READY, remove on failure),
                       ``_unload_claimed`` (UNLOADING, remove), ``copy_lost``
in-flight (leases)     ``_lease`` / ``release``
last use               ``_lease`` / ``release``; pruned when a copy goes
claims (victims)       ``_claim`` and the ``finally`` of whoever claimed
placements, loads      ``_placement`` / ``_load_copy``; removed when they end
draining workers       ``request_recycle`` / ``_recycle``
=====================  ==========================================================

The housekeeper and the data plane call methods (``acquire``, ``evict``,
``replicate``, ``request_recycle``); they never reach into these fields.

Loads run as their own tasks: a placement task per model version (plan, evict,
reserve, load) and under it a load task per copy. Requests only await a placement,
each under its own deadline, through ``asyncio.shield``: a request that is cancelled
or runs out of time leaves, and the load and the other waiters carry on. Timeline of
two cold requests for one model::

    t0 A: no routable copy -> starts placement P(m) and awaits it (deadline A)
    t1 B: no routable copy -> awaits the same P(m) (deadline B)
    t2 A: cancelled by its client; P(m) carries on, B still waits
    t3 P: lock, plan = Load(w, evict [x]) -> claim x, unload x, reserve, load task L(m, w)
    t4 L: READY in the store; P ends
    t5 B: leases the READY copy (in-flight += 1 in the same step), forwards

A copy with requests in flight is never unloaded: a lease counts in the same event-
loop step that chose the copy, and a claim checks "idle" in the same step that marks
the copy as going, so no request slips in between.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf import json_format

from modelpool.cache.footprints import FootprintBook
from modelpool.cache.records import (
    CopyKey,
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    Footprint,
    Resynced,
    StoreEvent,
    WorkerDown,
    WorkerRecord,
    device_kind,
)
from modelpool.cache.store import ResidencyStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.deadlines import CAPACITY_RETRY_AFTER_S, Deadline
from modelpool.gateway.host_tiers import HostTiers
from modelpool.gateway.metrics import Metrics
from modelpool.gpu import protocol
from modelpool.gpu.repository import ModelRepository
from modelpool.placement import policy as pol
from modelpool.placement.admission import Demand, judge
from modelpool.placement.cluster import ClusterView, DeviceView, ModelInfo, WorkerView
from modelpool.placement.errors import (
    DeadlineExceeded,
    DoesNotFit,
    ModelLoadError,
    ModelpoolError,
    OutOfMemory,
    QuotaExceeded,
    Unavailable,
    WorkerUnavailable,
)
from modelpool.placement.policies import Evicted, Loaded, PolicyState, Requested, make_policy
from modelpool.placement.pressure import Watermarks
from modelpool.placement.quota import quota_used, quota_victims

log = logging.getLogger(__name__)


#: Eviction reasons whose copy the worker may keep in its host tier (``UnloadRequest.
#: keep``): the model is still wanted, only not on this device now. A client's unload,
#: a removed or changed model and a drain drop the copy outright.
KEEP_REASONS = frozenset({"capacity", "pressure", "cooled"})


class WorkerRPC(Protocol):
    """What the manager and the data plane call on a worker (``gateway.workers``)."""

    worker_id: str
    address: str

    async def load(
        self, model: str, version: int, timeout_s: float, known_peak_bytes: int = 0
    ) -> protocol.LoadResult: ...

    async def unload(
        self, model: str, version: int, timeout_s: float, keep: bool = False
    ) -> protocol.UnloadResult: ...

    async def status(self, timeout_s: float) -> protocol.WorkerStatus: ...

    async def infer(self, request: Any, timeout_s: float, metadata: Any = None) -> Any: ...

    async def infer_raw(
        self, model: str, request: bytes, timeout_s: float, metadata: Any = None
    ) -> bytes: ...


class WorkerPool(Protocol):
    def get(self, worker_id: str, address: str) -> WorkerRPC: ...

    def drop(self, worker_id: str) -> None: ...


#: Restarts a worker and returns once its replacement is registered (or raises).
Recycler = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class Quota:
    """A tenant's device-memory quota over its private models (``owns``), in bytes."""

    tenant: str
    limit_bytes: int
    owns: Callable[[str], bool]


#: The quota a model counts against, or None (shared, or its tenant has no quota).
QuotaLookup = Callable[[str], Quota | None]


@dataclass(frozen=True)
class Lease:
    """A copy one request may use. Give it back with ``CopyManager.release`` once;
    a second release is ignored."""

    lease_id: int
    copy: CopyView
    client: WorkerRPC
    cold: bool
    #: The worker as registered when the lease was made: a restarted worker keeps its
    #: id (and, over a Unix socket, its address) but not this record.
    worker: WorkerRecord
    #: An early lease (``acquire(early=True)``) on a copy still LOADING: done once the
    #: copy is READY, with where it was loaded from (``LoadResult.source``); raises the
    #: error a waiter for the placement would get (the load's own: ModelLoadError,
    #: OutOfMemory, Unavailable...), or ``CopyMoved``. The holder may send its infer
    #: before this is done (the worker waits for the load) but reports nothing before
    #: it is. None: the copy was READY when leased.
    loading: asyncio.Future[str] | None = None


class CopyMoved(Exception):
    """An early lease's load failed in a way its placement recovers from (a lost
    worker, a reservation too small) and the placement put the model elsewhere: the
    request leases again. Never leaves the gateway."""


@dataclass(frozen=True)
class _MakeQuotaRoom:
    """Evict these copies of the same tenant before planning the load."""

    evict: tuple[CopyView, ...]


@dataclass(frozen=True)
class _Defer:
    """Admission holds the load back until ``until`` (see ``placement.admission``)."""

    until: Deadline


@dataclass(frozen=True)
class _Yield:
    """An older placement is blocked for room: this one waits rather than take it."""


@dataclass(frozen=True)
class LoadFailure:
    """Why a model version's last load failed, and its artifact's stamp then: an
    unchanged broken file fails fast, a replaced one is tried again."""

    reason: str
    artifact_stamp: str


@dataclass(frozen=True)
class ManagerConfig:
    """Seconds and bytes.

    ``placement_timeout_s`` bounds one placement (lock, plan, evictions, load) whoever
    waits for it; ``retained_limit_bytes`` is what an unload may leave in the worker's
    allocator before the worker is recycled; ``recycle_interval_s`` is the least time
    between two recycles on one device; ``drain_timeout_s`` is how long a recycle waits
    for a worker's requests and loads to finish before it is called off.
    """

    load_timeout_s: float = 300.0
    unload_timeout_s: float = 60.0
    placement_timeout_s: float = 120.0
    min_residency_s: float = 0.0
    watermarks: Watermarks = dataclasses.field(default_factory=Watermarks)
    retained_limit_bytes: int = 256 << 20
    recycle_interval_s: float = 60.0
    drain_timeout_s: float = 120.0
    #: Loads that may fail with a lost worker or an out-of-memory before a placement
    #: gives up (each failure plans again, elsewhere or with a larger reservation).
    max_load_attempts: int = 3
    #: How long a loaded copy is held for the request that asked for it before it
    #: may be evicted unserved (that request gave up, or was served elsewhere).
    fresh_grace_s: float = 10.0
    #: Longest a load may be held back because its victims are worth more than the
    #: model (``placement.admission``); 0 admits every load at once.
    admission_window_s: float = 0.0


class CopyManager:
    def __init__(
        self,
        repository: ModelRepository,
        store: ResidencyStore,
        view: ResidencyView,
        clients: WorkerPool,
        metrics: Metrics,
        config: ManagerConfig | None = None,
        policy: PolicyState | None = None,
        recycler: Recycler | None = None,
        quota_of: QuotaLookup | None = None,
    ) -> None:
        self.repository = repository
        self.store = store
        self.view = view
        self.clients = clients
        self.metrics = metrics
        self.config = config or ManagerConfig()
        #: The placement policy (lru, gdsf): decides, and hears what happened.
        self.policy: PolicyState = policy or make_policy("lru")
        #: Set once by ``modelpool serve`` (its supervisor); None: recycling is off.
        self.recycler = recycler
        #: Tenants' device-memory quotas (from the auth config); None: no quotas.
        self.quota_of = quota_of
        #: Raises for a model that model control keeps unloaded (explicit mode,
        #: ``gateway/model_control.py``); None: every model loads on demand.
        self.load_gate: Callable[[str], None] | None = None
        # -- owned state: see the module docstring for who writes what --
        self._leases: dict[int, CopyKey] = {}
        self._lease_ids = itertools.count(1)
        self._inflight: collections.Counter[CopyKey] = collections.Counter()
        self._last_used: dict[CopyKey, float] = {}
        self._claimed: set[CopyKey] = set()
        #: Copies a forward found gone: not routed to until the store speaks of them.
        self._suspect: set[CopyKey] = set()
        #: Copies loaded but not yet leased (monotonic load time): held for the
        #: requests that asked for them, or two placements could evict each other's
        #: copies before either served, and the pool would load without serving.
        self._fresh: dict[CopyKey, float] = {}
        self._placements: dict[tuple[str, int], asyncio.Task[None]] = {}
        #: Placements that found no idle copies to make room (or lost their victims to
        #: new requests), by when they started: younger ones do not load before them,
        #: or a large model starves while small ones take every byte that frees up.
        self._blocked: dict[tuple[str, int], float] = {}
        #: Each resolves to where its copy was loaded from (``LoadResult.source``).
        self._loads: dict[CopyKey, asyncio.Task[str]] = {}
        self._draining: set[str] = set()
        self._last_recycle: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Plans are made and their claims taken one at a time, so two placements
        #: never count the same free bytes or pick the same victim.
        self._plan_lock = asyncio.Lock()
        self._change = asyncio.Event()
        #: Set, and dropped, when a load task of the model version starts: wakes that
        #: version's early waiters only (``_early_lease``). Every waiter waking on every
        #: change instead made hundreds of waiters each rescan on each lease released.
        self._load_started: dict[tuple[str, int], asyncio.Event] = {}
        #: Peak bytes and load seconds measured on the last load of each model version
        #: per device kind: the store's record (shared by every gateway, kept across
        #: restarts with Redis), mirrored locally and fed by store events.
        self.measured = FootprintBook(store, view)
        self.failures: dict[tuple[str, int], LoadFailure] = {}
        #: Decayed request counts per model: what admission prices loads with.
        self.demand = Demand()
        #: Requests routed per model version since start (rates for replication).
        self.requests_by_model: collections.Counter[tuple[str, int]] = collections.Counter()
        #: Each worker's host tier as its last status said (the housekeeper records it);
        #: informational, never residency state.
        self.host_tiers = HostTiers()
        store.subscribe(self._apply)

    # -- store events ----------------------------------------------------------------
    def _apply(self, event: StoreEvent) -> None:
        """Mirror the event, then prune what belonged to copies that went."""
        shrinks = isinstance(event, CopyRemoved | WorkerDown | Resynced)
        before = set(self.view.copies) if shrinks else set()
        self.view.apply(event)
        if shrinks:
            for key in before - set(self.view.copies):
                self._last_used.pop(key, None)
                self._suspect.discard(key)
                self._fresh.pop(key, None)
        elif isinstance(event, CopyUpserted):
            self._suspect.discard(event.copy.key)
        self._notify()

    def _notify(self) -> None:
        """Wake everyone waiting for a change (a copy, a lease, a worker)."""
        self._change.set()
        self._change = asyncio.Event()

    async def _wait_change(self, timeout_s: float) -> None:
        change = self._change
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(change.wait(), max(0.0, timeout_s))

    # -- reading -----------------------------------------------------------------------
    def merged(self, copy: CopyView) -> CopyView:
        """A stored copy with this gateway's in-flight count and latest use. A fresh
        copy (loaded, not yet leased) counts one request in flight: the one it was
        loaded for, so no plan evicts it first."""
        key = copy.key
        last = max(copy.last_used, self._last_used.get(key, 0.0))
        inflight = self._inflight.get(key, 0) + (1 if self._is_fresh(key) else 0)
        return dataclasses.replace(copy, inflight=inflight, last_used=last)

    def _is_fresh(self, key: CopyKey) -> bool:
        loaded = self._fresh.get(key)
        if loaded is None:
            return False
        if time.monotonic() - loaded > self.config.fresh_grace_s:
            del self._fresh[key]  # nobody came for it: an ordinary idle copy
            return False
        return True

    def copies(self) -> list[CopyView]:
        """Every copy with a live worker, as this gateway sees it."""
        return [self.merged(c) for c in self.view.all_copies()]

    def last_used(self) -> dict[CopyKey, float]:
        """This gateway's last use of each copy, for the store's batched ``touch``."""
        return dict(self._last_used)

    def draining(self) -> frozenset[str]:
        return frozenset(self._draining)

    def _routable(self, copy: CopyView) -> bool:
        return (
            copy.state == CopyState.READY
            and copy.key not in self._claimed
            and copy.key not in self._suspect
            and copy.worker_id not in self._draining
        )

    def routable_count(self, model: str, version: int) -> int:
        """How many copies of a model version take requests now."""
        return len(self._routable_copies(model, version))

    def _routable_copies(self, model: str, version: int) -> list[CopyView]:
        return [c for c in self.view.ready_copies(model, version) if self._routable(c)]

    # -- request path ------------------------------------------------------------------
    def try_acquire(self, model: str, version: int) -> Lease | None:
        """The warm path: a routable READY copy, leased in this step. No awaits."""
        ready = self._routable_copies(model, version)
        if not ready:
            return None
        return self._lease(pol.choose_route([self.merged(c) for c in ready]), cold=False)

    def _lease(self, copy: CopyView, cold: bool) -> Lease:
        worker = self.view.workers[copy.worker_id]
        self.requests_by_model[(copy.model, copy.version)] += 1
        self._inflight[copy.key] += 1
        self._last_used[copy.key] = time.time()
        lease_id = next(self._lease_ids)
        self._leases[lease_id] = copy.key
        self._fresh.pop(copy.key, None)  # served: an ordinary copy from now on
        client = self.clients.get(worker.worker_id, worker.address)
        return Lease(lease_id, copy, client, cold, worker)

    def release(self, lease: Lease) -> None:
        key = self._leases.pop(lease.lease_id, None)
        if key is None:
            return
        if lease.loading is not None:
            lease.loading.cancel()  # this lease's view of the load; the load goes on
        n = self._inflight[key] - 1
        if n <= 0:
            del self._inflight[key]
        else:
            self._inflight[key] = n
        if key in self.view.copies:  # a copy that went keeps no last use
            self._last_used[key] = time.time()
        self._notify()

    async def acquire(
        self, model: str, version: int, deadline: Deadline, early: bool = False
    ) -> Lease:
        """A lease on a copy of ``model``/``version``, placing one if need be.

        Waits at most until ``deadline``; the placement it waits for is not bound to
        this request and carries on for the others (and for the next request) if this
        one leaves. With ``early``, a cold request is leased as soon as a load of the
        model version is under way here (``Lease.loading``; the data plane sends the
        infer then, pipelined behind the Load RPC); without it, only once a copy is
        READY. Either way the load is the manager's task, never the request's.

        Raises:
            DoesNotFit: the model is bigger than any device.
            Unavailable: no capacity before the server's wait bound (Retry-After).
            DeadlineExceeded: the client's deadline passed first.
            ModelLoadError: the artifact cannot be loaded.
            ModelNotReady: model control keeps the model unloaded (``load_gate``).
        """
        if self.load_gate is not None:
            self.load_gate(model)
        now = time.time()
        self.policy.observe(Requested(model, version, now))
        self.demand.observe(model, now)
        lease = self.try_acquire(model, version)
        if lease is not None:
            return lease
        self.check_failed(model, version)
        while True:
            placement = self._placement(model, version)
            if early:
                lease = await self._early_lease(model, version, placement, deadline)
                if lease is not None:
                    return lease
            try:
                await asyncio.wait_for(asyncio.shield(placement), deadline.remaining())
            except TimeoutError:
                raise deadline.error(f"model '{model}': waiting for a copy") from None
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # this request was cancelled
                raise Unavailable(f"model '{model}': the gateway is stopping") from None
            lease = self.try_acquire(model, version)
            if lease is not None:
                return dataclasses.replace(lease, cold=True)
            if deadline.expired():
                raise deadline.error(f"model '{model}': waiting for a copy")
            # Placed, then gone before this request got to it (evicted, worker lost):
            # place again.

    async def _early_lease(
        self, model: str, version: int, placement: asyncio.Task[None], deadline: Deadline
    ) -> Lease | None:
        """Wait until a load of the model version runs here (an early lease on its
        copy) or ``placement`` ends or the deadline passes (None: the caller reads the
        placement's outcome as a plain cold acquire does)."""
        while not placement.done() and not deadline.expired():
            lease = self._try_early(model, version, placement)
            if lease is not None:
                return lease
            # ``_load_copy`` sets this when it starts a load task of the version.
            started = self._load_started.get((model, version))
            if started is None:
                started = self._load_started[(model, version)] = asyncio.Event()
            changed = asyncio.ensure_future(started.wait())
            try:
                await asyncio.wait(
                    (placement, changed),
                    timeout=deadline.remaining(),
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                changed.cancel()
        return None

    def _try_early(self, model: str, version: int, placement: asyncio.Task[None]) -> Lease | None:
        """An early lease, counted in flight like any (so the copy cannot be evicted
        once READY), on a copy of the model version whose load task runs here."""
        for key, load in self._loads.items():
            copy = self.view.copies.get(key)
            if (
                key[:2] != (model, version)
                or load.done()
                or copy is None
                or copy.state != CopyState.LOADING
                or key in self._suspect
                or copy.worker_id in self._draining
                or copy.worker_id not in self.view.workers
            ):
                continue
            lease = self._lease(copy, cold=True)
            loading = asyncio.ensure_future(self._early_outcome(model, load, placement))
            self._tasks.add(loading)
            loading.add_done_callback(mark_retrieved)
            loading.add_done_callback(self._tasks.discard)
            return dataclasses.replace(lease, loading=loading)
        return None

    async def _early_outcome(
        self, model: str, load: asyncio.Task[str], placement: asyncio.Task[None]
    ) -> str:
        """``Lease.loading`` of an early lease: the outcome a waiter for the placement
        would have seen, in terms of this lease's copy.

        Raises:
            CopyMoved: the copy's load failed, and the placement recovered elsewhere.
            ModelpoolError: the load's own error, or the placement's last one.
        """
        try:
            return await asyncio.shield(load)
        except (OutOfMemory, WorkerUnavailable):
            pass  # the placement plans again (``_place_locked``): its verdict counts
        except asyncio.CancelledError:
            if load.cancelled():
                raise Unavailable(f"model '{model}': the gateway is stopping") from None
            raise
        try:
            await asyncio.shield(placement)
        except asyncio.CancelledError:
            if placement.cancelled():
                raise Unavailable(f"model '{model}': the gateway is stopping") from None
            raise
        raise CopyMoved(f"model '{model}': the load failed on one worker and was placed again")

    def check_failed(self, model: str, version: int) -> None:
        """Fail fast for a model version whose unchanged artifact failed to load."""
        failure = self.failures.get((model, version))
        if failure is None:
            return
        if self._artifact_stamp(model, version) != failure.artifact_stamp:
            del self.failures[(model, version)]  # replaced: worth another try
            return
        raise ModelLoadError(failure.reason)

    def _artifact_stamp(self, model: str, version: int) -> str:
        """What changes when a version's artifact or its declared checksum does: the
        repository's stamp (the ETag on S3) and, for a file on disk, its mtime now."""
        try:
            spec = self.repository.get(model)
        except ModelpoolError:
            return ""
        parts = [spec.stamps.get(version, ""), repr(spec.checksums.get(version, ()))]
        path = spec.artifacts.get(version)
        if path is not None:
            with contextlib.suppress(OSError):
                parts.append(str(path.stat().st_mtime_ns))
        return "|".join(parts)

    async def copy_lost(self, lease: Lease, worker_gone: bool) -> None:
        """A forward found the copy gone. Stop routing to it at once; if the worker
        itself does not answer, drop the worker from the store, unless it has since
        been replaced at another address (a restarted local worker keeps its id). A
        live worker dropped by mistake re-announces itself on its next heartbeat."""
        key = lease.copy.key
        self._suspect.add(key)
        self._notify()
        worker = self.view.workers.get(lease.copy.worker_id)
        if not worker_gone or worker != lease.worker:
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(key)
            return
        await self._check_worker(lease.worker, lease.client)

    async def _check_worker(self, seen: WorkerRecord, client: WorkerRPC) -> None:
        """Drop the worker ``seen`` from the store if it does not answer a status
        call, unless it has been replaced meanwhile: a restarted worker registers a new
        record under the same id (and, over a Unix socket, the same address), and
        removing that would lose a healthy worker for good."""
        try:
            await client.status(timeout_s=1.0)
            return  # it answers: only one call's connection failed
        except ModelpoolError:
            pass
        if self.view.workers.get(seen.worker_id) != seen:
            return
        with contextlib.suppress(ModelpoolError):
            dropped = await self.store.remove_worker(seen.worker_id)
            self.clients.drop(seen.worker_id)
            for c in dropped:
                self.metrics.evictions.labels(c.model, "worker_lost").inc()

    # -- placement ---------------------------------------------------------------------
    def _placement(self, model: str, version: int) -> asyncio.Task[None]:
        """The running placement of a model version, started if there is none."""
        key = (model, version)
        task = self._placements.get(key)
        if task is None:
            task = asyncio.create_task(self._place(model, version), name=f"place {model}/{version}")
            self._placements[key] = task
            task.add_done_callback(lambda t: self._placement_done(key, t))
        return task

    def _placement_done(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        if self._placements.get(key) is task:
            del self._placements[key]
            # Its early waiters wake on the placement itself; a later one makes anew.
            self._load_started.pop(key, None)
        mark_retrieved(task)  # its waiters have it; keep asyncio from warning when none did
        self._notify()

    async def _place(self, model: str, version: int) -> None:
        """Make a routable copy exist: lock, plan, evict, reserve, load; plan again
        whenever the world moved under the plan."""
        limit = self.config.placement_timeout_s
        deadline = Deadline.after(limit, client_set=False)
        admission = Deadline.after(self.config.admission_window_s, client_set=False)
        key, started = (model, version), time.monotonic()
        try:
            await self._place_locked(model, version, deadline, admission, key, started)
        finally:
            self._blocked.pop(key, None)

    async def _place_locked(
        self,
        model: str,
        version: int,
        deadline: Deadline,
        admission: Deadline,
        key: tuple[str, int],
        started: float,
    ) -> None:
        limit = self.config.placement_timeout_s
        failures = 0
        deferred = False
        async with self.store.load_lock(model, version, timeout_s=limit) as fence:
            while True:
                # Every round yields: a plan that cannot progress (a reservation the
                # store refuses, a victim that will not go) must never spin the loop.
                await asyncio.sleep(0)
                if self._routable_copies(model, version):
                    return
                if deadline.expired():
                    raise Unavailable(
                        f"model '{model}': no room on any device in {limit:.0f}s; "
                        "copies are busy or loading",
                        retry_after_s=CAPACITY_RETRY_AFTER_S,
                    )
                async with self._plan_lock:
                    view = self.cluster_view(model, version)
                    request = self._request(model, version, waited_s=limit - deadline.remaining())
                    over = self._over_quota(model, view, request)
                    plan: pol.Plan | _MakeQuotaRoom | _Defer | _Yield = (
                        over if over is not None else self.policy.plan(view, request)
                    )
                    victims: list[CopyView] = []
                    if isinstance(plan, _MakeQuotaRoom):
                        claimed = self._claim(plan.evict)
                        if claimed is None:
                            plan = pol.Wait(plan.evict[0])
                        else:
                            victims = claimed
                    elif isinstance(plan, pol.Load) and self._defer(
                        model, plan, view, admission, deferred
                    ):
                        deferred = True
                        plan = _Defer(admission)
                    elif isinstance(plan, pol.Load) and self._yields(key, started):
                        plan = _Yield()
                    elif isinstance(plan, pol.Load):
                        claimed = self._claim(plan.evict)
                        if claimed is None:
                            # A victim got a request meanwhile: plan again once
                            # something changed, ahead of younger placements.
                            self._blocked.setdefault(key, started)
                            plan = pol.Wait(plan.evict[0])
                        else:
                            victims = claimed
                    elif isinstance(plan, pol.Reject) and plan.retryable and admission.expired():
                        if _could_fit(view, model):
                            # Room would come if copies went idle: first claim on it.
                            self._blocked.setdefault(key, started)
                        else:
                            # Another process holds the memory: nothing to claim, and
                            # holding everyone else back would not bring it.
                            self._blocked.pop(key, None)
                    if (
                        isinstance(plan, pol.Reject | pol.Wait)
                        and key in self._blocked
                        and self.config.admission_window_s > 0
                        and admission.expired()
                        and not self._yields(key, started)
                    ):
                        # The oldest blocked placement, past its window: take its
                        # victims busy or not, route no new request to them, and
                        # unload them once their requests finish.
                        drain = self._drain_plan(view, request)
                        claimed = self._claim(drain.evict, busy_ok=True) if drain else None
                        if drain is not None and claimed is not None:
                            plan, victims = drain, claimed
                match plan:
                    case _MakeQuotaRoom():
                        try:
                            for victim in victims:
                                await self._unload_claimed(victim, reason="quota")
                        finally:
                            for victim in victims:
                                self._claimed.discard(victim.key)
                            self._notify()
                    case _Yield():
                        await self._wait_change(deadline.capped(1.0))
                    case _Defer(until):
                        # Its requests gather behind this placement meanwhile; plan
                        # again if memory moves (free room needs no admission).
                        await self._wait_change(min(deadline.capped(1.0), until.remaining()))
                    case pol.Reject(reason=reason, retryable=False):
                        self.metrics.out_of_memory.labels(model, "placement").inc()
                        raise DoesNotFit(reason)
                    case pol.Reject(reason=reason) if not self.view.workers and not self._draining:
                        # No worker, and none coming back from a recycle: say so now.
                        raise Unavailable(
                            f"model '{model}': {reason}", retry_after_s=CAPACITY_RETRY_AFTER_S
                        )
                    case pol.Route() | pol.Reject() | pol.Wait():
                        # Route: a copy placement can see but this gateway may not use
                        # yet (claimed, suspect); wait for it to settle either way. Wake
                        # at the admission window's end at the latest: a drain may start.
                        window = admission.remaining() if not admission.expired() else 1.0
                        await self._wait_change(deadline.capped(max(window, 0.001)))
                    case pol.Load():
                        try:
                            # A blocked placement keeps its first claim on room until
                            # its load is under way: the victims' bytes are for it.
                            if await self._execute(model, version, plan, victims, fence):
                                self._blocked.pop(key, None)
                            else:
                                # No progress (the store refused the reservation, or a
                                # victim would not go): wait for the world to move.
                                await self._wait_change(deadline.capped(1.0))
                        except (OutOfMemory, WorkerUnavailable) as e:
                            failures += 1
                            if failures >= self.config.max_load_attempts:
                                raise
                            if isinstance(e, OutOfMemory):
                                # The estimate was short: ask for half as much again.
                                need = int(plan.reserve_bytes * 1.5)
                                self.measured.guess(
                                    model, version, need, self.config.load_timeout_s
                                )

    def _drain_plan(self, view: ClusterView, request: pol.PlacementRequest) -> pol.Load | None:
        """The policy's load as if every READY copy were idle: victims chosen in its
        order among copies that only their requests in flight keep."""
        idle = dataclasses.replace(
            view,
            copies=tuple(
                dataclasses.replace(c, inflight=0) if c.state == CopyState.READY else c
                for c in view.copies
            ),
        )
        plan = self.policy.plan(idle, request)
        return plan if isinstance(plan, pol.Load) and plan.evict else None

    def _yields(self, key: tuple[str, int], started: float) -> bool:
        """Whether an older placement is blocked for room: it loads first."""
        return any(k != key and t < started for k, t in self._blocked.items())

    def _defer(
        self, model: str, plan: pol.Load, view: ClusterView, window: Deadline, deferred: bool
    ) -> bool:
        """Hold the load back while its victims are worth more than the model, for at
        most the admission window (from the placement's start)."""
        if not plan.evict or window.expired():
            return False
        verdict = judge(plan, view, model, self.demand.snapshot(time.time()))
        if verdict.admit:
            return False
        if not deferred:
            self.metrics.admission_deferrals.labels(model).inc()
            log.debug("deferring load: %s", verdict.describe(model))
        return True

    def _over_quota(
        self, model: str, view: ClusterView, request: pol.PlacementRequest
    ) -> _MakeQuotaRoom | None:
        """None when the model counts against no quota or fits in its tenant's; the
        tenant's own copies to evict when that makes room.

        Raises:
            QuotaExceeded: nothing of the tenant's can make room now.
        """
        quota = self.quota_of(model) if self.quota_of is not None else None
        if quota is None:
            return None
        info = view.models[model]
        # A tenant at its quota trades its own copies: the minimum residency shields a
        # copy from newcomers, not from its own tenant's next model.
        own = dataclasses.replace(request, min_residency_s=0.0)
        victims = quota_victims(
            view, quota.owns, info.need_bytes, quota.limit_bytes, own,
            self.policy.eviction_rank(view, request.now),
        )  # fmt: skip
        if victims is None:
            used = quota_used(view, quota.owns)
            raise QuotaExceeded(
                f"model '{model}' needs {info.need_bytes} bytes; tenant '{quota.tenant}' "
                f"holds {used} of its {quota.limit_bytes}-byte device memory quota and none "
                "of its idle copies can make room",
                retry_after_s=CAPACITY_RETRY_AFTER_S,
            )
        return _MakeQuotaRoom(victims) if victims else None

    async def _execute(
        self, model: str, version: int, plan: pol.Load, victims: list[CopyView], fence: int
    ) -> bool:
        """Unload the claimed victims, reserve, load. False, early, when a victim would
        not go or the store refused the reservation (the caller plans again)."""
        try:
            # Victims claimed busy (a drain) go once their requests have finished.
            drain = Deadline.after(self.config.drain_timeout_s, client_set=False)
            while any(self._inflight.get(v.key, 0) for v in victims):
                if drain.expired():
                    return False
                await self._wait_change(drain.capped(1.0))
            for victim in victims:
                if not await self._unload_claimed(victim, reason="capacity"):
                    return False
        finally:
            for victim in victims:
                self._claimed.discard(victim.key)
            self._notify()
        worker = self.view.workers.get(plan.worker_id)
        if worker is None or worker.worker_id in self._draining:
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
        await self._load_copy(reservation)
        return True

    async def _load_copy(self, reservation: CopyView) -> None:
        """Run the load of one reserved copy as its own task, keyed by the copy, and
        wait for it. Only manager shutdown cancels it."""
        key = reservation.key
        task = self._loads.get(key)
        if task is None:
            task = asyncio.create_task(self._run_load(reservation), name=f"load {key}")
            self._loads[key] = task
            task.add_done_callback(lambda t: self._load_done(key, t))
            started = self._load_started.pop(key[:2], None)
            if started is not None:
                started.set()  # the version's early waiters lease the loading copy now
        await asyncio.shield(task)

    def _load_done(self, key: CopyKey, task: asyncio.Task[str]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        mark_retrieved(task)
        self._notify()

    async def _run_load(self, reservation: CopyView) -> str:
        """Load a copy whose bytes are reserved; publish it READY with its measured
        footprint. On any failure the reservation goes, and a load the worker may
        still finish (a timeout, a cancellation) is unloaded there, so no copy ever
        outlives its reservation."""
        model, version, worker_id = reservation.key
        worker = self.view.workers.get(worker_id)
        if worker is None:  # it went between the reservation and this task
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(reservation.key)
            raise WorkerUnavailable(f"model '{model}': worker {worker_id} went before the load")
        client = self.clients.get(worker_id, worker.address)
        started = time.monotonic()
        try:
            try:
                measured = self.measured.get((model, version))
                # A config override (repository load with ``config``) goes with every
                # load of the model, so the worker reads it as this gateway does.
                override = self.repository.override(model)
                extra: dict[str, Any] = {}
                if override is not None:
                    extra["config_override"] = json_format.MessageToJson(override)
                result = await client.load(
                    model,
                    version,
                    timeout_s=self.config.load_timeout_s,
                    known_peak_bytes=measured[0] if measured else 0,
                    **extra,
                )
            except DeadlineExceeded:
                # The server's bound, not a client's: its waiters may try again.
                raise Unavailable(
                    f"model '{model}': load on worker {worker_id} did not finish in "
                    f"{self.config.load_timeout_s:.0f}s",
                    retry_after_s=CAPACITY_RETRY_AFTER_S,
                ) from None
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
        except BaseException as e:
            self.metrics.loads.labels(model, "failure", "disk").inc()
            if isinstance(e, OutOfMemory):
                self.metrics.out_of_memory.labels(model, "load").inc()
            if not isinstance(e, ModelLoadError | WorkerUnavailable | OutOfMemory):
                # The worker may hold (or still finish) the copy: take it back.
                self._spawn(self._unload_orphan(client, model, version))
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(reservation.key)
            if isinstance(e, ModelLoadError):
                stamp = self._artifact_stamp(model, version)
                self.failures[(model, version)] = LoadFailure(e.message, stamp)
            if isinstance(e, WorkerUnavailable):
                await self._check_worker(worker, client)
            log.warning("load failed model=%s worker=%s: %s", model, worker_id, e)
            raise
        if not self._inflight.get(reservation.key):
            # Nobody holds an early lease on it: hold it for those who asked.
            self._fresh[reservation.key] = time.monotonic()
        elapsed = time.monotonic() - started
        self.metrics.loads.labels(model, "success", result.source).inc()
        self.metrics.load_duration.labels(model, result.source).observe(elapsed)
        self.policy.observe(Loaded(reservation, time.time()))
        footprint = Footprint(
            model, version, device_kind(worker.device_id), result.footprint_bytes,
            result.peak_bytes, result.load_seconds, time.time(),
        )  # fmt: skip
        self.measured.put(footprint)
        self._spawn(self.measured.share(footprint))
        log.info(
            "placed model=%s version=%d worker=%s footprint=%d load_s=%.3f",
            model, version, worker_id, result.footprint_bytes, elapsed,
        )  # fmt: skip
        return result.source

    async def _unload_orphan(self, client: WorkerRPC, model: str, version: int) -> None:
        try:
            await client.unload(model, version, timeout_s=self.config.unload_timeout_s)
        except ModelpoolError as e:
            log.info("orphan unload of model=%s on %s skipped: %s", model, client.worker_id, e)

    def admit_bytes(self, device_id: str) -> int:
        """What our copies may commit on a device: up to the high watermark, less what
        other processes hold."""
        device = self.view.devices.get(device_id)
        if device is None:
            return 0
        return int(device.total_bytes * self.config.watermarks.high) - device.used_other_bytes

    # -- eviction ----------------------------------------------------------------------
    def _claim(self, victims: Iterable[CopyView], busy_ok: bool = False) -> list[CopyView] | None:
        """Claim copies for unloading, in this same event-loop step in which they are
        checked idle, so no request can lease them. All or none: None if any is busy,
        gone, already claimed or on a draining worker. ``busy_ok`` claims copies with
        requests in flight too: no new request is routed to them, and the unload waits
        for those in flight (``_execute``)."""
        claimed = []
        for v in victims:
            copy = self.view.copies.get(v.key)
            if (
                copy is None
                or copy.state != CopyState.READY
                or copy.key in self._claimed
                or (self._inflight.get(copy.key, 0) and not busy_ok)
                or self._is_fresh(copy.key)
                or copy.worker_id in self._draining
            ):
                return None
            claimed.append(copy)
        self._claimed.update(c.key for c in claimed)
        return claimed

    async def evict(self, copy: CopyView, reason: str) -> bool:
        """Unload one copy if it is idle now. False when it is busy, gone, or the
        worker refused; the copy then stays as it was."""
        claimed = self._claim((copy,))
        if not claimed:
            return False
        try:
            return await self._unload_claimed(claimed[0], reason)
        finally:
            self._claimed.discard(copy.key)
            self._notify()

    async def _unload_claimed(self, copy: CopyView, reason: str) -> bool:
        """Unload a claimed copy. A refusal (the worker is busy with it for another
        gateway) puts it back READY and returns False."""
        worker = self.view.workers.get(copy.worker_id)
        if worker is None:
            with contextlib.suppress(ModelpoolError):
                await self.store.remove_copy(copy.key)
            return True
        client = self.clients.get(worker.worker_id, worker.address)
        try:
            await self.store.put_copy(dataclasses.replace(copy, state=CopyState.UNLOADING))
            result: protocol.UnloadResult | None = await client.unload(
                copy.model,
                copy.version,
                timeout_s=self.config.unload_timeout_s,
                keep=reason in KEEP_REASONS,
            )
        except WorkerUnavailable:
            result = None  # the worker is gone; its memory went with it
        except ModelpoolError as e:
            log.warning("unload of model=%s on %s refused: %s", copy.model, worker.worker_id, e)
            with contextlib.suppress(ModelpoolError):
                await self.store.put_copy(copy)
            return False
        if result is not None and result.retained_bytes > self.config.retained_limit_bytes:
            log.warning(
                "worker %s kept %d bytes in its allocator after unloading model=%s",
                worker.worker_id, result.retained_bytes, copy.model,
            )  # fmt: skip
            self.request_recycle(worker.worker_id, "retained_memory")
        with contextlib.suppress(ModelpoolError):
            await self.store.remove_copy(copy.key)
        self.metrics.evictions.labels(copy.model, reason).inc()
        self.policy.observe(Evicted(copy, time.time(), chosen=reason == "capacity"))
        log.info(
            "evicted model=%s version=%d worker=%s reason=%s",
            copy.model, copy.version, copy.worker_id, reason,
        )  # fmt: skip
        return True

    async def unload_model(self, model: str, deadline: Deadline) -> int:
        """Unload every copy of ``model`` once its requests finish (Triton's unload);
        returns how many went."""
        count = 0
        while True:
            mine = [c for c in self.view.all_copies() if c.model == model]
            if not mine:
                return count
            for c in mine:
                if c.state == CopyState.READY and await self.evict(c, reason="unload"):
                    count += 1
            if any(c.key in self.view.copies for c in mine):
                if deadline.expired():
                    raise deadline.error(f"model '{model}': copies still busy")
                await self._wait_change(deadline.capped(1.0))

    # -- replication -------------------------------------------------------------------
    async def replicate(
        self, model: str, version: int, worker_id: str, device_id: str, reserve_bytes: int
    ) -> bool:
        """Load one more copy of a hot model on ``worker_id``, under the model's load
        lock so it never races a cold load of the same model. False if there was no
        room or the worker went."""
        worker = self.view.workers.get(worker_id)
        if worker is None or worker_id in self._draining:
            return False
        now = time.time()
        reservation = CopyView(
            model, version, worker_id, CopyState.LOADING, reserve_bytes,
            last_used=now, loaded_at=now,
        )  # fmt: skip
        async with self.store.load_lock(model, version, timeout_s=1.0) as fence:
            if not await self.store.reserve(
                reservation, device_id, self.admit_bytes(device_id), fence=fence
            ):
                return False
            log.info("replicating hot model=%s to worker %s", model, worker_id)
            await self._load_copy(reservation)
        self.metrics.replications.labels(model).inc()
        return True

    # -- recycling ---------------------------------------------------------------------
    def request_recycle(self, worker_id: str, reason: str) -> bool:
        """Restart a worker to get its device memory back, once it is drained: its
        copies stop taking requests and loads at once, requests in flight finish,
        new ones go to other copies or wait. At most one recycle per device every
        ``recycle_interval_s``. True if a recycle was started."""
        worker = self.view.workers.get(worker_id)
        if self.recycler is None or worker is None or worker_id in self._draining:
            return False
        now = time.monotonic()
        last = self._last_recycle.get(worker.device_id)
        if last is not None and now - last < self.config.recycle_interval_s:
            log.info(
                "recycle of worker %s (%s) deferred: device %s recycled %.0fs ago",
                worker_id, reason, worker.device_id, now - last,
            )  # fmt: skip
            return False
        self._last_recycle[worker.device_id] = now
        self._draining.add(worker_id)
        self._notify()
        self._spawn(self._recycle(worker_id, reason))
        return True

    def _busy(self, worker_id: str) -> bool:
        return (
            any(k[2] == worker_id for k in self._inflight)
            or any(k[2] == worker_id for k in self._loads)
            or any(k[2] == worker_id for k in self._claimed)
        )

    async def _recycle(self, worker_id: str, reason: str) -> None:
        assert self.recycler is not None
        try:
            drain = Deadline.after(self.config.drain_timeout_s, client_set=False)
            while self._busy(worker_id):
                if drain.expired():
                    log.warning(
                        "worker %s did not drain in %.0fs; recycle called off",
                        worker_id, self.config.drain_timeout_s,
                    )  # fmt: skip
                    return
                await self._wait_change(drain.capped(1.0))
            log.warning("recycling worker %s (%s), drained", worker_id, reason)
            self.metrics.recycles.labels(reason).inc()
            await self.recycler(worker_id)
        except Exception:
            log.exception("recycle of worker %s failed", worker_id)
        finally:
            self._draining.discard(worker_id)
            self._notify()

    # -- views -------------------------------------------------------------------------
    def _request(self, model: str, version: int, waited_s: float = 0.0) -> pol.PlacementRequest:
        """A placement that has waited ``waited_s`` may evict copies that much younger
        than the minimum residency: the residency shields a new copy from newcomers,
        not from a model that has been queueing for room longer than it existed.
        Without this a large model starves while small ones take every copy that
        comes of age one at a time."""
        return pol.PlacementRequest(
            model,
            version,
            now=time.time(),
            min_residency_s=max(0.0, self.config.min_residency_s - waited_s),
            host_workers=self.host_tiers.holders(model, version),
        )

    def model_info(self, model: str, version: int, resident_bytes: int = 0) -> ModelInfo:
        """What placement knows of a model version. Sizes come from what was recorded
        (a measured load, the repository's scan), never from a disk read; a model gone
        from the repository is priced by what its copies hold."""
        measured = self.measured.get((model, version))
        try:
            spec = self.repository.get(model)
        except ModelpoolError:
            return ModelInfo(
                name=model,
                estimated_bytes=resident_bytes,
                measured_bytes=measured[0] if measured else None,
                load_seconds=measured[1] if measured else None,
            )
        estimated = resident_bytes
        if version in spec.artifacts:
            with contextlib.suppress(OSError, KeyError):
                estimated = spec.estimated_bytes(version)
        return ModelInfo(
            name=model,
            estimated_bytes=estimated,
            measured_bytes=measured[0] if measured else None,
            load_seconds=measured[1] if measured else None,
            pinned=spec.pinned,
            min_copies=spec.min_copies,
        )

    def cluster_view(self, model: str, version: int | None, admission: bool = True) -> ClusterView:
        """The view placement decides on. Copies this gateway may not route to
        (claimed, suspect, on a draining worker) show as UNLOADING: their bytes count,
        but no plan routes to or evicts them. Draining workers take no loads. With
        ``admission`` each device's total is cut to its high watermark."""
        copies = []
        for c in self.view.all_copies():
            m = self.merged(c)
            if m.state == CopyState.READY and not self._routable(c):
                m = dataclasses.replace(m, state=CopyState.UNLOADING)
            copies.append(m)
        infos = {c.model: self.model_info(c.model, c.version, c.footprint_bytes) for c in copies}
        if version is not None:
            infos[model] = self.model_info(model, version)
        high = self.config.watermarks.high if admission else 1.0
        return ClusterView(
            devices=tuple(
                DeviceView(d.device_id, int(d.total_bytes * high), d.used_other_bytes)
                for d in self.view.devices.values()
            ),
            # A draining worker's copies still hold memory: it stays in the view,
            # not accepting, so its bytes count and no load goes there.
            workers=tuple(
                WorkerView(w.worker_id, w.device_id, w.worker_id not in self._draining)
                for w in self.view.workers.values()
            ),
            copies=tuple(copies),
            models=infos,
        )

    def invariant_errors(self) -> list[str]:
        """Broken invariants, for tests: in-flight equals live leases, nothing is owned
        for copies that are gone (a lease may outlive its copy until released)."""
        errors = []
        counted = collections.Counter(self._leases.values())
        if counted != +self._inflight:
            errors.append(f"in-flight {dict(self._inflight)} != leases {dict(counted)}")
        for key in self._last_used:
            if key not in self.view.copies:
                errors.append(f"last use kept for gone copy {key}")
        for key in self._claimed:
            if key not in self.view.copies:
                errors.append(f"claim kept for gone copy {key}")
        for key in self._fresh:
            if key not in self.view.copies:
                errors.append(f"fresh mark kept for gone copy {key}")
        return errors

    # -- lifecycle ---------------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel placements, loads and recycles (each cleans up its reservation)."""
        tasks = [*self._tasks, *self._placements.values(), *self._loads.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def mark_retrieved(task: asyncio.Future[Any]) -> None:
    """Mark a task's exception seen (a done callback): its holder may have left
    without awaiting it, and asyncio would log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def _could_fit(view: ClusterView, model: str) -> bool:
    """Whether ``model`` would fit on some device with a worker once every unpinned
    copy there went (loading ones finish, then they can go too): room that waiting can
    bring, unlike another process's memory or a model bigger than the device."""
    info = view.models.get(model)
    if info is None:
        return False
    for d in view.live_devices():
        movable = sum(
            c.footprint_bytes
            for c in view.copies_on(d.device_id)
            if c.state != CopyState.FAILED
            and not (view.models.get(c.model) is not None and view.models[c.model].pinned)
        )
        if view.free_bytes(d) + movable >= info.need_bytes:
            return True
    return False
