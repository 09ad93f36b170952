"""``modelpool worker``: one process hosting many models on one device, over gRPC.

It speaks Triton's GRPCInferenceService for inference and the repository extension
(so tritonclient can call a worker directly, and the gateway forwards ModelInfer
without re-encoding tensors), plus the JSON control methods of ``gpu.protocol``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import grpc
import torch
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelpool.gpu import execution, protocol, tracing
from modelpool.gpu.accounting import allocator_for
from modelpool.gpu.batching import Batcher, Forward
from modelpool.gpu.host_tier import FAKE_HOST_TIER_ENV
from modelpool.gpu.memory import MemoryProbe, probe_for
from modelpool.gpu.protocol import READY_LINE
from modelpool.gpu.repository import ModelRepository, config_from_json
from modelpool.gpu.runtime import LoadedModel, ModelRuntime
from modelpool.gpu.sources import RepositorySettings
from modelpool.placement.errors import DeadlineExceeded, ModelpoolError, Unavailable

log = logging.getLogger(__name__)

#: gRPC metadata key on a ModelInfer call the gateway sends while the copy's Load RPC
#: is in flight (``gateway.workers.AWAIT_LOAD``): a version not resident yet is waited
#: for, within the call's deadline, instead of answered NOT_READY at once.
AWAIT_LOAD_KEY = "modelpool-await-load"
#: The longest such a call without a deadline waits for its load.
AWAIT_LOAD_CAP_S = 120.0
#: Test hook: seconds every Load waits before loading, so a test can hold a load in
#: flight whatever the machine's speed (tests/test_cold_pipeline.py). Unset: none.
FAKE_LOAD_DELAY_ENV = "MODELPOOL_FAKE_LOAD_DELAY_S"


def grpc_code(err: ModelpoolError) -> grpc.StatusCode:
    """The gRPC status a typed error travels as: the class's own, from the one table in
    placement/errors.py. The class name rides along in the trailing metadata so the
    gateway re-raises the exact type."""
    return grpc.StatusCode[err.grpc_code]


@dataclass(frozen=True)
class WorkerConfig:
    model_repository: str
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 0
    device_memory_budget: int | None = None
    worker_id: str | None = None
    threads: int | None = None
    max_message_bytes: int = 1 << 30
    advertise: str | None = None
    #: Also listen on this Unix socket and advertise it: a gateway on the same host
    #: skips the TCP stack (``modelpool serve`` uses it for its local workers).
    unix_socket: str | None = None
    redis_url: str | None = None
    #: SIGTERM: how long in-flight requests may run before the worker stops anyway.
    drain_timeout_s: float = 30.0
    #: HTTP port for /metrics and the health endpoints (None: none).
    metrics_port: int | None = None
    #: The artifact cache and S3 settings (``--repository-cache``, ``--s3-*``).
    repository_settings: RepositorySettings | None = None
    #: ``--host-memory-budget``: pinned host bytes for copies evicted from the device
    #: (``gpu/host_tier.py``); 0: off. Ignored on CPU.
    host_memory_budget: int = 0


R = TypeVar("R")


class Worker(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, config: WorkerConfig) -> None:

        self.config = config
        self.worker_id = config.worker_id or f"{os.uname().nodename}-{os.getpid()}"
        self.repository = ModelRepository(config.model_repository, config.repository_settings)
        # The environment is read here, once, for a CPU test hook only
        # (MODELPOOL_FAKE_RETAINED_BYTES, see gpu.accounting.FakeRetainedAllocator).
        allocator = allocator_for(torch.device(config.device), os.environ)
        # Likewise MODELPOOL_FAKE_HOST_TIER=1: the host tier on a CPU worker, for tests.
        self.runtime = ModelRuntime(
            self.repository,
            config.device,
            config.threads,
            allocator=allocator,
            host_budget_bytes=config.host_memory_budget,
            fake_host_tier=os.environ.get(FAKE_HOST_TIER_ENV) == "1",
        )
        self.probe: MemoryProbe = probe_for(config.device, config.device_memory_budget)
        # OpenTelemetry: off (None) unless the OTEL_* environment asks (gpu/tracing.py).
        self.tracing = tracing.from_env("worker", os.environ)
        # Loads get their own thread so a long load never queues behind inference.
        self._infer_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, config.threads or 2), thread_name_prefix="infer"
        )
        # Two threads so an unload never waits behind a long load; the runtime still
        # runs the loads themselves one at a time, to measure each one's peak alone.
        self._load_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="load"
        )
        self._load_locks: dict[tuple[str, int], asyncio.Lock] = {}
        self._batchers: dict[tuple[str, int], Batcher] = {}
        #: SIGTERM: not ready, no new loads; inference goes on until the server stops.
        self.draining = False
        self.inflight = 0
        #: Monotonic time of the last inference call, to tell when gateways stopped
        #: routing here after the worker left the registry.
        self.last_call = 0.0
        #: Set, and replaced, whenever the resident set may have changed (a load or an
        #: unload returned): wakes infers that arrived ahead of their load.
        self._resident_changed = asyncio.Event()
        #: Infers that arrived before their load finished and waited for it.
        self.awaited_loads = 0
        self._fake_load_delay_s = float(os.environ.get(FAKE_LOAD_DELAY_ENV) or 0)

    async def _run(self, pool: concurrent.futures.Executor, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    # -- control (JSON) --------------------------------------------------------------
    async def load(self, req: protocol.LoadRequest) -> protocol.LoadResult:
        if self.draining:
            raise Unavailable(
                f"model '{req.model}': worker {self.worker_id} is draining (shutting down); "
                "load it elsewhere"
            )
        key = (req.model, req.version)
        lock = self._load_locks.setdefault(key, asyncio.Lock())
        # The gateway sends a model's config override with every load of it, so this
        # worker reads the model as the gateway does (the runtime re-reads at load).
        override = config_from_json(req.model, req.config_override) if req.config_override else None
        self.repository.set_override(req.model, override)
        async with lock:
            if self._fake_load_delay_s > 0:
                await asyncio.sleep(self._fake_load_delay_s)
            try:
                loaded = await self._run(
                    self._load_pool, self.runtime.load, req.model, req.version, req.known_peak_bytes
                )
                self._start_batcher(loaded)
            finally:
                self._notify_resident()
        return protocol.LoadResult(
            model=req.model,
            version=loaded.version,
            footprint_bytes=loaded.footprint_bytes,
            peak_bytes=loaded.peak_bytes,
            load_seconds=loaded.load_seconds,
            source=loaded.source,
        )

    async def unload(self, req: protocol.UnloadRequest) -> protocol.UnloadResult:
        # The load's lock: a load and an unload of one model never interleave.
        lock = self._load_locks.setdefault((req.model, req.version), asyncio.Lock())
        async with lock:
            done = await self._run(
                self._load_pool, self.runtime.release, req.model, req.version, req.keep
            )
            self._notify_resident()
            batcher = self._batchers.pop((req.model, req.version), None)
            if batcher is not None:
                await batcher.close()
        return protocol.UnloadResult(
            req.model, req.version, done.freed_bytes, done.retained_bytes, done.kept_bytes
        )

    async def close(self) -> None:
        """Stop the batchers and the thread pools; once the server has stopped."""
        batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            await batcher.close()
        self._infer_pool.shutdown(wait=False, cancel_futures=True)
        self._load_pool.shutdown(wait=False, cancel_futures=True)

    async def status(self, _req: object = None) -> protocol.WorkerStatus:
        copies = tuple(
            protocol.CopyStatus(
                model=m.spec.name,
                version=m.version,
                footprint_bytes=m.footprint_bytes,
                peak_bytes=m.peak_bytes,
                load_seconds=m.load_seconds,
                inflight=m.inflight,
                last_used=m.last_used,
                executions=m.executions,
                inferences=m.inferences,
            )
            for m in list(self.runtime.models.values())
        )
        usage = self.runtime.allocator_usage()
        host = self.runtime.host
        host_copies = tuple(
            protocol.HostCopyStatus(e.model, e.version, e.nbytes, e.last_used)
            for e in host.entries()
        )
        return protocol.WorkerStatus(
            worker_id=self.worker_id,
            device=self.config.device,
            pid=os.getpid(),
            memory=self.probe.read(self.runtime.ours_bytes()),
            copies=copies,
            allocated_bytes=usage.allocated_bytes,
            reserved_bytes=usage.reserved_bytes,
            host_copies=host_copies,
            host_budget_bytes=host.budget_bytes,
            host_used_bytes=sum(c.bytes for c in host_copies),
        )

    # -- Triton GRPCInferenceService subset --------------------------------------------
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=not self.draining)

    async def ModelReady(self, request, context):
        version = int(request.version) if request.version else None
        ready = any(
            n == request.name and (version is None or v == version) for n, v in self.runtime.models
        )
        return pb.ModelReadyResponse(ready=ready)

    async def ModelInfer(self, request, context):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            # Answer an expired request before touching the device.
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before compute")
        deadline = None if remaining is None else asyncio.get_running_loop().time() + remaining
        self.last_call = time.monotonic()
        self.inflight += 1
        if (AWAIT_LOAD_KEY, "1") in (context.invocation_metadata() or ()):
            try:
                await self._await_resident(request, deadline)
            except BaseException:
                self.inflight -= 1
                raise
        call = (
            self._infer(request, deadline)
            if self.tracing is None
            else self._traced_infer(request, deadline, context.invocation_metadata())
        )
        try:
            return await self._guard(context, call)
        finally:
            self.inflight -= 1

    def _notify_resident(self) -> None:
        """Wake every infer waiting for its load (``_await_resident``)."""
        self._resident_changed.set()
        self._resident_changed = asyncio.Event()

    def _resident(self, request: pb.ModelInferRequest) -> bool:
        """Whether the copy ``request`` is for is loaded here, as ``runtime.begin``
        would find it."""
        try:
            version = self.runtime.version_of(request)
        except ValueError:
            return True  # not a version: ``_infer`` answers it as it always has
        return (request.model_name, version) in self.runtime.models

    async def _await_resident(self, request: pb.ModelInferRequest, deadline: float | None) -> None:
        """Wait until the request's copy is resident, the deadline (event-loop clock)
        passes (``AWAIT_LOAD_CAP_S`` without one). The gateway sends such an
        infer right after the copy's Load RPC, and the two race on the channel: the
        load may be running or not have arrived yet. Returning without the copy is
        fine: ``_infer`` then answers NOT_READY as it would have at once. A cancelled
        call (the gateway saw the load fail) stops waiting here."""
        if self._resident(request):
            return
        loop = asyncio.get_running_loop()
        started = loop.time()
        # The gateway always sets a deadline (its wait bound for a copy); the cap is
        # for a caller without one, never shorter than what the gateway waits.
        until = deadline if deadline is not None else started + AWAIT_LOAD_CAP_S
        while not self._resident(request):
            changed = self._resident_changed
            left = until - loop.time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)
        self.awaited_loads += 1
        log.info(
            "infer for model=%s version=%s arrived before its load finished; waited %.3fs",
            request.model_name, request.model_version or "latest", loop.time() - started,
        )  # fmt: skip

    async def _traced_infer(
        self, request: pb.ModelInferRequest, deadline: float | None, metadata: Any
    ) -> pb.ModelInferResponse:
        """``_infer`` in the compute span, a child of the gateway's forward span when
        ``metadata`` (the call's) carries its traceparent."""
        assert self.tracing is not None
        with self.tracing.compute(
            metadata, request.model_name, request.model_version, self.worker_id
        ):
            return await self._infer(request, deadline)

    async def settle(self, quiet_s: float = 0.25, limit_s: float = 1.0) -> None:
        """After leaving the registry: serve on until no call came for ``quiet_s``
        (``limit_s`` at most), so a gateway that routed here just before it saw the
        worker leave is answered instead of refused."""
        until = time.monotonic() + limit_s
        # Each sleep ends when the quiet period would, had no call come meanwhile.
        for _ in range(int(limit_s / quiet_s) + 1):
            left = min(until, self.last_call + quiet_s) - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None = None
    ) -> pb.ModelInferResponse:
        """Args:
        deadline: the caller's deadline on the event loop's clock; None: none.
        """
        loaded = self.runtime.begin(request)
        try:
            args = self.runtime.decode(loaded.spec, request)
            tensors, ran = await self._compute(loaded, args, deadline)
            encoding = time.monotonic()
            response = self.runtime.encode(loaded, request, tensors)
            # Which forward it was, for the gateway's execution_count and batch_stats.
            output_s = time.monotonic() - encoding
            execution.write(response, replace(ran, output_s=output_s))
            return response
        finally:
            self.runtime.end(loaded)

    async def _compute(
        self, loaded: LoadedModel, args: list[torch.Tensor], deadline: float | None
    ) -> tuple[list[torch.Tensor], execution.Execution]:
        """The forward, through the model's dynamic batcher if it has one, and the
        execution it ran in.

        Raises:
            DeadlineExceeded: ``deadline`` passed while the request waited for a batch
                or a free inference thread. A request still queued then is dropped
                before compute; one whose forward already started is answered at the
                deadline and its result discarded.
        """
        batcher = self._batchers.get((loaded.spec.name, loaded.version))
        try:
            # Cancelling the wait cancels the queued work: the batcher leaves cancelled
            # requests out of its next batch, the pool drops a future not yet started.
            async with asyncio.timeout_at(deadline) as scope:
                if batcher is None:
                    return await self._run(
                        self._infer_pool, self._forward_alone, loaded, args, time.monotonic()
                    )
                return await batcher.submit_timed(args)
        except TimeoutError:
            if not scope.expired():
                raise  # raised inside the wait, not our deadline
            raise DeadlineExceeded(
                f"model '{loaded.spec.name}': deadline passed while the request waited "
                f"{'for a batch' if batcher is not None else 'for an inference thread'}"
            ) from None

    def _forward_alone(
        self, loaded: LoadedModel, args: list[torch.Tensor], submitted: float
    ) -> tuple[list[torch.Tensor], execution.Execution]:
        """An unbatched forward, timed on its thread: the wait for a free thread
        (since ``submitted``, monotonic) is queueing, not compute."""
        started = time.monotonic()
        outputs = self.runtime.forward(loaded, args)
        infer_s = time.monotonic() - started
        rows = int(args[0].shape[0]) if loaded.spec.max_batch_size > 0 and args else 1
        return outputs, execution.Execution(rows, True, started - submitted, infer_s)

    def _start_batcher(self, loaded: LoadedModel) -> None:
        """Triton's dynamic batching, for models whose config asks for it."""
        spec = loaded.spec
        key = (spec.name, loaded.version)
        if (
            key in self._batchers
            or spec.max_batch_size <= 0
            or not spec.config.HasField("dynamic_batching")
            # BYTES are List[str] in forward(): no tensor to concatenate or split.
            or any(t.datatype == "BYTES" for t in (*spec.inputs, *spec.outputs))
        ):
            return
        delay_s = spec.config.dynamic_batching.max_queue_delay_microseconds / 1e6
        name, version = key

        # The copy is looked up per batch, not captured: the batcher outlives the
        # runtime's unload by a moment, and a captured copy would keep the module's
        # memory alive through the unload's measurement of what came back.
        def forward(args: list[torch.Tensor]) -> list[torch.Tensor]:
            return self.runtime.forward(self.runtime.get(name, version), args)

        async def run(fn: Forward, args: list[torch.Tensor]) -> list[torch.Tensor]:
            return await self._run(self._infer_pool, fn, args)

        self._batchers[key] = Batcher(spec.name, forward, run, spec.max_batch_size, delay_s)

    async def RepositoryModelLoad(self, request, context):
        await self._guard(context, self.load(protocol.LoadRequest(request.model_name, 0)))
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        for name, version in [k for k in self.runtime.models if k[0] == request.model_name]:
            await self._guard(context, self.unload(protocol.UnloadRequest(name, version)))
        return pb.RepositoryModelUnloadResponse()

    async def RepositoryIndex(self, request, context):
        resp = pb.RepositoryIndexResponse()
        for name, version in sorted(self.runtime.models):
            resp.models.add(name=name, version=str(version), state="READY")
        return resp

    async def _guard(self, context: grpc.aio.ServicerContext, call: Awaitable[R]) -> R:
        """Run ``call``; a typed error becomes a gRPC status carrying its class name."""
        try:
            return await call
        except ModelpoolError as e:
            await context.abort(
                grpc_code(e),
                e.message,
                trailing_metadata=((protocol.ERROR_CLASS_KEY, type(e).__name__),),
            )
            raise  # unreachable: abort raises

    def control_handler(self) -> grpc.GenericRpcHandler:
        def unary(fn: Callable[[Any], Awaitable[Any]], req_cls: type) -> grpc.RpcMethodHandler:
            async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._guard(context, fn(request))

            return grpc.unary_unary_rpc_method_handler(
                handle,
                request_deserializer=protocol.decoder(req_cls),
                response_serializer=protocol.encode,
            )

        return grpc.method_handlers_generic_handler(
            protocol.SERVICE,
            {
                "Load": unary(self.load, protocol.LoadRequest),
                "Unload": unary(self.unload, protocol.UnloadRequest),
                "Status": unary(self.status, dict),
            },
        )


