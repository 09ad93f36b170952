"""ONNX models (platform onnxruntime_onnx, gpu/onnx_backend.py): built here with the
``onnx`` helper API, served by the real ``modelpool serve`` over HTTP and gRPC,
batched, evicted and reloaded like TorchScript models; and the clear error when the
``onnx`` extra is missing from the worker."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from modelpool.gpu.onnx_backend import (
    MISSING_EXTRA,
    OnnxModel,
    device_footprint,
    initializer_bytes,
)
from modelpool.gpu.repository import ModelRepository, read_model
from modelpool.gpu.runtime import ModelRuntime
from modelpool.placement.errors import ModelLoadError
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

MB = 1_000_000
#: The matrix of the "add" model's second output: mm = a @ W.
W = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _save(repo: Path, name: str, graph: onnx.GraphProto, config: str) -> Path:
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelpool-tests"
    )
    model.ir_version = 8  # readable by every onnxruntime the extra allows (>= 1.17)
    onnx.checker.check_model(model)
    d = repo / name
    (d / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(d / "1" / "model.onnx"))
    (d / "config.pbtxt").write_text(config)
    return d


def write_add(repo: Path, name: str, *, extra: str = "", framework: str = "") -> Path:
    """sum = a + b and mm = a @ W, batch dimension first (max_batch_size 8)."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("MatMul", ["a", "W"], ["mm"]),
        ],
        name,
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["batch", 4]),
        ],
        [
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("mm", TensorProto.FLOAT, ["batch", 3]),
        ],
        initializer=[helper.make_tensor("W", TensorProto.FLOAT, [4, 3], W.ravel().tolist())],
    )
    config = f"""name: "{name}"
{framework or 'platform: "onnxruntime_onnx"'}
max_batch_size: 8
input {{ name: "a" data_type: TYPE_FP32 dims: [ 4 ] }}
input {{ name: "b" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "sum" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "mm" data_type: TYPE_FP32 dims: [ 3 ] }}
{extra}"""
    return _save(repo, name, graph, config)


def write_int(repo: Path, name: str) -> Path:
    """y = x + x in INT64, with no batch dimension (max_batch_size 0)."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [3])],
    )
    config = f"""name: "{name}"
backend: "onnxruntime"
input {{ name: "x" data_type: TYPE_INT64 dims: [ 3 ] }}
output {{ name: "y" data_type: TYPE_INT64 dims: [ 3 ] }}
"""
    return _save(repo, name, graph, config)


def write_sized_onnx(repo: Path, name: str, nbytes: int) -> Path:
    """y = 2x + w[argmin(x)] with w all zeros: ``nbytes`` of weights that the graph
    really reads (the row depends on the input, so no optimiser can fold them away)."""
    rows = max(4, nbytes // 16)
    w = helper.make_tensor(
        "w", TensorProto.FLOAT, [rows, 4], np.zeros(rows * 4, np.float32).tobytes(), raw=True
    )
    graph = helper.make_graph(
        [
            helper.make_node("ArgMin", ["x"], ["i"], axis=1, keepdims=0),
            helper.make_node("Gather", ["w", "i"], ["row"], axis=0),
            helper.make_node("Mul", ["x", "two"], ["x2"]),
            helper.make_node("Add", ["x2", "row"], ["y"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializer=[w, helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])],
    )
    config = f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 8
input {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }}
"""
    return _save(repo, name, graph, config)


def _ab(batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.standard_normal((batch, 4)).astype(np.float32),
        rng.standard_normal((batch, 4)).astype(np.float32),
    )


def _status(server: Served) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/modelpool/status", timeout=10) as r:
        return json.load(r)


def _infer_x(url: str, model: str) -> np.ndarray:
    client = thttp.InferenceServerClient(url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4))
    return client.infer(model, [x]).as_numpy("y")


# -- repository and runtime, in process ---------------------------------------------


