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
    from gpu.memory import NvmlProbe

    probe = NvmlProbe("cuda:0", 0)
    torch.cuda.init()
    block = torch.empty(512 * MB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    m = probe.read(ours_bytes=0)
    free, total = torch.cuda.mem_get_info(0)
    assert m.source == "nvml" and m.total_bytes == total
    # Same device, two readers a moment apart: within 64 MiB of each other.
    assert abs(m.free_bytes - free) < 64 << 20
    assert m.used_bytes >= 512 * MB
    del block


def test_memory_returns_after_unload(tmp_path: Path) -> None:
    from gpu.repository import ModelRepository
    from gpu.runtime import ModelRuntime

    _sized(tmp_path, "big", 512 * MB)
    runtime = ModelRuntime(ModelRepository(tmp_path), "cuda:0")
    base = torch.cuda.memory_allocated(0)
    loaded = runtime.load("big", 1)
    assert loaded.footprint_bytes >= 512 * MB
    assert loaded.peak_bytes >= loaded.footprint_bytes
    freed, retained = runtime.unload("big", 1)
    assert freed == loaded.footprint_bytes and retained < 16 << 20
    assert torch.cuda.memory_allocated(0) - base < 16 << 20


FOREIGN = r"""
import sys, time, torch
n = int(sys.argv[1])
block = torch.empty(n, dtype=torch.uint8, device="cuda:0")
torch.cuda.synchronize()
print("allocated", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_foreign_process_makes_modelpool_evict_under_its_high_mark(tmp_path: Path, serve) -> None:
    import tritonclient.http as thttp

    for i in range(6):
        _sized(tmp_path, f"m{i}", 512 * MB)
    budget = 4 * GiB
    server = serve(
        tmp_path,
        "--devices",
        "cuda:0",
        "--device-memory-budget",
        str(budget),
        "--housekeeping-interval",
        "0.2",
    )
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    for i in range(6):
        client.infer(f"m{i}", [x])
    ours = server.metric("modelpool_device_memory_bytes", kind="ours")
    assert ours >= 6 * 512 * MB
    # A foreign job takes all of the device beyond our budget, and 1 GiB of our share:
    # usage (ours + that GiB + its CUDA context) crosses 95% of the budget.
    free, _ = torch.cuda.mem_get_info(0)
    grab = int(free - (budget - ours) + GiB)
    foreign = subprocess.Popen(
        [sys.executable, "-c", FOREIGN, str(grab), "60"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert foreign.stdout is not None and foreign.stdout.readline().strip() == "allocated"
        deadline = time.monotonic() + 30
        evicted = 0.0
        while time.monotonic() < deadline:
            evicted = sum(
                server.metric("modelpool_model_evictions_total", model=f"m{i}", reason="pressure")
                for i in range(6)
            )
            used = server.metric("modelpool_device_memory_bytes", kind="used")
            if evicted and used <= 0.95 * budget:
                break
            time.sleep(0.2)
        assert evicted >= 1, server.log()
        assert server.metric("modelpool_device_memory_bytes", kind="used") <= 0.95 * budget
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

    from gpu.examples import write_examples
    from gpu.repository import read_model
    from tests.payloads import inputs_for, torch_reference

    write_examples(tmp_path, count=4)
    server = serve(tmp_path, "--devices", "cuda:0")
    client = tgrpc.InferenceServerClient(server.grpc_url)
    for i, name in enumerate(sorted(p.name for p in tmp_path.iterdir())):
        spec = read_model(tmp_path / name)
        data = inputs_for(spec, batch=2, seed=i)
        inputs = []
        for t in spec.inputs:
            inp = tgrpc.InferInput(t.name, list(data[t.name].shape), t.datatype)
            inp.set_data_from_numpy(data[t.name])
            inputs.append(inp)
        result = client.infer(name, inputs)
        for out, want in torch_reference(tmp_path, name, data).items():
            np.testing.assert_allclose(result.as_numpy(out), want, rtol=1e-3, atol=1e-4)
    assert server.metric("modelpool_device_memory_bytes", kind="total") > 0
