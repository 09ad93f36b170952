"""The one service object REST and gRPC both call: parse -> DataPlane -> render.

Implements the KServe v2 / Open Inference Protocol and Triton's repository extension:
https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from modelpool.cache.records import CopyState
from modelpool.cache.view import ResidencyView
from modelpool.gateway.audit import AuditEvent, AuditLog
from modelpool.gateway.copies import CopyManager, CopyMoved, mark_retrieved
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.drain import Drain
from modelpool.gateway.errors import outcome_of
from modelpool.gateway.fairness import FairGates
from modelpool.gateway.limits import TenantLimiter
from modelpool.gateway.metrics import NO_TENANT, UNKNOWN_MODEL, Metrics
from modelpool.gateway.model_control import ModelControl, ModelControlConfig
from modelpool.gateway.routing import (
    PIN_PARAMETER,
    SESSION_PARAMETER,
    Route,
    RouteHints,
    Router,
    hint_text,
)
from modelpool.gateway.settings import LogControl, LogSettings, LogValue, TraceSettings, TraceValues
from modelpool.gateway.shm import RegionStatus, SharedMemoryRegistry
from modelpool.gateway.stats import Statistics
from modelpool.gateway.tenants import Authenticator, Tenant
from modelpool.gateway.validate import contents_to_raw, validate_request
from modelpool.gateway.workers import AWAIT_LOAD
from modelpool.gpu import execution as worker_execution
from modelpool.gpu import tracing as tr
from modelpool.gpu.repository import (
    ModelRepository,
    ModelSpec,
    check_model_name,
    clip,
    model_not_found,
)
from modelpool.placement.errors import (
    InvalidInput,
    ModelNotFound,
    ModelNotReady,
    ModelpoolError,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

SERVER_NAME = "modelpool"
SERVER_VERSION = "0.1.0"
EXTENSIONS = (
    "binary_tensor_data",
    "model_repository",
    "model_repository(unload_dependents)",
    "statistics",
    "logging",
    "system_shared_memory",
)


#: What each admin action is called in a 403's message.
_ADMIN_CALLS = {
    "load": "repository load",
    "unload": "repository unload",
    "status": "the status view",
    "statistics": "statistics of every model",
    "log_settings": "log settings",
    "trace_settings": "trace settings",
    "routes": "reading routes",
    "route_set": "changing routes",
}


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str
    reason: str


@dataclass(frozen=True)
class InferOutcome:
    """The worker's reply: parsed (REST renders it) or as raw bytes (gRPC returns them
    as they came). Exactly one is set."""

    cold: bool
    response: pb.ModelInferResponse | None = None
    raw: bytes | None = None

    def parsed(self) -> pb.ModelInferResponse:
        if self.response is not None:
            return self.response
        assert self.raw is not None
        return pb.ModelInferResponse.FromString(self.raw)

    def raw_response(self) -> bytes:
        if self.raw is not None:
            return self.raw
        assert self.response is not None
        return self.response.SerializeToString()

    def named(self, model_name: str) -> InferOutcome:
        """The reply under the name the client used (a route's public name). Raw: a
        parser keeps the last value of a singular field, so appending ``model_name``
        renames it without re-encoding the tensors."""
        if self.raw is not None:
            renamed = pb.ModelInferResponse(model_name=model_name).SerializeToString()
            return dataclasses.replace(self, raw=self.raw + renamed)
        response = self.parsed()
        response.model_name = model_name
        return self


def _shm_owner(tenant: Tenant | None) -> str:
    """Whose shared memory regions a caller uses: its tenant's (none with auth off)."""
    return tenant.name if tenant is not None else ""


class DataPlane:
    """Every client call, for REST and gRPC alike.

    Tenants: the edge resolves the caller's key with ``authenticate`` and passes the
    ``Tenant`` as ``tenant=`` (None: an open server, everything visible). Which models a
    tenant sees (``_visible``) and which calls need the admin role (``_require_admin``)
    are decided here and nowhere else. A model a tenant may not see is answered exactly
    as one that does not exist (404 / NOT_FOUND, the same message); an admin call by a
    tenant is 403 / PERMISSION_DENIED. Admin calls: repository load and unload, the
    status view, statistics of every model, log and trace settings, routes. The repository
    index is open to tenants
    and lists only the models they see.
    """

    def __init__(
        self,
        repository: ModelRepository,
        view: ResidencyView,
        manager: CopyManager,
        metrics: Metrics,
        *,
        infer_timeout_s: float,
        acquire_timeout_s: float,
        expected_devices: frozenset[str] = frozenset(),
        authenticator: Authenticator | None = None,
        audit: AuditLog | None = None,
        limiter: TenantLimiter | None = None,
        gates: FairGates | None = None,
        control: ModelControl | None = None,
        shm: SharedMemoryRegistry | None = None,
        router: Router | None = None,
    ) -> None:
        self.repository = repository
        self.view = view
        self.manager = manager
        self.metrics = metrics
        self.infer_timeout_s = infer_timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        #: A cold request sends its infer while its copy loads (``acquire(early=True)``).
        #: ``MODELPOOL_COLD_PIPELINE=0`` waits for READY as before: only for
        #: loadtests/cold_start.py to measure both in one place.
        self.early_leases = os.environ.get("MODELPOOL_COLD_PIPELINE", "1") != "0"
        #: Devices this gateway runs workers on (``modelpool serve``): not ready while
        #: any of them has none.
        self.expected_devices = expected_devices
        self.ready = True
        #: SIGTERM: not ready, new requests refused, accepted ones finish (drain.py).
        self.drain = Drain("gateway")
        self.statistics = Statistics()
        #: Auth off (every caller is None) unless built from an auth config.
        self.authenticator = authenticator if authenticator is not None else Authenticator()
        self.audit = audit if audit is not None else AuditLog()
        #: Per-tenant rate and concurrency (429), and fair per-model queues.
        self.limiter = limiter if limiter is not None else TenantLimiter()
        self.gates = gates if gates is not None else FairGates(lambda m, v: 1 << 30, 1 << 30)
        #: Model control (--model-control-mode): the repository API and which models
        #: may serve. Default: today's on-demand loading.
        #: System shared memory regions, per tenant (gateway/shm.py).
        self.shm = shm if shm is not None else SharedMemoryRegistry()
        self.control = control or ModelControl(
            ModelControlConfig(),
            repository,
            manager,
            load_timeout_s=acquire_timeout_s,
            unload_timeout_s=infer_timeout_s,
        )
        #: Triton's logging and trace extensions (gateway/settings.py).
        self.log_control = LogControl()
        self.traces = TraceSettings()
        #: OpenTelemetry (gpu/tracing.py); None: off, and no trace step runs.
        self.tracing: tr.Tracing | None = None
        #: Aliases and canary splits (gateway/routing.py): public name -> targets.
        self.router = router if router is not None else Router()

    # -- tenants -----------------------------------------------------------------------
    def authenticate(
        self, authorization: str | None, *, action: str, model: str | None = None, source: str = ""
    ) -> Tenant | None:
        """The tenant behind an ``Authorization`` value (``Bearer KEY``); None when auth
        is off. ``action``, ``model`` and ``source`` (the peer address) only go to the
        audit log of a refusal.

        Raises:
            Unauthenticated: no key, or one no tenant holds (HTTP 401 / UNAUTHENTICATED).
        """
        try:
            return self.authenticator.authenticate(authorization)
        except Unauthenticated:
            self.audit.record(AuditEvent(None, action, model, "unauthenticated", 401, source))
            raise

    def _visible(self, tenant: Tenant | None, name: str) -> None:
        """Raise for a model ``tenant`` may not see exactly what a model absent from the
        repository raises (and without looking at the repository, so not even timing
        tells them apart): InvalidInput for a malformed name, else ModelNotFound."""
        if tenant is None or tenant.sees(name):
            return
        check_model_name(name)
        raise model_not_found(name)

    def _require_admin(
        self, tenant: Tenant | None, action: str, model: str | None, source: str
    ) -> None:
        """Refuse (and audit) an admin call by a tenant without the admin role."""
        if tenant is None or tenant.is_admin:
            return
        self.audit.record(AuditEvent(tenant.name, action, model, "denied", 403, source))
        raise PermissionDenied(
            f"{_ADMIN_CALLS.get(action, action)} is an admin call: tenant '{tenant.name}' "
            "does not have the admin role"
        )

    @contextlib.contextmanager
    def _audited(
        self, tenant: Tenant | None, action: str, model: str | None, source: str
    ) -> Iterator[None]:
        """Audit an admin action with its outcome."""
        name = tenant.name if tenant is not None else None
        try:
            yield
        except ModelpoolError as e:
            self.audit.record(AuditEvent(name, action, model, "error", e.http_status, source))
            raise
        except asyncio.CancelledError:
            self.audit.record(AuditEvent(name, action, model, "cancelled", 499, source))
            raise
        except Exception:
            self.audit.record(AuditEvent(name, action, model, "error", 500, source))
            raise
        self.audit.record(AuditEvent(name, action, model, "ok", 200, source))

    # -- server ------------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return (
            self.ready
            and not self.drain.draining
            and bool(self.view.workers)
            and not self.devices_without_workers()
        )

    def devices_without_workers(self) -> list[str]:
        """Expected devices with no live worker (one crashed and is restarting)."""
        live = {w.device_id for w in self.view.workers.values()}
        return sorted(d for d in self.expected_devices if d not in live)

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    # -- models ------------------------------------------------------------------------
    def spec(
        self, name: str, version: str | int | None = None, tenant: Tenant | None = None
    ) -> tuple[ModelSpec, int]:
        """The model and the version a request names, as ``tenant`` may see them.

        Raises:
            ModelNotFound: no such model (or ``tenant`` may not see it), or version.
            ModelNotReady: the model's config is broken.
        """
        self._visible(tenant, name)
        spec = self.repository.get(name)
        return spec, spec.resolve_version(version)

    def model_label(self, name: str) -> str:
        """A bounded label value: repository names only."""
        return name if name in self.repository else UNKNOWN_MODEL

    def model_metadata(
        self, name: str, version: str = "", *, tenant: Tenant | None = None
    ) -> pb.ModelMetadataResponse:
        """A route answers under its public name: the versions of its targets, the
        platform and tensors of its first target."""
        route = self._public(name, version, tenant)
        if route is not None:
            specs = [self.spec(t.model, t.version, tenant) for t in route.targets]
            return _metadata(specs[0][0], name, sorted({v for _, v in specs}))
        spec, v = self.spec(name, version, tenant)
        return _metadata(spec, spec.name, list(spec.versions) if not version else [v])

    def model_config(
        self, name: str, version: str = "", *, tenant: Tenant | None = None
    ) -> mc.ModelConfig:
        route = self._public(name, version, tenant)
        if route is not None:  # the first target's, under the public name
            first = route.targets[0]
            config = mc.ModelConfig()
            config.CopyFrom(self.spec(first.model, first.version, tenant)[0].config)
            config.name = name
            return config
        spec, _ = self.spec(name, version, tenant)
        return spec.config

    def model_ready(self, name: str, version: str = "", *, tenant: Tenant | None = None) -> bool:
        """Ready when it can serve: resident, or loadable on demand (config valid and no
        failed load of an unchanged artifact). False too for a model ``tenant`` may
        not see; the edge answers 404 for it first (``spec``). A route is ready when
        any of its targets is."""
        try:
            route = self._public(name, version, tenant)
        except ModelpoolError:
            return False
        if route is None:
            return self._model_ready(name, version, tenant)
        # A target may be a model of the route's own name: never resolved as a route.
        return any(self._model_ready(t.model, t.version, tenant) for t in route.targets)

    def _model_ready(self, name: str, version: str | int | None, tenant: Tenant | None) -> bool:
        try:
            _, v = self.spec(name, version, tenant)
            self.control.check_loadable(name)
            self.manager.check_failed(name, v)
        except ModelpoolError:
            return False
        return True

    # -- routes (aliases and canary splits; gateway/routing.py) --------------------------
    def _public(self, name: str, version: str | int | None, tenant: Tenant | None) -> Route | None:
        """The route ``name`` is (narrowed to ``version`` when one is given), or None for
        a name the routing table does not hold. A route wins over a model of its name.

        Raises:
            ModelNotFound: ``tenant`` may not see the name, or no target has ``version``.
            InvalidInput: ``version`` is not a number.
        """
        route = self.router.get(name)
        if route is None:
            return None
        self._visible(tenant, name)
        if version in (None, "", 0):
            return route
        if isinstance(version, str) and not (
            version.isascii() and version.isdigit() and len(version) < 19
        ):
            raise InvalidInput(
                f"route '{name}': version '{clip(version)}' is not a version number (digits only)"
            )
        return route.with_version(int(version), self._latest)

    def _latest(self, model: str) -> int | None:
        try:
            return self.repository.get(model).latest
        except ModelpoolError:
            return None

    def check_known(self, name: str, version: str = "", tenant: Tenant | None = None) -> None:
        """Raise what ``spec`` raises for a name that is neither a route nor a model
        ``tenant`` may see, or a version it does not have (the edges' early 404)."""
        if self._public(name, version, tenant) is None:
            self.spec(name, version, tenant)

    def _route(
        self,
        request: pb.ModelInferRequest,
        raw: bytes | None,
        hints: RouteHints,
        tenant: Tenant | None,
    ) -> tuple[str | None, bytes | None]:
        """Point a request for a public name at one of its targets, in place, before
        anything else reads it. Returns the public name (None: not a route) and the
        bytes to forward (the target's name appended: a parser keeps the last value).

        Raises:
            InvalidInput: a malformed pin or session, or a pin that is not a target.
            ModelNotFound: a version no target has; a target ``tenant`` may not see.
        """
        route = self._public(request.model_name, request.model_version, tenant)
        if route is None:
            return None, raw
        hints = hints.over(
            _string_parameter(request, PIN_PARAMETER),
            _string_parameter(request, SESSION_PARAMETER),
        )
        target = route.choose(hints)
        if tenant is not None and not tenant.sees(target.model):
            raise model_not_found(request.model_name)  # names no model it may not see
        spec, version = self.spec(target.model, target.version, tenant)
        public = request.model_name
        request.model_name = spec.name
        request.model_version = str(version)
        if raw is not None and spec.name != public:
            raw = raw + pb.ModelInferRequest(model_name=spec.name).SerializeToString()
        self.metrics.route_requests.labels(route.name, spec.name, str(version)).inc()
        return public, raw

    def routes(
        self, name: str = "", *, tenant: Tenant | None = None, source: str = ""
    ) -> list[dict[str, Any]]:
        """Every route, or the one named (``GET /v2/routes[/{name}]``; an admin call).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            ModelNotFound: no route ``name``.
        """
        self._require_admin(tenant, "routes", name or None, source)
        if not name:
            return [r.as_dict() for r in self.router.table.routes]
        route = self.router.get(name)
        if route is None:
            raise ModelNotFound(f"route '{clip(name)}' does not exist")
        return [route.as_dict()]

    def set_route(
        self, name: str, body: object, *, tenant: Tenant | None = None, source: str = ""
    ) -> dict[str, Any]:
        """Add or replace a route at run time (``PUT /v2/routes/{name}``, audited); the
        next request uses it. Lasts until the routing file next changes or SIGHUP.

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            InvalidInput: a malformed route, or a target the repository does not hold.
        """
        self._require_admin(tenant, "route_set", name, source)
        with self._audited(tenant, "route_set", name, source):
            return self.router.set_route(name, body).as_dict()

    def delete_route(self, name: str, *, tenant: Tenant | None = None, source: str = "") -> None:
        """Drop a route at run time (``DELETE /v2/routes/{name}``, audited).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            ModelNotFound: no route ``name``.
        """
        self._require_admin(tenant, "route_set", name, source)
        with self._audited(tenant, "route_set", name, source):
            self.router.delete_route(name)

    # -- inference ---------------------------------------------------------------------
    async def infer(
        self,
        request: pb.ModelInferRequest | Callable[[], pb.ModelInferRequest],
        protocol: str,
        model: str | None = None,
        raw: bytes | None = None,
        client_timeout_s: float | None = None,
        tenant: Tenant | None = None,
        route: RouteHints | None = None,
        trace: tr.Carrier | None = None,
    ) -> InferOutcome:
        """Validate, find or load a copy, forward. Counts the request exactly once.

        ``request`` may be a parser so that a body that does not parse is counted under
        its model like any other failed request; ``model`` names it then. ``raw`` is the
        request as it arrived (gRPC): forwarded as is when nothing in it needs
        rewriting, and the reply is then returned raw too. ``client_timeout_s`` is the
        time the client gave the request (gRPC deadline, REST header or parameter),
        None when it set none; see ``gateway/deadlines.py``. ``tenant`` is the caller
        (None: an open server); a model it may not see is ModelNotFound. ``route``: the
        pin and session key the edge read from headers or metadata; a public name of
        the routing table is resolved to one target here, before anything else looks at
        the request, and the reply names the public name again. ``trace``: the
        headers or metadata that may carry the client's ``traceparent``, read only when
        tracing is on.
        """
        started = time.monotonic()
        label = self.model_label(model) if model is not None else UNKNOWN_MODEL
        who = tenant.name if tenant is not None else NO_TENANT
        self.metrics.inflight.inc()
        admitted = None
        try:
            # Draining (SIGTERM): refused before anything else, so a balancer's retry
            # elsewhere is the request's only cost; accepted ones hold the drain open.
            with self.drain.accepted(), self._trace_request(protocol, trace, tenant):
                # Over its limits, a tenant is refused before it costs the pool anything.
                admitted = self.limiter.admit(tenant.name) if tenant is not None else None
                parsed = request() if callable(request) else request
                public, raw = self._route(parsed, raw, route or RouteHints(), tenant)
                if model is None or public is not None:
                    label = self.model_label(parsed.model_name)
                deadline = Deadline.from_client(client_timeout_s, self.acquire_timeout_s)
                forward_s = (
                    client_timeout_s if client_timeout_s is not None else self.infer_timeout_s
                )
                forward = Deadline.after(forward_s, client_set=client_timeout_s is not None)
                outcome = await self._infer(parsed, label, started, raw, deadline, forward, tenant)
                if public is not None:
                    outcome = outcome.named(public)
        except BaseException as e:
            self.metrics.requests.labels(label, protocol, outcome_of(e), who).inc()
            raise
        finally:
            if admitted is not None:
                admitted.release()
            self.metrics.inflight.dec()
            self.metrics.request_duration.labels(label, who).observe(time.monotonic() - started)
        self.metrics.requests.labels(label, protocol, "success", who).inc()
        return outcome

    # -- tracing (gpu/tracing.py): the shared no-op contexts when off -------------------
    def _trace_request(
        self, protocol: str, carrier: tr.Carrier | None, tenant: Tenant | None
    ) -> contextlib.AbstractContextManager[object]:
        if self.tracing is None:
            return _OFF
        return self.tracing.request(protocol, carrier, tenant.name if tenant else None)

    def _trace_span(self, name: str) -> contextlib.AbstractContextManager[object]:
        return _OFF if self.tracing is None else self.tracing.span(name)

    def _trace_load_wait(self) -> contextlib.AbstractContextManager[tr.LoadWait | None]:
        return _OFF if self.tracing is None else self.tracing.load_wait()

    def _trace_forward(
        self, worker_id: str
    ) -> contextlib.AbstractContextManager[tuple[tuple[str, str], ...] | None]:
        return _OFF if self.tracing is None else self.tracing.forward(worker_id)

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        label: str,
        started: float,
        raw: bytes | None,
        deadline: Deadline,
        forward: Deadline,
        tenant: Tenant | None,
    ) -> InferOutcome:
        spec, version = self.spec(request.model_name, request.model_version, tenant)
        try:
            # Inputs in shared memory become raw contents before validation; the
            # request was rewritten, so its original bytes are not forwarded.
            shm_outputs = self.shm.resolve(_shm_owner(tenant), request)
            if shm_outputs is not None:
                raw = None
            outcome = await self._forward(
                spec, version, request, label, started, raw, deadline, forward,
                tenant.name if tenant is not None else NO_TENANT,
            )  # fmt: skip
        except ModelpoolError:
            self.statistics.record_failure(spec.name, version, time.monotonic() - started)
            raise
        if shm_outputs is None or not shm_outputs.slots:
            return outcome
        return InferOutcome(outcome.cold, response=shm_outputs.write(outcome.parsed()))

    async def _forward(
        self,
        spec: ModelSpec,
        version: int,
        request: pb.ModelInferRequest,
        label: str,
        started: float,
        raw: bytes | None,
        deadline: Deadline,
        forward: Deadline,
        tenant: str,
    ) -> InferOutcome:
        """Find a copy within ``deadline`` (the earlier of the client's and the
        server's wait bound), take the tenant's turn at the model's fair queue, then
        forward within what is left of ``forward`` (the client's deadline, or the
        server's infer timeout). The lease is held while queued, so the copy stays."""
        if any(t.HasField("contents") for t in request.inputs):
            contents_to_raw(request)
            raw = None  # rewritten: the original bytes no longer say the same
        validate_request(spec, request)
        request.model_version = str(version)
        if self.tracing is not None:
            self.tracing.annotate(spec.name, version)
        if raw is not None:
            # A parser keeps the last value it reads of a singular field, so appending
            # the resolved version pins it without re-encoding the tensors.
            raw = raw + pb.ModelInferRequest(model_version=str(version)).SerializeToString()
        cold = False
        # One retry: a copy whose worker died between routing and forwarding is
        # dropped, and the request goes to (or loads) another.
        queued = self.metrics.model_queue_depth.labels(label)
        running = self.metrics.model_inflight.labels(label)
        attempt = 1
        while True:
            # Waiting (queue depth, queue_wait, the statistics' queue) is the same span:
            # arrival until the worker computes, copy, load and fair turn included.
            queued.inc()
            try:
                with self._trace_load_wait() as waited:
                    # Early: a cold request's lease comes while its copy loads, and
                    # its infer follows the Load RPC on the channel at once.
                    got = await self.manager.acquire(
                        spec.name, version, deadline, early=self.early_leases
                    )
                    if waited is not None and got.cold:
                        waited.source = tr.LOAD_FROM_DISK
                        # Leased early: the wait's span ends with the load, not here.
                        waited.until = got.loading
                # Once per request: a load placed again elsewhere (CopyMoved) or a
                # copy lost mid-request is the same request's one cold start.
                if got.cold and not cold:
                    self.metrics.cold_starts.labels(label).inc()
                cold = cold or got.cold
                gate = self.gates.gate(spec.name, version)
                try:
                    with self._trace_span(tr.QUEUE):
                        await gate.enter(tenant, deadline)
                except BaseException:
                    self.manager.release(got)
                    raise
            finally:
                queued.dec()
            compute_started = time.monotonic()
            if got.loading is None:
                self.metrics.queue_wait.labels(label).observe(compute_started - started)
            running.inc()
            try:
                if forward.expired():
                    raise forward.error(f"model '{spec.name}'")
                timeout_s = forward.remaining()
                with self._trace_forward(got.copy.worker_id) as metadata:
                    if got.loading is not None:
                        metadata = (*(metadata or ()), AWAIT_LOAD)
                    call = (
                        got.client.infer_raw(spec.name, raw, timeout_s=timeout_s, metadata=metadata)
                        if raw is not None
                        else got.client.infer(request, timeout_s=timeout_s, metadata=metadata)
                    )
                    if got.loading is None:
                        reply = await call
                    else:
                        # Compute starts, for the metrics, once the copy is loaded.
                        reply, compute_started = await _pipelined(
                            call, got.loading, deadline, spec.name
                        )
                        self.metrics.queue_wait.labels(label).observe(compute_started - started)
                    if raw is not None:
                        outcome = InferOutcome(cold, raw=reply)
                    else:
                        outcome = InferOutcome(cold, response=reply)
            except CopyMoved:
                continue  # placed again elsewhere, no retry spent: lease that copy
            except _LoadFailed as e:
                # What acquire would have raised had it waited for READY: no retry.
                raise e.error from None
            except (WorkerUnavailable, ModelNotReady) as e:
                # The worker died, or another gateway evicted the copy after we
                # routed to it: the request has not run, so it may go elsewhere.
                await self.manager.copy_lost(got, worker_gone=isinstance(e, WorkerUnavailable))
                if attempt == 2:
                    raise
                attempt = 2
                log.warning(
                    "copy of model=%s on worker %s lost mid-request (%s); retrying",
                    spec.name,
                    got.copy.worker_id,
                    e,
                )
                continue
            finally:
                running.dec()
                gate.leave()
                self.manager.release(got)
            done = time.monotonic()
            self.metrics.compute_duration.labels(label).observe(done - compute_started)
            batch = (
                int(request.inputs[0].shape[0]) if spec.max_batch_size > 0 and request.inputs else 1
            )
            # The worker's internal parameters feed the statistics and leave the reply
            # here, raw or parsed, so no client sees them whatever renders the reply.
            if outcome.raw is not None:
                ran, stripped = worker_execution.split_raw(outcome.raw)
                outcome = dataclasses.replace(outcome, raw=stripped)
            else:
                ran = worker_execution.read(outcome.parsed(), strip=True)
            self.statistics.record_success(
                spec.name,
                version,
                batch,
                started=started,
                compute_started=compute_started,
                done=done,
                reply=ran,
            )
            return outcome

    def model_statistics(
        self,
        name: str = "",
        version: str = "",
        *,
        tenant: Tenant | None = None,
        source: str = "",
    ) -> pb.ModelStatisticsResponse:
        """Triton's statistics for one model (and version), or every model when ``name``
        is empty (an admin call).

        Raises:
            PermissionDenied: every model's, asked by a tenant that is not an admin.
        """
        if not name:
            self._require_admin(tenant, "statistics", None, source)
        route = self._public(name, version, tenant) if name else None
        if route is not None:  # its targets', under their own names
            resolved = [self.spec(t.model, t.version, tenant) for t in route.targets]
            keys = sorted({(s.name, v) for s, v in resolved})
        elif name:
            spec, v = self.spec(name, version, tenant)
            keys = [(spec.name, v)] if version else [(spec.name, x) for x in spec.versions]
        else:
            keys = [
                (s.name, v) for s in self.repository.specs() if s.error is None for v in s.versions
            ]
        return self.statistics.response(keys)

    # -- system shared memory extension -------------------------------------------------
    # https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_shared_memory.md
    # Open to every tenant; each sees and uses only its own regions (gateway/shm.py).
    def shm_register(
        self, name: str, key: str, offset: int, byte_size: int, *, tenant: Tenant | None = None
    ) -> None:
        """Register ``byte_size`` bytes at ``offset`` of the POSIX object ``key``.

        Raises:
            InvalidInput: bad key or range, no such object, name already registered.
        """
        self.shm.register(_shm_owner(tenant), name, key, offset, byte_size)

    def shm_status(self, name: str = "", *, tenant: Tenant | None = None) -> list[RegionStatus]:
        """The caller's regions, or the one named (InvalidInput if it has none such)."""
        return self.shm.status(_shm_owner(tenant), name)

    def shm_unregister(self, name: str = "", *, tenant: Tenant | None = None) -> None:
        """Unregister the caller's region ``name``, or all of them when empty."""
        self.shm.unregister(_shm_owner(tenant), name)

    # -- operator view -----------------------------------------------------------------
    def status(self, *, tenant: Tenant | None = None, source: str = "") -> dict[str, Any]:
        """The JSON behind ``GET /v2/modelpool/status`` and ``modelpool status``: workers,
        devices (bytes) and every copy this gateway knows of. An admin call (audited).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
        """
        self._require_admin(tenant, "status", None, source)
        with self._audited(tenant, "status", None, source):
            return self._status()

    def _tenants_status(self, copies: list[Any]) -> list[dict[str, Any]]:
        """Per tenant: its private models' resident bytes against its quota, requests
        in flight and refused (rate, concurrency) at this gateway."""
        config = self.authenticator.config
        if config is None:
            return []
        rows = []
        for t in config.tenants:
            quota = None
            resident = 0
            for c in copies:
                q = self.manager.quota_of(c.model) if self.manager.quota_of else None
                if q is not None and q.tenant == t.name:
                    quota = q.limit_bytes
                    resident += c.footprint_bytes
            rows.append(
                {
                    "name": t.name,
                    "role": str(t.role),
                    "resident_bytes": resident,
                    "device_memory_quota": t.device_memory_quota if quota is None else quota,
                    "inflight": self.limiter.inflight(t.name),
                    "rejected": {
                        reason: self.limiter.rejections.get((t.name, reason), 0)
                        for reason in ("rate", "concurrency")
                    },
                }
            )
        return rows

    def _status(self) -> dict[str, Any]:
        copies = self.manager.copies()
        return {
            "server": {
                "name": SERVER_NAME,
                "version": SERVER_VERSION,
                "models": len(self.repository.names()),
            },
            "workers": [
                {
                    **dataclasses.asdict(w),
                    "draining": w.worker_id in self.manager.draining(),
                    **self._host_tier_status(w.worker_id),
                }
                for w in sorted(self.view.workers.values(), key=lambda w: w.worker_id)
            ],
            "devices_without_workers": self.devices_without_workers(),
            "tenants": self._tenants_status(copies),
            "devices": [
                dataclasses.asdict(d)
                for d in sorted(self.view.devices.values(), key=lambda d: d.device_id)
            ],
            # Measured sizes per model version and device kind (shared through the
            # store), with the bytes the next plan for the model would reserve.
            "footprints": [
                {
                    **dataclasses.asdict(f),
                    "planned_bytes": self.manager.model_info(f.model, f.version).need_bytes,
                }
                for f in self.manager.measured.all()
            ],
            "copies": [
                {
                    "model": c.model,
                    "version": c.version,
                    "worker_id": c.worker_id,
                    "state": c.state.value,
                    "footprint_bytes": c.footprint_bytes,
                    "last_used": c.last_used,
                    "loaded_at": c.loaded_at,
                    "inflight": c.inflight,
                    "tier": "device",
                }
                for c in sorted(copies, key=lambda c: (-c.last_used, c.model))
            ],
            # Copies evicted from a device and kept in their worker's host memory, as
            # the housekeeper last read them (gateway/host_tiers.py).
            "host_copies": [
                {
                    "model": h.model,
                    "version": h.version,
                    "worker_id": worker_id,
                    "tier": "host",
                    "bytes": h.bytes,
                    "last_used": h.last_used,
                }
                for worker_id, h in self.manager.host_tiers.copies()
            ],
        }

    def _host_tier_status(self, worker_id: str) -> dict[str, int]:
        report = self.manager.host_tiers.report(worker_id)
        if report is None:
            return {"host_budget_bytes": 0, "host_used_bytes": 0}
        return {"host_budget_bytes": report.budget_bytes, "host_used_bytes": report.used_bytes}

    # -- repository extension ------------------------------------------------------------
    def repository_index(
        self, ready_only: bool = False, *, tenant: Tenant | None = None
    ) -> list[IndexEntry]:
        """Triton's repository index: every model, or for a tenant the models it sees."""
        self.control.refresh_index()
        states_of: dict[tuple[str, int], set[CopyState]] = {}
        for c in self.view.all_copies():
            states_of.setdefault((c.model, c.version), set()).add(c.state)
        entries = []
        for spec in self.repository.specs():
            if tenant is not None and not tenant.sees(spec.name):
                continue
            if spec.error is not None:
                if not ready_only:
                    entries.append(IndexEntry(spec.name, "", "UNAVAILABLE", spec.error))
                continue
            for v in spec.versions:
                states = states_of.get((spec.name, v), set())
                failure = self.manager.failures.get((spec.name, v))
                if CopyState.READY in states:
                    entries.append(IndexEntry(spec.name, str(v), "READY", ""))
                elif ready_only:
                    continue
                elif CopyState.LOADING in states:
                    entries.append(IndexEntry(spec.name, str(v), "LOADING", ""))
                elif failure is not None:
                    entries.append(IndexEntry(spec.name, str(v), "UNAVAILABLE", failure.reason))
                else:
                    reason = self.control.unloaded_reason(spec.name)
                    entries.append(IndexEntry(spec.name, str(v), "UNAVAILABLE", reason))
        return entries

    async def load_model(
        self,
        name: str,
        *,
        tenant: Tenant | None = None,
        source: str = "",
        config: str | None = None,
    ) -> None:
        """Triton's explicit load: re-read the config, forget a past failure, load now.
        ``config`` is the request's ``parameters.config`` (a JSON ModelConfig that
        replaces config.pbtxt). An admin call (audited with ``source``, the peer
        address). See ``gateway/model_control.py`` for what each mode allows.

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            NotAllowed: --model-control-mode none or poll.
            InvalidInput: ``config`` is not a valid config of the model.
        """
        self._require_admin(tenant, "load", name, source)
        with self._audited(tenant, "load", name, source):
            await self.control.load(name, config)

    async def unload_model(
        self, name: str, *, tenant: Tenant | None = None, source: str = ""
    ) -> None:
        """Triton's explicit unload: every copy of ``name`` goes. An admin call (audited).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
        """
        self._require_admin(tenant, "unload", name, source)
        with self._audited(tenant, "unload", name, source):
            await self.control.unload(name)

    # -- settings (Triton's logging and trace extensions; admin calls) ------------------
    def log_settings(self, *, tenant: Tenant | None = None, source: str = "") -> LogSettings:
        """The gateway's log settings (``GET /v2/logging``). Raises PermissionDenied."""
        self._require_admin(tenant, "log_settings", None, source)
        return self.log_control.current()

    def update_log_settings(
        self,
        changes: Mapping[str, LogValue | None],
        *,
        tenant: Tenant | None = None,
        source: str = "",
    ) -> LogSettings:
        """Change the gateway's logging (audited); see ``LogControl.update``.

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            InvalidInput: an unknown setting or a bad value.
        """
        self._require_admin(tenant, "log_settings", None, source)
        with self._audited(tenant, "log_settings", None, source):
            return self.log_control.update(changes)

    def trace_settings(
        self, model: str = "", *, tenant: Tenant | None = None, source: str = ""
    ) -> TraceValues:
        """Trace settings of ``model`` ("" for the global ones).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            ModelNotFound: no such model.
        """
        self._require_admin(tenant, "trace_settings", model or None, source)
        if model:
            self.spec(model)
        return self.traces.get(model)

    def update_trace_settings(
        self,
        model: str,
        changes: Mapping[str, Sequence[str] | None],
        *,
        tenant: Tenant | None = None,
        source: str = "",
    ) -> TraceValues:
        """Store trace settings (audited). Triton's trace API does not drive tracing:
        OpenTelemetry is set by the OTEL_* environment (docs/observability.md).

        Raises:
            PermissionDenied: ``tenant`` is not an admin.
            ModelNotFound: no such model.
            InvalidInput: an unknown setting or a bad value.
            TracingNotImplemented: a trace level other than OFF.
        """
        self._require_admin(tenant, "trace_settings", model or None, source)
        with self._audited(tenant, "trace_settings", model or None, source):
            if model:
                self.spec(model)
            return self.traces.update(model, changes)


