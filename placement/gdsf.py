"""Greedy-Dual-Size-Frequency placement, pure: ``(ClusterView, PlacementRequest) -> Plan``.

A copy's value is ``L + (reload_cost + miss_penalty_s) * frequency / size``: seconds a
miss of it costs (``ModelInfo.load_seconds`` plus a fixed penalty) times its recent
demand (``ModelInfo.frequency``, requests, decayed) per byte it holds
(``CopyView.footprint_bytes``). Evicting the lowest value first keeps the copies that
save the most miss time per byte. ``L``
(``ModelInfo.priority_base``) is the aging clock as it stood at the model's last
request: the value of the last victim, so a model that was hot once but is no longer
asked for is overtaken by newer ones instead of squatting forever.

Frequencies and the clock are state; this module only reads them from the view.
``placement.policies.GdsfPolicy`` keeps them and feeds them in, the way Ray Serve wraps
its pure autoscaling decision in a stateful class.

``plan_by_value`` is the decision with the ranking left open: GDSF, the simulator's
Belady and (with ``value=last_used``) LRU are all "evict the lowest value first".
"""

from __future__ import annotations

from collections.abc import Callable

from modelpool.placement.cluster import ClusterView, CopyView, DeviceView, ModelInfo
from modelpool.placement.policy import (
    Load,
    PlacementRequest,
    Plan,
    _holds_in_host,
    _least_loaded_worker,
    plan_lru,
    victims_by,
)

#: Bytes per second assumed when a model was never loaded, to guess its reload cost
#: from its size. Only the ratio between models matters, so one figure serves all.
GUESS_LOAD_BYTES_PER_S = 1e9

#: Lower value = evicted first. Must be pure: called many times per decision.
ValueFn = Callable[[CopyView], float]


def reload_cost(info: ModelInfo | None, size_bytes: int) -> float:
    """Seconds to load the model again: measured if known, else guessed from its size."""
    if info is not None and info.load_seconds is not None:
        return info.load_seconds
    return size_bytes / GUESS_LOAD_BYTES_PER_S


def gdsf_value(copy: CopyView, info: ModelInfo | None, miss_penalty_s: float = 0.0) -> float:
    """``L + (reload_cost + miss_penalty_s) * frequency / size``, in seconds x requests
    per byte.

    ``miss_penalty_s`` is what a miss costs besides the load itself (the request that
    queues behind it, a runtime's fixed warm-up). When load time is proportional to size
    it is the only term that lets GDSF prefer small models, which is what hit rate
    rewards. A model placement knows nothing of is worth nothing.
    """
    if info is None:
        return 0.0
    size = max(copy.footprint_bytes, 1)
    cost = reload_cost(info, size) + miss_penalty_s
    return info.priority_base + cost * info.frequency / size


def plan_gdsf(view: ClusterView, req: PlacementRequest, miss_penalty_s: float = 0.0) -> Plan:
    """GDSF placement: as ``plan_lru``, but victims are the lowest-value idle copies."""
    return plan_by_value(
        view, req, lambda c: gdsf_value(c, view.models.get(c.model), miss_penalty_s)
    )


def value_victims(
    device: DeviceView, need: int, view: ClusterView, req: PlacementRequest, value: ValueFn
) -> tuple[CopyView, ...] | None:
    """The lowest-valued idle copies on ``device`` whose removal frees ``need`` bytes,
    cheapest first; None when evicting every idle copy would not be enough."""
    # last_used breaks ties so that copies nobody tracks (value 0) go in LRU order.
    return victims_by(device, need, view, req, rank=lambda c: (value(c), c.last_used))


def plan_by_value(view: ClusterView, req: PlacementRequest, value: ValueFn) -> Plan:
    """``plan_lru``'s decision with the victims ranked by ``value``, lowest first.

    Routing, waiting, rejecting and loading into free room do not depend on the ranking,
    and whether a device can be freed depends only on how many idle bytes it has, so
    ``plan_lru`` answers all of those and the rules stay one. Only when it would evict
    are the victims chosen again: on each device the lowest-valued idle copies until
    the model fits, on the device whose dearest victim is cheapest (then whose newest
    victim is coldest, then the emptier one).
    """
    plan = plan_lru(view, req)
    if not isinstance(plan, Load) or not plan.evict:
        return plan
    best: tuple[tuple[float, float, int, int], DeviceView, tuple[CopyView, ...]] | None = None
    for d in view.live_devices():
        victims = value_victims(d, plan.reserve_bytes, view, req, value)
        if victims is None:
            continue
        # plan_lru evicts only when no device has room, so every victim set is non-empty.
        dearest = max(value(v) for v in victims)
        newest = max(v.last_used for v in victims)
        score = (dearest, newest, -_holds_in_host(view, d.device_id, req), -view.free_bytes(d))
        if best is None or score < best[0]:
            best = (score, d, victims)
    if best is None:  # plan_lru found a device to free; the same bytes are idle here
        raise AssertionError("plan_lru evicts where no ranking could")
    _, device, victims = best
    worker = _least_loaded_worker(view, device.device_id, req.host_workers)
    return Load(
        worker_id=worker,
        device_id=device.device_id,
        reserve_bytes=plan.reserve_bytes,
        evict=victims,
    )
