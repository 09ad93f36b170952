"""A cold request's infer pipelined behind its copy's Load RPC (issue 11, item 4).

The copy manager leases a cold requester a copy as soon as its load task runs
(``acquire(early=True)``, ``Lease.loading``); the data plane sends the infer at once
with ``modelpool-await-load: 1``, and the worker holds such a call until the version
is resident. The load stays the manager's own task: a failed load fails its waiters
with the load's error, a cancelled waiter leaves the load and the others alone.

In-process first (fake workers, in-memory store, the real manager and data plane),
then the worker servicer over real gRPC, then ``modelpool serve`` with tritonclient.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from modelpool.cache.records import CopyState
from modelpool.gateway.dataplane import DataPlane, InferOutcome
from modelpool.gateway.workers import AWAIT_LOAD, WorkerClient
from modelpool.gpu import worker as gpu_worker
from modelpool.gpu.repository import ModelRepository
from modelpool.gpu.worker import Worker, WorkerConfig
from modelpool.placement.errors import (
    DeadlineExceeded,
    ModelLoadError,
    ModelNotReady,
    Unavailable,
    WorkerUnavailable,
)
from tests.conftest import Served, start_serve
from tests.core_fakes import Core, FakeWorker, make_core, settle, soon
from tests.modelgen import write_sized

# -- the copy manager and the data plane, in-process ----------------------------------


def _request(model: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return req


def _dataplane(core: Core) -> DataPlane:
    m = core.manager
    return DataPlane(
        ModelRepository(core.repo), m.view, m, core.metrics,
        infer_timeout_s=5.0, acquire_timeout_s=5.0,
    )  # fmt: skip


async def _until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Poll what another thread or process makes true (a gRPC server's counters)."""
    for _ in range(int(timeout_s / 0.005)):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not met in time")


def _quiet(core: Core) -> None:
    m = core.manager
    assert m.invariant_errors() == []
    assert not m._inflight and not m._leases
    assert core.orphans() == [] and core.reservation_errors() == []


