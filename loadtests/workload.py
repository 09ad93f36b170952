"""Who asks for which model, and when: pure functions of (models, options, seed).

No clock, no I/O: the same seed gives the same arrivals, so a run can be replayed and
the generator is unit-tested without a server.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

# Bursty traffic alternates a burst at BURST_FACTOR x the mean rate for BURST_FRACTION of
# each BURST_PERIOD_S with a lull slow enough that the long-run mean stays the asked rate.
BURST_PERIOD_S = 5.0
BURST_FRACTION = 0.2
BURST_FACTOR = 4.0


@dataclass(frozen=True)
class Arrival:
    t: float  # seconds after the start of the run
    model: str
    tenant: int


@dataclass(frozen=True)
class Tenant:
    index: int
    exponent: float
    #: Models by this tenant's popularity, most requested first.
    order: tuple[str, ...]
    cumulative: tuple[float, ...]


@dataclass(frozen=True)
class Workload:
    tenants: tuple[Tenant, ...]
    #: Each model's share of all requests (tenants send equal shares).
    share: dict[str, float]
    #: 1 for the most requested model overall, by ``share``.
    rank: dict[str, int]


def zipf_weights(n: int, exponent: float) -> tuple[float, ...]:
    """Normalised 1/k^a for ranks k = 1..n."""
    raw = [1.0 / (k**exponent) for k in range(1, n + 1)]
    total = sum(raw)
    return tuple(w / total for w in raw)


def tenant_exponents(zipf: float, tenants: int) -> tuple[float, ...]:
    """Spread 0.5a..1.5a so tenants range from flat to very skewed; one tenant gets a."""
    if tenants == 1:
        return (zipf,)
    return tuple(zipf * (0.5 + i / (tenants - 1)) for i in range(tenants))


def plan_workload(
    models: list[str] | tuple[str, ...], zipf: float, tenants: int, seed: int
) -> Workload:
    if not models:
        raise ValueError("workload: no models to send to")
    # Sorting first makes the result independent of the order the server listed them in.
    base = sorted(models)
    global_order = base[:]
    random.Random(f"{seed}:order").shuffle(global_order)
    built = []
    for i, exponent in enumerate(tenant_exponents(zipf, tenants)):
        order = global_order[:]
        if i > 0:
            # Other tenants have hot sets of their own, not the first tenant's.
            random.Random(f"{seed}:tenant:{i}").shuffle(order)
        weights = zipf_weights(len(order), exponent)
        built.append(Tenant(i, exponent, tuple(order), tuple(itertools.accumulate(weights))))
    share = dict.fromkeys(base, 0.0)
    for t in built:
        previous = 0.0
        for model, c in zip(t.order, t.cumulative, strict=True):
            share[model] += (c - previous) / len(built)
            previous = c
    # Ties (uniform popularity) break by the first tenant's order, which is seeded.
    position = {m: i for i, m in enumerate(global_order)}
    ranked = sorted(base, key=lambda m: (-round(share[m], 12), position[m]))
    return Workload(tuple(built), share, {m: r for r, m in enumerate(ranked, start=1)})


def _segments(
    rate: float, duration: float, arrival: str, rng: random.Random
) -> Iterator[tuple[float, float, float]]:
    """(start, end, rate) pieces covering [0, duration)."""
    if arrival == "poisson":
        yield 0.0, duration, rate
        return
    if arrival != "bursty":
        raise ValueError(f"unknown arrival process {arrival!r}")
    burst_len = BURST_PERIOD_S * BURST_FRACTION
    lull_rate = rate * (1 - BURST_FRACTION * BURST_FACTOR) / (1 - BURST_FRACTION)
    cycle = 0.0
    while cycle < duration:
        # Bursts start at a random point of each period, so they do not beat with
        # anything periodic on the server (the device-memory poller, say).
        on = cycle + rng.uniform(0.0, BURST_PERIOD_S - burst_len)
        pieces = (
            (cycle, on, lull_rate),
            (on, on + burst_len, rate * BURST_FACTOR),
            (on + burst_len, cycle + BURST_PERIOD_S, lull_rate),
        )
        for start, end, r in pieces:
            if start < duration and end > start:
                yield start, min(end, duration), r
        cycle += BURST_PERIOD_S


def arrival_times(rate: float, duration: float, arrival: str, seed: int) -> Iterator[float]:
    """Times in [0, duration), increasing. Exponential gaps within each constant-rate
    piece; restarting the clock at a piece's start is exact because gaps are memoryless."""
    rng = random.Random(f"{seed}:times")
    for start, end, r in _segments(rate, duration, arrival, rng):
        if r <= 0:
            continue
        t = start + rng.expovariate(r)
        while t < end:
            yield t
            t += rng.expovariate(r)


def arrivals(
    workload: Workload, rate: float, duration: float, arrival: str, seed: int
) -> Iterator[Arrival]:
    """The whole run's requests in time order; each picks a tenant uniformly, then a
    model by that tenant's Zipf weights."""
    rng = random.Random(f"{seed}:choices")
    tenants = workload.tenants
    for t in arrival_times(rate, duration, arrival, seed):
        tenant = tenants[rng.randrange(len(tenants))]
        # min(): the last cumulative weight may round to just under 1.0.
        k = min(bisect.bisect_right(tenant.cumulative, rng.random()), len(tenant.order) - 1)
        yield Arrival(t, tenant.order[k], tenant.index)


# -- keyed tenants: one stream each ---------------------------------------------------


def stream_seed(seed: int, name: str) -> int:
    """A keyed tenant's own seed, from its name: adding or dropping another tenant
    leaves this one's arrivals exactly as they were (a noisy neighbour's run replays
    the quiet tenant's requests of the run without it)."""
    return zlib.crc32(f"{seed}:tenant:{name}".encode())


def tenant_arrivals(
    workload: Workload, rate: float, duration: float, arrival: str, seed: int, index: int
) -> Iterator[Arrival]:
    """One keyed tenant's stream, its arrivals labelled with the tenant's ``index``."""
    for a in arrivals(workload, rate, duration, arrival, seed):
        yield Arrival(a.t, a.model, index)


def merge_streams(streams: Iterable[Iterator[Arrival]]) -> Iterator[Arrival]:
    """Independent streams as one, in time order (ties: the earlier stream first)."""
    return heapq.merge(*streams, key=lambda a: a.t)


def combined_rank(workloads: Sequence[Workload], rates: Sequence[float]) -> dict[str, int]:
    """1 for the most requested model over streams sending at ``rates``; ties by name."""
    share: dict[str, float] = {}
    for w, rate in zip(workloads, rates, strict=True):
        for model, s in w.share.items():
            share[model] = share.get(model, 0.0) + s * rate
    ranked = sorted(share, key=lambda m: (-round(share[m], 9), m))
    return {m: r for r, m in enumerate(ranked, start=1)}
