"""ModelStreamInfer through the real ``modelpool serve`` with tritonclient's streaming
API (``start_stream`` / ``async_stream_infer`` / ``stop_stream``, and the asyncio
client's ``stream_infer``): one reply per request in request order (a slow request
ahead of fast ones included), errors answered in the stream without ending it, the
caller's key from the stream's metadata, Triton's final-response flag, and a
request's own timeout."""

from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import yaml
from tritonclient.utils import InferenceServerException

from modelpool.gateway.streaming import ordered
from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized, write_slow

FAST, SLOW = "double", "slow"  # y = 2x, x FP32 [-1, 4] (slow also takes iters INT64 [-1, 1])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str]]]:
    root = tmp_path_factory.mktemp("stream")
    write_sized(root / "models", FAST, 4096)
    write_slow(root / "models", SLOW, 4096)
    key = new_key()
    config = root / "auth.yaml"
    config.write_text(
        yaml.safe_dump({"tenants": [{"name": "acme", "keys": [hash_key(key)], "models": ["*"]}]})
    )
    s = start_serve(
        root / "models", root / "serve.log", "--auth-config", str(config),
        "--device-memory-budget", "256MB",
    )  # fmt: skip
    yield s, {"authorization": f"Bearer {key}"}
    s.stop()


def _inputs(x: np.ndarray, iters: int | None = None) -> list[tgrpc.InferInput]:
    t = tgrpc.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    if iters is None:
        return [t]
    n = tgrpc.InferInput("iters", [x.shape[0], 1], "INT64")
    n.set_data_from_numpy(np.full((x.shape[0], 1), iters, dtype=np.int64))
    return [t, n]


class Replies:
    """The stream's callback: every (result, error) in the order they arrived."""

    def __init__(self) -> None:
        self.q: queue.Queue[tuple[Any, Any]] = queue.Queue()

    def __call__(self, result: Any, error: Any) -> None:
        self.q.put((result, error))

    def take(self, n: int) -> list[tuple[Any, Any]]:
        return [self.q.get(timeout=120) for _ in range(n)]


def _x(i: int) -> np.ndarray:
    return np.full((1, 4), float(i), dtype=np.float32)


def test_replies_come_in_request_order_one_each(served) -> None:
    s, headers = served
    client = tgrpc.InferenceServerClient(s.grpc_url)
    replies = Replies()
    client.start_stream(replies, headers=headers)
    try:
        # A slow request first: the fast ones behind it may finish first, but their
        # replies must wait for it.
        plan: list[tuple[str, int | None]] = [(SLOW, 300), *[(FAST, None)] * 6, (SLOW, 50)]
        plan += [(FAST, None)] * 4
        for i, (model, iters) in enumerate(plan):
            client.async_stream_infer(model, _inputs(_x(i), iters), request_id=f"r{i}")
        got = replies.take(len(plan))
    finally:
        client.stop_stream()
        client.close()
    assert [e for _, e in got] == [None] * len(plan)
    assert [r.get_response().id for r, _ in got] == [f"r{i}" for i in range(len(plan))]
    for i, (r, _) in enumerate(got):
        np.testing.assert_array_equal(r.as_numpy("y"), _x(i) * 2)
    assert replies.q.empty()  # exactly one reply each


def test_a_failed_request_is_answered_in_the_stream_which_goes_on(served) -> None:
    s, headers = served
    client = tgrpc.InferenceServerClient(s.grpc_url)
    replies = Replies()
    client.start_stream(replies, headers=headers)
    try:
        client.async_stream_infer(FAST, _inputs(_x(1)), request_id="ok-1")
        bad = tgrpc.InferInput("x", [1, 3], "FP32")  # the model takes [-1, 4]
        bad.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        client.async_stream_infer(FAST, [bad], request_id="bad-shape")
        client.async_stream_infer("no-such-model", _inputs(_x(2)), request_id="missing")
        # Triton's timeout parameter (microseconds): 1 us has passed before any work.
        client.async_stream_infer(SLOW, _inputs(_x(3), 10), request_id="late", timeout=1)
        client.async_stream_infer(FAST, _inputs(_x(4)), request_id="ok-2")
        got = replies.take(5)
    finally:
        client.stop_stream()
        client.close()
    (r1, e1), (_, e2), (_, e3), (_, e4), (r5, e5) = got
    assert e1 is None and r1.get_response().id == "ok-1"
    np.testing.assert_array_equal(r1.as_numpy("y"), _x(1) * 2)
    assert isinstance(e2, InferenceServerException)
    assert f"model '{FAST}'" in e2.message() and "input 'x'" in e2.message()
    assert "no-such-model" in e3.message() and "not in the model repository" in e3.message()
    assert "deadline" in e4.message().lower() or "timed out" in e4.message().lower(), e4
    assert e5 is None and r5.get_response().id == "ok-2"
    np.testing.assert_array_equal(r5.as_numpy("y"), _x(4) * 2)