async def test_a_cold_acquire_is_leased_while_the_load_runs(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    lease = await asyncio.wait_for(m.acquire("a", 1, soon(), early=True), 5)
    assert lease.cold and lease.loading is not None
    assert lease.copy.state == CopyState.LOADING
    assert not lease.loading.done() and w.held == {}
    assert [c.inflight for c in m.copies()] == [1]
    gate.set()
    await lease.loading
    (copy,) = core.stored().values()
    assert copy.state == CopyState.READY
    # Served by its early lease: not held back as "fresh" for a request to come.
    assert m.copies()[0].inflight == 1
    m.release(lease)
    assert m.copies()[0].inflight == 0
    await settle(core)
    _quiet(core)
    # A warm acquire has nothing to await.
    warm = await m.acquire("a", 1, soon(), early=True)
    assert warm.loading is None and not warm.cold
    m.release(warm)


async def test_without_early_a_cold_acquire_still_waits_for_ready(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    task = asyncio.create_task(m.acquire("a", 1, soon()))
    await w.load_started.wait()
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()
    gate.set()
    lease = await task
    assert lease.loading is None and lease.copy.state == CopyState.READY
    m.release(lease)


async def test_the_infer_is_sent_before_the_load_completes(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    w = core.worker("w1")
    gate = w.gate("a")
    dp = _dataplane(core)
    task = asyncio.create_task(dp.infer(_request("a"), "grpc"))
    await asyncio.wait_for(w.infer_sent.wait(), 5)
    # Sent while the copy was not held yet, asking the worker to await the load.
    assert w.infers == [("a", (AWAIT_LOAD,), False)]
    assert not task.done()
    gate.set()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.cold and outcome.parsed().model_name == "a"
    assert core.metric("modelpool_cold_starts_total", model="a") == 1
    assert core.metric("modelpool_queue_wait_seconds_count", model="a") == 1
    await settle(core)
    _quiet(core)
    # Warm: no await-load metadata.
    await dp.infer(_request("a"), "grpc")
    assert w.infers[-1] == ("a", (), True)


async def test_a_failed_load_fails_its_early_waiters_with_its_error(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    w.fail_load["a"] = ModelLoadError("model 'a': broken artifact")
    dp = _dataplane(core)
    tasks = [asyncio.create_task(dp.infer(_request("a"), "grpc")) for _ in range(2)]
    lease = await m.acquire("a", 1, soon(), early=True)  # a manager-level waiter too
    await asyncio.wait_for(w.infer_sent.wait(), 5)
    gate.set()
    for t in tasks:
        with pytest.raises(ModelLoadError, match="broken artifact"):
            await asyncio.wait_for(t, 5)
    assert lease.loading is not None
    with pytest.raises(ModelLoadError, match="broken artifact"):
        await lease.loading
    m.release(lease)
    # Every waiter sent its infer early; the load ran once.
    assert len(w.infers) == 2 and all(held is False for _, _, held in w.infers)
    assert w.loads == ["a"]
    await settle(core)
    _quiet(core)
    assert core.stored() == {}


async def test_a_cancelled_waiter_leaves_the_load_and_the_others_alone(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    dp = _dataplane(core)
    first = asyncio.create_task(dp.infer(_request("a"), "grpc"))
    second = asyncio.create_task(dp.infer(_request("a"), "grpc"))
    await _until(lambda: len(w.infers) == 2)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert [c.inflight for c in m.copies()] == [1]  # the first's lease went back
    gate.set()
    outcome = await asyncio.wait_for(second, 5)
    assert outcome.cold
    assert w.loads == ["a"] and w.held == {("a", 1): 100}
    await settle(core)
    _quiet(core)


async def test_early_leases_block_eviction_of_the_loading_copy(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 600, "b": 600}, total_bytes=1000)
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    lease = await m.acquire("a", 1, soon(), early=True)
    (loading,) = core.stored().values()
    assert not await m.evict(loading, "pressure")  # loading: never a victim
    gate.set()
    assert lease.loading is not None
    await lease.loading
    (ready,) = core.stored().values()
    assert not await m.evict(ready, "pressure")  # its early lease is in flight
    with pytest.raises((DeadlineExceeded, Unavailable)):
        await m.acquire("b", 1, soon(0.2, client_set=True), early=True)
    assert ("a", 1) in w.held and ("b", 1) not in w.held
    m.release(lease)
    other = await m.acquire("b", 1, soon(), early=True)
    if other.loading is not None:
        await other.loading
    assert ("b", 1) in w.held and ("a", 1) not in w.held
    m.release(other)
    await settle(core)
    _quiet(core)


async def _cold_on_two_workers(
    core: Core,
) -> tuple[asyncio.Task[InferOutcome], FakeWorker, FakeWorker]:
    """A cold request for "a" whose load has started, held, on one of two workers:
    the request, the worker loading it, and the other (its loads of "a" held too)."""
    workers = [core.worker("w1"), core.worker("w2")]
    for w in workers:
        w.gate("a")
    dp = _dataplane(core)
    task = asyncio.create_task(dp.infer(_request("a"), "grpc"))
    started = [asyncio.ensure_future(w.load_started.wait()) for w in workers]
    await asyncio.wait(started, timeout=5, return_when=asyncio.FIRST_COMPLETED)
    for s in started:
        s.cancel()
    loading, other = workers if workers[0].load_started.is_set() else workers[::-1]
    return task, loading, other


async def test_a_load_lost_with_its_worker_is_served_by_the_next_placement(
    tmp_path: Path,
) -> None:
    core = await make_core(tmp_path, {"a": 100}, workers=["w1", "w2"])
    task, lost, other = await _cold_on_two_workers(core)
    await asyncio.wait_for(lost.infer_sent.wait(), 5)
    other.gate("a").set()
    lost.alive = False  # the load fails: WorkerUnavailable, and placement plans again
    lost.gate("a").set()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.cold
    assert other.held == {("a", 1): 100}
    assert other.infers and other.infers[-1][0] == "a"
    # Leased again after the placement's verdict, not retried as a lost copy.
    assert not core.manager._suspect
    # One request, one cold start, though its lease moved to the second placement.
    assert core.metric("modelpool_cold_starts_total", model="a") == 1
    await settle(core)
    assert core.manager.invariant_errors() == [] and not core.manager._inflight


async def test_a_request_that_loads_twice_is_one_cold_start(tmp_path: Path) -> None:
    """The worker dies in the infer after its load; the retry loads the model again
    elsewhere. The request waited for two loads and is still one cold start."""
    core = await make_core(tmp_path, {"a": 100}, workers=["w1", "w2"])
    task, lost, other = await _cold_on_two_workers(core)
    lost.die_on_infer.add("a")
    for w in (lost, other):
        w.gate("a").set()
    outcome = await asyncio.wait_for(task, 5)
    assert outcome.cold
    assert (lost.loads, other.loads) == (["a"], ["a"])
    assert core.metric("modelpool_cold_starts_total", model="a") == 1
    await settle(core)
    assert core.manager.invariant_errors() == [] and not core.manager._inflight


# -- the worker over real gRPC ---------------------------------------------------------


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[tuple[Worker, WorkerClient]]:
    repo = tmp_path / "repo"
    write_sized(repo, "m", 1 << 20)
    w = Worker(WorkerConfig(model_repository=str(repo), threads=1, device_memory_budget=1 << 30))
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(w, server)
    server.add_generic_rpc_handlers((w.control_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = WorkerClient("w", f"127.0.0.1:{port}")
    try:
        yield w, client
    finally:
        await client.channel.close()
        await server.stop(grace=None)
        await w.close()


def _worker_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m", model_version="1")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.full((1, 4), 3.0, np.float32).tobytes())
    return req


def test_the_metadata_key_is_the_one_the_worker_reads() -> None:
    assert AWAIT_LOAD == (gpu_worker.AWAIT_LOAD_KEY, "1")


async def test_worker_holds_an_infer_sent_before_its_load(
    worker: tuple[Worker, WorkerClient],
) -> None:
    w, client = worker
    infer = asyncio.create_task(client.infer(_worker_request(), 10.0, metadata=(AWAIT_LOAD,)))
    await _until(lambda: w.inflight == 1)  # arrived, and waiting: no Load sent yet
    assert not infer.done()
    await client.load("m", 1, timeout_s=30.0)
    reply = await asyncio.wait_for(infer, 10)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(y, np.full(4, 6.0, np.float32))
    assert w.awaited_loads == 1 and w.inflight == 0


async def test_worker_without_the_metadata_is_not_ready_at_once(
    worker: tuple[Worker, WorkerClient],
) -> None:
    _w, client = worker
    with pytest.raises(ModelNotReady, match="'m'"):
        await asyncio.wait_for(client.infer(_worker_request(), 10.0), 5)


async def test_worker_await_ends_at_the_calls_deadline(
    worker: tuple[Worker, WorkerClient],
) -> None:
    w, client = worker
    with pytest.raises((DeadlineExceeded, ModelNotReady)):
        await asyncio.wait_for(client.infer(_worker_request(), 0.3, metadata=(AWAIT_LOAD,)), 5)
    await _until(lambda: w.inflight == 0)
    assert w.awaited_loads == 0


async def test_worker_stops_waiting_when_the_call_is_cancelled(
    worker: tuple[Worker, WorkerClient],
) -> None:
    w, client = worker
    infer = asyncio.create_task(client.infer(_worker_request(), 30.0, metadata=(AWAIT_LOAD,)))
    await _until(lambda: w.inflight == 1)
    infer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await infer
    await _until(lambda: w.inflight == 0)  # the servicer's wait ended with the call
    # A load afterwards finds no one waiting.
    await client.load("m", 1, timeout_s=30.0)
    assert w.awaited_loads == 0


async def test_a_call_whose_channel_closes_under_it_is_a_lost_worker(
    worker: tuple[Worker, WorkerClient],
) -> None:
    """A worker dropped or replaced closes its channel with calls in flight. grpc.aio
    cancels those calls; that must reach the data plane as WorkerUnavailable (retried
    elsewhere), not as a CancelledError, which in a gateway handler ends the client's
    RPC with no status and leaves the client waiting out its deadline (the soak's
    kill -9 found a request that hung 60 s so)."""
    w, client = worker
    infer = asyncio.create_task(client.infer(_worker_request(), 30.0, metadata=(AWAIT_LOAD,)))
    await _until(lambda: w.inflight == 1)
    await client.channel.close(grace=None)
    with pytest.raises(WorkerUnavailable, match="channel closed during the call"):
        await asyncio.wait_for(infer, 5)


# -- modelpool serve with tritonclient ---------------------------------------------------

AWAITED = re.compile(r"infer for model=(\w+) version=\d+ arrived before its load finished")
MODELS = ("p4", "q4")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("cold-pipeline")
    for name in MODELS:
        write_sized(root / "repo", name, 4 << 20)
    # Each load held 0.5 s: the infer is sent at once behind the Load RPC, so it
    # arrives while the load runs however busy the test machine is.
    s = start_serve(
        root / "repo", root / "serve.log", "--device-memory-budget", "256MiB",
        env={gpu_worker.FAKE_LOAD_DELAY_ENV: "0.5"},
    )  # fmt: skip
    yield s
    s.stop()


def _awaited(s: Served, model: str) -> int:
    return sum(1 for m in AWAITED.finditer(s.log()) if m[1] == model)


def _wait_for_log(s: Served, model: str, count: int) -> None:
    """The worker's line goes through the supervisor's pipe: it may trail the reply."""
    end = time.monotonic() + 10
    while _awaited(s, model) < count and time.monotonic() < end:
        time.sleep(0.05)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cold_requests_match_warm_ones(served: Served, protocol: str) -> None:
    """Two cold rounds per protocol: the pipelined infer waited for its load in the
    worker, and answered what a warm request answers."""
    client_module = thttp if protocol == "http" else tgrpc
    url = served.http_url if protocol == "http" else served.grpc_url
    client = client_module.InferenceServerClient(url)
    values = np.arange(8, dtype=np.float32).reshape(2, 4) - 3.5
    x = client_module.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(values)
    model = MODELS[0] if protocol == "http" else MODELS[1]
    for round_ in (1, 2):
        client.unload_model(model)
        cold = client.infer(model, [x]).as_numpy("y")
        warm = client.infer(model, [x]).as_numpy("y")
        np.testing.assert_array_equal(cold, warm)
        np.testing.assert_allclose(warm, values * 2.0)
        _wait_for_log(served, model, round_)
        assert _awaited(served, model) == round_, served.log()[-3000:]
        assert served.metric("modelpool_cold_starts_total", model=model) == round_
