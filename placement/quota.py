"""Device-memory quotas of tenants, pure: which of a tenant's own copies must go for
one more of its models to fit in its quota.

A tenant's quota covers its private models (those only it may see), on every device
together; models several tenants see count against none and are governed by the pool.
Copies counted: READY, LOADING (the reservation) and UNLOADING (still held).
"""

from __future__ import annotations

from collections.abc import Callable

from modelpool.placement.cluster import ClusterView, CopyView
from modelpool.placement.policy import PlacementRequest, evictable


def quota_used(view: ClusterView, owns: Callable[[str], bool]) -> int:
    """Bytes the tenant's private copies hold or have reserved."""
    return sum(c.footprint_bytes for c in view.copies if owns(c.model))


def quota_victims(
    view: ClusterView,
    owns: Callable[[str], bool],
    need: int,
    limit: int,
    req: PlacementRequest,
    rank: Callable[[CopyView], object],
) -> tuple[CopyView, ...] | None:
    """The tenant's own idle copies, lowest ``rank`` first, whose eviction lets ``need``
    more bytes fit under ``limit``; () when it fits already; None when even evicting
    every idle one would not do (its copies are busy, or the model is bigger than
    the quota)."""
    used = quota_used(view, owns)
    if used + need <= limit:
        return ()
    if need > limit:
        return None
    mine = sorted(
        (c for c in view.copies if owns(c.model) and evictable(c, view, req)),
        key=rank,  # type: ignore[arg-type]
    )
    victims: list[CopyView] = []
    for c in mine:
        victims.append(c)
        used -= c.footprint_bytes
        if used + need <= limit:
            return tuple(victims)
    return None
