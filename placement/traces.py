"""Request traces for the placement simulator: the CSV format and synthetic generators.

A trace is a CSV file with the header ``t,model,bytes,load_s``: request time in seconds
from the start (non-decreasing), model name, the model's footprint in bytes and the
seconds a load of it takes.

Generators (all seeded, so a command reproduces a file byte for byte)::

    python -m placement.traces --kind zipf|shifting|tenants --models N --requests R \\
        --seed S --out FILE.csv

* ``zipf``: a fixed Zipf popularity over the models.
* ``shifting``: Zipf, but the hot set rotates: every phase the hottest models turn cold
  and warm ones take their place.
* ``tenants``: several tenants, each with its own models and Zipf popularity, idling at
  a low rate and now and then bursting at many times it.

Model sizes are lognormal between 50 MB and 2 GB (median 300 MB, the spread of the
BERT-to-7B-quantised models a pool like this serves); load time is proportional to size
(500 MB/s) with lognormal noise, because disk, deserialisation and transfer all scale
with bytes.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import math
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

HEADER = ("t", "model", "bytes", "load_s")

MIN_MODEL_BYTES = 50 * 1000**2
MAX_MODEL_BYTES = 2 * 1000**3
MEDIAN_MODEL_BYTES = 300 * 1000**2
SIZE_SIGMA = 0.9
LOAD_BYTES_PER_S = 500 * 1000**2
LOAD_NOISE_SIGMA = 0.25


class TraceKind(StrEnum):
    ZIPF = "zipf"
    SHIFTING = "shifting"
    TENANTS = "tenants"


@dataclass(frozen=True)
class TraceRow:
    """One request: at ``t`` seconds, for ``model`` of ``size_bytes`` that loads in
    ``load_s`` seconds."""

    t: float
    model: str
    size_bytes: int
    load_s: float


@dataclass(frozen=True)
class ModelSpec:
    name: str
    size_bytes: int
    load_s: float


def parse_trace(lines: Iterable[str]) -> list[TraceRow]:
    """Rows of a trace CSV.

    Raises:
        ValueError: wrong header, a malformed row, or time running backwards; the
            message names the line.
    """
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != HEADER:
        raise ValueError(f"trace header must be {','.join(HEADER)!r}, got {header!r}")
    rows: list[TraceRow] = []
    last_t = -math.inf
    for lineno, fields in enumerate(reader, start=2):
        if not fields:
            continue
        if len(fields) != len(HEADER):
            raise ValueError(f"trace line {lineno}: expected 4 fields, got {len(fields)}")
        try:
            row = TraceRow(
                t=float(fields[0]),
                model=fields[1].strip(),
                size_bytes=int(fields[2]),
                load_s=float(fields[3]),
            )
        except ValueError as exc:
            raise ValueError(f"trace line {lineno}: {exc}") from None
        if not row.model:
            raise ValueError(f"trace line {lineno}: empty model name")
        if row.size_bytes <= 0 or not row.load_s >= 0 or not math.isfinite(row.t):
            raise ValueError(f"trace line {lineno}: bytes must be > 0, load_s >= 0 and t finite")
        if row.t < last_t:
            raise ValueError(f"trace line {lineno}: t={row.t} is before the previous row")
        last_t = row.t
        rows.append(row)
    return rows


def format_trace(rows: Iterable[TraceRow]) -> Iterator[str]:
    """CSV lines (with newlines) of a trace, header first."""
    yield ",".join(HEADER) + "\n"
    for r in rows:
        yield f"{r.t:.6f},{r.model},{r.size_bytes},{r.load_s:.3f}\n"


def model_catalogue(rng: random.Random, n: int, prefix: str = "m") -> list[ModelSpec]:
    """``n`` models with lognormal sizes (clipped to 50 MB-2 GB) and noisy load times."""
    width = len(str(n - 1))
    out = []
    for i in range(n):
        size = rng.lognormvariate(math.log(MEDIAN_MODEL_BYTES), SIZE_SIGMA)
        size_bytes = int(min(max(size, MIN_MODEL_BYTES), MAX_MODEL_BYTES))
        load_s = size_bytes / LOAD_BYTES_PER_S * rng.lognormvariate(0.0, LOAD_NOISE_SIGMA)
        out.append(ModelSpec(f"{prefix}{i:0{width}d}", size_bytes, round(load_s, 3)))
    return out


def zipf_weights(n: int, alpha: float) -> list[float]:
    """Cumulative weights of ranks 0..n-1 with P(rank r) proportional to 1/(r+1)^alpha."""
    return list(itertools.accumulate(1.0 / (r + 1) ** alpha for r in range(n)))


def _times(rng: random.Random, n: int, rate: float) -> list[float]:
    """Poisson arrivals at ``rate`` requests per second."""
    return list(itertools.accumulate(rng.expovariate(rate) for _ in range(n)))


def _rows(times: Sequence[float], picks: Sequence[ModelSpec]) -> list[TraceRow]:
    return [TraceRow(t, m.name, m.size_bytes, m.load_s) for t, m in zip(times, picks, strict=True)]


def zipf_trace(
    models: int, requests: int, seed: int, alpha: float = 1.0, rate: float = 10.0
) -> list[TraceRow]:
    """Fixed Zipf(``alpha``) popularity; which model is hot is independent of its size."""
    rng = random.Random(seed)
    catalogue = model_catalogue(rng, models)
    rng.shuffle(catalogue)
    picks = rng.choices(catalogue, cum_weights=zipf_weights(models, alpha), k=requests)
    return _rows(_times(rng, requests, rate), picks)


def shifting_trace(
    models: int,
    requests: int,
    seed: int,
    alpha: float = 1.0,
    rate: float = 10.0,
    phases: int = 8,
) -> list[TraceRow]:
    """Zipf popularity whose ranking rotates ``phases`` times: at each phase the hottest
    ``models // phases`` models drop to the coldest ranks and the rest move up."""
    rng = random.Random(seed)
    catalogue = model_catalogue(rng, models)
    rng.shuffle(catalogue)
    cum = zipf_weights(models, alpha)
    shift = max(1, models // phases)
    per_phase = math.ceil(requests / phases)
    picks: list[ModelSpec] = []
    for phase in range(phases):
        k = min(per_phase, requests - len(picks))
        ranks = rng.choices(range(models), cum_weights=cum, k=k)
        picks.extend(catalogue[(r + phase * shift) % models] for r in ranks)
    return _rows(_times(rng, requests, rate), picks)


def tenants_trace(
    models: int,
    requests: int,
    seed: int,
    tenants: int = 6,
    alpha: float = 1.0,
    rate: float = 10.0,
    burst_factor: float = 20.0,
    block: int = 100,
) -> list[TraceRow]:
    """Tenants with their own models and Zipf popularity, mostly idle, sometimes bursting.

    Every ``block`` requests each idle tenant starts a burst with probability 2% and each
    bursting one ends it with probability 10% (bursts last ~10 blocks); a bursting
    tenant sends ``burst_factor`` times its idle share and raises the arrival rate.
    """
    rng = random.Random(seed)
    tenants = max(1, min(tenants, models))
    catalogues: list[list[ModelSpec]] = []
    for k in range(tenants):
        n = models // tenants + (1 if k < models % tenants else 0)
        catalogues.append(model_catalogue(rng, n, prefix=f"t{k}-m"))
    cums = [zipf_weights(len(c), alpha) for c in catalogues]
    # Tenants differ in size too: the first is ten times as busy as the last.
    idle = [1.0 / (1 + 9 * k / max(1, tenants - 1)) for k in range(tenants)]
    bursting = [False] * tenants
    picks: list[ModelSpec] = []
    times: list[float] = []
    t = 0.0
    while len(picks) < requests:
        for k in range(tenants):
            flip = 0.10 if bursting[k] else 0.02
            if rng.random() < flip:
                bursting[k] = not bursting[k]
        weights = [w * (burst_factor if b else 1.0) for w, b in zip(idle, bursting, strict=True)]
        block_rate = rate * sum(weights) / sum(idle)
        cum_tenants = list(itertools.accumulate(weights))
        for _ in range(min(block, requests - len(picks))):
            k = bisect.bisect_right(cum_tenants, rng.random() * cum_tenants[-1])
            k = min(k, tenants - 1)
            picks.append(rng.choices(catalogues[k], cum_weights=cums[k])[0])
            t += rng.expovariate(block_rate)
            times.append(t)
    return _rows(times, picks)


#: Each takes (models, requests, seed) and returns the rows in time order.
GENERATORS: dict[TraceKind, Callable[[int, int, int], list[TraceRow]]] = {
    TraceKind.ZIPF: zipf_trace,
    TraceKind.SHIFTING: shifting_trace,
    TraceKind.TENANTS: tenants_trace,
}


def generate(kind: str, models: int, requests: int, seed: int) -> list[TraceRow]:
    """A trace of ``kind`` with default shape parameters."""
    if models < 1 or requests < 0:
        raise ValueError("need at least one model and a non-negative request count")
    return GENERATORS[TraceKind(kind)](models, requests, seed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m placement.traces", description="Write a synthetic request trace."
    )
    parser.add_argument("--kind", required=True, choices=[k.value for k in TraceKind])
    parser.add_argument("--models", type=int, required=True, help="number of models")
    parser.add_argument("--requests", type=int, required=True, help="number of requests")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="CSV file to write")
    args = parser.parse_args(argv)
    try:
        rows = generate(args.kind, args.models, args.requests, args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    with open(args.out, "w", encoding="utf-8", newline="") as f:
        f.writelines(format_trace(rows))
    distinct = {r.model: r.size_bytes for r in rows}
    print(
        f"wrote {len(rows)} requests for {len(distinct)} models "
        f"({sum(distinct.values()) / 1e9:.1f} GB in all) to {args.out}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
