"""OpenTelemetry tracing for the gateway and the workers: off unless the environment
asks for it (docs/observability.md, "Tracing").

Both processes import this module, and it imports neither of them (gpu/ never imports
gateway/). Off, nothing here runs: callers hold ``None`` instead of a ``Tracing`` and
skip every trace step, so no attributes are built and no ``traceparent`` is read. The
OpenTelemetry SDK and exporter are imported only when tracing is asked for, so the
package runs without the ``tracing`` extra installed.

On (``from_env``) when ``OTEL_TRACES_EXPORTER`` names ``otlp`` (or ``console``), or
when it is unset and ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is; ``OTEL_SDK_DISABLED=true`` and
``OTEL_TRACES_EXPORTER=none`` keep it off. The exporter reads the other standard
``OTEL_EXPORTER_OTLP_*`` and ``OTEL_BSP_*`` variables itself.

Spans of one inference request::

    modelpool.infer        (gateway, SERVER; parent: the client's traceparent)
      modelpool.load_wait  (only when the request waited for a copy to load)
      modelpool.queue      (the tenant's turn at the model's fair queue)
      modelpool.forward    (CLIENT; its traceparent goes to the worker as gRPC metadata)
        modelpool.compute  (worker, SERVER: decode, forward, encode)

Sampling (``OTEL_TRACES_SAMPLER``, default ``parentbased_traceidratio``): a client's
``traceparent`` decides; a new trace is sampled at the ratio (``_ARG``, default 1.0),
drawn before the SDK is called so that an unsampled request starts no span at all.
Workers never start a trace of their own: they record a compute span only for a call
whose ``traceparent`` is sampled, and the gateway sends one only then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

#: W3C trace context header (HTTP) and gRPC metadata key, lower case as gRPC wants.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

#: Span names: few and fixed (the model is an attribute, not part of the name).
INFER = "modelpool.infer"
LOAD_WAIT = "modelpool.load_wait"
QUEUE = "modelpool.queue"
FORWARD = "modelpool.forward"
COMPUTE = "modelpool.compute"

#: Attributes.
MODEL = "modelpool.model.name"
VERSION = "modelpool.model.version"
PROTOCOL = "modelpool.protocol"
TENANT = "modelpool.tenant"
COLD = "modelpool.cold"
WORKER = "modelpool.worker.id"
#: Where the copy a request waited for was loaded from: "disk" today (a host-RAM tier
#: may add "host"); absent on a warm request, which has no load_wait span.
LOAD_SOURCE = "modelpool.load.source"
LOAD_FROM_DISK = "disk"

#: The extra that installs the SDK and the OTLP exporter.
EXTRA = "modelpool[tracing]"

#: OTEL_TRACES_SAMPLER values (the OpenTelemetry spec's names) this module builds.
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
DEFAULT_SAMPLER = "parentbased_traceidratio"

#: A carrier of trace context: HTTP headers (a mapping) or gRPC metadata (pairs).
Carrier = Mapping[str, str] | Iterable[tuple[str, str]]


@dataclass(frozen=True)
class TraceConfig:
    """What the environment asks for; ``None`` from ``config_from_env`` means off.

    ``exporters``: "otlp" and/or "console". ``protocol``: "grpc" or "http/protobuf".
    ``ratio``: the traceidratio samplers' fraction of new traces, 0..1.
    """

    exporters: tuple[str, ...]
    protocol: str
    sampler: str
    ratio: float
    service_name: str | None


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def config_from_env(env: Mapping[str, str]) -> TraceConfig | None:
    """Pure: whether and how ``env`` asks for tracing. Unknown values are logged and
    replaced by the defaults (a typo must not stop a server)."""
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return None
    named = env.get("OTEL_TRACES_EXPORTER")
    if named is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        exporters: tuple[str, ...] = ("otlp",) if endpoint else ()
    else:
        wanted = [e.strip().lower() for e in named.split(",") if e.strip()]
        exporters = tuple(e for e in wanted if e in ("otlp", "console"))
        for e in wanted:
            if e not in ("otlp", "console", "none"):
                log.warning("OTEL_TRACES_EXPORTER=%s: exporter %r is not supported", named, e)
    if not exporters:
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        log.warning("OTLP protocol %r is not supported; using grpc", protocol)
        protocol = "grpc"
    sampler = (env.get("OTEL_TRACES_SAMPLER") or DEFAULT_SAMPLER).strip().lower()
    if sampler not in SAMPLERS:
        log.warning("OTEL_TRACES_SAMPLER=%s is not supported; using %s", sampler, DEFAULT_SAMPLER)
        sampler = DEFAULT_SAMPLER
    ratio = 1.0
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if arg and sampler.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a ratio in [0, 1]; using 1.0", arg)
            ratio = 1.0
    return TraceConfig(exporters, protocol, sampler, ratio, env.get("OTEL_SERVICE_NAME") or None)


def root_ratio(config: TraceConfig) -> float | None:
    """The fraction of new traces a ``parentbased_*`` config samples, which
    ``Tracing`` applies itself (None for the others: the SDK's sampler decides all)."""
    if not config.sampler.startswith("parentbased_"):
        return None
    return {"always_on": 1.0, "always_off": 0.0, "traceidratio": config.ratio}[
        config.sampler.removeprefix("parentbased_")
    ]


def _sampler(config: TraceConfig) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    if root_ratio(config) is not None:
        # New traces are decided before the SDK is called (Tracing.request): an
        # unsampled one then costs a random number, not a span. Spans the SDK is asked
        # for are children of a sampled span, or sampled roots.
        return sampling.ParentBased(sampling.ALWAYS_ON)
    root = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "traceidratio": sampling.TraceIdRatioBased(config.ratio),
    }[config.sampler.removeprefix("parentbased_")]
    # parentbased_*: a client's sampled (or unsampled) parent decides; the root
    # sampler only decides traces that start here.
    return sampling.ParentBased(root) if config.sampler.startswith("parentbased_") else root


