"""Device memory accounting under concurrency, on CPU.

On an H200, 24 models behind a 1.25 GiB budget and 2 workers got their workers
recycled over and over for "retained" memory that was never leaked: a load's footprint
and an unload's "returned" bytes were differences of device-wide counters, which also
moved with other loads and forwards in the same worker. A simulated caching allocator
replays those timelines here; the real runtime and worker run on small TorchScript
models. (``tests/test_gpu.py`` checks the same on a real device.)
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu import protocol
from modelpool.gpu.accounting import (
    FAKE_RETAINED_ENV,
    AllocatorUsage,
    CpuAllocator,
    CudaAllocator,
    FakeRetainedAllocator,
    allocator_for,
    module_bytes,
    retained_after_release,
)
from modelpool.gpu.repository import ModelRepository
from modelpool.gpu.runtime import ModelRuntime
from modelpool.gpu.worker import Worker, WorkerConfig
from modelpool.placement.errors import DeadlineExceeded
from tests.modelgen import write_model, write_sized

MB = 1_000_000
MiB = 1 << 20
#: The gateway recycles a worker whose unload reports more than this retained.
RECYCLE_LIMIT = 256 * MiB


class SimDevice:
    """A CUDA caching allocator in miniature, for timelines a CPU run cannot produce.

    Live tensors are named blocks. A freed block stays cached (reserved) until
    ``empty_cache()``; ``fragmented`` is free space inside segments that still hold a
    live tensor, which ``empty_cache()`` cannot give back. ``at(method, fn)`` runs
    ``fn`` once, inside the next call of ``method`` and before it takes effect: another
    thread of the worker acting at exactly that moment.
    """

    def __init__(self, fragmented: int = 0) -> None:
        self.live: dict[str, int] = {}
        self.cached = 0
        self.fragmented = fragmented
        self._peak = 0
        self._hooks: dict[str, list[Callable[[], None]]] = collections.defaultdict(list)

    def at(self, method: str, fn: Callable[[], None]) -> None:
        self._hooks[method].append(fn)

    def _meanwhile(self, method: str) -> None:
        hooks, self._hooks[method] = self._hooks[method], []
        for fn in hooks:
            fn()

    @property
    def allocated(self) -> int:
        return sum(self.live.values())

    # What other threads do: allocate (from the cache first) and free.
    def alloc(self, name: str, nbytes: int) -> None:
        self.cached -= min(self.cached, nbytes)
        self.live[name] = nbytes
        self._peak = max(self._peak, self.allocated)

    def free(self, name: str) -> None:
        self.cached += self.live.pop(name)

    # The Allocator protocol.
    def usage(self) -> AllocatorUsage:
        self._meanwhile("usage")
        reserved = self.allocated + self.cached + self.fragmented
        return AllocatorUsage(self.allocated, reserved, self.fragmented)

    def synchronize(self) -> None:
        self._meanwhile("synchronize")

    def empty_cache(self) -> None:
        self._meanwhile("empty_cache")
        self.cached = 0

    def reset_peak(self) -> None:
        self._meanwhile("reset_peak")
        self._peak = self.allocated

    def peak_bytes(self) -> int:
        self._meanwhile("peak_bytes")
        return self._peak


# The accounting this change replaced, verbatim in substance (ModelRuntime.load/unload).
def old_load(dev: SimDevice, load: Callable[[], None]) -> int:
    dev.synchronize()
    before = dev.usage().allocated_bytes
    load()
    dev.synchronize()
    return dev.usage().allocated_bytes - before


def old_unload(dev: SimDevice, footprint: int, drop: Callable[[], None]) -> int:
    before = dev.usage().allocated_bytes
    drop()
    dev.empty_cache()
    returned = before - dev.usage().allocated_bytes
    return max(0, footprint - returned)


# -- the H200 timeline: old formulas against the new ------------------------------------


def test_old_formulas_take_concurrent_work_for_a_leak() -> None:
    dev = SimDevice()

    def load_a() -> None:
        dev.alloc("a", 400 * MB)
        dev.alloc("activations", 100 * MB)  # a forward of another model, meanwhile

    footprint = old_load(dev, load_a)
    assert footprint == 500 * MB  # a's weights are 400 MB
    dev.free("activations")
    # a is evicted while the worker's other load thread brings b in.
    dev.at("empty_cache", lambda: dev.alloc("b", 300 * MB))
    retained = old_unload(dev, 400 * MB, lambda: dev.free("a"))
    assert retained == 300 * MB > RECYCLE_LIMIT  # the gateway recycled a healthy worker
    assert dev.usage().cached_bytes == 0  # nothing was ever stuck


def test_new_accounting_on_the_same_timeline_sees_no_leak(tmp_path: Path) -> None:
    write_sized(tmp_path, "a", 4 * MB)
    dev = SimDevice()
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", allocator=dev)
    # While a loads, a forward of another model allocates 100 MB of activations.
    dev.at("peak_bytes", lambda: dev.alloc("activations", 100 * MB))
    loaded = runtime.load("a", 1)
    assert loaded.footprint_bytes == 4 * MB  # its own storages, exactly
    assert loaded.peak_bytes >= 100 * MB  # a forward meanwhile only makes it larger
    dev.free("activations")
    del loaded
    # a is unloaded while the other load thread brings b in.
    dev.at("empty_cache", lambda: dev.alloc("b", 300 * MB))
    freed, retained = runtime.unload("a", 1)
    assert (freed, retained) == (4 * MB, 0)


@pytest.mark.parametrize(
    "meanwhile",
    [
        pytest.param(("empty_cache", "alloc"), id="load-allocates-while-releasing"),
        pytest.param(("usage", "alloc"), id="load-allocates-before-the-reading"),
        pytest.param(("usage", "free"), id="forward-frees-before-the-reading"),
    ],
)
def test_retained_ignores_other_threads(meanwhile: tuple[str, str]) -> None:
    method, action = meanwhile
    dev = SimDevice()
    dev.alloc("activations", 300 * MB)
    if action == "alloc":
        dev.at(method, lambda: dev.alloc("b", 300 * MB))
    else:
        # Freed after empty_cache() ran: cached for an instant, in reserved - allocated,
        # but a whole free segment, so empty_cache() could give it back.
        dev.at(method, lambda: dev.free("activations"))
    assert retained_after_release(dev, settle_s=0) == 0


def test_retained_reports_memory_really_stuck() -> None:
    dev = SimDevice(fragmented=300 * MiB)
    assert retained_after_release(dev, settle_s=0) == 300 * MiB


def test_retained_lets_transient_fragmentation_settle() -> None:
    dev = SimDevice()

    def split() -> None:  # a forward's activation split from a cached block
        dev.fragmented = 300 * MiB

    def settle() -> None:  # that forward finished
        dev.fragmented = 0

    dev.at("usage", split)
    dev.at("empty_cache", lambda: dev.at("empty_cache", settle))
    assert retained_after_release(dev, settle_s=0) == 0


def test_loads_in_one_runtime_never_overlap(tmp_path: Path) -> None:
    class Windows(CpuAllocator):
        """Counts load measurement windows open at once; each lasts a while."""

        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.open = self.most = 0

        def reset_peak(self) -> None:
            with self.lock:
                self.open += 1
                self.most = max(self.most, self.open)
            time.sleep(0.05)  # a load that takes a moment, so others would overlap it

        def peak_bytes(self) -> int:
            with self.lock:
                self.open -= 1
            return 0

    names = [f"m{i}" for i in range(4)]
    for name in names:
        write_sized(tmp_path, name, MB)
    windows = Windows()
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", allocator=windows)
    with ThreadPoolExecutor(len(names)) as pool:
        loaded = list(pool.map(lambda n: runtime.load(n, 1), names))
    assert windows.most == 1
    assert [m.footprint_bytes for m in loaded] == [MB] * len(names)


# -- real TorchScript models on CPU -----------------------------------------------------


class Tied(nn.Module):
    """Two layers sharing one weight: the storage counts once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


