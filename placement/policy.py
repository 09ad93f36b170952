"""Placement decisions: ``(ClusterView, PlacementRequest) -> Plan``, pure.

The gateway builds a view, asks for a plan and executes it (unload the evictions, load,
route); the simulator applies the same plans to a model of memory. Keeping the
decision free of I/O and clocks is what makes both possible.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from modelpool.placement.cluster import ClusterView, CopyState, CopyView, DeviceView


@dataclass(frozen=True)
class PlacementRequest:
    model: str
    version: int
    now: float
    #: Copies younger than this are not evicted, so a burst of cold models cannot
    #: evict each other before any of them served a request.
    min_residency_s: float = 0.0
    #: Workers holding this version in their host-RAM tier: a load there is a copy
    #: to the device, not a read from disk, so their devices come first where the
    #: choice costs nothing else (no device needs fewer or colder evictions).
    host_workers: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Route:
    """Send the request to this READY copy."""

    copy: CopyView


@dataclass(frozen=True)
class Wait:
    """A copy is loading; wait for it instead of loading another."""

    copy: CopyView


@dataclass(frozen=True)
class Load:
    """Unload ``evict`` (in order), then load the model on ``worker_id``, reserving
    ``reserve_bytes`` on ``device_id`` until the load reports its real footprint."""

    worker_id: str
    device_id: str
    reserve_bytes: int
    evict: tuple[CopyView, ...] = ()


@dataclass(frozen=True)
class Reject:
    """No placement now. ``retryable`` means waiting could help (copies busy or loading);
    otherwise the model can never fit."""

    reason: str
    retryable: bool


Plan = Route | Wait | Load | Reject


def evictable(copy: CopyView, view: ClusterView, req: PlacementRequest) -> bool:
    """A copy may go if it is READY, idle, not pinned, has served its minimum time, and
    its model keeps at least its ``min_copies`` without it."""
    info = view.models.get(copy.model)
    if not (
        copy.state == CopyState.READY
        and copy.inflight == 0
        and not (info is not None and info.pinned)
        and req.now - copy.loaded_at >= req.min_residency_s
    ):
        return False
    if info is None or info.min_copies <= 0:
        return True
    ready = sum(1 for c in view.copies if c.model == copy.model and c.state == CopyState.READY)
    return ready > info.min_copies


def choose_route(copies: list[CopyView]) -> CopyView:
    """Fewest requests in flight, then most recently used (its cache is warmest)."""
    return min(copies, key=lambda c: (c.inflight, -c.last_used))


def victims_by(
    device: DeviceView,
    need: int,
    view: ClusterView,
    req: PlacementRequest,
    rank: Callable[[CopyView], Any],
) -> tuple[CopyView, ...] | None:
    """Idle copies on ``device``, lowest ``rank`` first, whose removal makes ``need``
    bytes free; None when even evicting every idle copy is not enough."""
    free = view.free_bytes(device)
    if free >= need:
        return ()
    candidates = sorted(
        (c for c in view.copies_on(device.device_id) if evictable(c, view, req)), key=rank
    )
    victims: list[CopyView] = []
    for c in candidates:
        victims.append(c)
        free += c.footprint_bytes
        if free >= need:
            return tuple(victims)
    return None


def lru_victims(
    device: DeviceView, need: int, view: ClusterView, req: PlacementRequest
) -> tuple[CopyView, ...] | None:
    """The least recently used idle copies on ``device`` that make ``need`` bytes free."""
    return victims_by(device, need, view, req, rank=lambda c: c.last_used)


def plan_lru(view: ClusterView, req: PlacementRequest) -> Plan:
    """Classic size-aware LRU placement.

    1. A READY copy exists: route to the least busy one.
    2. One is LOADING: wait for it (one load per model, however many ask); one is
       UNLOADING: wait until it is gone.
    3. A device has room: load on the one with the most free bytes.
    4. Otherwise evict least-recently-used idle copies on the device whose victims are
       the coldest (their newest last use is the oldest), never one with requests in
       flight, pinned, loading, or younger than the minimum residency.
    5. Nothing can be freed now: a retryable reject; the model is bigger than any device
       could hold: a final one.
    """
    mine = [c for c in view.copies if c.model == req.model and c.version == req.version]
    ready = [c for c in mine if c.state == CopyState.READY]
    if ready:
        return Route(choose_route(ready))
    # A copy being unloaded shares the key a new copy on its worker would get; load
    # after it is gone, or the unload would take the new copy with it.
    busy = [c for c in mine if c.state in (CopyState.LOADING, CopyState.UNLOADING)]
    if busy:
        return Wait(busy[0])

    info = view.models.get(req.model)
    if info is None:
        return Reject(f"model '{req.model}' is not known to placement", retryable=False)
    need = info.need_bytes
    live_devices = view.live_devices()
    if not live_devices:
        return Reject("no worker is running", retryable=True)
    capacity = max(d.total_bytes - d.used_other_bytes for d in live_devices)
    if need > max(d.total_bytes for d in live_devices):
        return Reject(
            f"model '{req.model}' needs {need} bytes and does not fit on any device "
            f"(largest holds {max(d.total_bytes for d in live_devices)} bytes)",
            retryable=False,
        )

    best: tuple[tuple[float, int, int], DeviceView, tuple[CopyView, ...]] | None = None
    for d in live_devices:
        victims = lru_victims(d, need, view, req)
        if victims is None:
            continue
        # No evictions beats any eviction; among evictions, the coldest set wins; then
        # a device whose worker holds the model in host RAM, then the emptier one.
        newest = max((v.last_used for v in victims), default=float("-inf"))
        score = (newest, -_holds_in_host(view, d.device_id, req), -view.free_bytes(d))
        if best is None or score < best[0]:
            best = (score, d, victims)
    if best is None:
        if need > capacity:
            return Reject(
                f"model '{req.model}' needs {need} bytes; other processes leave at most "
                f"{capacity} bytes on any device",
                retryable=True,
            )
        return Reject(
            f"model '{req.model}' needs {need} bytes and every device is busy with "
            "requests in flight or loads",
            retryable=True,
        )
    _, device, victims = best
    worker = _least_loaded_worker(view, device.device_id, req.host_workers)
    return Load(worker_id=worker, device_id=device.device_id, reserve_bytes=need, evict=victims)


def _holds_in_host(view: ClusterView, device_id: str, req: PlacementRequest) -> int:
    """1 when an accepting worker of the device holds the model in its host tier."""
    return int(
        any(
            w.worker_id in req.host_workers and w.accepting
            for w in view.workers
            if w.device_id == device_id
        )
    )


def _least_loaded_worker(
    view: ClusterView, device_id: str, host_workers: frozenset[str] = frozenset()
) -> str:
    """The device's worker that holds the model in host RAM, else the one with the
    fewest copies."""
    counts = {w.worker_id: 0 for w in view.workers if w.device_id == device_id and w.accepting}
    holding = sorted(w for w in counts if w in host_workers)
    if holding:
        return holding[0]
    for c in view.copies:
        if c.worker_id in counts:
            counts[c.worker_id] += 1
    return min(counts, key=lambda w: (counts[w], w))
