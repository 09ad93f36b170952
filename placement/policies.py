"""Named placement policies with their state, driven the same way in production and in
the simulator.

A caller (the gateway, ``placement.simulate``) does, for every request::

    policy.observe(Requested(model, version, now))
    plan = policy.plan(view, PlacementRequest(model, version, now))
    # executing a Load:
    for victim in plan.evict:
        ...unload...;  policy.observe(Evicted(victim, now))
    ...load...;        policy.observe(Loaded(copy, now))

The decision itself stays a pure function of the view (``plan_lru``, ``plan_gdsf``); a
policy object only remembers what the view cannot carry (decayed request counts, the
GDSF aging clock) and writes it into the view before deciding. Times are seconds on the
caller's clock, sizes bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Protocol

from modelpool.placement.cluster import ClusterView, CopyView, ModelInfo
from modelpool.placement.decay import Decayed
from modelpool.placement.gdsf import gdsf_value, plan_gdsf
from modelpool.placement.policy import Load, PlacementRequest, Plan, plan_lru


class PolicyName(StrEnum):
    LRU = "lru"
    GDSF = "gdsf"


@dataclass(frozen=True)
class Requested:
    """A request for ``model`` arrived (before planning it, hit or miss)."""

    model: str
    version: int
    now: float


@dataclass(frozen=True)
class Loaded:
    """``copy`` is now resident (its load finished)."""

    copy: CopyView
    now: float


@dataclass(frozen=True)
class Evicted:
    """``copy`` was unloaded. ``chosen`` is False for unloads the policy did not ask for
    (an operator's unload, a failed copy): those do not advance the GDSF clock, which
    would otherwise jump to the value of a copy that was still hot."""

    copy: CopyView
    now: float
    chosen: bool = True


Event = Requested | Loaded | Evicted


class PolicyState(Protocol):
    """A placement policy with whatever memory it needs between decisions."""

    @property
    def name(self) -> str: ...

    def plan(self, view: ClusterView, req: PlacementRequest) -> Plan:
        """Decide for one request. Pure apart from reading the policy's own state."""
        ...

    def observe(self, event: Event) -> None:
        """Record what happened, in the order it happened."""
        ...

    def eviction_rank(self, view: ClusterView, now: float) -> Callable[[CopyView], Any]:
        """The order this policy evicts in, lowest first: what memory pressure uses
        too, so ``--policy`` decides every eviction, not only those of a cold load."""
        ...


class LruPolicy:
    """``plan_lru`` as it is: its only state, each copy's last use, is in the view."""

    name: str = PolicyName.LRU

    def plan(self, view: ClusterView, req: PlacementRequest) -> Plan:
        return plan_lru(view, req)

    def observe(self, event: Event) -> None:
        return None

    def eviction_rank(self, view: ClusterView, now: float) -> Callable[[CopyView], Any]:
        return lambda c: c.last_used


@dataclass
class GdsfPolicy:
    """Greedy-Dual-Size-Frequency with exponentially decayed frequencies.

    Every term of a value (request counts, the clock ``L``, each model's floor) decays
    at the same rate, so decay never reorders copies by itself: only requests and
    evictions do, and the clock keeps its weight against fresh frequencies.

    Args:
        half_life_s: seconds after which a model's request count has halved; ``inf``
            counts every request forever (classic GDSF).
        aging: advance the clock ``L`` to each chosen victim's value, so a copy that
            stops being asked for is overtaken by newcomers. Decay already ages; the
            sweep in docs/placement.md shows the clock costing hit rate on top of it.
        miss_penalty_s: seconds a miss costs besides its load (see ``gdsf_value``).
    """

    # Tuned on seed-1 traces; docs/placement.md has the sweep and held-out results.
    half_life_s: float = 30.0
    aging: bool = False
    miss_penalty_s: float = 3.0
    name: str = field(default=PolicyName.GDSF, init=False)
    _clock: Decayed = field(default_factory=Decayed, init=False)
    _counts: dict[str, Decayed] = field(default_factory=dict, init=False)
    #: The clock at each model's last request or load: its value's floor.
    _base: dict[str, Decayed] = field(default_factory=dict, init=False)
    #: The last ModelInfo seen per model, to price a victim when it is evicted.
    _infos: dict[str, ModelInfo] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if not self.half_life_s > 0 or not self.miss_penalty_s >= 0:
            raise ValueError(
                f"gdsf needs half_life_s > 0 and miss_penalty_s >= 0 "
                f"(got {self.half_life_s}, {self.miss_penalty_s})"
            )

    def clock(self, now: float) -> float:
        """The aging clock ``L`` at ``now`` (seconds x requests per byte)."""
        return self._clock.at_time(now, self.half_life_s)

    def frequency(self, model: str, now: float) -> float:
        """Requests for ``model``, decayed to ``now``."""
        return self._decayed(self._counts, model, now)

    def plan(self, view: ClusterView, req: PlacementRequest) -> Plan:
        plan = plan_lru(view, req)
        if isinstance(plan, Load) and plan.evict:
            return plan_gdsf(self.feed(view, req.now), req, self.miss_penalty_s)
        # plan_gdsf differs from plan_lru only in its victims, so the state is written
        # into the view only when there are some: hits stay cheap.
        return plan

    def eviction_rank(self, view: ClusterView, now: float) -> Callable[[CopyView], Any]:
        fed = self.feed(view, now)
        # last_used breaks ties, as in plan_gdsf's victims.
        return lambda c: (
            gdsf_value(c, fed.models.get(c.model), self.miss_penalty_s),
            c.last_used,
        )

    def feed(self, view: ClusterView, now: float) -> ClusterView:
        """``view`` with this policy's frequencies and clock floors, at ``now``, written
        into the ModelInfo of every model with a copy (the only ones ever priced)."""
        models = dict(view.models)
        for name in {c.model for c in view.copies}:
            info = view.models.get(name)
            if info is not None:
                self._infos[name] = info
                models[name] = self._priced(info, now)
        return replace(view, models=models)

    def observe(self, event: Event) -> None:
        match event:
            case Requested(model, _, now):
                self._counts[model] = Decayed(self.frequency(model, now) + 1.0, now)
                self._base[model] = Decayed(self.clock(now), now)
            case Loaded(copy, now):
                # Victims evicted for this load raised the clock since its request; a
                # newcomer starts level with them, as in Cao and Irani's GreedyDual.
                self._base[copy.model] = Decayed(self.clock(now), now)
            case Evicted(copy, now, chosen):
                info = self._infos.get(copy.model)
                if chosen and self.aging and info is not None:
                    victim = gdsf_value(copy, self._priced(info, now), self.miss_penalty_s)
                    # The clock never runs back, or newcomers would start below copies
                    # they already beat.
                    self._clock = Decayed(max(self.clock(now), victim), now)

    def _priced(self, info: ModelInfo, now: float) -> ModelInfo:
        return replace(
            info,
            frequency=self.frequency(info.name, now),
            priority_base=self._decayed(self._base, info.name, now),
        )

    def _decayed(self, table: dict[str, Decayed], model: str, now: float) -> float:
        entry = table.get(model)
        return entry.at_time(now, self.half_life_s) if entry is not None else 0.0


#: Factories by name; keyword arguments tune them (``GdsfPolicy``'s fields).
POLICIES: Mapping[str, Callable[..., PolicyState]] = {
    PolicyName.LRU: LruPolicy,
    PolicyName.GDSF: GdsfPolicy,
}


def make_policy(name: str, **params: float | bool) -> PolicyState:
    """A fresh policy by name (``lru``, ``gdsf``), with optional tuning parameters
    (``make_policy("gdsf", half_life_s=120)``).

    Raises:
        ValueError: unknown name or parameter. ``opt`` is refused here: it needs the
            future and lives in ``placement.simulate``.
    """
    factory = POLICIES.get(name)
    if factory is None:
        hint = " ('opt' needs the future: only placement.simulate has it)" if name == "opt" else ""
        raise ValueError(
            f"unknown placement policy {name!r}{hint}; known: {', '.join(sorted(POLICIES))}"
        )
    try:
        return factory(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {params} for policy {name!r}: {exc}") from None
