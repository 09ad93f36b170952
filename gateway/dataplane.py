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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from modelpool.cache.records import CopyState
from modelpool.cache.view import ResidencyView
from modelpool.gateway.audit import AuditEvent, AuditLog
from modelpool.gateway.copies import CopyManager
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.errors import outcome_of
from modelpool.gateway.fairness import FairGates
from modelpool.gateway.limits import TenantLimiter
from modelpool.gateway.metrics import NO_TENANT, UNKNOWN_MODEL, Metrics
from modelpool.gateway.model_control import ModelControl, ModelControlConfig
from modelpool.gateway.settings import LogControl, LogSettings, LogValue, TraceSettings, TraceValues
from modelpool.gateway.shm import RegionStatus, SharedMemoryRegistry
from modelpool.gateway.stats import Statistics
from modelpool.gateway.tenants import Authenticator, Tenant
from modelpool.gateway.validate import contents_to_raw, validate_request
from modelpool.gpu import execution as worker_execution
from modelpool.gpu.repository import (
    ModelRepository,
    ModelSpec,
    check_model_name,
    model_not_found,
)
from modelpool.placement.errors import (
    ModelNotReady,
    ModelpoolError,
    PermissionDenied,
    Unauthenticated,
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
    status view, statistics of every model, log and trace settings. The repository
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
    ) -> None:
        self.repository = repository
        self.view = view
        self.manager = manager
        self.metrics = metrics
        self.infer_timeout_s = infer_timeout_s
        self.acquire_timeout_s = acquire_timeout_s
        #: Devices this gateway runs workers on (``modelpool serve``): not ready while
        #: any of them has none.
        self.expected_devices = expected_devices
        self.ready = True
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
        return self.ready and bool(self.view.workers) and not self.devices_without_workers()

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
        spec, v = self.spec(name, version, tenant)
        resp = pb.ModelMetadataResponse(
            name=spec.name,
            versions=[str(x) for x in spec.versions] if not version else [str(v)],
            platform=spec.platform,
        )
        batch = [-1] if spec.max_batch_size > 0 else []
        for t in spec.inputs:
            resp.inputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
        for t in spec.outputs:
            resp.outputs.add(name=t.name, datatype=t.datatype, shape=batch + list(t.dims))
        return resp

    def model_config(
        self, name: str, version: str = "", *, tenant: Tenant | None = None
    ) -> mc.ModelConfig:
        spec, _ = self.spec(name, version, tenant)
        return spec.config

    def model_ready(self, name: str, version: str = "", *, tenant: Tenant | None = None) -> bool:
        """Ready when it can serve: resident, or loadable on demand (config valid and no
        failed load of an unchanged artifact). False too for a model ``tenant`` may
        not see; the edge answers 404 for it first (``spec``)."""
        try:
            _, v = self.spec(name, version, tenant)
            self.control.check_loadable(name)
            self.manager.check_failed(name, v)
        except ModelpoolError:
            return False
        return True

    # -- inference ---------------------------------------------------------------------
    async def infer(
        self,
        request: pb.ModelInferRequest | Callable[[], pb.ModelInferRequest],
        protocol: str,
        model: str | None = None,
        raw: bytes | None = None,
        client_timeout_s: float | None = None,
        tenant: Tenant | None = None,
    ) -> InferOutcome:
        """Validate, find or load a copy, forward. Counts the request exactly once.

        ``request`` may be a parser so that a body that does not parse is counted under
        its model like any other failed request; ``model`` names it then. ``raw`` is the
        request as it arrived (gRPC): forwarded as is when nothing in it needs
        rewriting, and the reply is then returned raw too. ``client_timeout_s`` is the
        time the client gave the request (gRPC deadline, REST header or parameter),
        None when it set none; see ``gateway/deadlines.py``. ``tenant`` is the caller
        (None: an open server); a model it may not see is ModelNotFound.
        """
        started = time.monotonic()
        label = self.model_label(model) if model is not None else UNKNOWN_MODEL
        who = tenant.name if tenant is not None else NO_TENANT
        self.metrics.inflight.inc()
        admitted = None
        try:
            # Over its limits, a tenant is refused before it costs the pool anything.
            admitted = self.limiter.admit(tenant.name) if tenant is not None else None
            parsed = request() if callable(request) else request
            if model is None:
                label = self.model_label(parsed.model_name)
            deadline = Deadline.from_client(client_timeout_s, self.acquire_timeout_s)
            forward_s = client_timeout_s if client_timeout_s is not None else self.infer_timeout_s
            forward = Deadline.after(forward_s, client_set=client_timeout_s is not None)
            outcome = await self._infer(parsed, label, started, raw, deadline, forward, tenant)
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
        if raw is not None:
            # A parser keeps the last value it reads of a singular field, so appending
            # the resolved version pins it without re-encoding the tensors.
            raw = raw + pb.ModelInferRequest(model_version=str(version)).SerializeToString()
        cold = False
        # One retry: a copy whose worker died between routing and forwarding is
        # dropped, and the request goes to (or loads) another.
        for attempt in (1, 2):
            got = await self.manager.acquire(spec.name, version, deadline)
            cold = cold or got.cold
            if got.cold:
                self.metrics.cold_starts.labels(label).inc()
            self.metrics.queue_wait.labels(label).observe(time.monotonic() - started)
            gate = self.gates.gate(spec.name, version)
            try:
                await gate.enter(tenant, deadline)
            except BaseException:
                self.manager.release(got)
                raise
            compute_started = time.monotonic()
            try:
                if forward.expired():
                    raise forward.error(f"model '{spec.name}'")
                timeout_s = forward.remaining()
                if raw is not None:
                    reply = await got.client.infer_raw(spec.name, raw, timeout_s=timeout_s)
                    outcome = InferOutcome(cold, raw=reply)
                else:
                    response = await got.client.infer(request, timeout_s=timeout_s)
                    outcome = InferOutcome(cold, response=response)
            except (WorkerUnavailable, ModelNotReady) as e:
                # The worker died, or another gateway evicted the copy after we
                # routed to it: the request has not run, so it may go elsewhere.
                await self.manager.copy_lost(got, worker_gone=isinstance(e, WorkerUnavailable))
                if attempt == 2:
                    raise
                log.warning(
                    "copy of model=%s on worker %s lost mid-request (%s); retrying",
                    spec.name,
                    got.copy.worker_id,
                    e,
                )
                continue
            finally:
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
        raise AssertionError("unreachable")

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
        if name:
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
                {**dataclasses.asdict(w), "draining": w.worker_id in self.manager.draining()}
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
                }
                for c in sorted(copies, key=lambda c: (-c.last_used, c.model))
            ],
        }

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
        """Store trace settings (audited); tracing itself is not implemented.

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