def test_platform_and_backend_name_onnx_and_its_file(tmp_path: Path) -> None:
    write_add(tmp_path, "p")
    write_add(tmp_path, "b", framework='backend: "onnxruntime"')
    write_add(tmp_path, "both", framework='platform: "onnxruntime_onnx" backend: "onnxruntime"')
    write_add(tmp_path, "clash", framework='platform: "onnxruntime_onnx" backend: "pytorch"')
    for name in ("p", "b", "both"):
        spec = read_model(tmp_path / name)
        assert spec.error is None, spec.error
        assert spec.platform == "onnxruntime_onnx"
        assert spec.artifacts[1].name == "model.onnx"
    clash = read_model(tmp_path / "clash").error or ""
    assert "platform 'onnxruntime_onnx' with backend 'pytorch' is not supported" in clash
    # A model.pt beside an ONNX config is not its artifact.
    (tmp_path / "p" / "1" / "model.onnx").rename(tmp_path / "p" / "1" / "model.pt")
    assert "no version directory holds model.onnx" in (read_model(tmp_path / "p").error or "")


def test_runtime_loads_runs_measures_and_unloads_onnx(tmp_path: Path) -> None:
    write_sized_onnx(tmp_path, "sized", 2 * MB)
    write_add(tmp_path, "add")
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", threads=1)
    loaded = runtime.load("sized", 1)
    assert isinstance(loaded.module, OnnxModel)
    assert loaded.module.providers == ["CPUExecutionProvider"]
    # The footprint is the weights' bytes: 2 MB of w plus the 4-byte constant.
    assert loaded.footprint_bytes == initializer_bytes(loaded.spec.artifacts[1]) == 2 * MB + 4
    import torch

    x = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    [y] = runtime.forward(loaded, [x])
    assert y.dtype == torch.float32 and y.tolist() == [[6.0, 2.0, 4.0, 10.0]]

    add = runtime.load("add", 1)
    a, b = _ab(2, 0)
    total, mm = runtime.forward(add, [torch.from_numpy(a), torch.from_numpy(b)])
    np.testing.assert_allclose(total.numpy(), a + b, rtol=1e-6)
    np.testing.assert_allclose(mm.numpy(), a @ W, rtol=1e-5)

    session = weakref.ref(loaded.module)
    del loaded
    freed, retained = runtime.unload("sized", 1)
    assert freed == 2 * MB + 4 and retained == 0
    assert session() is None  # nothing keeps the session (and its memory) alive


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda c: c.replace('name: "b"', 'name: "B"'), "has no input 'B' (its inputs: a, b)"),
        (
            lambda c: c.replace('"mm" data_type: TYPE_FP32', '"mm" data_type: TYPE_FP64'),
            "output 'mm' is FP32 (tensor(float)), config.pbtxt declares FP64",
        ),
        (
            lambda c: c.replace('input { name: "b" data_type: TYPE_FP32 dims: [ 4 ] }\n', ""),
            "needs input(s) b that config.pbtxt does not declare",
        ),
    ],
)
def test_config_that_disagrees_with_the_graph_fails_to_load(
    tmp_path: Path, edit, reason: str
) -> None:
    d = write_add(tmp_path, "m")
    (d / "config.pbtxt").write_text(edit((d / "config.pbtxt").read_text()))
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", threads=1)
    with pytest.raises(ModelLoadError) as e:
        runtime.load("m", 1)
    assert "model 'm': model.onnx" in e.value.message and reason in e.value.message
    assert not runtime.models


def test_a_file_that_is_not_onnx_fails_to_load_naming_it(tmp_path: Path) -> None:
    d = write_add(tmp_path, "m")
    (d / "1" / "model.onnx").write_bytes(b"not a protobuf at all")
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", threads=1)
    with pytest.raises(ModelLoadError, match=r"model 'm': cannot load .*model\.onnx"):
        runtime.load("m", 1)


def test_device_footprint_is_the_sessions_rise_less_torchs() -> None:
    MiB = 1 << 20
    # The device lost 300 MiB, 100 of them to torch's allocator (another copy's forward).
    assert device_footprint((1000 * MiB, 50 * MiB), (1300 * MiB, 150 * MiB), 150 * MiB) == 200 * MiB
    # Another process freed memory inside the window: never below the weights.
    assert device_footprint((1000 * MiB, 0), (900 * MiB, 0), 150 * MiB) == 150 * MiB
    assert device_footprint((0, 0), (0, 0), 0) == 1


# -- through modelpool serve ----------------------------------------------------------


