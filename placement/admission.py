"""Admission: whether a cold model is worth the copies its load would evict. Pure.

A plan that evicts trades misses: the newcomer's requests stop missing, the victims'
start to. Per second, each side costs ``demand x (reload seconds + miss penalty)``.
When the victims' side is dearer (several hot small copies for one rarely asked-for
large one: LRU's thrash), the load is *deferred* rather than refused: the caller holds
the placement for up to a window while the model's requests gather behind it, plans
again whenever memory changes (a cheaper victim may appear, or free room), and loads at
the window's end whatever the balance. A deferred model thus costs one load per window
for all the requests that gathered, instead of one load per request; the window bounds
what a request waits for it.

``Demand`` keeps the per-model request rates admission prices with: exponentially
decayed counts, so a model that stops being asked for loses its claim on memory
within a few half-lives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from modelpool.placement.cluster import ClusterView, ModelInfo
from modelpool.placement.decay import Decayed
from modelpool.placement.gdsf import reload_cost
from modelpool.placement.policy import Load

#: Seconds for a model's request count to halve: long enough to span the gaps between
#: a tail model's requests, short enough to follow a shift of traffic within a minute.
DEFAULT_HALF_LIFE_S = 10.0
#: Seconds a miss costs besides its load (the request that queues, a fixed warm-up).
#: Without it, models whose load time is proportional to size would be priced by
#: demand per byte alone.
DEFAULT_MISS_PENALTY_S = 0.05


class Demand:
    """Decayed request counts per model: ``rate(m, now)`` is roughly requests in the
    last ``half_life_s / ln 2`` seconds. Times are the caller's clock, in seconds."""

    def __init__(self, half_life_s: float = DEFAULT_HALF_LIFE_S) -> None:
        if not half_life_s > 0:
            raise ValueError(f"half_life_s must be positive, got {half_life_s}")
        self.half_life_s = half_life_s
        self._counts: dict[str, Decayed] = {}

    def observe(self, model: str, now: float) -> None:
        self._counts[model] = Decayed(self.count(model, now) + 1.0, now)

    def count(self, model: str, now: float) -> float:
        entry = self._counts.get(model)
        return entry.at_time(now, self.half_life_s) if entry is not None else 0.0

    def snapshot(self, now: float) -> dict[str, float]:
        return {m: self.count(m, now) for m in self._counts}


@dataclass(frozen=True)
class Verdict:
    admit: bool
    #: Miss seconds per unit of demand: what loading saves and what the evictions cost.
    gain: float
    loss: float

    def describe(self, model: str) -> str:
        return (
            f"model '{model}' would save {self.gain:.3g} miss-seconds of demand and cost "
            f"its victims {self.loss:.3g}"
        )


def miss_cost(info: ModelInfo | None, size_bytes: int, miss_penalty_s: float) -> float:
    return reload_cost(info, size_bytes) + miss_penalty_s


def judge(
    plan: Load,
    view: ClusterView,
    model: str,
    demand: Mapping[str, float],
    miss_penalty_s: float = DEFAULT_MISS_PENALTY_S,
) -> Verdict:
    """Whether ``plan`` (a load of ``model``) is worth its evictions now.

    A load into free room always is. Otherwise the newcomer's demand times its miss
    cost must at least match the victims' summed: one hot copy is not thrown out for a
    colder one, nor several for one that is not asked for as much as they are together.
    """
    if not plan.evict:
        return Verdict(True, 0.0, 0.0)
    info = view.models.get(model)
    gain = demand.get(model, 0.0) * miss_cost(info, plan.reserve_bytes, miss_penalty_s)
    loss = sum(
        demand.get(v.model, 0.0)
        * miss_cost(view.models.get(v.model), v.footprint_bytes, miss_penalty_s)
        for v in plan.evict
    )
    return Verdict(gain >= loss or math.isclose(gain, loss), gain, loss)
