"""The one service object REST and gRPC both call: parse -> DataPlane -> render.

Implements the KServe v2 / Open Inference Protocol and Triton's repository extension:
https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_model_repository.md
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from modelpool.cache.records import CopyState
from modelpool.cache.view import ResidencyView
from modelpool.gateway.copies import CopyManager
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.errors import outcome_of
from modelpool.gateway.metrics import UNKNOWN_MODEL, Metrics
from modelpool.gateway.stats import Statistics
from modelpool.gateway.validate import contents_to_raw, validate_request
from modelpool.gpu.repository import ModelRepository, ModelSpec
from modelpool.placement.errors import (
    ModelNotFound,
    ModelNotReady,
    ModelpoolError,
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
)


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


class DataPlane:
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
    def spec(self, name: str, version: str | int | None = None) -> tuple[ModelSpec, int]:
        spec = self.repository.get(name)
        return spec, spec.resolve_version(version)

    def model_label(self, name: str) -> str:
        """A bounded label value: repository names only."""
        return name if name in self.repository else UNKNOWN_MODEL

    def model_metadata(self, name: str, version: str = "") -> pb.ModelMetadataResponse:
        spec, v = self.spec(name, version)
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

    def model_config(self, name: str, version: str = "") -> mc.ModelConfig:
        spec, _ = self.spec(name, version)
        return spec.config

    def model_ready(self, name: str, version: str = "") -> bool:
        """Ready when it can serve: resident, or loadable on demand (config valid and no
        failed load of an unchanged artifact)."""
        try:
            _, v = self.spec(name, version)
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
    ) -> InferOutcome:
        """Validate, find or load a copy, forward. Counts the request exactly once.

        ``request`` may be a parser so that a body that does not parse is counted under
        its model like any other failed request; ``model`` names it then. ``raw`` is the
        request as it arrived (gRPC): forwarded as is when nothing in it needs
        rewriting, and the reply is then returned raw too. ``client_timeout_s`` is the
        time the client gave the request (gRPC deadline, REST header or parameter),
        None when it set none; see ``gateway/deadlines.py``.
        """
        started = time.monotonic()
        label = self.model_label(model) if model is not None else UNKNOWN_MODEL
        self.metrics.inflight.inc()
        try:
            parsed = request() if callable(request) else request
            if model is None:
                label = self.model_label(parsed.model_name)
            deadline = Deadline.from_client(client_timeout_s, self.acquire_timeout_s)
            forward_s = client_timeout_s if client_timeout_s is not None else self.infer_timeout_s
            forward = Deadline.after(forward_s, client_set=client_timeout_s is not None)
            outcome = await self._infer(parsed, label, started, raw, deadline, forward)
        except BaseException as e:
            self.metrics.requests.labels(label, protocol, outcome_of(e)).inc()
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.request_duration.labels(label).observe(time.monotonic() - started)
        self.metrics.requests.labels(label, protocol, "success").inc()
        return outcome

    async def _infer(
        self,
        request: pb.ModelInferRequest,
        label: str,
        started: float,
        raw: bytes | None,
        deadline: Deadline,
        forward: Deadline,
    ) -> InferOutcome:
        spec, version = self.spec(request.model_name, request.model_version)
        try:
            return await self._forward(
                spec, version, request, label, started, raw, deadline, forward
            )
        except ModelpoolError:
            self.statistics.record_failure(spec.name, version, time.monotonic() - started)
            raise

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
    ) -> InferOutcome:
        """Find a copy within ``deadline`` (the earlier of the client's and the
        server's wait bound), then forward within what is left of ``forward`` (the
        client's deadline, or the server's infer timeout)."""
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
                self.manager.release(got)
            done = time.monotonic()
            self.metrics.compute_duration.labels(label).observe(done - compute_started)
            batch = (
                int(request.inputs[0].shape[0]) if spec.max_batch_size > 0 and request.inputs else 1
            )
            self.statistics.record_success(
                spec.name,
                version,
                batch,
                done - started,
                compute_started - started,
                done - compute_started,
            )
            return outcome
        raise AssertionError("unreachable")

    def model_statistics(self, name: str = "", version: str = "") -> pb.ModelStatisticsResponse:
        """Triton's statistics for one model (and version), or every model when ``name``
        is empty."""
        if name:
            spec, v = self.spec(name, version)
            keys = [(spec.name, v)] if version else [(spec.name, x) for x in spec.versions]
        else:
            keys = [
                (s.name, v) for s in self.repository.specs() if s.error is None for v in s.versions
            ]
        return self.statistics.response(keys)

    # -- operator view -----------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """The JSON behind ``GET /v2/modelpool/status`` and ``modelpool status``: workers,
        devices (bytes) and every copy this gateway knows of."""
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
            "devices": [
                dataclasses.asdict(d)
                for d in sorted(self.view.devices.values(), key=lambda d: d.device_id)
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
    def repository_index(self, ready_only: bool = False) -> list[IndexEntry]:
        self.repository.refresh()
        states_of: dict[tuple[str, int], set[CopyState]] = {}
        for c in self.view.all_copies():
            states_of.setdefault((c.model, c.version), set()).add(c.state)
        entries = []
        for spec in self.repository.specs():
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
                    entries.append(
                        IndexEntry(
                            spec.name, str(v), "UNAVAILABLE", "unloaded: loads on first request"
                        )
                    )
        return entries

    async def load_model(self, name: str) -> None:
        """Triton's explicit load: re-read the config, forget a past failure, load now."""
        self.repository.refresh(name)
        spec = self.repository.get(name)
        if spec.error is not None:
            raise ModelNotReady(f"model '{name}' is not available: {spec.error}")
        for v in spec.versions:
            self.manager.failures.pop((name, v), None)
            deadline = Deadline.after(self.acquire_timeout_s, client_set=False)
            got = await self.manager.acquire(name, v, deadline)
            self.manager.release(got)

    async def unload_model(self, name: str) -> None:
        if name not in self.repository.names():
            self.repository.get(name)  # raises ModelNotFound for unknown names
        deadline = Deadline.after(self.infer_timeout_s, client_set=False)
        count = await self.manager.unload_model(name, deadline)
        if count == 0 and name not in self.repository.names():
            raise ModelNotFound(f"model '{name}' is not in the model repository")
