"""Turns per-request outcomes into the run's figures: percentiles, per-model rows, the
per-second series, report.json and the table printed at the end. Pure: no I/O but
``Report.write``."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpool.loadtests.options import LoadOptions
from modelpool.loadtests.probe import MetricsSample

#: Error kind of an arrival dropped because max_outstanding requests were in flight.
DROPPED = "dropped"
#: Error kind of a request still unanswered when the run's drain deadline passed.
UNFINISHED = "unfinished"
#: Error kinds of a request the server refused for its tenant's limits: HTTP 429, and
#: gRPC RESOURCE_EXHAUSTED (which a request over the server's size limit gets too).
REJECTED_KINDS = frozenset({"http_429", "RESOURCE_EXHAUSTED"})


@dataclass(frozen=True)
class Outcome:
    model: str
    tenant: int
    scheduled_s: float
    #: How late the generator sent it: a saturated generator shows here, not in latency.
    lag_s: float
    finished_s: float
    #: None when it failed.
    latency_s: float | None
    error: str | None = None


@dataclass(frozen=True)
class SeriesPoint:
    t: float
    sent: int
    done: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None
    resident_models: float | None
    device_memory_used_bytes: float | None


@dataclass(frozen=True)
class ModelFigures:
    requests: int
    errors: int
    p50: float | None
    p99: float | None
    rank: int


@dataclass(frozen=True)
class TenantFigures:
    """One keyed tenant's stream: ``sent`` = ``ok`` + ``rejected`` + ``errors``.
    Latencies (ms) are of its ``ok`` requests."""

    rate_rps: float
    sent: int
    ok: int
    #: Refused for the tenant's limits (``REJECTED_KINDS``): 429 / RESOURCE_EXHAUSTED.
    rejected: int
    #: Every other failure, dropped and timed-out requests included.
    errors: int
    errors_by_kind: dict[str, int]
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


@dataclass(frozen=True)
class Latency:
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None
    mean: float | None


def percentile(ordered: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default) on sorted data."""
    if not ordered:
        return None
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def latency_ms(seconds: list[float]) -> Latency:
    ordered = sorted(s * 1000.0 for s in seconds)
    if not ordered:
        return Latency(None, None, None, None, None)
    return Latency(
        percentile(ordered, 50),
        percentile(ordered, 95),
        percentile(ordered, 99),
        ordered[-1],
        sum(ordered) / len(ordered),
    )


class Recorder:
    """Collects outcomes as they finish and cuts them into one-second windows.
    ``names``: keyed tenants by index, for per-tenant counts in the progress line."""

    def __init__(self, names: tuple[str, ...] = ()) -> None:
        self.names = names
        self._tenant_ok = [0] * len(names)
        self._tenant_rejected = [0] * len(names)
        self.outcomes: list[Outcome] = []
        self.sent = 0
        self._latencies: list[float] = []
        self._window_sent = 0
        self._window: list[Outcome] = []

    def on_sent(self) -> None:
        self.sent += 1
        self._window_sent += 1

    def on_finished(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        self._window.append(outcome)
        if outcome.latency_s is not None:
            self._latencies.append(outcome.latency_s)
        if self.names:
            if outcome.error is None:
                self._tenant_ok[outcome.tenant] += 1
            elif outcome.error in REJECTED_KINDS:
                self._tenant_rejected[outcome.tenant] += 1

    def tick(self, t: float, sample: MetricsSample | None) -> SeriesPoint:
        window = latency_ms([o.latency_s for o in self._window if o.latency_s is not None])
        point = SeriesPoint(
            t=round(t, 3),
            sent=self._window_sent,
            done=len(self._window),
            errors=sum(1 for o in self._window if o.error is not None),
            p50_ms=window.p50,
            p99_ms=window.p99,
            resident_models=sample.resident_models if sample else None,
            device_memory_used_bytes=sample.device_memory_used_bytes if sample else None,
        )
        self._window_sent = 0
        self._window = []
        return point

    def progress(self, t: float, point: SeriesPoint) -> str:
        """One status line: totals so far, and the last second's completion rate."""
        so_far = latency_ms(self._latencies)
        errors = sum(1 for o in self.outcomes if o.error is not None)
        line = (
            f"[{t:6.1f}s] sent={self.sent} done={len(self.outcomes)} errors={errors} "
            f"rps={point.done} p50={_ms(so_far.p50)} p99={_ms(so_far.p99)}"
        )
        for name, ok, rejected in zip(
            self.names, self._tenant_ok, self._tenant_rejected, strict=True
        ):
            line += f" | {name} ok={ok} 429={rejected}"
        return line


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}ms"


