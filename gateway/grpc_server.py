"""KServe v2 gRPC (Triton's GRPCInferenceService) on grpc.aio. Each method converts
protobuf to a DataPlane call and back; typed errors map to status codes here.

Credentials: metadata ``authorization: Bearer KEY`` (tritonclient's ``headers=``).
Every method but ServerLive, ServerReady and ServerMetadata resolves the caller with
``_tenant`` first and passes it on.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelpool.gateway import streaming
from modelpool.gateway.dataplane import DataPlane
from modelpool.gateway.errors import retry_after, status_of
from modelpool.gateway.routing import RouteHints
from modelpool.gateway.settings import (
    log_changes_from_grpc,
    log_grpc,
    trace_changes_from_grpc,
    trace_grpc,
)
from modelpool.gateway.shm import CUDA_UNSUPPORTED
from modelpool.gateway.tenants import Tenant
from modelpool.gateway.validate import client_timeout, grpc_timeout_parameter, parsed_or_deferred
from modelpool.gpu.repository import clip
from modelpool.placement.errors import InvalidInput, ModelpoolError

log = logging.getLogger(__name__)

T = TypeVar("T")


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self.dp = dataplane

    async def _guard(self, context: grpc.aio.ServicerContext, call: Awaitable[T]) -> T:
        """Await ``call``; a typed error becomes its status code (Retry-After in the
        trailing metadata for 503s), anything else an INTERNAL that is logged as a bug."""
        try:
            return await call
        except ModelpoolError as e:
            _, code = status_of(e)
            after = retry_after(e)
            trailing = (("retry-after", str(max(1, round(after)))),) if after is not None else ()
            await context.abort(code, e.message, trailing_metadata=trailing)
            raise
        except Exception:
            log.exception("bug: unhandled error in gRPC call")
            await context.abort(
                grpc.StatusCode.INTERNAL, "internal error (a bug): see the gateway log"
            )
            raise

    def _tenant(
        self, context: grpc.aio.ServicerContext, action: str, model: str | None = None
    ) -> Tenant | None:
        """The caller, from metadata ``authorization: Bearer KEY``; None when auth is
        off. Raises Unauthenticated for a missing or unknown key (call it under
        ``_guard``)."""
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                authorization = value if isinstance(value, str) else None
                break
        return self.dp.authenticate(
            authorization, action=action, model=model, source=context.peer() or ""
        )

    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.dp.live())

    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.dp.server_ready())

    async def ServerMetadata(self, request, context):
        return self.dp.server_metadata()

    async def ModelReady(self, request, context):
        def check() -> pb.ModelReadyResponse:
            tenant = self._tenant(context, "ready", request.name)
            self.dp.check_known(request.name, request.version, tenant)
            ready = self.dp.model_ready(request.name, request.version, tenant=tenant)
            return pb.ModelReadyResponse(ready=ready)

        return await self._guard(context, _call(check))

    async def ModelMetadata(self, request, context):
        def metadata() -> pb.ModelMetadataResponse:
            tenant = self._tenant(context, "metadata", request.name)
            return self.dp.model_metadata(request.name, request.version, tenant=tenant)

        return await self._guard(context, _call(metadata))

    async def ModelConfig(self, request, context):
        def config() -> pb.ModelConfigResponse:
            tenant = self._tenant(context, "config", request.name)
            return pb.ModelConfigResponse(
                config=self.dp.model_config(request.name, request.version, tenant=tenant)
            )

        return await self._guard(context, _call(config))

    async def ModelInfer(self, data: bytes, context) -> bytes:
        """Bytes in, bytes out: a request that needs no rewriting goes to the worker as
        it came, and the worker's reply comes back unparsed (see ``service_handler``).

        The request's time is the smaller of the client's gRPC deadline and Triton's
        ``timeout`` request parameter (int64_param, microseconds; what tritonclient's
        ``infer(timeout=...)`` sends); a malformed parameter is INVALID_ARGUMENT.
        """
        # Before parsing: an unknown caller costs no more than the lookup of its key.
        tenant = await self._guard(context, _call(self._tenant, context, "infer"))
        # Parsed before the data plane is called, as the deadline rides in the request;
        # one that fails to parse still goes through ``dp.infer`` to be counted.
        source, timeout_s = parsed_or_deferred(lambda: _parse_infer(data, context))
        outcome = await self._guard(
            context,
            self.dp.infer(
                source,
                protocol="grpc",
                raw=data,
                client_timeout_s=timeout_s,
                tenant=tenant,
                route=RouteHints.from_pairs(context.invocation_metadata() or ()),
                trace=context.invocation_metadata(),
            ),
        )
        return outcome.raw_response()

    async def ModelStreamInfer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Triton's bidirectional stream for ordinary models (gateway/streaming.py): one
        reply per request, in request order; a failed request is answered with its
        ``error_message`` and the stream goes on. The caller is authenticated once, from
        the stream's metadata; each request then goes through ``dp.infer`` like a unary
        ModelInfer (limits, validation, its own ``timeout`` parameter, and what is left
        of the stream's deadline)."""
        tenant = await self._guard(context, _call(self._tenant, context, "infer"))
        hints = RouteHints.from_pairs(context.invocation_metadata() or ())
        carrier = context.invocation_metadata()  # the stream's traceparent, if any

        async def one(data: bytes) -> bytes:
            source, timeout_s = parsed_or_deferred(lambda: _parse_infer(data, context))
            request = source if isinstance(source, pb.ModelInferRequest) else None
            final = streaming.wants_final_flag(request)
            try:
                outcome = await self.dp.infer(
                    source,
                    protocol="grpc",
                    raw=data,
                    client_timeout_s=timeout_s,
                    tenant=tenant,
                    route=hints,
                    trace=carrier,
                )
            except ModelpoolError as e:
                return streaming.error_reply(e.message, request, final)
            except Exception:
                log.exception("bug: unhandled error in a ModelStreamInfer request")
                return streaming.error_reply(
                    "internal error (a bug): see the gateway log", request, final
                )
            return streaming.reply(outcome.raw_response(), final)

        async for reply in streaming.ordered(requests, one):
            yield reply

    async def SystemSharedMemoryRegister(self, request, context):
        def register() -> pb.SystemSharedMemoryRegisterResponse:
            tenant = self._tenant(context, "shm_register")
            self.dp.shm_register(
                request.name, request.key, request.offset, request.byte_size, tenant=tenant
            )
            return pb.SystemSharedMemoryRegisterResponse()

        return await self._guard(context, _call(register))

    async def SystemSharedMemoryStatus(self, request, context):
        def status() -> pb.SystemSharedMemoryStatusResponse:
            tenant = self._tenant(context, "shm_status")
            resp = pb.SystemSharedMemoryStatusResponse()
            for r in self.dp.shm_status(request.name, tenant=tenant):
                resp.regions[r.name].CopyFrom(
                    pb.SystemSharedMemoryStatusResponse.RegionStatus(
                        name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size
                    )
                )
            return resp

        return await self._guard(context, _call(status))

    async def SystemSharedMemoryUnregister(self, request, context):
        def unregister() -> pb.SystemSharedMemoryUnregisterResponse:
            tenant = self._tenant(context, "shm_unregister")
            self.dp.shm_unregister(request.name, tenant=tenant)
            return pb.SystemSharedMemoryUnregisterResponse()

        return await self._guard(context, _call(unregister))

    async def _no_cuda_shm(self, context: grpc.aio.ServicerContext) -> None:
        await self._guard(context, _call(self._tenant, context, "cuda_shm"))
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, CUDA_UNSUPPORTED)

    async def CudaSharedMemoryRegister(self, request, context):
        await self._no_cuda_shm(context)

    async def CudaSharedMemoryStatus(self, request, context):
        await self._no_cuda_shm(context)

    async def CudaSharedMemoryUnregister(self, request, context):
        await self._no_cuda_shm(context)

    async def ModelStatistics(self, request, context):
        def statistics() -> pb.ModelStatisticsResponse:
            tenant = self._tenant(context, "statistics", request.name or None)
            return self.dp.model_statistics(
                request.name, request.version, tenant=tenant, source=context.peer() or ""
            )

        return await self._guard(context, _call(statistics))

    async def RepositoryIndex(self, request, context):
        def index() -> pb.RepositoryIndexResponse:
            tenant = self._tenant(context, "index")
            resp = pb.RepositoryIndexResponse()
            for e in self.dp.repository_index(request.ready, tenant=tenant):
                resp.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
            return resp

        return await self._guard(context, _call(index))

    async def RepositoryModelLoad(self, request, context):
        async def load() -> None:
            tenant = self._tenant(context, "load", request.model_name)
            config = None
            if "config" in request.parameters:
                param = request.parameters["config"]
                if param.WhichOneof("parameter_choice") != "string_param":
                    raise InvalidInput(
                        f"model '{clip(request.model_name)}' load: parameter 'config' must "
                        "be a string_param holding the model config as JSON"
                    )
                config = param.string_param
            await self.dp.load_model(
                request.model_name, tenant=tenant, source=context.peer() or "", config=config
            )

        await self._guard(context, load())
        return pb.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        async def unload() -> None:
            tenant = self._tenant(context, "unload", request.model_name)
            await self.dp.unload_model(
                request.model_name, tenant=tenant, source=context.peer() or ""
            )

        await self._guard(context, unload())
        return pb.RepositoryModelUnloadResponse()

    async def LogSettings(self, request, context):
        """Triton's logging extension (an admin call): no settings reads them."""

        def settings() -> pb.LogSettingsResponse:
            tenant = self._tenant(context, "log_settings")
            source = context.peer() or ""
            if request.settings:
                changes = log_changes_from_grpc(request)
                return log_grpc(self.dp.update_log_settings(changes, tenant=tenant, source=source))
            return log_grpc(self.dp.log_settings(tenant=tenant, source=source))

        return await self._guard(context, _call(settings))

    async def TraceSetting(self, request, context):
        """Triton's trace extension (an admin call): settings stored, no tracing."""

        def settings() -> pb.TraceSettingResponse:
            tenant = self._tenant(context, "trace_settings", request.model_name or None)
            source = context.peer() or ""
            if request.settings:
                changes = trace_changes_from_grpc(request)
                values = self.dp.update_trace_settings(
                    request.model_name, changes, tenant=tenant, source=source
                )
            else:
                values = self.dp.trace_settings(request.model_name, tenant=tenant, source=source)
            return trace_grpc(values)

        return await self._guard(context, _call(settings))