@pytest.mark.parametrize("nbytes", [4, 1 * MB, 12 * MB + 4])
def test_footprint_is_the_module_bytes(tmp_path: Path, nbytes: int) -> None:
    write_sized(tmp_path, "m", nbytes)
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu")
    loaded = runtime.load("m", 1)
    assert loaded.footprint_bytes == nbytes == module_bytes(loaded.module)
    assert loaded.peak_bytes == nbytes
    del loaded
    assert runtime.unload("m", 1) == (nbytes, 0)


def test_shared_storage_counts_once(tmp_path: Path) -> None:
    write_model(tmp_path, "tied", Tied())
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu")
    loaded = runtime.load("tied", 1)
    assert loaded.footprint_bytes == 64 * 64 * 4 + 2 * 64 * 4


def test_concurrent_loads_and_unloads_report_exact_footprints(tmp_path: Path) -> None:
    sizes = {f"m{i}": (i + 1) * MB for i in range(6)}
    for name, nbytes in sizes.items():
        write_sized(tmp_path, name, nbytes)
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu")
    with ThreadPoolExecutor(3) as pool:
        loads = list(pool.map(lambda n: runtime.load(n, 1).footprint_bytes, sizes))
        unloads = list(pool.map(lambda n: runtime.unload(n, 1), sizes))
    assert loads == list(sizes.values())
    assert unloads == [(n, 0) for n in sizes.values()]


# -- the worker: test hook, status, batcher, deadlines ----------------------------------

MakeWorker = Callable[[Path], Worker]


