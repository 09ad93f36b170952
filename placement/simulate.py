"""Replay a request trace through the placement policies production runs.

    python -m placement.simulate --trace FILE --capacity SIZE [--devices N] \\
        --policies lru,gdsf,opt [--json OUT]

The simulated cluster has ``N`` devices of ``SIZE`` bytes each and one worker per
device. Requests are sequential, so nothing is ever in flight, and loads finish at once
in trace time while their ``load_s`` is still added up: the result is what each policy
would cost in cold starts, not a model of queueing. Every request goes through the same
``PolicyState.plan``/``observe`` calls the gateway makes; plans are applied to the
simulated residency (``Route`` is a hit, ``Load`` a miss that unloads its victims first,
``Reject`` a miss that loads nothing: a model bigger than a device is never admitted).

``opt`` is Belady's policy (evict the copy whose next use is farthest away) and exists
only here, because it reads the future from a next-use index built over the trace.
With models of different sizes it is a strong baseline rather than a proven optimum.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from modelpool.placement.cluster import (
    ClusterView,
    CopyState,
    CopyView,
    DeviceView,
    ModelInfo,
    WorkerView,
)
from modelpool.placement.gdsf import plan_by_value
from modelpool.placement.policies import (
    POLICIES,
    Event,
    Evicted,
    Loaded,
    PolicyState,
    Requested,
    make_policy,
)
from modelpool.placement.policy import Load, PlacementRequest, Plan, Reject, Route, Wait
from modelpool.placement.traces import TraceRow, parse_trace
from modelpool.placement.units import format_size, parse_size

OPT = "opt"
VERSION = 1

#: Called with (requests done, requests in all).
Progress = Callable[[int, int], None]


class SimulationError(RuntimeError):
    """A policy returned a plan the simulated cluster cannot carry out."""


@dataclass
class Stats:
    """One policy's totals over a trace. ``load_seconds`` sums the trace's ``load_s`` of
    every load; ``bytes_loaded`` their sizes."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    bytes_loaded: int = 0
    load_seconds: float = 0.0
    evictions: int = 0
    #: Misses that loaded nothing: the model can never fit.
    rejected: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def to_json(self) -> dict[str, float | int]:
        out: dict[str, float | int] = asdict(self)
        out["hit_rate"] = self.hit_rate
        out["load_seconds"] = round(self.load_seconds, 6)
        return out


def next_use_index(models: Sequence[str]) -> list[float]:
    """For each request, the index of the next request for the same model (inf if none)."""
    out: list[float] = [math.inf] * len(models)
    upcoming: dict[str, int] = {}
    for i in range(len(models) - 1, -1, -1):
        out[i] = upcoming.get(models[i], math.inf)
        upcoming[models[i]] = i
    return out


class OptPolicy:
    """Belady: evict the copies whose next request is farthest away (never = first).

    It must see every request of ``models`` in order through ``observe(Requested)``.
    """

    name = OPT

    def __init__(self, models: Sequence[str]) -> None:
        self._models = list(models)
        self._next = next_use_index(self._models)
        self._cursor = 0
        self._next_of: dict[str, float] = {}

    def plan(self, view: ClusterView, req: PlacementRequest) -> Plan:
        return plan_by_value(view, req, lambda c: -self._next_of.get(c.model, math.inf))

    def eviction_rank(self, view: ClusterView, now: float) -> Callable[[CopyView], Any]:
        return lambda c: -self._next_of.get(c.model, math.inf)

    def observe(self, event: Event) -> None:
        if isinstance(event, Requested):
            i = self._cursor
            if i >= len(self._models) or self._models[i] != event.model:
                raise SimulationError(f"opt was replayed out of order at request {i}")
            self._next_of[event.model] = self._next[i]
            self._cursor += 1