#: Tracing off: one stateless context for every trace step, entered for nothing.
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()


async def _pipelined(
    call: Awaitable[Any], loading: asyncio.Future[str], deadline: Deadline, model: str
) -> tuple[Any, float]:
    """An infer sent while its copy loads (the worker holds it until the load is
    done): its reply, and when the load was seen done (monotonic). The load's outcome
    comes first: a load that fails cancels the call and raises its error, and no reply
    is reported before the load succeeded. The wait for the load ends at ``deadline``,
    the same bound a cold request's wait for a copy has."""
    infer = asyncio.ensure_future(call)
    # Its error is not reported when the load failed first.
    infer.add_done_callback(mark_retrieved)
    try:
        done, _ = await asyncio.wait((loading,), timeout=deadline.remaining())
        if not done:
            raise _LoadFailed(deadline.error(f"model '{model}': waiting for a copy"))
        try:
            loading.result()
        except ModelpoolError as e:
            raise _LoadFailed(e) from None
        except asyncio.CancelledError:  # the manager closed (this task was not cancelled)
            raise _LoadFailed(Unavailable(f"model '{model}': the gateway is stopping")) from None
        loaded = time.monotonic()
        return await infer, loaded
    finally:
        infer.cancel()  # no-op once it answered


class _LoadFailed(Exception):
    """An early lease's load (or the wait for it) failed: ``error`` is what the
    request gets, as from ``CopyManager.acquire``, not a lost copy to retry."""

    def __init__(self, error: ModelpoolError) -> None:
        super().__init__(error.message)
        self.error = error


def _metadata(spec: ModelSpec, name: str, versions: Sequence[int]) -> pb.ModelMetadataResponse:
    resp = pb.ModelMetadataResponse(
        name=name, versions=[str(v) for v in versions], platform=spec.platform
    )
    batch = [-1] if spec.max_batch_size > 0 else []
    for t in spec.inputs:
        resp.inputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
    for t in spec.outputs:
        resp.outputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
    return resp


def _string_parameter(request: pb.ModelInferRequest, key: str) -> str | None:
    """A routing hint given as a request parameter (a string_param), or None."""
    if key not in request.parameters:
        return None
    param = request.parameters[key]
    if param.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"model '{request.model_name}': parameter '{key}' must be a string")
    return hint_text(param.string_param, key)
