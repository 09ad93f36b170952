"""The real ``modelpool serve`` called with tritonclient over HTTP (binary and JSON) and
gRPC (sync and aio); every output compared with torch running the same model.pt."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from modelpool.gpu.repository import read_model
from tests.payloads import inputs_for, torch_reference


def _models(repo: Path) -> list[str]:
    return sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())


def _check(result, reference: dict[str, np.ndarray]) -> None:
    for name, want in reference.items():
        got = result.as_numpy(name)
        assert got is not None, f"output {name} missing"
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_http_binary_and_json_match_torch(served_examples, example_repo: Path) -> None:
    client = thttp.InferenceServerClient(served_examples.http_url)
    for i, name in enumerate(_models(example_repo)):
        spec = read_model(example_repo / name)
        data = inputs_for(spec, batch=2, seed=i)
        ref = torch_reference(example_repo, name, data)
        for binary in (True, False):
            inputs = []
            for t in spec.inputs:
                x = thttp.InferInput(t.name, list(data[t.name].shape), t.datatype)
                x.set_data_from_numpy(data[t.name], binary_data=binary)
                inputs.append(x)
            outputs = [thttp.InferRequestedOutput(o.name, binary_data=binary) for o in spec.outputs]
            _check(client.infer(name, inputs, outputs=outputs), ref)


def test_grpc_sync_matches_torch(served_examples, example_repo: Path) -> None:
    client = tgrpc.InferenceServerClient(served_examples.grpc_url)
    for i, name in enumerate(_models(example_repo)):
        spec = read_model(example_repo / name)
        data = inputs_for(spec, batch=3, seed=100 + i)
        inputs = []
        for t in spec.inputs:
            x = tgrpc.InferInput(t.name, list(data[t.name].shape), t.datatype)
            x.set_data_from_numpy(data[t.name])
            inputs.append(x)
        _check(client.infer(name, inputs), torch_reference(example_repo, name, data))


async def test_grpc_aio_matches_torch(served_examples, example_repo: Path) -> None:
    client = tgrpc_aio.InferenceServerClient(served_examples.grpc_url)
    try:

        async def one(i: int, name: str) -> None:
            spec = read_model(example_repo / name)
            data = inputs_for(spec, batch=1, seed=200 + i)
            inputs = []
            for t in spec.inputs:
                x = tgrpc_aio.InferInput(t.name, list(data[t.name].shape), t.datatype)
                x.set_data_from_numpy(data[t.name])
                inputs.append(x)
            _check(await client.infer(name, inputs), torch_reference(example_repo, name, data))

        await asyncio.gather(*(one(i, n) for i, n in enumerate(_models(example_repo))))
    finally:
        await client.close()


def test_metadata_config_ready_and_index(served_examples, example_repo: Path) -> None:
    http = thttp.InferenceServerClient(served_examples.http_url)
    grpc = tgrpc.InferenceServerClient(served_examples.grpc_url)
    assert http.is_server_live() and http.is_server_ready()
    assert grpc.is_server_live() and grpc.is_server_ready()
    meta = http.get_server_metadata()
    assert meta["name"] == "modelpool" and "model_repository" in meta["extensions"]

    name = "pair_02_8mb"
    md = http.get_model_metadata(name)
    assert [i["name"] for i in md["inputs"]] == ["x", "y"]
    assert md["inputs"][0]["shape"] == [-1, 32] and md["platform"] == "pytorch_libtorch"
    assert http.get_model_metadata(name, model_version="1")["versions"] == ["1"]
    gmd = grpc.get_model_metadata(name)
    assert [o.name for o in gmd.outputs] == ["sum", "score"]

    cfg = http.get_model_config(name)
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["dims"] == [32]
    assert grpc.get_model_config(name, model_version="1").config.max_batch_size == 8

    # Loadable on demand answers ready, as the issue asks, resident or not.
    assert http.is_model_ready(name) and grpc.is_model_ready(name)
    assert http.is_model_ready(name, model_version="1")

    index = {m["name"]: m for m in http.get_model_repository_index()}
    assert set(index) == set(_models(example_repo))
    for m in index.values():
        assert m["state"] in ("READY", "UNAVAILABLE")
        if m["state"] == "UNAVAILABLE":
            assert m["reason"]
    grpc_index = grpc.get_model_repository_index()
    assert {m.name for m in grpc_index.models} == set(index)


def test_repository_load_unload_and_curl_style_json(served_examples) -> None:
    base = f"http://{served_examples.http_url}"
    name = "mlp_00_2mb"

    def post(path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(
            base + path,
            data=json.dumps(body or {}).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    assert post(f"/v2/repository/models/{name}/load")[0] == 200
    status, index = post("/v2/repository/index", {"ready": True})
    assert status == 200 and name in {m["name"] for m in index}
    status, body = post(
        f"/v2/models/{name}/infer",
        {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]},
    )
    assert status == 200
    assert body["model_name"] == name and len(body["outputs"][0]["data"]) == 16
    assert post(f"/v2/repository/models/{name}/unload")[0] == 200
    index = {m["name"]: m for m in post("/v2/repository/index")[1]}
    assert index[name]["state"] == "UNAVAILABLE"
    assert (
        served_examples.metric("modelpool_model_evictions_total", model=name, reason="unload") >= 1
    )
    assert post("/v2/repository/models/nope/load")[0] == 404


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_requests_counted_by_outcome(served_examples, protocol: str) -> None:
    name = "conv_07_6mb"
    before = served_examples.metric(
        "modelpool_requests_total", model=name, protocol=protocol, outcome="success"
    )
    mod = thttp if protocol == "http" else tgrpc
    client = mod.InferenceServerClient(
        served_examples.http_url if protocol == "http" else served_examples.grpc_url
    )
    x = mod.InferInput("image", [1, 3, 16, 16], "FP32")
    x.set_data_from_numpy(np.zeros((1, 3, 16, 16), np.float32))
    client.infer(name, [x])
    after = served_examples.metric(
        "modelpool_requests_total", model=name, protocol=protocol, outcome="success"
    )
    assert after == before + 1


def test_triton_statistics_over_http_and_grpc(served_examples) -> None:
    name = "embed_01_4mb"
    http = thttp.InferenceServerClient(served_examples.http_url)
    grpc = tgrpc.InferenceServerClient(served_examples.grpc_url)
    before = http.get_inference_statistics(name)["model_stats"][0]
    x = thttp.InferInput("token_ids", [2, 16], "INT64")
    x.set_data_from_numpy(np.arange(32, dtype=np.int64).reshape(2, 16))
    for _ in range(3):
        http.infer(name, [x])
    bad = thttp.InferInput("token_ids", [2, 15], "INT64")
    bad.set_data_from_numpy(np.zeros((2, 15), np.int64))
    with pytest.raises(InferenceServerException):
        http.infer(name, [bad])
    after = http.get_inference_statistics(name)["model_stats"][0]
    assert after["name"] == name and after["version"] == "1"
    stats, prev = after["inference_stats"], before["inference_stats"]
    assert stats["success"]["count"] - prev.get("success", {}).get("count", 0) == 3
    assert stats["fail"]["count"] - prev.get("fail", {}).get("count", 0) == 1
    assert after["inference_count"] - before.get("inference_count", 0) == 6  # batch 2, three times
    assert stats["queue"]["ns"] > 0 and stats["compute_infer"]["ns"] > 0
    g = grpc.get_inference_statistics(name)
    assert g.model_stats[0].inference_stats.success.count == stats["success"]["count"]
    every = http.get_inference_statistics()
    assert {m["name"] for m in every["model_stats"]} >= {name, "mlp_00_2mb"}


def test_modelpool_status_shows_resident_models(served_examples) -> None:
    import subprocess
    import sys

    client = thttp.InferenceServerClient(served_examples.http_url)
    x = thttp.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros((1, 64), np.float32))
    client.infer("mlp_00_2mb", [x])
    url = f"http://{served_examples.http_url}"
    out = subprocess.run(
        [sys.executable, "-m", "modelpool.gateway.cli", "status", "--url", url],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("modelpool") and "resident" in lines[0]
    row = next(line for line in lines if line.startswith("mlp_00_2mb"))
    assert "READY" in row and "MiB" in row
    assert any(line.startswith("DEVICE") for line in lines) and any(
        line.startswith("WORKER") for line in lines
    )
    raw = subprocess.run(
        [sys.executable, "-m", "modelpool.gateway.cli", "status", "--url", url, "--json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    doc = json.loads(raw.stdout)
    assert any(c["model"] == "mlp_00_2mb" and c["state"] == "READY" for c in doc["copies"])
    assert doc["devices"][0]["total_bytes"] == 1 << 30
