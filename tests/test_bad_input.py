"""The bad-input matrix: every mistake gets a 4xx naming the model, tensor and problem,
and the server goes on serving everyone else."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.modelgen import Crashy, write_model, write_sized

MODEL = "mlp_00_2mb"  # input FP32 [-1, 64], max_batch_size 32


def _infer_body(shape: list[int], datatype: str = "FP32", name: str = "input", data=None) -> dict:
    n = int(np.prod(shape)) if shape else 0
    return {
        "inputs": [
            {
                "name": name,
                "shape": shape,
                "datatype": datatype,
                "data": data if data is not None else [0] * n,
            }
        ]
    }


def _post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"{}"), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        return (
            e.code,
            json.loads(raw) if raw.startswith(b"{") else {"raw": raw.decode(errors="replace")},
            dict(e.headers),
        )


@pytest.fixture(scope="module")
def bad_repo(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("badrepo")
    shutil.copytree(example_repo / MODEL, repo / MODEL)
    write_model(repo, "crashy", Crashy())
    write_sized(repo, "corrupt", 1 << 16)
    (repo / "corrupt" / "1" / "model.pt").write_bytes(b"this is not a torchscript archive")
    write_sized(repo, "badconfig", 1 << 16)
    (repo / "badconfig" / "config.pbtxt").write_text(
        'name: "badconfig"\nplatform: "pytorch_libtorch"\ninput { nme: "x" }\n'
    )
    write_sized(repo, "huge", 1 << 16)
    return repo


@pytest.fixture(scope="module")
def server(bad_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    from tests.conftest import start_serve

    s = start_serve(
        bad_repo, tmp_path_factory.mktemp("bad") / "serve.log", "--max-request-size", "1MiB"
    )
    yield s
    s.stop()


HTTP_CASES = [
    # (id, path model, body or raw bytes, headers, status, words in the message)
    ("unknown model", "nope", _infer_body([1, 64]), None, 404, ["nope"]),
    (
        "unknown version",
        f"{MODEL}/versions/7",
        _infer_body([1, 64]),
        None,
        404,
        [MODEL, "version 7"],
    ),
    (
        "wrong datatype",
        MODEL,
        _infer_body([1, 64], "INT32"),
        None,
        400,
        [MODEL, "input", "INT32", "FP32"],
    ),
    ("wrong shape", MODEL, _infer_body([1, 63]), None, 400, [MODEL, "input", "[1, 63]"]),
    ("batch too large", MODEL, _infer_body([33, 64]), None, 400, [MODEL, "input", "batch size 33"]),
    (
        "wrong element count",
        MODEL,
        _infer_body([1, 64], data=[0.0] * 10),
        None,
        400,
        [MODEL, "input", "10 elements"],
    ),
    ("missing input", MODEL, {"inputs": []}, None, 400, [MODEL, "missing", "input"]),
    (
        "extra input",
        MODEL,
        {
            "inputs": [
                *_infer_body([1, 64])["inputs"],
                {"name": "extra", "shape": [1], "datatype": "FP32", "data": [1]},
            ]
        },
        None,
        400,
        [MODEL, "unexpected input 'extra'"],
    ),
    ("malformed json", MODEL, b"{not json", None, 400, [MODEL, "JSON"]),
    ("no inputs list", MODEL, {"inputs": "x"}, None, 400, [MODEL, "inputs"]),
    (
        "unknown output",
        MODEL,
        {**_infer_body([1, 64]), "outputs": [{"name": "zzz"}]},
        None,
        400,
        [MODEL, "zzz"],
    ),
    (
        "bad datatype name",
        MODEL,
        _infer_body([1, 64], "FLOAT"),
        None,
        400,
        [MODEL, "input", "FLOAT"],
    ),
    ("non-numeric data", MODEL, _infer_body([1, 2], data=["a", "b"]), None, 400, [MODEL, "input"]),
    (
        "corrupt model.pt",
        "corrupt",
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]},
        None,
        400,
        ["corrupt", "model.pt"],
    ),
    ("bad config", "badconfig", {"inputs": []}, None, 400, ["badconfig", "config.pbtxt"]),
    (
        "model raises",
        "crashy",
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [-1, 2, 3, 4]}]},
        None,
        400,
        ["crashy", "negative input"],
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input(server, case) -> None:
    _, model, body, headers, status, words = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, doc, _ = _post(f"http://{server.http_url}/v2/models/{model}/infer", raw, headers)
    assert code == status, doc
    for w in words:
        assert w in doc["error"], (w, doc["error"])


def test_binary_header_length_mismatch(server) -> None:
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 256},
                }
            ]
        }
    ).encode()
    url = f"http://{server.http_url}/v2/models/{MODEL}/infer"
    # 255 bytes of tensor data where 256 are declared.
    code, doc, _ = _post(
        url, header + b"\0" * 255, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert code == 400 and MODEL in doc["error"] and "binary" in doc["error"]
    # A header length pointing past the body.
    code, doc, _ = _post(url, header, {"Inference-Header-Content-Length": str(len(header) + 10)})
    assert code == 400 and "Inference-Header-Content-Length" in doc["error"]
    # Right sizes: served.
    code, doc, _ = _post(
        url, header + b"\0" * 256, {"Inference-Header-Content-Length": str(len(header))}
    )
    assert code == 200, doc


def test_oversized_body_gets_413(server) -> None:
    n = 640_000  # about 2 MB of JSON, over the 1 MiB limit
    code, doc, _ = _post(
        f"http://{server.http_url}/v2/models/{MODEL}/infer",
        json.dumps(_infer_body([n // 64, 64])).encode(),
    )
    assert code == 413 and MODEL in doc["error"]


def test_model_name_escaping_repository_is_rejected(server) -> None:
    code, doc, _ = _post(f"http://{server.http_url}/v2/repository/models/..%2F..%2Fetc/load", b"{}")
    assert code in (400, 404)
    code, doc, _ = _post(
        f"http://{server.http_url}/v2/models/a..b/infer", json.dumps(_infer_body([1, 64])).encode()
    )
    assert code == 400 and "not allowed" in doc["error"]


def test_failed_models_listed_unavailable_with_reason(server) -> None:
    _, index, _ = _post(f"http://{server.http_url}/v2/repository/index", b"{}")
    entries = {m["name"]: m for m in index}
    assert (
        entries["badconfig"]["state"] == "UNAVAILABLE"
        and "config.pbtxt" in entries["badconfig"]["reason"]
    )
    _post(
        f"http://{server.http_url}/v2/models/corrupt/infer",
        b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}',
    )
    _, index, _ = _post(f"http://{server.http_url}/v2/repository/index", b"{}")
    entries = {m["name"]: m for m in index}
    assert (
        entries["corrupt"]["state"] == "UNAVAILABLE" and "model.pt" in entries["corrupt"]["reason"]
    )


GRPC_CASES = [
    ("unknown model", "nope", "FP32", [1, 64], grpc.StatusCode.NOT_FOUND),
    ("wrong datatype", MODEL, "INT32", [1, 64], grpc.StatusCode.INVALID_ARGUMENT),
    ("wrong shape", MODEL, "FP32", [2, 65], grpc.StatusCode.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case", GRPC_CASES, ids=[c[0] for c in GRPC_CASES])
def test_grpc_bad_input(server, case) -> None:
    _, model, datatype, shape, code = case
    client = tgrpc.InferenceServerClient(server.grpc_url)
    x = tgrpc.InferInput("input", shape, datatype)
    x.set_data_from_numpy(np.zeros(shape, dtype=np.float32 if datatype == "FP32" else np.int32))
    with pytest.raises(InferenceServerException) as err:
        client.infer(model, [x])
    assert err.value.status() == str(code)
    assert model in err.value.message()


def test_grpc_raw_count_and_size_mismatch(server) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(b"\0" * 100)  # 256 needed
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "100 bytes" in err.value.details() and "'input'" in err.value.details()
    # Typed contents (no raw bytes) with the wrong element count.
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    t.contents.fp32_contents.extend([1.0] * 3)
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(req, timeout=30)
    assert (
        err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "3 elements" in err.value.details()
    )
    # Typed contents, right count: served (the KServe SDK sends these).
    t.contents.fp32_contents.extend([1.0] * 61)
    resp = stub.ModelInfer(req, timeout=30)
    assert resp.outputs[0].name == "output"
    channel.close()


def test_server_keeps_serving_after_all_of_it(server) -> None:
    """After the whole matrix (and a model that raised), a good request still works and
    no worker restarted."""
    code, doc, _ = _post(
        f"http://{server.http_url}/v2/models/{MODEL}/infer",
        json.dumps(_infer_body([2, 64])).encode(),
    )
    assert code == 200 and len(doc["outputs"][0]["data"]) == 32
    assert "exited with code" not in server.log()
    assert (
        server.metric(
            "modelpool_requests_total", model=MODEL, protocol="http", outcome="client_error"
        )
        > 0
    )
    assert (
        server.metric(
            "modelpool_requests_total", model="_unknown", protocol="http", outcome="client_error"
        )
        > 0
    )