@dataclass(frozen=True)
class Report:
    protocol: str
    url: str
    metrics_url: str
    started_at: float
    duration_s: float
    elapsed_s: float
    options: dict[str, Any]
    requests: int
    errors: int
    errors_by_kind: dict[str, int]
    offered_rps: float
    throughput_rps: float
    latency_ms: Latency
    send_lag_ms: Latency
    #: Delta of cold starts over delta of requests on the server; None without metrics.
    cold_start_rate: float | None
    server_requests: float | None
    server_cold_starts: float | None
    models: dict[str, ModelFigures]
    series: tuple[SeriesPoint, ...]
    plots: tuple[str, ...] = field(default=())
    #: Keyed tenants' rows, in the order given; empty for a single-stream run.
    tenants: dict[str, TenantFigures] = field(default_factory=dict)
    #: Each keyed tenant's answered latencies (ms), for figures pooled over several
    #: runs (loadtests/noisy_neighbour.py); too long for report.json, so not written.
    tenant_latencies_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        del doc["tenant_latencies_ms"]
        doc["series"] = list(doc["series"])
        doc["plots"] = list(doc["plots"])
        return doc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        path = out / "report.json"
        path.write_text(self.to_json() + "\n")
        return path

    def table(self) -> str:
        o = self.options
        lat = self.latency_ms
        rate = "-" if self.cold_start_rate is None else f"{self.cold_start_rate:.2%}"
        if self.tenants:
            offered = sum(t.rate_rps for t in self.tenants.values())
            shape = f"{o['arrival']}, {len(self.tenants)} keyed tenant(s)"
        else:
            offered = o["rate"]
            shape = f"{o['arrival']}, zipf {o['zipf']:g}, {o['tenants']} tenant(s)"
        lines = [
            f"modelpool load test: {self.protocol} {self.url}, {self.duration_s:g} s at "
            f"{offered:g} rps ({shape}, {len(self.models)} models)",
            f"requests {self.requests}  errors {self.errors}  throughput {self.throughput_rps:.1f} rps"
            f"  cold-start rate {rate}",
            f"latency ms  p50 {_num(lat.p50)}  p95 {_num(lat.p95)}  p99 {_num(lat.p99)}"
            f"  max {_num(lat.max)}",
            "",
            f"{'rank':>4}  {'model':<24} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8}",
        ]
        for name, m in sorted(self.models.items(), key=lambda kv: kv[1].rank):
            lines.append(
                f"{m.rank:>4}  {name:<24} {m.requests:>8} {m.errors:>6} {_num(m.p50):>8} {_num(m.p99):>8}"
            )
        if self.errors_by_kind:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.errors_by_kind.items()))
            lines.append(f"errors by kind: {kinds}")
        if self.tenants:
            lines += ["", *tenant_table(self.tenants)]
        return "\n".join(lines)


