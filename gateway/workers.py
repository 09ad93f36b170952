"""Persistent gRPC channels to workers, with deadlines and error translation.

A grpc ``AioRpcError`` never leaves this module: a worker's typed failure comes back as
the same ``placement.errors`` class (its name rides in trailing metadata), and a lost
connection becomes ``WorkerUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

import modelpool.placement.errors as errors
from modelpool.gpu import protocol

log = logging.getLogger(__name__)

#: Codes that mean the connection, not the call, failed. UNKNOWN is not one of them:
#: it is an unexpected exception inside a live worker, a bug to report as such, not a
#: reason to believe the worker gone.
_CONNECTION_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
}


def translate(
    err: grpc.aio.AioRpcError, worker_id: str, what: str, timeout_s: float | None = None
) -> errors.ModelpoolError:
    """The typed error a worker's gRPC status stands for. A call that ran out of its
    ``timeout_s`` is a DeadlineExceeded: the caller chose that time (the request's own
    deadline, or the server's bound for the step)."""
    name = dict(err.trailing_metadata() or ()).get(protocol.ERROR_CLASS_KEY)
    cls = getattr(errors, str(name), None) if name else None
    if isinstance(cls, type) and issubclass(cls, errors.ModelpoolError):
        return cls(err.details() or what)
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout_s:.3g}s" if timeout_s is not None else ""
        return errors.DeadlineExceeded(f"{what}: worker {worker_id} did not answer{within}")
    if err.code() in _CONNECTION_CODES:
        return errors.WorkerUnavailable(
            f"{what}: worker {worker_id} is unreachable ({err.code().name})"
        )
    return errors.ModelpoolError(
        f"{what}: worker {worker_id} failed: {err.code().name} {err.details()}"
    )


#: The longest timeout handed to grpc for one worker call: a day.
MAX_CALL_TIMEOUT_S = 86_400.0

#: Metadata on an infer sent while the copy's Load RPC is still in flight: the worker
#: waits for the load (within the call's deadline) instead of answering NOT_READY.
#: The key is ``gpu.worker.AWAIT_LOAD_KEY``; spelled here so the gateway never
#: imports the worker (torch).
AWAIT_LOAD: tuple[str, str] = ("modelpool-await-load", "1")


class WorkerClient:
    def __init__(self, worker_id: str, address: str, max_message_bytes: int = 1 << 30) -> None:
        self.worker_id = worker_id
        self.address = address
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Local workers restart on another port under the same id only after a
                # new client is made; keep reconnect attempts quick meanwhile.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ],
        )
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        # The same method without (de)serializers: bytes the gateway already has go
        # out as they are, and replies come back unparsed for gRPC clients.
        self._infer_raw = self.channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        self._load = self.channel.unary_unary(
            protocol.LOAD,
            request_serializer=protocol.encode,
            response_deserializer=protocol.decoder(protocol.LoadResult),
        )
        self._unload = self.channel.unary_unary(
            protocol.UNLOAD,
            request_serializer=protocol.encode,
            response_deserializer=protocol.decoder(protocol.UnloadResult),
        )
        self._status = self.channel.unary_unary(
            protocol.STATUS,
            request_serializer=lambda _: b"{}",
            response_deserializer=protocol.decoder(protocol.WorkerStatus),
        )

    async def _call(
        self,
        what: str,
        method: Any,
        request: Any,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> Any:
        # grpc reads a timeout past ~4e9 s as already expired; a client may ask for more.
        timeout_s = min(timeout_s, MAX_CALL_TIMEOUT_S)
        try:
            return await method(request, timeout=timeout_s, metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise translate(e, self.worker_id, what, timeout_s) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise  # this caller was cancelled
            # The call itself was: its channel closed under it (the worker was dropped
            # or restarted elsewhere). Raised as is, a server handler's CancelledError
            # would end the client's RPC with no status at all, and the client would
            # wait out its whole deadline.
            raise errors.WorkerUnavailable(
                f"{what}: worker {self.worker_id}'s channel closed during the call"
            ) from None
        except grpc.aio.UsageError:  # the channel was closed: its worker was replaced
            raise errors.WorkerUnavailable(
                f"{what}: worker {self.worker_id}'s channel is closed"
            ) from None

    async def infer(
        self,
        request: pb.ModelInferRequest,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> pb.ModelInferResponse:
        """``metadata``: the trace context (``traceparent``) when tracing is on, and
        ``AWAIT_LOAD`` when the copy is still loading."""
        return await self._call(
            f"model '{request.model_name}'", self.stub.ModelInfer, request, timeout_s, metadata
        )

    async def infer_raw(
        self,
        model: str,
        request: bytes,
        timeout_s: float,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> bytes:
        return await self._call(f"model '{model}'", self._infer_raw, request, timeout_s, metadata)

    async def load(
        self,
        model: str,
        version: int,
        timeout_s: float,
        known_peak_bytes: int = 0,
        config_override: str = "",
    ) -> protocol.LoadResult:
        return await self._call(
            f"model '{model}' load",
            self._load,
            protocol.LoadRequest(model, version, known_peak_bytes, config_override),
            timeout_s,
        )

    async def unload(
        self, model: str, version: int, timeout_s: float, keep: bool = False
    ) -> protocol.UnloadResult:
        """``keep``: ask the worker to demote the copy to its host tier (if on)."""
        return await self._call(
            f"model '{model}' unload",
            self._unload,
            protocol.UnloadRequest(model, version, keep),
            timeout_s,
        )

    async def status(self, timeout_s: float) -> protocol.WorkerStatus:
        return await self._call("status", self._status, None, timeout_s)

    async def close(self) -> None:
        await self.channel.close(grace=None)


class WorkerClients:
    """One client per worker id, made on first use from the worker's address."""

    def __init__(self, max_message_bytes: int = 1 << 30) -> None:
        self._clients: dict[str, WorkerClient] = {}
        self.max_message_bytes = max_message_bytes
        #: worker id -> (registered address, address dialed instead): a local worker's
        #: Unix socket, while the store holds the address other hosts dial.
        self._local: dict[str, tuple[str, str]] = {}

    def dial_locally(self, worker_id: str, registered: str, local: str) -> None:
        self._local[worker_id] = (registered, local)

    def get(self, worker_id: str, address: str) -> WorkerClient:
        override = self._local.get(worker_id)
        if override is not None and override[0] == address:
            address = override[1]
        client = self._clients.get(worker_id)
        if client is None or client.address != address:
            if client is not None:
                self._retire(client)
            client = WorkerClient(worker_id, address, self.max_message_bytes)
            self._clients[worker_id] = client
        return client

    def drop(self, worker_id: str) -> None:
        client = self._clients.pop(worker_id, None)
        if client is not None:
            self._retire(client)

    def _retire(self, client: WorkerClient) -> None:
        asyncio.get_running_loop().create_task(client.close())

    async def close(self) -> None:
        for client in list(self._clients.values()):
            await client.close()
        self._clients.clear()