async def _call(fn, *args):
    return fn(*args)


def _parse_infer(
    data: bytes, context: grpc.aio.ServicerContext
) -> tuple[pb.ModelInferRequest, float | None]:
    """A ModelInferRequest and the time its client gave it: the smaller of the call's
    gRPC deadline and the request's ``timeout`` parameter."""
    request = _decode(pb.ModelInferRequest, data)
    remaining = context.time_remaining()  # None: the client set no deadline
    deadline_s = max(0.0, remaining) if remaining is not None else None
    return request, client_timeout(deadline_s, grpc_timeout_parameter(request))


M = TypeVar("M", bound=Message)


def _decode(cls: type[M], data: bytes) -> M:
    """Parse a request; bytes that are not one are the client's error (grpc.aio would
    answer UNKNOWN for a deserializer that raises)."""
    try:
        return cls.FromString(data)
    except DecodeError as e:
        raise InvalidInput(f"{cls.DESCRIPTOR.name} does not parse: {e}") from None


def _decoding(
    servicer: InferenceServicer, name: str, cls: type[Message]
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Any]]:
    """``servicer.<name>`` taking raw bytes, parsed under the servicer's error guard."""
    method = getattr(servicer, name)

    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> Any:
        request = await servicer._guard(context, _call(_decode, cls, data))
        return await method(request, context)

    return handle


def service_handler(servicer: InferenceServicer) -> grpc.GenericRpcHandler:
    """GRPCInferenceService with every method the servicer implements; ModelInfer and
    ModelStreamInfer take and return raw bytes so the gateway forwards without
    re-encoding. Methods it lacks answer UNIMPLEMENTED, as in Triton without those
    extensions (CUDA shared memory answers it with a message of its own)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        impl = getattr(type(servicer), method.name, None)
        base = getattr(pb_grpc.GRPCInferenceServiceServicer, method.name, None)
        if method.name == "ModelStreamInfer" and impl is not None and impl is not base:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(servicer.ModelStreamInfer)
            continue
        if impl is None or impl is base or method.client_streaming or method.server_streaming:
            continue
        if method.name == "ModelInfer":
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(servicer.ModelInfer)
            continue
        request_cls = message_factory.GetMessageClass(method.input_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            _decoding(servicer, method.name, request_cls),
            response_serializer=lambda m: m.SerializeToString(),
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def create_grpc_server(
    dataplane: DataPlane, address: str, max_message_bytes: int
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max(max_message_bytes, 1 << 30)),
        ]
    )
    server.add_generic_rpc_handlers((service_handler(InferenceServicer(dataplane)),))
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, port