def test_final_response_flag_when_asked(served) -> None:
    s, headers = served
    client = tgrpc.InferenceServerClient(s.grpc_url)
    replies = Replies()
    client.start_stream(replies, headers=headers)
    try:
        client.async_stream_infer(FAST, _inputs(_x(1)), enable_empty_final_response=True)
        client.async_stream_infer(FAST, _inputs(_x(2)))
        (r1, e1), (r2, e2) = replies.take(2)
    finally:
        client.stop_stream()
        client.close()
    assert e1 is None and e2 is None
    assert r1.get_response().parameters["triton_final_response"].bool_param is True
    np.testing.assert_array_equal(r1.as_numpy("y"), _x(1) * 2)
    assert "triton_final_response" not in r2.get_response().parameters


def test_stream_needs_a_key(served) -> None:
    s, _ = served
    client = tgrpc.InferenceServerClient(s.grpc_url)
    replies = Replies()
    client.start_stream(replies, headers={"authorization": "Bearer not-a-key"})
    try:
        # Refused as the stream opens, before any request is read.
        ((result, error),) = replies.take(1)
        with pytest.raises(InferenceServerException, match="no longer in valid state"):
            client.async_stream_infer(FAST, _inputs(_x(1)))
    finally:
        client.stop_stream()
        client.close()
    assert result is None and error.status() == "StatusCode.UNAUTHENTICATED"


async def test_asyncio_client_stream(served) -> None:
    s, headers = served
    client = tgrpc_aio.InferenceServerClient(s.grpc_url)

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(5):
            yield {"model_name": FAST, "inputs": _inputs(_x(i)), "request_id": str(i)}

    try:
        got = []
        async for result, error in client.stream_infer(requests(), headers=headers):
            assert error is None, error
            got.append((result.get_response().id, result.as_numpy("y")))
    finally:
        await client.close()
    assert [i for i, _ in got] == [str(i) for i in range(5)]
    for i, y in got:
        np.testing.assert_array_equal(y, _x(int(i)) * 2)


# -- the ordering pump on its own (no server) ----------------------------------------------


async def _numbers(n: int) -> AsyncIterator[int]:
    for i in range(n):
        yield i


async def test_ordered_yields_in_request_order_whatever_finishes_first() -> None:
    # Each request waits for the one after it: they finish 2, 1, 0, which only works
    # if all three run at once, and must still come out 0, 1, 2.
    done = [asyncio.Event() for _ in range(3)]

    async def handle(i: int) -> int:
        if i + 1 < len(done):
            await done[i + 1].wait()
        done[i].set()
        return i

    assert [r async for r in ordered(_numbers(3), handle, limit=3)] == [0, 1, 2]


async def test_ordered_bounds_the_requests_in_flight_and_cancels_on_close() -> None:
    running, most = 0, 0
    release = asyncio.Event()
    started: list[int] = []

    async def handle(i: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        started.append(i)
        try:
            if i > 0:
                await release.wait()  # never set: only cancellation ends these
            return i
        finally:
            running -= 1

    stream = ordered(_numbers(10), handle, limit=3)
    assert await anext(stream) == 0
    for _ in range(5):
        await asyncio.sleep(0)  # let the reader fill the room that 0 left
    assert most == 3 and started == [0, 1, 2, 3]
    await stream.aclose()
    for _ in range(3):
        await asyncio.sleep(0)
    assert running == 0  # the requests still in flight were cancelled
