"""GPU truth, run where CUDA is: NVML against torch, memory back after unload, and a
foreign process growing on the device making modelpool evict to stay under its high
watermark. Skipped without CUDA (``pytest -m gpu`` on a GPU machine runs them)."""

from __future__ import annotations

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