def _exporter(name: str, protocol: str) -> SpanExporter:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def from_env(process: str, env: Mapping[str, str]) -> Tracing | None:
    """The process's tracing as ``env`` asks (None: off). ``process``: "gateway" or
    "worker"; the service name is ``OTEL_SERVICE_NAME`` or ``modelpool-<process>``.

    Spans go through a batch processor (``OTEL_BSP_*``) and are flushed at exit."""
    config = config_from_env(env)
    if config is None:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporters = [_exporter(name, config.protocol) for name in config.exporters]
    except ImportError as e:
        log.warning(
            "tracing is asked for (OTEL_* environment) but OpenTelemetry is not "
            "installed (%s): install the extra, pip install '%s'; tracing stays off",
            e,
            EXTRA,
        )
        return None
    attributes: dict[str, Any] = {"modelpool.process": process}
    if config.service_name is None:  # else Resource.create reads OTEL_SERVICE_NAME
        attributes["service.name"] = f"modelpool-{process}"
    provider = TracerProvider(sampler=_sampler(config), resource=Resource.create(attributes))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    log.info(
        "tracing on: exporters=%s protocol=%s sampler=%s ratio=%s",
        ",".join(config.exporters),
        config.protocol,
        config.sampler,
        config.ratio,
    )
    return Tracing(provider, parent_based=False, root_ratio=root_ratio(config))


class LoadWait:
    """What a request's wait for a copy turned out to be: ``source`` stays None on the
    warm path (no span is recorded), else where the copy was loaded from. ``until``:
    the load's outcome (its source) when the request was leased the copy while it
    loads (its infer pipelined behind the load); the span then ends when that is
    done, so it shows the load, not the moment the lease was granted, and names the
    source the load reported."""

    __slots__ = ("source", "started_ns", "until")

    def __init__(self, started_ns: int) -> None:
        self.started_ns = started_ns
        self.source: str | None = None
        self.until: asyncio.Future[str] | None = None


