"""GPU truth, run where CUDA is: NVML against torch, memory back after unload, and a
foreign process growing on the device making modelpool evict to stay under its high
watermark. Skipped without CUDA (``pytest -m gpu`` on a GPU machine runs them)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MB = 1_000_000
MiB = 1 << 20
GiB = 1 << 30


def _sized(repo: Path, name: str, nbytes: int) -> None:
    from tests.modelgen import write_sized

    write_sized(repo, name, nbytes)


def test_nvml_agrees_with_torch_mem_get_info() -> None:
    from modelpool.gpu.memory import NvmlProbe

    probe = NvmlProbe("cuda:0", 0)
    torch.cuda.init()
    torch.cuda.synchronize()
    before = probe.read(ours_bytes=0)
    block = torch.empty(512 * MB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    after = probe.read(ours_bytes=0)
    free, total = torch.cuda.mem_get_info(0)
    assert after.source == "nvml"
    # NVML counts memory the driver reserves for itself in its total; the CUDA runtime
    # does not. They agree within a percent, and on what an allocation takes.
    assert abs(after.total_bytes - total) < 0.01 * total
    assert abs(after.free_bytes - free) < 0.01 * total
    grew = after.used_bytes - before.used_bytes
    assert 512 * MB <= grew <= 512 * MB + (64 << 20)
    del block


def test_memory_returns_after_unload(tmp_path: Path) -> None:
    from modelpool.gpu.repository import ModelRepository
    from modelpool.gpu.runtime import ModelRuntime

    _sized(tmp_path, "big", 512 * MB)
    runtime = ModelRuntime(ModelRepository(tmp_path), "cuda:0")
    base = torch.cuda.memory_allocated(0)
    loaded = runtime.load("big", 1)
    footprint, peak = loaded.footprint_bytes, loaded.peak_bytes
    del loaded  # the runtime's reference must be the last, as in a worker
    assert footprint >= 512 * MB and peak >= footprint
    freed, retained = runtime.unload("big", 1)
    assert freed == footprint and retained < 16 << 20
    assert torch.cuda.memory_allocated(0) - base < 16 << 20


class Hungry(torch.nn.Module):
    """y = 2x + w[0], after taking ``scratch`` bytes of activations: every forward
    moves the device-wide counters by that much, as the H200 run's MLPs did."""

    def __init__(self, nbytes: int, scratch: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(max(1, nbytes // 4)))
        self.scratch = scratch // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.ones([self.scratch], device=x.device)
        return x * 2.0 + self.w[0] + t[-1] * 0.0


def _request(model: str):
    from tritonclient.grpc import service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, model_version="1")
    x = request.inputs.add(name="x", datatype="FP32")
    x.shape.extend([1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return request


async def test_concurrent_loads_unloads_and_forwards_keep_accounting_exact(
    tmp_path: Path,
) -> None:
    """The H200 failure, replayed on one cuda worker: loads and unloads of 64-256 MB
    models run at once on its two load threads while forwards of another model take
    and free 256 MiB each. Footprints are the models' bytes and no unload reports
    retained memory near the gateway's 256 MiB recycle limit."""
    from modelpool.gpu import protocol
    from modelpool.gpu.worker import Worker, WorkerConfig
    from tests.modelgen import write_model

    sizes = {f"m{i}": mb * MiB for i, mb in enumerate((64, 96, 128, 160, 192, 256))}
    for name, nbytes in sizes.items():
        _sized(tmp_path, name, nbytes)
    write_model(tmp_path, "hungry", Hungry(16 * MiB, 256 * MiB))
    halves = (list(sizes)[0::2], list(sizes)[1::2])
    worker = Worker(WorkerConfig(str(tmp_path), device="cuda:0"))
    stop = asyncio.Event()

    async def hammer() -> int:
        n = 0
        while not stop.is_set():
            await worker._infer(_request("hungry"))
            n += 1
        return n

    loads: list[protocol.LoadResult] = []
    unloads: list[protocol.UnloadResult] = []
    try:
        await worker.load(protocol.LoadRequest("hungry", 1))
        hammers = [asyncio.create_task(hammer()) for _ in range(2)]
        loads += await asyncio.gather(*(worker.load(protocol.LoadRequest(n, 1)) for n in halves[0]))
        for round_ in range(4):
            out, into = halves[round_ % 2], halves[(round_ + 1) % 2]
            results = await asyncio.gather(
                *(worker.unload(protocol.UnloadRequest(n, 1)) for n in out),
                *(worker.load(protocol.LoadRequest(n, 1)) for n in into),
            )
            unloads += results[: len(out)]
            loads += results[len(out) :]
        status = await worker.status()
        stop.set()
        forwards = await asyncio.gather(*hammers)
        unloads += await asyncio.gather(
            *(worker.unload(protocol.UnloadRequest(n, 1)) for n in halves[0])
        )
    finally:
        stop.set()
        await worker.close()
    assert all(n > 0 for n in forwards)
    for r in loads:
        assert r.footprint_bytes == sizes[r.model] and r.peak_bytes >= r.footprint_bytes
    assert len(unloads) == 2 * len(sizes) + len(halves[0])
    for u in unloads:
        assert u.freed_bytes == sizes[u.model]
        assert u.retained_bytes < 64 * MiB, u
    assert status.reserved_bytes >= status.allocated_bytes >= sum(sizes[n] for n in halves[0])


def test_out_of_memory_in_warm_up_is_typed_and_gives_the_copy_back(tmp_path: Path) -> None:
    from modelpool.gpu.repository import ModelRepository
    from modelpool.gpu.runtime import ModelRuntime
    from modelpool.placement.errors import OutOfMemory
    from tests.modelgen import write_model

    # Weights fit; the first forward asks for more than any device has.
    write_model(tmp_path, "greedy", Hungry(256 * MiB, 1 << 40))
    runtime = ModelRuntime(ModelRepository(tmp_path), "cuda:0")
    base = torch.cuda.memory_allocated(0)
    with pytest.raises(OutOfMemory, match="first forward"):
        runtime.load("greedy", 1)
    assert torch.cuda.memory_allocated(0) - base < 16 * MiB
    assert not runtime.models


def test_a_known_peak_skips_the_warm_up_forward(tmp_path: Path) -> None:
    """The same greedy model loads when its peak is known: no warm-up forward ran."""
    from modelpool.gpu.repository import ModelRepository
    from modelpool.gpu.runtime import ModelRuntime
    from tests.modelgen import write_model

    write_model(tmp_path, "greedy", Hungry(256 * MiB, 1 << 40))
    runtime = ModelRuntime(ModelRepository(tmp_path), "cuda:0")
    loaded = runtime.load("greedy", 1, known_peak_bytes=512 * MiB)
    assert loaded.peak_bytes == 512 * MiB
    assert loaded.footprint_bytes >= 256 * MiB
    runtime.unload("greedy", 1)


def test_unreleasable_is_what_empty_cache_leaves() -> None:
    """On a quiet device the allocator's non-releasable bytes are reserved - allocated
    after empty_cache(): holes in segments that still hold a live tensor."""
    from modelpool.gpu.accounting import CudaAllocator, retained_after_release

    allocator = CudaAllocator(torch.device("cuda:0"))
    # 2 MiB tensors share 20 MiB segments; freeing every other one leaves 100 holes.
    blocks = [torch.empty(2 * MiB, dtype=torch.uint8, device="cuda:0") for _ in range(200)]
    del blocks[::2]
    retained = retained_after_release(allocator, settle_s=0)
    usage = allocator.usage()
    assert usage.unreleasable_bytes == usage.cached_bytes == retained
    assert 200 * MiB <= retained < 240 * MiB
    del blocks
    assert retained_after_release(allocator) < 16 * MiB


FOREIGN = r"""
import sys, time, torch
torch.cuda.init()
free, _ = torch.cuda.mem_get_info(0)  # after this process's own context
block = torch.empty(free - int(sys.argv[1]), dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("allocated", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_foreign_process_makes_modelpool_evict_under_its_high_mark(tmp_path: Path, serve) -> None:
    import tritonclient.http as thttp

    repo = tmp_path / "repo"
    for i in range(4):
        _sized(repo, f"m{i}", 512 * MB)
    budget = 4 * GiB
    server = serve(
        repo,
        "--devices", "cuda:0",
        "--device-memory-budget", str(budget),
        "--high-watermark", "0.8",
        "--low-watermark", "0.6",
        "--housekeeping-interval", "0.2",
    )  # fmt: skip
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    for i in range(4):
        client.infer(f"m{i}", [x])
    ours = server.metric("modelpool_device_memory_bytes", kind="ours")
    assert ours >= 4 * 512 * MB
    # A foreign job takes the whole device but 0.5 GiB of what is left of our share:
    # usage (ours + the rest of the share) crosses 80% of the budget.
    keep = int(0.5 * GiB)
    foreign = subprocess.Popen(
        [sys.executable, "-c", FOREIGN, str(keep), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert foreign.stdout is not None and foreign.stdout.readline().strip() == "allocated"
        deadline = time.monotonic() + 30
        evicted = 0.0
        while time.monotonic() < deadline:
            evicted = sum(
                server.metric("modelpool_model_evictions_total", model=f"m{i}", reason="pressure")
                for i in range(4)
            )
            used = server.metric("modelpool_device_memory_bytes", kind="used")
            if evicted and used <= 0.8 * budget:
                break
            time.sleep(0.2)
        assert evicted >= 1, server.log()
        assert server.metric("modelpool_device_memory_bytes", kind="used") <= 0.8 * budget
        # Still serving: a request for an evicted model finds room or says 503, never 500.
        try:
            client.infer("m0", [x])
        except Exception as e:
            assert "503" in str(e), e
    finally:
        foreign.kill()
        foreign.wait()


def test_serve_on_gpu_matches_torch(tmp_path: Path, serve) -> None:
    import tritonclient.grpc as tgrpc

    from modelpool.gpu.examples import write_examples
    from modelpool.gpu.repository import read_model
    from tests.payloads import inputs_for, torch_reference

    repo = tmp_path / "repo"
    names = write_examples(repo, count=4)
    server = serve(repo, "--devices", "cuda:0")
    client = tgrpc.InferenceServerClient(server.grpc_url)
    for i, name in enumerate(names):
        spec = read_model(repo / name)
        data = inputs_for(spec, batch=2, seed=i)
        inputs = []
        for t in spec.inputs:
            inp = tgrpc.InferInput(t.name, list(data[t.name].shape), t.datatype)
            inp.set_data_from_numpy(data[t.name])
            inputs.append(inp)
        result = client.infer(name, inputs)
        for out, want in torch_reference(repo, name, data).items():
            np.testing.assert_allclose(result.as_numpy(out), want, rtol=1e-3, atol=1e-4)
    assert server.metric("modelpool_device_memory_bytes", kind="total") > 0


class Weighted(torch.nn.Module):
    """A linear layer (outputs that depend on every weight) and 64 MiB of buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("pad", torch.ones(16 * MiB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.pad[0]


def test_host_tier_demotes_to_pinned_memory_and_promotes_back(tmp_path: Path) -> None:
    """Issue 11: device -> pinned host -> device, same outputs, device bytes returned."""
    from modelpool.gpu.repository import ModelRepository
    from modelpool.gpu.runtime import ModelRuntime
    from tests.modelgen import write_model

    write_model(tmp_path, "w", Weighted())
    runtime = ModelRuntime(ModelRepository(tmp_path), "cuda:0", host_budget_bytes=1 * GiB)
    assert runtime.host.enabled
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    loaded = runtime.load("w", 1)
    assert loaded.source == "disk"
    x = torch.randn(2, 4)
    with torch.inference_mode():
        want = loaded.module(x.to("cuda:0")).cpu()
    module, footprint = loaded.module, loaded.footprint_bytes
    del loaded

    done = runtime.release("w", 1, keep=True)
    assert done.freed_bytes == footprint and done.kept_bytes == footprint >= 64 * MiB
    tensors = [*module.parameters(), *module.buffers()]
    assert all(t.device.type == "cpu" and t.is_pinned() for t in tensors)
    assert runtime.ours_bytes() == 0 and runtime.host.used_bytes() == footprint
    assert torch.cuda.memory_allocated(0) - base < 16 << 20  # the device bytes came back

    again = runtime.load("w", 1)
    assert again.source == "host" and again.module is module
    assert again.footprint_bytes == footprint
    assert all(
        t.device == torch.device("cuda:0") for t in [*module.parameters(), *module.buffers()]
    )
    with torch.inference_mode():
        got = again.module(x.to("cuda:0")).cpu()
    assert torch.equal(got, want)
    assert runtime.host.used_bytes() == 0