@pytest.fixture
async def make_worker() -> AsyncIterator[MakeWorker]:
    """Factory: a CPU worker over a repository (no server); all closed at teardown."""
    made: list[Worker] = []

    def make(repo: Path) -> Worker:
        worker = Worker(WorkerConfig(str(repo), device="cpu", device_memory_budget=1 << 30))
        made.append(worker)
        return worker

    yield make
    for worker in reversed(made):
        await worker.close()


async def test_fake_retained_hook_reaches_the_unload_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_worker: MakeWorker
) -> None:
    monkeypatch.setenv(FAKE_RETAINED_ENV, str(300 * MiB))
    write_sized(tmp_path, "m", MB)
    worker = make_worker(tmp_path)
    loaded = await worker.load(protocol.LoadRequest("m", 1))
    assert loaded.footprint_bytes == MB
    result = await worker.unload(protocol.UnloadRequest("m", 1))
    assert result == protocol.UnloadResult("m", 1, MB, 300 * MiB)
    assert result.retained_bytes > RECYCLE_LIMIT  # enough to drive the recycle path
    status = await worker.status()
    assert (status.allocated_bytes, status.reserved_bytes) == (0, 300 * MiB)


async def test_without_the_hook_a_cpu_worker_retains_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_worker: MakeWorker
) -> None:
    monkeypatch.delenv(FAKE_RETAINED_ENV, raising=False)
    write_sized(tmp_path, "m", MB)
    worker = make_worker(tmp_path)
    await worker.load(protocol.LoadRequest("m", 1))
    status = await worker.status()
    assert (status.allocated_bytes, status.reserved_bytes) == (0, 0)
    decoded = protocol.decoder(protocol.WorkerStatus)(protocol.encode(status))
    assert decoded == status
    result = await worker.unload(protocol.UnloadRequest("m", 1))
    assert result.retained_bytes == 0


def test_the_hook_is_validated_and_cpu_only(caplog: pytest.LogCaptureFixture) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda:0")
    assert isinstance(allocator_for(cpu, {}), CpuAllocator)
    fake = allocator_for(cpu, {FAKE_RETAINED_ENV: "1234"})
    assert isinstance(fake, FakeRetainedAllocator) and fake.retained_bytes == 1234
    with pytest.raises(ValueError, match=FAKE_RETAINED_ENV):
        allocator_for(cpu, {FAKE_RETAINED_ENV: "lots"})
    with pytest.raises(ValueError, match=FAKE_RETAINED_ENV):
        allocator_for(cpu, {FAKE_RETAINED_ENV: "-1"})
    with caplog.at_level(logging.WARNING, logger="modelpool.gpu.accounting"):
        assert isinstance(allocator_for(cuda, {FAKE_RETAINED_ENV: "1234"}), CudaAllocator)
    assert "ignored on device=cuda:0" in caplog.text


def _batched(repo: Path, name: str, delay_us: int) -> None:
    write_sized(repo, name, MB)
    cfg = repo / name / "config.pbtxt"
    cfg.write_text(
        cfg.read_text() + f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
    )


def _request(model: str, value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version="1")
    x = request.inputs.add(name="x", datatype="FP32")
    x.shape.extend([1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return request


async def test_unloading_a_batched_model_leaves_no_reference(
    tmp_path: Path, make_worker: MakeWorker, caplog: pytest.LogCaptureFixture
) -> None:
    _batched(tmp_path, "b", 0)
    worker = make_worker(tmp_path)
    await worker.load(protocol.LoadRequest("b", 1))
    response = await worker._infer(_request("b", 1.0))
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
    module = weakref.ref(worker.runtime.get("b", 1).module)
    with caplog.at_level(logging.WARNING, logger="modelpool.gpu.runtime"):
        await worker.unload(protocol.UnloadRequest("b", 1))
    # The batcher is closed after the runtime measured the unload; it must not have
    # kept the module (and its device memory) alive through that measurement.
    assert "still referenced" not in caplog.text
    assert module() is None


async def test_a_request_that_waits_for_a_batch_past_its_deadline_is_not_computed(
    tmp_path: Path, make_worker: MakeWorker
) -> None:
    _batched(tmp_path, "b", 600_000)  # the batcher waits 0.6 s for others to join
    worker = make_worker(tmp_path)
    await worker.load(protocol.LoadRequest("b", 1))
    rows: list[int] = []
    forward = worker.runtime.forward

    def recording(loaded, args):
        rows.append(int(args[0].shape[0]))
        return forward(loaded, args)

    worker.runtime.forward = recording  # type: ignore[method-assign]
    loop = asyncio.get_running_loop()
    with pytest.raises(DeadlineExceeded, match="waited for a batch"):
        await worker._infer(_request("b", 1.0), deadline=loop.time() + 0.1)
    # A second request joins the same queue while the expired one is still in it: the
    # batch that runs holds only the second.
    response = await worker._infer(_request("b", 2.0))
    assert np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [4.0] * 4
    assert rows == [1]
    assert worker.runtime.get("b", 1).inflight == 0