class Tracing:
    """One process's tracer. The provider is this object's own (never the global
    one), so tests and two servers in one process do not share state."""

    def __init__(
        self, provider: TracerProvider, parent_based: bool = True, root_ratio: float | None = None
    ) -> None:
        """``parent_based``: the provider's sampler follows a parent's decision.
        ``root_ratio``: this object samples new traces at that ratio itself (the
        provider's sampler being ``ParentBased(ALWAYS_ON)``); None: the provider's
        sampler decides every span."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer("modelpool")
        self._propagator = TraceContextTextMapPropagator()
        self._trace = trace
        #: The sampler follows a parent's decision: a child of an unsampled span is
        #: never recorded, so it is not even started (most requests at low ratios).
        self.parent_based = parent_based or root_ratio is not None
        #: A new trace is sampled when a random 64-bit number is below this.
        self._root_bound = None if root_ratio is None else round(root_ratio * 2**64)

    def _skip(self) -> bool:
        """Whether the current span's children would not be recorded."""
        return self.parent_based and not self._trace.get_current_span().is_recording()

    # -- context ------------------------------------------------------------------------
    def extract(self, carrier: Carrier | None) -> Context | None:
        """The client's trace context from headers or metadata (None: none sent, or
        malformed: the request starts a trace of its own)."""
        if carrier is None:
            return None
        if isinstance(carrier, Mapping):
            found = {k: carrier[k] for k in (TRACEPARENT, TRACESTATE) if k in carrier}
        else:
            found = {k: v for k, v in carrier if k in (TRACEPARENT, TRACESTATE)}
        if not found:
            return None
        context = self._propagator.extract(found)
        if not self._trace.get_current_span(context).get_span_context().is_valid:
            return None  # malformed: as if none had been sent
        return context

    def _new_trace_unsampled(self) -> bool:
        """Draw the sampling decision of a new trace (False: ask the SDK)."""
        return self._root_bound is not None and random.getrandbits(64) >= self._root_bound

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The current span's context as gRPC metadata for the worker call."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return tuple(carrier.items())

    # -- spans --------------------------------------------------------------------------
    def request(
        self, protocol: str, carrier: Carrier | None, tenant: str | None = None
    ) -> contextlib.AbstractContextManager[object]:
        """The gateway's span of one inference request, current inside the block
        (none at all for a new trace that is not sampled)."""
        parent = self.extract(carrier)
        if parent is None and self._new_trace_unsampled():
            return _SKIP
        return self._request(protocol, parent, tenant)

    @contextlib.contextmanager
    def _request(self, protocol: str, parent: Context | None, tenant: str | None) -> Iterator[Span]:
        from opentelemetry.trace import SpanKind

        attributes: dict[str, Any] = {PROTOCOL: protocol}
        if tenant is not None:
            attributes[TENANT] = tenant
        with self.tracer.start_as_current_span(
            INFER, context=parent, kind=SpanKind.SERVER, attributes=attributes
        ) as span:
            yield span

    def annotate(self, model: str, version: int) -> None:
        """Name the model and version on the current span (the gateway's request span,
        once the request's target is resolved)."""
        span = self._trace.get_current_span()
        if span.is_recording():
            span.set_attribute(MODEL, model)
            span.set_attribute(VERSION, version)

    def span(self, name: str) -> contextlib.AbstractContextManager[object]:
        """A child of the current span, current inside the block."""
        return _SKIP if self._skip() else self.tracer.start_as_current_span(name)

    def forward(
        self, worker_id: str
    ) -> contextlib.AbstractContextManager[tuple[tuple[str, str], ...] | None]:
        """The worker call's span; yields the metadata that makes the worker's compute
        span its child. Unsampled: no span and no metadata (None). Workers never start
        a trace, so saying nothing is enough, and custom metadata on the call costs
        more than the rest of an unsampled request's tracing."""
        return _SKIP if self._skip() else self._forward(worker_id)

    @contextlib.contextmanager
    def _forward(self, worker_id: str) -> Iterator[tuple[tuple[str, str], ...]]:
        from opentelemetry.trace import SpanKind

        with self.tracer.start_as_current_span(FORWARD, kind=SpanKind.CLIENT) as span:
            span.set_attribute(WORKER, worker_id)
            yield self.metadata()

    def load_wait(self) -> contextlib.AbstractContextManager[LoadWait | None]:
        """Times the wait for a copy; recorded as a span afterwards, only when the
        caller set ``source`` (it waited for a load) or the wait failed. Recorded after
        the fact because only its end tells a warm request from a cold one. Yields None
        (nothing to note) in an unsampled trace."""
        return _SKIP if self._skip() else self._load_wait()

    @contextlib.contextmanager
    def _load_wait(self) -> Iterator[LoadWait]:
        wait = LoadWait(time.time_ns())
        try:
            yield wait
        except BaseException as e:
            self._record_wait(wait, wait.source or LOAD_FROM_DISK, e)
            raise
        if wait.source is None:
            return
        until = wait.until
        if until is None:
            self._record_wait(wait, wait.source, None)
        elif until.done():
            self._record_load(wait, until)
        else:
            # Recorded by the load's outcome: in this context (the request's span the
            # parent), whether or not the request is still waiting by then.
            until.add_done_callback(lambda f: self._record_load(wait, f))

    def _record_load(self, wait: LoadWait, load: asyncio.Future[str]) -> None:
        """The wait's span, at the end of the load it waited for. A cancelled load is
        this request's view of it, given up (``CopyManager.release``): the load went on."""
        source = wait.source or LOAD_FROM_DISK
        if load.cancelled():
            self._record_wait(wait, source, None)
        elif (error := load.exception()) is not None:
            self._record_wait(wait, source, error)
        else:
            self._record_wait(wait, load.result() or source, None)

    def _record_wait(self, wait: LoadWait, source: str, error: BaseException | None) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.tracer.start_span(
            LOAD_WAIT, attributes={LOAD_SOURCE: source}, start_time=wait.started_ns
        )
        if error is not None:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.end()

    def compute(
        self, carrier: Carrier | None, model: str, version: str, worker_id: str
    ) -> contextlib.AbstractContextManager[object]:
        """The worker's span of one request, a child of the gateway's forward span.

        Workers never start a trace: a span is recorded only for a call whose
        ``traceparent`` (from a gateway's sampled forward span, or a client calling
        the worker directly) says it is sampled, or any ``traceparent`` with a sampler
        that is not parent-based. Traces start at the edge, the gateway."""
        if carrier is None:
            return _SKIP
        pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
        for key, value in pairs:
            if key == TRACEPARENT:
                if self.parent_based and _unsampled(value):
                    return _SKIP
                parent = self.extract(carrier)
                if parent is None:
                    return _SKIP
                return self._compute(parent, model, version, worker_id)
        return _SKIP

    @contextlib.contextmanager
    def _compute(
        self, parent: Context | None, model: str, version: str, worker_id: str
    ) -> Iterator[Span]:
        from opentelemetry.trace import SpanKind

        with self.tracer.start_as_current_span(
            COMPUTE,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={MODEL: model, WORKER: worker_id},
        ) as span:
            if span.is_recording() and version.isdigit():
                span.set_attribute(VERSION, int(version))
            yield span

    def shutdown(self) -> None:
        """Flush and stop exporting (also done at interpreter exit)."""
        self.provider.shutdown()


#: What a step of an unsampled trace enters: nothing.
_SKIP: contextlib.nullcontext[None] = contextlib.nullcontext()


def _unsampled(traceparent: str) -> bool:
    """A well-formed W3C traceparent whose sampled flag is clear (version 00: 55
    characters, the flags last)."""
    if len(traceparent) != 55 or traceparent[-3] != "-":
        return False
    try:
        return not int(traceparent[-2:], 16) & 1
    except ValueError:
        return False