def tenant_table(tenants: dict[str, TenantFigures]) -> list[str]:
    """Per-tenant rows: what each sent, what came back, and its latencies (ms)."""
    lines = [
        f"{'tenant':<16} {'rps':>7} {'sent':>7} {'ok':>7} {'429s':>7} {'errors':>6}"
        f" {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    ]
    for name, t in tenants.items():
        lines.append(
            f"{name:<16} {t.rate_rps:>7g} {t.sent:>7} {t.ok:>7} {t.rejected:>7} {t.errors:>6}"
            f" {_num(t.p50):>8} {_num(t.p95):>8} {_num(t.p99):>8}"
        )
    return lines


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def build_report(
    options: LoadOptions,
    outcomes: list[Outcome],
    ranks: dict[str, int],
    series: list[SeriesPoint],
    before: MetricsSample | None,
    after: MetricsSample | None,
    started_at: float,
    elapsed_s: float,
) -> Report:
    ok = [o.latency_s for o in outcomes if o.latency_s is not None]
    errors = Counter(o.error for o in outcomes if o.error is not None)
    by_model: dict[str, list[Outcome]] = {m: [] for m in ranks}
    for o in outcomes:
        by_model[o.model].append(o)
    models = {}
    for name, rows in by_model.items():
        lat = latency_ms([o.latency_s for o in rows if o.latency_s is not None])
        models[name] = ModelFigures(
            requests=len(rows),
            errors=sum(1 for o in rows if o.error is not None),
            p50=lat.p50,
            p99=lat.p99,
            rank=ranks[name],
        )
    tenants = tenant_figures(options, outcomes)
    tenant_latencies = {
        spec.name: tuple(
            o.latency_s * 1000.0 for o in outcomes if o.tenant == i and o.latency_s is not None
        )
        for i, spec in enumerate(options.tenant_specs)
    }
    server_requests = server_cold = rate = None
    if before is not None and after is not None:
        server_requests = after.requests_total - before.requests_total
        server_cold = after.cold_starts_total - before.cold_starts_total
        rate = server_cold / server_requests if server_requests > 0 else 0.0
    # Throughput over the sending window, or longer when replies ran past it.
    window = max(options.duration, elapsed_s)
    return Report(
        protocol=options.protocol,
        url=options.url,
        metrics_url=options.resolved_metrics_url,
        started_at=started_at,
        duration_s=options.duration,
        elapsed_s=round(elapsed_s, 3),
        options=options.to_dict(),
        requests=len(outcomes),
        errors=sum(errors.values()),
        errors_by_kind=dict(errors),
        offered_rps=len(outcomes) / options.duration,
        throughput_rps=len(ok) / window,
        latency_ms=latency_ms(ok),
        send_lag_ms=latency_ms([o.lag_s for o in outcomes if o.error != DROPPED]),
        cold_start_rate=rate,
        server_requests=server_requests,
        server_cold_starts=server_cold,
        models=models,
        series=tuple(series),
        tenants=tenants,
        tenant_latencies_ms=tenant_latencies,
    )


def tenant_figures(options: LoadOptions, outcomes: list[Outcome]) -> dict[str, TenantFigures]:
    """Rows of the keyed tenants (``Outcome.tenant`` indexes ``options.tenant_specs``)."""
    rows: list[list[Outcome]] = [[] for _ in options.tenant_specs]
    for o in outcomes:
        if o.tenant < len(rows):
            rows[o.tenant].append(o)
    figures = {}
    for spec, mine in zip(options.tenant_specs, rows, strict=True):
        kinds = Counter(o.error for o in mine if o.error is not None)
        rejected = sum(n for k, n in kinds.items() if k in REJECTED_KINDS)
        lat = latency_ms([o.latency_s for o in mine if o.latency_s is not None])
        figures[spec.name] = TenantFigures(
            rate_rps=options.rate_of(spec),
            sent=len(mine),
            ok=sum(1 for o in mine if o.error is None),
            rejected=rejected,
            errors=sum(kinds.values()) - rejected,
            errors_by_kind=dict(kinds),
            p50=lat.p50,
            p95=lat.p95,
            p99=lat.p99,
            max=lat.max,
        )
    return figures