@pytest.fixture(scope="module")
def onnx_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("onnx-repo")
    write_add(repo, "add")
    write_add(repo, "batched", extra="dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    write_int(repo, "ints")
    d = write_add(repo, "misnamed")
    cfg = d / "config.pbtxt"
    cfg.write_text(cfg.read_text().replace('name: "b"', 'name: "bee"'))
    write_sized(repo, "torch", 1 << 20)  # a TorchScript model beside them
    return repo


@pytest.fixture(scope="module")
def served(onnx_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("onnx-serve") / "serve.log"
    server = start_serve(onnx_repo, log, "--device-memory-budget", "256MB")
    yield server
    server.stop()


def test_http_binary_json_and_grpc_infer(served: Served) -> None:
    http = thttp.InferenceServerClient(served.http_url)
    a, b = _ab(3, 1)
    for binary in (True, False):
        inputs = []
        for name, value in (("a", a), ("b", b)):
            x = thttp.InferInput(name, [3, 4], "FP32")
            x.set_data_from_numpy(value, binary_data=binary)
            inputs.append(x)
        outputs = [thttp.InferRequestedOutput(n, binary_data=binary) for n in ("sum", "mm")]
        result = http.infer("add", inputs, outputs=outputs)
        np.testing.assert_allclose(result.as_numpy("sum"), a + b, rtol=1e-6)
        np.testing.assert_allclose(result.as_numpy("mm"), a @ W, rtol=1e-5)

    grpc = tgrpc.InferenceServerClient(served.grpc_url)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        x = tgrpc.InferInput(name, [3, 4], "FP32")
        x.set_data_from_numpy(value)
        inputs.append(x)
    # Asking for one output returns that one only.
    result = grpc.infer("add", inputs, outputs=[tgrpc.InferRequestedOutput("mm")])
    np.testing.assert_allclose(result.as_numpy("mm"), a @ W, rtol=1e-5)
    assert result.as_numpy("sum") is None

    x = tgrpc.InferInput("x", [3], "INT64")
    x.set_data_from_numpy(np.array([1, -2, 1 << 40], np.int64))
    y = grpc.infer("ints", [x]).as_numpy("y")
    assert y.dtype == np.int64 and y.tolist() == [2, -4, 1 << 41]

    # The TorchScript model serves beside them from the same worker.
    np.testing.assert_allclose(_infer_x(served.http_url, "torch"), [[0.0, 2.0, 4.0, 6.0]])


def test_metadata_config_and_index(served: Served) -> None:
    http = thttp.InferenceServerClient(served.http_url)
    grpc = tgrpc.InferenceServerClient(served.grpc_url)
    md = http.get_model_metadata("add")
    assert md["platform"] == "onnxruntime_onnx"
    assert [(i["name"], i["datatype"], i["shape"]) for i in md["inputs"]] == [
        ("a", "FP32", [-1, 4]),
        ("b", "FP32", [-1, 4]),
    ]
    assert [o["name"] for o in md["outputs"]] == ["sum", "mm"]
    # A config naming only the backend reports the platform it means.
    assert grpc.get_model_metadata("ints").platform == "onnxruntime_onnx"
    assert grpc.get_model_metadata("ints").inputs[0].shape == [3]
    cfg = http.get_model_config("add")
    assert cfg["platform"] == "onnxruntime_onnx" and cfg["max_batch_size"] == 8
    assert grpc.get_model_config("ints").config.backend == "onnxruntime"
    assert http.is_model_ready("add") and grpc.is_model_ready("ints")

    a, b = _ab(1, 2)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        x = thttp.InferInput(name, [1, 4], "FP32")
        x.set_data_from_numpy(value)
        inputs.append(x)
    http.infer("add", inputs)
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["add"]["state"] == "READY"
    [copy] = [c for c in _status(served)["copies"] if c["model"] == "add"]
    assert copy["footprint_bytes"] == 4 * 3 * 4  # W: 4x3 float32


def test_config_that_disagrees_with_the_graph_is_a_clear_4xx(served: Served) -> None:
    http = thttp.InferenceServerClient(served.http_url)
    inputs = []
    for name in ("a", "bee"):
        x = thttp.InferInput(name, [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), np.float32))
        inputs.append(x)
    with pytest.raises(InferenceServerException) as e:
        http.infer("misnamed", inputs)
    assert e.value.status() == "400"
    assert "model 'misnamed': model.onnx has no input 'bee' (its inputs: a, b)" in e.value.message()
    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["misnamed"]["state"] == "UNAVAILABLE"
    assert "has no input 'bee'" in index["misnamed"]["reason"]


async def test_dynamic_batching_runs_onnx_requests_together(served: Served) -> None:
    client = tgrpc_aio.InferenceServerClient(served.grpc_url)
    try:

        async def one(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            a, b = _ab(1, 100 + i)
            inputs = []
            for name, value in (("a", a), ("b", b)):
                x = tgrpc_aio.InferInput(name, [1, 4], "FP32")
                x.set_data_from_numpy(value)
                inputs.append(x)
            result = await client.infer("batched", inputs)
            return a + b, result.as_numpy("sum"), result.as_numpy("mm")

        results = await asyncio.gather(*(one(i) for i in range(16)))
    finally:
        await client.close()
    for i, (want, got, mm) in enumerate(results):
        np.testing.assert_allclose(got, want, rtol=1e-6)
        assert mm.shape == (1, 3), i
    address = (await asyncio.to_thread(_status, served))["workers"][0]["address"]
    from modelpool.gateway.workers import WorkerClient

    worker = WorkerClient("w", address)
    status = await worker.status(timeout_s=10)
    await worker.close()
    [copy] = [c for c in status.copies if c.model == "batched"]
    assert copy.inferences == 16 and copy.executions < 16


def test_onnx_models_are_evicted_and_reloaded_like_torch_ones(tmp_path: Path, serve) -> None:
    # Each holds 10 MB of weights (measured at load as the initializers' bytes; before
    # a first load estimated at its file size plus headroom): up to the high watermark
    # (0.95) of 30 MB, two fit and never three.
    for name in ("a", "b", "c"):
        write_sized_onnx(tmp_path, name, 10 * MB)
    # LRU's order, with no minimum residency: what this test is about.
    server = serve(
        tmp_path, "--device-memory-budget", "30MB", "--policy", "lru", "--min-residency", "0"
    )
    url = server.http_url

    def resident() -> set[str]:
        client = thttp.InferenceServerClient(url)
        return {m["name"] for m in client.get_model_repository_index() if m["state"] == "READY"}

    want = [[0.0, 2.0, 4.0, 6.0]]
    np.testing.assert_allclose(_infer_x(url, "a"), want)
    np.testing.assert_allclose(_infer_x(url, "b"), want)
    np.testing.assert_allclose(_infer_x(url, "a"), want)  # b is now least recently used
    np.testing.assert_allclose(_infer_x(url, "c"), want)
    assert resident() == {"a", "c"}
    assert server.metric("modelpool_model_evictions_total", model="b", reason="capacity") == 1
    np.testing.assert_allclose(_infer_x(url, "b"), want)  # reloaded, evicting a
    assert resident() == {"b", "c"}
    assert server.metric("modelpool_model_loads_total", model="b", outcome="success") == 2
    footprints = {c["model"]: c["footprint_bytes"] for c in _status(server)["copies"]}
    assert footprints == {"b": 10 * MB + 4, "c": 10 * MB + 4}
    assert server.metric("modelpool_device_memory_bytes", kind="ours") <= 30 * MB


# -- the onnx extra missing from the worker -------------------------------------------

#: TEST SHIM, put first on PYTHONPATH: ``import onnxruntime`` fails as it does where
#: the extra is not installed. The gateway gets it too and never imports onnxruntime;
#: what the test observes is the worker's answer to a load.
SHIM = '''"""Test shim: onnxruntime is "not installed" in this process."""
raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")
'''


def test_missing_onnxruntime_is_a_clear_error_not_a_500(
    tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    shim = tmp_path / "shim"
    (shim / "onnxruntime").mkdir(parents=True)
    (shim / "onnxruntime" / "__init__.py").write_text(SHIM)
    repo = tmp_path / "repo"
    write_add(repo, "add")
    write_sized(repo, "torch", 1 << 20)
    old = [p for p in [os.environ.get("PYTHONPATH", "")] if p]
    monkeypatch.setenv("PYTHONPATH", ":".join([str(shim), *old]))
    server = serve(repo)
    monkeypatch.undo()

    http = thttp.InferenceServerClient(server.http_url)
    # Listed, with nothing wrong in its config, before anything tried to load it.
    assert http.get_model_metadata("add")["platform"] == "onnxruntime_onnx"
    a, b = _ab(1, 3)
    inputs = []
    for name, value in (("a", a), ("b", b)):
        x = thttp.InferInput(name, [1, 4], "FP32")
        x.set_data_from_numpy(value)
        inputs.append(x)
    with pytest.raises(InferenceServerException) as e:
        http.infer("add", inputs)
    assert e.value.status() == "400"
    assert MISSING_EXTRA in e.value.message() and "'add'" in e.value.message()

    grpc = tgrpc.InferenceServerClient(server.grpc_url)
    ginputs = []
    for name, value in (("a", a), ("b", b)):
        x = tgrpc.InferInput(name, [1, 4], "FP32")
        x.set_data_from_numpy(value)
        ginputs.append(x)
    with pytest.raises(InferenceServerException) as ge:
        grpc.infer("add", ginputs)
    assert ge.value.status() == "StatusCode.FAILED_PRECONDITION"
    assert MISSING_EXTRA in ge.value.message()

    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert index["add"]["state"] == "UNAVAILABLE" and MISSING_EXTRA in index["add"]["reason"]
    assert not http.is_model_ready("add")
    # TorchScript is untouched by the missing extra.
    np.testing.assert_allclose(_infer_x(server.http_url, "torch"), [[0.0, 2.0, 4.0, 6.0]])


# -- CUDA provider (pytest -m gpu on a GPU machine) ------------------------------------


def _cuda_provider_missing() -> str | None:
    import onnxruntime
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        return "needs onnxruntime-gpu (CUDAExecutionProvider)"
    return None


@pytest.mark.gpu
def test_cuda_provider_on_the_workers_device_and_memory_back_after_unload(
    tmp_path: Path,
) -> None:
    reason = _cuda_provider_missing()
    if reason:
        pytest.skip(reason)
    import torch

    write_sized_onnx(tmp_path, "big", 256 * MB)
    write_sized_onnx(tmp_path, "small", 1 * MB)
    device = torch.cuda.device_count() - 1  # the last device: device_id must follow cuda:N
    runtime = ModelRuntime(ModelRepository(tmp_path), f"cuda:{device}")
    # A first session loads the CUDA libraries' kernels into the process for good;
    # what is measured below is one model's own memory.
    runtime.load("small", 1)
    runtime.unload("small", 1)
    free_before, _ = torch.cuda.mem_get_info(device)
    loaded = runtime.load("big", 1)
    assert isinstance(loaded.module, OnnxModel)
    assert loaded.module.providers[0] == "CUDAExecutionProvider"
    options = loaded.module.session.get_provider_options()["CUDAExecutionProvider"]
    assert options["device_id"] == str(device)
    # Measured on the device: at least the weights, and not wildly more.
    assert 256 * MB <= loaded.footprint_bytes <= 256 * MB + (256 << 20)
    x = torch.tensor([[3.0, 1.0, 2.0, 5.0]])
    [y] = runtime.forward(loaded, [x])
    assert y.device.type == "cpu" and y.tolist() == [[6.0, 2.0, 4.0, 10.0]]
    del loaded
    runtime.unload("big", 1)
    free_after, _ = torch.cuda.mem_get_info(device)
    # The session's arena goes with it: the weights' memory is back on the device.
    assert free_before - free_after < 64 << 20


def test_onnxruntime_rejecting_an_input_is_the_models_400(tmp_path: Path) -> None:
    import torch

    from modelpool.placement.errors import InferenceError

    d = write_add(tmp_path, "m")
    # The config promises 5 columns; the graph has 4: onnxruntime refuses at run time.
    cfg = d / "config.pbtxt"
    cfg.write_text(
        cfg.read_text().replace(
            '"a" data_type: TYPE_FP32 dims: [ 4 ]', '"a" data_type: TYPE_FP32 dims: [ 5 ]'
        )
    )
    runtime = ModelRuntime(ModelRepository(tmp_path), "cpu", threads=1)
    loaded = runtime.load("m", 1)
    with pytest.raises(InferenceError, match="model 'm' failed on this input") as e:
        runtime.forward(loaded, [torch.zeros(1, 5), torch.zeros(1, 4)])
    assert e.value.http_status == 400
