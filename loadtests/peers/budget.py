"""A byte budget as Ray Serve's knob: models per replica.

modelpool is given bytes (``--device-memory-budget``) and evicts by bytes. Ray Serve's
``@serve.multiplexed`` caps a *count* of models per replica and evicts LRU by count.
The mapping: the budget holds ``K = floor(budget / mean model size)`` models on average
(model size = the TorchScript file's bytes, which is what a loaded CPU copy holds:
weights dominate these models), split evenly over the replicas, at least one each.

So both may hold about the same bytes on average; neither holds the same *set*:
modelpool fits more small models when the big ones are evicted, Ray always holds K
whatever their sizes (its peak can exceed the budget when the K largest are resident).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BudgetMapping:
    budget_bytes: int
    models: int
    mean_model_bytes: float
    #: K: models the budget holds on average, capped at the repository's size.
    models_in_budget: int
    replicas: int
    max_models_per_replica: int

    @property
    def models_held(self) -> int:
        """What the peer may hold in all: per replica times replicas."""
        return self.max_models_per_replica * self.replicas

    @property
    def evicts(self) -> bool:
        return self.models_held < self.models


def map_budget(budget_bytes: int, model_bytes: list[int], replicas: int) -> BudgetMapping:
    if budget_bytes <= 0:
        raise ValueError("budget must be positive")
    if not model_bytes:
        raise ValueError("no models to size the budget by")
    if replicas < 1:
        raise ValueError("replicas must be at least 1")
    mean = sum(model_bytes) / len(model_bytes)
    k = min(len(model_bytes), math.floor(budget_bytes / mean))
    # At least one per replica: a replica that can hold nothing cannot answer at all.
    per_replica = max(1, k // replicas)
    return BudgetMapping(
        budget_bytes=budget_bytes,
        models=len(model_bytes),
        mean_model_bytes=mean,
        models_in_budget=k,
        replicas=replicas,
        max_models_per_replica=per_replica,
    )
