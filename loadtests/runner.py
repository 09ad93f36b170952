"""The open-loop driver: ``run_load(options) -> Report``.

Arrivals are sent at their scheduled time whether or not earlier requests have been
answered, so a slow server shows up as latency and errors, not as a lower offered
rate. The run is bounded: the schedule ends at ``duration``, at most
``max_outstanding`` requests are in flight, and stragglers get ``timeout`` seconds.

With keyed tenants (``options.tenant_specs``) each tenant is a stream of its own: its
own connection carrying its key, its own arrivals at its own rate, its own
``max_outstanding``; the streams are merged in time and sent by one loop, so one
tenant's slow replies never hold back another's sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from modelpool.loadtests.client import Adapter, RequestFailed, connect
from modelpool.loadtests.options import LoadOptions, TenantSpec
from modelpool.loadtests.probe import MetricsProbe
from modelpool.loadtests.report import (
    DROPPED,
    UNFINISHED,
    Outcome,
    Recorder,
    Report,
    SeriesPoint,
    build_report,
)
from modelpool.loadtests.workload import (
    Arrival,
    Workload,
    arrivals,
    combined_rank,
    merge_streams,
    plan_workload,
    stream_seed,
    tenant_arrivals,
)

log = logging.getLogger(__name__)

#: Slack over the per-request timeout before unanswered requests are abandoned.
DRAIN_SLACK_S = 2.0

Progress = Callable[[str], None]


def stderr_progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


async def discover_models(adapter: Adapter, wanted: tuple[str, ...]) -> list[str]:
    """Every model the index lists with a version. Unloaded models are listed as
    UNAVAILABLE but load on first request; one without a version has a broken config."""
    servable = sorted({e.name for e in await adapter.index() if e.version})
    if not wanted:
        if not servable:
            raise RuntimeError("the repository index lists no servable model")
        return servable
    unknown = [m for m in wanted if m not in servable]
    if unknown:
        raise RuntimeError(f"models not servable by this server: {unknown} (it has {servable})")
    return list(wanted)


@dataclass
class _Lane:
    """Where a stream's requests go: its adapter (with its key), the inputs prepared
    per model, and how many of its requests are in flight."""

    adapter: Adapter
    prepared: dict[str, Any]
    inflight: int = 0

    def done(self) -> None:
        self.inflight -= 1


@dataclass(frozen=True)
class _Plan:
    lanes: tuple[_Lane, ...]
    schedule: Iterable[Arrival]
    #: Model -> popularity rank over the whole run.
    ranks: dict[str, int]
    #: Whether ``Arrival.tenant`` picks the lane (keyed tenants) or all share lane 0.
    per_tenant: bool


async def _prepare(adapter: Adapter, models: list[str], seed: int) -> dict[str, Any]:
    return {
        name: adapter.prepare(await adapter.model_info(name), seed + i)
        for i, name in enumerate(models)
    }


async def _plan_single(options: LoadOptions, adapter: Adapter) -> _Plan:
    models = await discover_models(adapter, options.models)
    prepared = await _prepare(adapter, models, options.seed)
    workload = plan_workload(models, options.zipf, options.tenants, options.seed)
    log.info(
        "sending %s to %d models at %s rps for %s s (%s, zipf %s, %d tenants)",
        options.protocol, len(models), options.rate, options.duration,
        options.arrival, options.zipf, options.tenants,
    )  # fmt: skip
    schedule = arrivals(workload, options.rate, options.duration, options.arrival, options.seed)
    return _Plan((_Lane(adapter, prepared),), schedule, workload.rank, per_tenant=False)


async def _plan_tenants(options: LoadOptions, adapters: list[Adapter]) -> _Plan:
    lanes: list[_Lane] = []
    streams: list[Iterator[Arrival]] = []
    workloads: list[Workload] = []
    rates: list[float] = []
    for i, (spec, adapter) in enumerate(zip(options.tenant_specs, adapters, strict=True)):
        try:
            # Discovered with the tenant's key: the index lists the models it sees.
            models = await discover_models(adapter, spec.models or options.models)
        except (RequestFailed, RuntimeError) as e:
            raise RuntimeError(f"tenant {spec.name}: {e}") from e
        lanes.append(_Lane(adapter, await _prepare(adapter, models, options.seed)))
        seed = stream_seed(options.seed, spec.name)
        zipf = spec.zipf if spec.zipf is not None else options.zipf
        rate = options.rate_of(spec)
        workload = plan_workload(models, zipf, 1, seed)
        log.info(
            "tenant %s (%s): %d models at %s rps, zipf %s",
            spec.name, "keyed" if spec.key else "no key", len(models), rate, zipf,
        )  # fmt: skip
        streams.append(tenant_arrivals(workload, rate, options.duration, options.arrival, seed, i))
        workloads.append(workload)
        rates.append(rate)
    log.info(
        "sending %s for %s s (%s), %d tenant streams, %s rps in all",
        options.protocol, options.duration, options.arrival, len(lanes), options.total_rate,
    )  # fmt: skip
    return _Plan(
        tuple(lanes), merge_streams(streams), combined_rank(workloads, rates), per_tenant=True
    )


def _connect_tenant(options: LoadOptions, spec: TenantSpec) -> Adapter:
    return connect(
        options.protocol, options.url, options.timeout, options.max_outstanding, spec.headers
    )


async def run_load(
    options: LoadOptions,
    progress: Progress | None = stderr_progress,
    stop: asyncio.Event | None = None,
    adapter: Adapter | None = None,
    adapters: Mapping[str, Adapter] | None = None,
) -> Report:
    """One load test against ``options.url``. ``progress`` gets a line per second;
    setting ``stop`` ends the schedule early and still returns a report. ``adapter``
    replaces the tritonclient one (another protocol, or a fake in tests); with keyed
    tenants ``adapters`` does, by tenant name (a tenant not in it connects with its
    key). Every adapter used is closed."""
    if options.tenant_specs:
        if adapter is not None:
            raise ValueError("keyed tenants take adapters={name: adapter}, not adapter=")
        given = adapters or {}
        opened = [
            given.get(spec.name) or _connect_tenant(options, spec) for spec in options.tenant_specs
        ]
    else:
        if adapter is None:
            adapter = connect(
                options.protocol, options.url, options.timeout, options.max_outstanding
            )
        opened = [adapter]
    probe = MetricsProbe(options.resolved_metrics_url)
    try:
        if options.tenant_specs:
            plan = await _plan_tenants(options, opened)
        else:
            plan = await _plan_single(options, opened[0])
        before = await probe.scrape()
        started_at = time.time()
        names = tuple(t.name for t in options.tenant_specs)
        driver = _Driver(options, plan, probe, progress, stop, Recorder(names))
        elapsed = await driver.run(plan.schedule)
        after = await probe.scrape()
    finally:
        await probe.close()
        for a in opened:
            await a.close()
    return build_report(
        options, driver.recorder.outcomes, plan.ranks, driver.series, before, after,
        started_at, elapsed,
    )  # fmt: skip


class _Driver:
    def __init__(
        self,
        options: LoadOptions,
        plan: _Plan,
        probe: MetricsProbe,
        progress: Progress | None,
        stop: asyncio.Event | None,
        recorder: Recorder,
    ) -> None:
        self.options = options
        self.lanes = plan.lanes
        self.per_tenant = plan.per_tenant
        self.probe = probe
        self.progress = progress
        self.stop = stop or asyncio.Event()
        self.recorder = recorder
        self.series: list[SeriesPoint] = []
        self.inflight: set[asyncio.Task[None]] = set()
        self.start = 0.0

    def _now(self) -> float:
        return asyncio.get_running_loop().time() - self.start

    async def run(self, schedule: Iterable[Arrival]) -> float:
        """Send the schedule, drain, and return the seconds it all took."""
        self.start = asyncio.get_running_loop().time()
        ticks = asyncio.create_task(self._ticker(), name="loadtest-ticker")
        try:
            for a in schedule:
                if self.stop.is_set():
                    log.info("stopped early at %.1f s", self._now())
                    break
                delay = a.t - self._now()
                if delay > 0:
                    await asyncio.sleep(delay)
                self._send(a)
            await self._drain()
        finally:
            ticks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticks
            for task in list(self.inflight):
                task.cancel()
        elapsed = self._now()
        self._tail(elapsed)
        return elapsed

    def _send(self, a: Arrival) -> None:
        self.recorder.on_sent()
        lane = self.lanes[a.tenant if self.per_tenant else 0]
        if lane.inflight >= self.options.max_outstanding:
            self.recorder.on_finished(Outcome(a.model, a.tenant, a.t, 0.0, a.t, None, DROPPED))
            return
        task = asyncio.create_task(self._one(a, lane))
        lane.inflight += 1
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        # A callback, not a finally: a task cancelled before it ever ran leaves too.
        task.add_done_callback(lambda _: lane.done())

    async def _one(self, a: Arrival, lane: _Lane) -> None:
        sent = self._now()
        latency: float | None = None
        error: str | None = None
        try:
            await lane.adapter.infer(a.model, lane.prepared[a.model])
            latency = self._now() - sent
        except RequestFailed as e:
            error = e.kind
            log.debug("request to %s failed: %s", a.model, e)
        except asyncio.CancelledError:
            # Only the drain deadline cancels these; record it and end quietly.
            error = UNFINISHED
        except Exception as e:  # an adapter's own bug must still count as one failed request
            error = type(e).__name__
            log.warning("request to %s failed unexpectedly: %r", a.model, e)
        self.recorder.on_finished(
            Outcome(a.model, a.tenant, a.t, sent - a.t, self._now(), latency, error)
        )

    async def _drain(self) -> None:
        """Each request has its own timeout; the slack covers a deadline that did not fire."""
        if not self.inflight:
            return
        _, late = await asyncio.wait(
            set(self.inflight), timeout=self.options.timeout + DRAIN_SLACK_S
        )
        if late:
            log.warning("%d requests unanswered after the drain deadline", len(late))
            for task in late:
                task.cancel()
            await asyncio.wait(late, timeout=DRAIN_SLACK_S)

    async def _ticker(self) -> None:
        second = 1
        while True:
            await asyncio.sleep(max(0.0, second - self._now()))
            sample = await self.probe.scrape()
            now = self._now()
            point = self.recorder.tick(now, sample)
            self.series.append(point)
            if self.progress is not None:
                self.progress(self.recorder.progress(now, point))
            second = max(second + 1, int(now) + 1)

    def _tail(self, elapsed: float) -> None:
        """The last, partial window; it has no scrape of its own, so it keeps the last."""
        point = self.recorder.tick(elapsed, None)
        if not (point.sent or point.done):
            return
        if self.series:
            last = self.series[-1]
            point = dataclasses.replace(
                point,
                resident_models=last.resident_models,
                device_memory_used_bytes=last.device_memory_used_bytes,
            )
        self.series.append(point)