class SimCluster:
    """Residency of the simulated cluster: at most one copy per model (a second request
    for a resident model always routes to it)."""

    def __init__(self, devices: int, capacity_bytes: int) -> None:
        self.devices = tuple(DeviceView(f"d{i}", capacity_bytes) for i in range(devices))
        self.workers = tuple(WorkerView(f"w{i}", f"d{i}") for i in range(devices))
        self._device_of = {w.worker_id: w.device_id for w in self.workers}
        self.capacity_bytes = capacity_bytes
        self.copies: dict[str, CopyView] = {}
        self.used: dict[str, int] = {d.device_id: 0 for d in self.devices}
        self.models: dict[str, ModelInfo] = {}

    def view(self) -> ClusterView:
        return ClusterView(self.devices, self.workers, tuple(self.copies.values()), self.models)

    def touch(self, copy: CopyView, now: float) -> None:
        self.copies[copy.model] = replace(copy, last_used=now)

    def remove(self, copy: CopyView) -> None:
        held = self.copies.get(copy.model)
        if held is None or held.key != copy.key:
            raise SimulationError(f"plan evicts {copy.key}, which is not resident")
        del self.copies[copy.model]
        self.used[self._device_of[copy.worker_id]] -= copy.footprint_bytes

    def add(self, plan: Load, model: str, now: float) -> CopyView:
        if self._device_of.get(plan.worker_id) != plan.device_id:
            raise SimulationError(f"plan loads on {plan.worker_id}, not on {plan.device_id}")
        used = self.used[plan.device_id] + plan.reserve_bytes
        if used > self.capacity_bytes:
            raise SimulationError(
                f"plan overfills {plan.device_id}: {used} > {self.capacity_bytes} bytes"
            )
        copy = CopyView(
            model, VERSION, plan.worker_id, CopyState.READY, plan.reserve_bytes, now, now
        )
        self.copies[model] = copy
        self.used[plan.device_id] = used
        return copy


def simulate(
    trace: Sequence[TraceRow],
    policy: PolicyState,
    capacity_bytes: int,
    devices: int = 1,
    progress: Progress | None = None,
) -> Stats:
    """Replay ``trace`` through ``policy`` on ``devices`` devices of ``capacity_bytes``."""
    cluster = SimCluster(devices, capacity_bytes)
    stats = Stats()
    now = -math.inf
    step = max(1, math.ceil(len(trace) / 10))
    for i, row in enumerate(trace):
        # Strictly increasing time, so equal timestamps still have an LRU order.
        now = row.t if row.t > now else math.nextafter(now, math.inf)
        cluster.models[row.model] = ModelInfo(
            row.model, row.size_bytes, measured_bytes=row.size_bytes, load_seconds=row.load_s
        )
        policy.observe(Requested(row.model, VERSION, now))
        plan = policy.plan(cluster.view(), PlacementRequest(row.model, VERSION, now))
        stats.requests += 1
        match plan:
            case Route(copy):
                stats.hits += 1
                cluster.touch(copy, now)
            case Load():
                stats.misses += 1
                for victim in plan.evict:
                    cluster.remove(victim)
                    policy.observe(Evicted(victim, now))
                    stats.evictions += 1
                copy = cluster.add(plan, row.model, now)
                policy.observe(Loaded(copy, now))
                stats.bytes_loaded += plan.reserve_bytes
                stats.load_seconds += row.load_s
            case Reject():
                stats.misses += 1
                stats.rejected += 1
            case Wait():
                raise SimulationError("a Wait with instantaneous loads: nothing is LOADING")
        if progress is not None and ((i + 1) % step == 0 or i + 1 == len(trace)):
            progress(i + 1, len(trace))
    return stats


def parse_policy_spec(spec: str) -> tuple[str, dict[str, float | bool]]:
    """``gdsf:half_life_s=120:aging=true`` -> ``("gdsf", {"half_life_s": 120.0, ...})``.

    Raises:
        ValueError: a parameter is not ``key=value`` or its value is not a number or
            true/false.
    """
    name, *pairs = spec.split(":")
    params: dict[str, float | bool] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"policy parameter {pair!r} in {spec!r} is not key=value")
        lowered = raw.strip().lower()
        if lowered in ("true", "false"):
            params[key.strip()] = lowered == "true"
            continue
        try:
            params[key.strip()] = float(raw)
        except ValueError:
            raise ValueError(f"policy parameter {pair!r} in {spec!r}: not a number") from None
    return name.strip(), params


