"""Triton's ModelStreamInfer for ordinary (not decoupled) models: a bidirectional gRPC
stream of ModelInferRequests, answered with exactly one ModelStreamInferResponse per
request, in the order the requests came.

Requests of one stream run concurrently (at most ``MAX_PENDING`` at a time, each
through the same ``DataPlane.infer`` as a unary ModelInfer) and their replies are sent
in request order: a slow request holds back the replies behind it, never reorders
them. A request that fails is answered with ``error_message`` and the stream goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from tritonclient.grpc import service_pb2 as pb

#: Requests of one stream in flight at once; the stream reads no further until the
#: oldest is answered, so a client that never reads replies cannot pile up work.
MAX_PENDING = 16
#: Triton's request parameter asking for ``triton_final_response`` on each reply.
EMPTY_FINAL = "triton_enable_empty_final_response"
FINAL = "triton_final_response"

T = TypeVar("T")
R = TypeVar("R")

#: ModelStreamInferResponse.infer_response: field 2, length-delimited.
_INFER_RESPONSE_TAG = b"\x12"
_FINAL_PARAMETER = pb.ModelInferResponse(
    parameters={FINAL: pb.InferParameter(bool_param=True)}
).SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def wants_final_flag(request: pb.ModelInferRequest | None) -> bool:
    """Whether the client asked (``enable_empty_final_response=True`` in tritonclient)
    to have each reply marked with ``triton_final_response``; a model that is not
    decoupled answers once, so its one reply is the final one."""
    if request is None or EMPTY_FINAL not in request.parameters:
        return False
    return request.parameters[EMPTY_FINAL].bool_param


def reply(raw_response: bytes, final_flag: bool = False) -> bytes:
    """A ModelStreamInferResponse around a worker's serialized ModelInferResponse,
    without parsing it: the embedded message is written as the field's bytes (and
    the final flag appended to them: a parser merges map entries it reads later)."""
    body = raw_response + _FINAL_PARAMETER if final_flag else raw_response
    return _INFER_RESPONSE_TAG + _varint(len(body)) + body


def error_reply(message: str, request: pb.ModelInferRequest | None, final_flag: bool) -> bytes:
    """A ModelStreamInferResponse for a request that failed: the message, and the
    request's model and id so a client can tell which one."""
    response = pb.ModelInferResponse()
    if request is not None:
        response.model_name = request.model_name
        response.model_version = request.model_version
        response.id = request.id
    if final_flag:
        response.parameters[FINAL].bool_param = True
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=response
    ).SerializeToString()


async def ordered(
    requests: AsyncIterator[T],
    handle: Callable[[T], Awaitable[R]],
    limit: int = MAX_PENDING,
) -> AsyncIterator[R]:
    """``handle(request)`` for each request, up to ``limit`` at once, results yielded
    in request order. ``handle`` should answer errors rather than raise them: one
    that raises ends the stream.

    Timeline (limit 2)::

        t0 read r1 -> task h1        t1 read r2 -> task h2     t2 read r3: waits for room
        t3 h2 done (kept)            t4 h1 done -> yield h1, room for r3 -> task h3
        t5 yield h2 (already done)   t6 h3 done -> yield h3; requests end -> stop

    Cancellation (the client went away, or the server stops) cancels the reader and
    every task not yet answered.
    """
    queue: asyncio.Queue[asyncio.Future[R] | None] = asyncio.Queue()
    room = asyncio.Semaphore(limit)

    async def read() -> None:
        try:
            async for request in requests:
                await room.acquire()
                queue.put_nowait(asyncio.ensure_future(handle(request)))
        finally:
            queue.put_nowait(None)  # never blocks: the queue is unbounded

    reader = asyncio.ensure_future(read())
    try:
        while (task := await queue.get()) is not None:
            try:
                result = await task
            finally:
                room.release()
            yield result
        await reader  # what ended the reading, if not the end of the requests
    finally:
        reader.cancel()
        while not queue.empty():
            pending = queue.get_nowait()
            if pending is not None:
                pending.cancel()