def _exit_with_parent() -> None:
    """Die with the supervisor: a gateway killed -9 must not leave workers behind."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:
        os._exit(0)


#: Runs beside the worker's server once it listens, given the worker and the address
#: gateways should dial (the residency announcer, when a shared store is configured).
Companion = Callable[["Worker", str], Coroutine[Any, Any, None]]


async def serve_worker(
    config: WorkerConfig, exit_with_parent: bool = False, companion: Companion | None = None
) -> None:
    if exit_with_parent:
        _exit_with_parent()
    worker = Worker(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
    ]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(worker, server)
    server.add_generic_rpc_handlers((worker.control_handler(),))
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise SystemExit(f"worker: cannot listen on {config.host}:{config.port}")
    # What other hosts dial (the registry); a local supervisor dials the socket.
    published = advertised_address(config.advertise or config.host, port)
    address = published
    if config.unix_socket:
        if server.add_insecure_port(f"unix:{config.unix_socket}") == 0:
            raise SystemExit(f"worker: cannot listen on unix:{config.unix_socket}")
        address = f"unix:{config.unix_socket}"
    await server.start()
    http = None
    metrics = ""
    if config.metrics_port is not None:
        from modelpool.gpu.worker_http import serve_http

        http, bound = await serve_http(worker, config.host, config.metrics_port)
        metrics = f" metrics={bound}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("worker %s serving on %s device=%s", worker.worker_id, published, config.device)
    # The supervisor reads this line to learn the addresses and the id.
    print(
        f"{READY_LINE} address={address} worker_id={worker.worker_id} pid={os.getpid()} "
        f"tcp={config.host}:{port} advertise={published}{metrics}",
        flush=True,
    )
    started = time.monotonic()
    side = asyncio.create_task(companion(worker, published)) if companion is not None else None
    await stop.wait()
    # Drain: not ready and no new loads at once; the copies leave the registry (the
    # companion deregisters when cancelled) before the worker stops serving them.
    worker.draining = True
    log.info(
        "worker %s draining: %d request(s) in flight, up to %.0fs",
        worker.worker_id,
        worker.inflight,
        config.drain_timeout_s,
    )
    if side is not None:
        side.cancel()
        await asyncio.gather(side, return_exceptions=True)
        await worker.settle()
    # New calls are refused from here; those running get the rest of the drain time.
    await server.stop(grace=config.drain_timeout_s)
    if http is not None:
        await http.cleanup()
    log.info("worker %s stopped after %.0fs", worker.worker_id, time.monotonic() - started)
    await worker.close()


#: Addresses that mean "every interface": never dialable, so never advertised.
WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})


def advertised_address(host: str, port: int) -> str:
    """The HOST:PORT other hosts dial: ``host`` as given when it names a port
    (``--advertise HOST:PORT``), else with the bound ``port``; a wildcard listen
    address becomes this host's name (resolvable on most networks; pass ``--advertise``
    where it is not, e.g. a pod IP)."""
    if host.startswith("unix:"):
        return host
    name, _, tail = host.rpartition("]") if host.startswith("[") else ("", "", host)
    if ":" in tail and (name or tail.count(":") == 1):
        return host
    if host in WILDCARDS:
        host = socket.getfqdn()
    return f"{host}:{port}"