def make_sim_policy(spec: str, trace: Sequence[TraceRow]) -> PolicyState:
    """A production policy by spec (``lru``, ``gdsf:half_life_s=120``), or ``opt``
    primed with the trace's future.

    Raises:
        ValueError: unknown policy or parameter.
    """
    name, params = parse_policy_spec(spec)
    if name == OPT:
        if params:
            raise ValueError("opt takes no parameters")
        return OptPolicy([r.model for r in trace])
    return make_policy(name, **params)


def run(
    trace: Sequence[TraceRow],
    capacity_bytes: int,
    devices: int,
    names: Sequence[str],
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Stats]:
    """Simulate every named policy on the same trace, in the order given."""
    results: dict[str, Stats] = {}
    for name in names:
        on_step = None if progress is None else _bind(progress, name)
        policy = make_sim_policy(name, trace)
        results[name] = simulate(trace, policy, capacity_bytes, devices, on_step)
    return results


def _bind(progress: Callable[[str, int, int], None], name: str) -> Progress:
    return lambda done, total: progress(name, done, total)


def report(results: dict[str, Stats]) -> dict[str, dict[str, dict[str, float | int]]]:
    """The JSON document: ``{"policies": {name: {requests, hits, ...}}}``."""
    opt = results.get(OPT)
    policies: dict[str, dict[str, float | int]] = {}
    for name, stats in results.items():
        entry = stats.to_json()
        if opt is not None and opt.hit_rate > 0:
            entry["hit_rate_vs_opt"] = stats.hit_rate / opt.hit_rate
        policies[name] = entry
    return {"policies": policies}


def format_table(results: dict[str, Stats]) -> str:
    """A fixed-width table, one policy per line."""
    opt = results.get(OPT)
    head = ["policy", "requests", "hits", "misses", "hit_rate", "bytes_loaded", "load_seconds"]
    if opt is not None:
        head.append("vs_opt")
    lines = [head]
    for name, s in results.items():
        line = [
            name,
            str(s.requests),
            str(s.hits),
            str(s.misses),
            f"{s.hit_rate:.4f}",
            format_size(s.bytes_loaded),
            f"{s.load_seconds:.1f}",
        ]
        if opt is not None:
            line.append(f"{s.hit_rate / opt.hit_rate:.3f}" if opt.hit_rate > 0 else "-")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    )


def _policy_list(text: str) -> list[str]:
    specs = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not specs:
        raise argparse.ArgumentTypeError("no policies named")
    for spec in specs:
        try:
            # Build each once so a typo fails before minutes of simulation.
            make_sim_policy(spec, ())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{exc} (known: {', '.join(sorted({*POLICIES, OPT}))})"
            ) from None
    return specs


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stderr_progress(name: str, done: int, total: int) -> None:
    print(f"{name}: {done}/{total} requests ({100 * done // total}%)", file=sys.stderr)


#: Below this many requests a run is over before progress lines would help.
PROGRESS_MIN_REQUESTS = 10_000


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m placement.simulate",
        description="Replay a t,model,bytes,load_s trace through placement policies.",
    )
    parser.add_argument("--trace", required=True, help="CSV trace (t,model,bytes,load_s)")
    parser.add_argument(
        "--capacity", required=True, type=_size, help="bytes per device: 4GiB, 512MB, 1.5GB"
    )
    parser.add_argument("--devices", type=int, default=1, help="devices (default 1)")
    parser.add_argument(
        "--policies",
        type=_policy_list,
        default=["lru", "gdsf", OPT],
        help="comma-separated: lru, gdsf, opt; tune with gdsf:half_life_s=120:aging=true",
    )
    parser.add_argument("--json", dest="json_out", help="write results as JSON here")
    args = parser.parse_args(argv)
    if args.devices < 1:
        parser.error("--devices must be at least 1")
    if args.capacity < 1:
        parser.error("--capacity must be at least one byte")
    try:
        with open(args.trace, encoding="utf-8", newline="") as f:
            trace = parse_trace(f)
    except (OSError, ValueError) as exc:
        parser.error(f"cannot read trace {args.trace}: {exc}")
    progress = _stderr_progress if len(trace) >= PROGRESS_MIN_REQUESTS else None
    results = run(trace, args.capacity, args.devices, args.policies, progress)
    print(format_table(results))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(report(results), f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
