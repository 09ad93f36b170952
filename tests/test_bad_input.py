"""The bad-input matrix: every mistake gets a 4xx naming the model, tensor and problem,
and the server goes on serving everyone else. Then a seeded fuzz of 10,000 malformed
requests per protocol (``tests/fuzz_inputs.py``), none of which may get a 5xx."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from aiohttp.test_utils import TestClient, TestServer
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException
from yarl import URL

from modelpool.gateway.dataplane import InferOutcome
from modelpool.gateway.grpc_server import InferenceServicer
from modelpool.gateway.rest import create_rest_app
from modelpool.gateway.validate import (
    client_timeout,
    grpc_timeout_parameter,
    timeout_microseconds,
    timeout_seconds,
)
from modelpool.placement.errors import InvalidInput, ModelNotFound
from tests.fuzz_inputs import SERVICE, Case, grpc_case, rest_case
from tests.modelgen import Crashy, Sized, write_model, write_sized

MODEL = "mlp_00_2mb"  # input FP32 [-1, 64], max_batch_size 32
#: Longest error message any reply may carry: client strings are clipped in messages.
MAX_MESSAGE = 2000


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
    # For the fuzz: an embedding (int64 ids), a model with a variable dimension, and
    # one without a batch dimension (see tests/fuzz_inputs.py MODELS).
    shutil.copytree(example_repo / "embed_01_4mb", repo / "embed_01_4mb")
    write_model(repo, "dyn", Sized(1 << 12))
    (repo / "dyn" / "config.pbtxt").write_text(
        'name: "dyn"\nplatform: "pytorch_libtorch"\nmax_batch_size: 8\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [ -1 ] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [ -1 ] }\n'
    )
    write_model(repo, "nobatch", Sized(1 << 12))
    (repo / "nobatch" / "config.pbtxt").write_text(
        'name: "nobatch"\nplatform: "pytorch_libtorch"\nmax_batch_size: 0\n'
        'input { name: "x" data_type: TYPE_FP32 dims: [ 2, -1 ] }\n'
        'output { name: "y" data_type: TYPE_FP32 dims: [ 2, -1 ] }\n'
    )
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
    # Names that cannot be directory names: 400 (a long one once raised OSError: 500).
    ("overlong model name", "a" * 5000, _infer_body([1, 64]), None, 400, ["5000 characters"]),
    ("longest name", "a" * 255, _infer_body([1, 64]), None, 404, ["not in the model repository"]),
    ("name with %2F", "..%2F" + MODEL, _infer_body([1, 64]), None, 400, ["not allowed"]),
    ("name with NUL", MODEL + "%00", _infer_body([1, 64]), None, 400, ["not allowed"]),
    ("name with newline", MODEL + "%0A", _infer_body([1, 64]), None, 400, ["not allowed"]),
    ("unicode name", "%C3%A9" + MODEL, _infer_body([1, 64]), None, 400, ["not allowed"]),
    ("hidden name", ".hidden", _infer_body([1, 64]), None, 400, ["not allowed"]),
    ("version not a number", f"{MODEL}/versions/1x", _infer_body([1, 64]), None, 400, ["1x"]),
    (
        "version of 5000 digits",
        f"{MODEL}/versions/{'9' * 5000}",
        _infer_body([1, 64]),
        None,
        404,
        [MODEL],
    ),
    # Shapes (a dimension past int64 once failed building the protobuf: 500).
    (
        "dimension beyond int64",
        MODEL,
        _infer_body([1, 2**63], data=[]),
        None,
        400,
        [MODEL, "'input'", "int64"],
    ),
    (
        "dimension of 3000 digits",
        MODEL,
        _infer_body([1, 10**3000], data=[]),
        None,
        400,
        [MODEL, "'input'", "int64", "3001 chars"],
    ),
    (
        "element count overflow",
        MODEL,
        _infer_body([2**62, 2**62], data=[]),
        None,
        400,
        [MODEL, "'input'", "elements"],
    ),
    ("negative dimension", MODEL, _infer_body([-1, 64], data=[]), None, 400, ["negative"]),
    (
        "too many dimensions",
        MODEL,
        _infer_body([1] * 1000, data=[0]),
        None,
        400,
        ["1000 dimensions"],
    ),
    # Bodies.
    ("deeply nested JSON", MODEL, b'{"inputs": ' + b"[" * 100_000, None, 400, [MODEL, "JSON"]),
    (
        "lone surrogate in a name",
        MODEL,
        _infer_body([1, 64], name="\ud800"),
        None,
        400,
        [MODEL, "Unicode"],
    ),
    (
        "binary_data_size true",
        MODEL,
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, 64],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": True},
                }
            ]
        },
        None,
        400,
        [MODEL, "binary_data_size"],
    ),
    # Deadlines: the header in seconds, the parameter in microseconds.
    (
        "timeout header not a number",
        MODEL,
        _infer_body([1, 64]),
        {"Modelpool-Timeout": "soon"},
        400,
        [MODEL, "Modelpool-Timeout", "soon"],
    ),
    (
        "timeout header zero",
        MODEL,
        _infer_body([1, 64]),
        {"Modelpool-Timeout": "0"},
        400,
        ["Modelpool-Timeout"],
    ),
    (
        "timeout header negative",
        MODEL,
        _infer_body([1, 64]),
        {"Modelpool-Timeout": "-1"},
        400,
        ["Modelpool-Timeout"],
    ),
    (
        "timeout header nan",
        MODEL,
        _infer_body([1, 64]),
        {"Modelpool-Timeout": "nan"},
        400,
        ["Modelpool-Timeout"],
    ),
    (
        "timeout header inf",
        MODEL,
        _infer_body([1, 64]),
        {"Modelpool-Timeout": "inf"},
        400,
        ["Modelpool-Timeout"],
    ),
    (
        "timeout parameter negative",
        MODEL,
        {**_infer_body([1, 64]), "parameters": {"timeout": -5}},
        None,
        400,
        [MODEL, "parameter 'timeout'"],
    ),
    (
        "timeout parameter a string",
        MODEL,
        {**_infer_body([1, 64]), "parameters": {"timeout": "5"}},
        None,
        400,
        [MODEL, "parameter 'timeout'"],
    ),
    ("timeout header valid", MODEL, _infer_body([1, 64]), {"Modelpool-Timeout": "30"}, 200, []),
    (
        "timeout parameter valid",
        MODEL,
        {**_infer_body([1, 64]), "parameters": {"timeout": 30_000_000}},
        {"Modelpool-Timeout": "60.5"},
        200,
        [],
    ),
]


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_http_bad_input(server, case) -> None:
    _, model, body, headers, status, words = case
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    code, doc, _ = _post(f"http://{server.http_url}/v2/models/{model}/infer", raw, headers)
    assert code == status, doc
    if status == 200:
        assert len(doc["outputs"][0]["data"]) == 16
        return
    assert len(doc["error"]) <= MAX_MESSAGE, len(doc["error"])
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


def _grpc_infer(stub, req: pb.ModelInferRequest, **kw) -> grpc.RpcError | pb.ModelInferResponse:
    try:
        return stub.ModelInfer(req, timeout=30, **kw)
    except grpc.RpcError as e:
        return e


def _valid_grpc_request(name: str = MODEL) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=name)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 64])
    req.raw_input_contents.append(b"\0" * 256)
    return req


def test_grpc_names_shapes_contents_and_parameters(server) -> None:
    channel = grpc.insecure_channel(server.grpc_url)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)

    def invalid(req: pb.ModelInferRequest, *words: str) -> None:
        err = _grpc_infer(stub, req)
        assert isinstance(err, grpc.RpcError), words
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert len(err.details()) <= MAX_MESSAGE
        for w in words:
            assert w in err.details(), (w, err.details())

    invalid(_valid_grpc_request("m" * 100_000), "100000 characters")
    invalid(_valid_grpc_request("../" + MODEL), "not allowed")
    invalid(_valid_grpc_request(MODEL + "\0"), "not allowed")
    err = _grpc_infer(stub, _valid_grpc_request("m" * 255))
    assert err.code() == grpc.StatusCode.NOT_FOUND

    req = _valid_grpc_request()
    req.inputs[0].ClearField("shape")
    req.inputs[0].shape.extend([2**63 - 1, 2**63 - 1])
    invalid(req, MODEL, "'input'", "batch size")
    req.inputs[0].ClearField("shape")
    req.inputs[0].shape.extend([1] * 5000)
    invalid(req, MODEL, "'input'", "5000 dimensions")

    # Typed contents that do not fit their datatype: uint_contents carries UINT8.
    req = pb.ModelInferRequest(model_name=MODEL)
    t = req.inputs.add(name="input", datatype="UINT8", shape=[1, 64])
    t.contents.uint_contents.extend([300] * 64)
    invalid(req, MODEL, "'input'", "UINT8")

    # Triton's timeout parameter: int64 microseconds.
    for bad in ("string_param", "double_param", "bool_param"):
        req = _valid_grpc_request()
        setattr(req.parameters["timeout"], bad, type(getattr(pb.InferParameter(), bad))(1))
        invalid(req, MODEL, "parameter 'timeout'", bad)
    req = _valid_grpc_request()
    req.parameters["timeout"].int64_param = -1
    invalid(req, MODEL, "parameter 'timeout'")
    req.parameters["timeout"].int64_param = 30_000_000
    assert stub.ModelInfer(req, timeout=30).outputs[0].name == "output"

    # Bytes that are no request, to an RPC whose request grpc.aio would parse.
    metadata = channel.unary_unary(SERVICE + "ModelMetadata")
    with pytest.raises(grpc.RpcError) as e:
        metadata(b"\xff\xff\xff", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ModelMetadataRequest" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.ModelMetadata(pb.ModelMetadataRequest(name="x" * 1000), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()


def test_tritonclient_timeout_and_deadline_are_served(server) -> None:
    """tritonclient's ``infer(timeout=...)`` (the microseconds parameter) and a gRPC
    deadline, both generous: the request is served."""
    client = tgrpc.InferenceServerClient(server.grpc_url)
    x = tgrpc.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(np.zeros([1, 64], dtype=np.float32))
    result = client.infer(MODEL, [x], timeout=30_000_000, client_timeout=30)
    assert result.as_numpy("output").shape == (1, 16)
    client.close()


# -- the edges pass the client's time on ---------------------------------------------------
def test_timeout_parsing() -> None:
    assert timeout_seconds("2.5", "h") == 2.5
    assert timeout_seconds(" 1e-1 ", "h") == pytest.approx(0.1)
    assert timeout_seconds(".5", "h") == 0.5
    for bad in ("", "0", "-1", "nan", "inf", "1e999", "abc", "1,5", "0x10", "\uff11", "+5", "1_0"):
        with pytest.raises(InvalidInput, match="header X"):
            timeout_seconds(bad, "header X")
    assert timeout_microseconds(2_500_000, "p") == 2.5
    assert timeout_microseconds(3e6, "p") == 3.0  # JSON's 3e6 is a float
    assert timeout_microseconds(0, "p") is None  # Triton: 0 is no timeout
    for bad in (-1, 1.5, float("nan"), float("inf"), True, "5", None, 1 << 64):
        with pytest.raises(InvalidInput, match="parameter P"):
            timeout_microseconds(bad, "parameter P")
    assert client_timeout(None, None) is None
    assert client_timeout(3.0, None, 2.0) == 2.0
    req = pb.ModelInferRequest(model_name="m")
    assert grpc_timeout_parameter(req) is None
    req.parameters["timeout"].int64_param = 1_000_000
    assert grpc_timeout_parameter(req) == 1.0
    req.parameters["timeout"].string_param = "1"
    with pytest.raises(InvalidInput, match="'m': parameter 'timeout'"):
        grpc_timeout_parameter(req)


class _RecordingPlane:
    """Just enough of DataPlane for the edges: records ``client_timeout_s``."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def authenticate(self, authorization: str | None, **audit: object) -> None:
        return None  # auth off

    def spec(self, name: str, version: str | int | None = None, tenant: object = None):
        if name != "m":
            raise ModelNotFound(f"model '{name}' is not in the model repository")
        return None, 1

    def check_known(self, name: str, version: str = "", tenant: object = None) -> None:
        self.spec(name, version, tenant)

    async def infer(
        self,
        request: pb.ModelInferRequest | Callable[[], pb.ModelInferRequest],
        protocol: str,
        model: str | None = None,
        raw: bytes | None = None,
        client_timeout_s: float | None = None,
        tenant: object = None,
        route: object = None,
        trace: object = None,
    ) -> InferOutcome:
        if callable(request):
            request()  # a parse failure raises here, as in the real data plane
        self.timeouts.append(client_timeout_s)
        return InferOutcome(False, response=pb.ModelInferResponse(model_name="m"))


@pytest.mark.parametrize(
    ("header", "parameter", "expected"),
    [
        (None, None, None),
        ("2.5", None, 2.5),
        (None, 1_500_000, 1.5),
        ("5", 2_000_000, 2.0),  # the smaller wins
        ("0.25", 2_000_000, 0.25),
        (None, 0, None),  # Triton's 0: no timeout
    ],
)
async def test_rest_timeout_reaches_the_data_plane(header, parameter, expected) -> None:
    plane = _RecordingPlane()
    body: dict = {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}
    if parameter is not None:
        body["parameters"] = {"timeout": parameter}
    headers = {"Modelpool-Timeout": header} if header is not None else {}
    async with TestClient(TestServer(create_rest_app(plane, 1 << 20))) as client:
        r = await client.post("/v2/models/m/infer", data=json.dumps(body), headers=headers)
        assert r.status == 200, await r.text()
        # Malformed: a 400 naming the header or the parameter, never reaching a worker.
        r = await client.post(
            "/v2/models/m/infer", data=json.dumps(body), headers={"Modelpool-Timeout": "-3"}
        )
        assert r.status == 400 and "Modelpool-Timeout" in (await r.json())["error"]
        r = await client.post(
            "/v2/models/m/infer", data=json.dumps({**body, "parameters": {"timeout": "x"}})
        )
        assert r.status == 400 and "parameter 'timeout'" in (await r.json())["error"]
    assert plane.timeouts == [expected]


@dataclass
class _Aborted(Exception):
    code: grpc.StatusCode
    details: str


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def abort(self, code, details, trailing_metadata=()) -> None:
        raise _Aborted(code, details)


@pytest.mark.parametrize(
    ("deadline", "parameter", "expected"),
    [
        (None, None, None),
        (4.0, None, 4.0),
        (None, 1_500_000, 1.5),
        (4.0, 1_500_000, 1.5),
        (0.5, 1_500_000, 0.5),
        (-1.0, None, 0.0),  # already past: no time left
    ],
)
async def test_grpc_timeout_reaches_the_data_plane(deadline, parameter, expected) -> None:
    plane = _RecordingPlane()
    servicer = InferenceServicer(plane)
    req = pb.ModelInferRequest(model_name="m")
    if parameter is not None:
        req.parameters["timeout"].int64_param = parameter
    await servicer.ModelInfer(req.SerializeToString(), _Context(deadline))
    assert plane.timeouts == [expected]
    req.parameters["timeout"].int64_param = -1
    with pytest.raises(_Aborted) as err:
        await servicer.ModelInfer(req.SerializeToString(), _Context(deadline))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameter 'timeout'" in err.value.details
    assert plane.timeouts == [expected]


def test_very_long_client_timeouts_are_served(server) -> None:
    """Valid, if absurd, client timeouts (int64 microseconds is 292,000 years) must be
    served like no timeout at all."""
    url = f"http://{server.http_url}/v2/models/{MODEL}/infer"
    code, doc, _ = _post(
        url, json.dumps({**_infer_body([1, 64]), "parameters": {"timeout": 2**63 - 1}}).encode()
    )
    assert code == 200, doc
    code, doc, _ = _post(
        url, json.dumps(_infer_body([1, 64])).encode(), {"Modelpool-Timeout": "1e12"}
    )
    assert code == 200, doc


# -- the fuzz ----------------------------------------------------------------------------------
FUZZ_SEED = int(os.environ.get("MODELPOOL_FUZZ_SEED", "20251130"))
FUZZ_CASES = int(os.environ.get("MODELPOOL_FUZZ_CASES", "10000"))
FUZZ_CONCURRENCY = 8


@dataclass
class _Outcome:
    """What the fuzz saw: counts per status, and the cases that broke a rule as
    (kind, description) pairs."""

    counts: Counter
    failures: list[tuple[str, str]]
    seconds: float

    def report(self) -> str:
        """Counts per kind of failure, and the first few cases of each."""
        kinds = Counter(kind for kind, _ in self.failures)
        lines = [f"{len(self.failures)} failures {dict(kinds)}; statuses {dict(self.counts)}"]
        for kind in kinds:
            lines += [text for k, text in self.failures if k == kind][:3]
        return "\n".join(lines)


async def _drive(n: int, one: Callable[[int], object]) -> float:
    """Run ``one(i)`` for i in 0..n-1, FUZZ_CONCURRENCY at a time; seconds taken."""
    started = time.monotonic()
    queue = iter(range(n))

    async def lane() -> None:
        for i in queue:
            await one(i)  # type: ignore[misc]

    await asyncio.gather(*(lane() for _ in range(FUZZ_CONCURRENCY)))
    return time.monotonic() - started


async def _fuzz_rest(base: str, seed: int, n: int) -> _Outcome:
    counts: Counter = Counter()
    failures: list[tuple[str, str]] = []
    timeout = aiohttp.ClientTimeout(total=60)
    pooled = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=FUZZ_CONCURRENCY), timeout=timeout
    )
    fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True), timeout=timeout)
    async with pooled, fresh:

        async def send(session: aiohttp.ClientSession, case: Case) -> tuple[int, bytes]:
            async with session.request(
                case.method,
                URL(base + case.path, encoded=True),
                data=case.body,
                headers=case.headers,
                skip_auto_headers=("Content-Type",),
            ) as r:
                return r.status, await r.read()

        async def one(i: int) -> None:
            case = rest_case(seed, i)
            try:
                status, body = await send(pooled, case)
            except aiohttp.ClientError:
                # A pooled connection the server closed after answering an earlier
                # request (aiohttp's own 400 for a request line over 8190 bytes closes
                # without "Connection: close") can reset under the next request: the
                # same request on a connection of its own must get an answer.
                counts["resent"] += 1
                try:
                    status, body = await send(fresh, case)
                except aiohttp.ClientError as e:
                    failures.append((type(e).__name__, f"{case.describe()}\n  -> {e}"))
                    return
            counts[status] += 1
            problem = _rest_problem(status, body)
            if problem:
                failures.append((f"{status} {problem}", f"{case.describe()}\n  -> {body[:300]!r}"))

        seconds = await _drive(n, one)
    return _Outcome(counts, failures, seconds)


def _rest_problem(status: int, body: bytes) -> str | None:
    if status >= 500:
        return "server error"
    if status >= 400 and body.startswith(b"{"):
        error = json.loads(body).get("error", "")
        if len(error) > MAX_MESSAGE:
            return f"{len(error)}-character message"
    return None


#: gRPC codes a bad request may get: its own fault (400, 404, 413 in HTTP terms).
CLIENT_CODES = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the message size limit
}


async def _fuzz_grpc(target: str, seed: int, n: int) -> _Outcome:
    counts: Counter = Counter()
    failures: list[tuple[str, str]] = []
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

        async def one(i: int) -> None:
            case = grpc_case(seed, i)
            call = calls.get(case.method)
            if call is None:
                call = calls[case.method] = channel.unary_unary(SERVICE + case.method)
            try:
                await call(case.body, timeout=case.timeout_s)
                code, details, trailing = grpc.StatusCode.OK, "", ()
            except grpc.aio.AioRpcError as e:
                code, details = e.code(), e.details() or ""
                trailing = tuple(e.trailing_metadata() or ())
            counts[code.name] += 1
            problem = _grpc_problem(code, details, trailing)
            if problem:
                failures.append(
                    (f"{code.name} {problem}", f"{case.describe()}\n  -> {details[:300]!r}")
                )

        seconds = await _drive(n, one)
    return _Outcome(counts, failures, seconds)


def _grpc_problem(code: grpc.StatusCode, details: str, trailing: tuple) -> str | None:
    if len(details) > MAX_MESSAGE:
        return f"{len(details)}-character message"
    if code in CLIENT_CODES:
        return None
    if code == grpc.StatusCode.UNAVAILABLE and "is not available" in details:
        # ModelNotReady (a model whose config is bad): HTTP 400, gRPC UNAVAILABLE as in
        # Triton; it carries no retry-after, a capacity 503 would.
        if not any(k == "retry-after" for k, _ in trailing):
            return None
    return "server-side status"


def _still_serves(server) -> None:
    code, doc, _ = _post(
        f"http://{server.http_url}/v2/models/{MODEL}/infer",
        json.dumps(_infer_body([3, 64])).encode(),
    )
    assert code == 200 and len(doc["outputs"][0]["data"]) == 48, doc
    client = tgrpc.InferenceServerClient(server.grpc_url)
    x = tgrpc.InferInput("input", [2, 64], "FP32")
    x.set_data_from_numpy(np.ones([2, 64], dtype=np.float32))
    assert client.infer(MODEL, [x]).as_numpy("output").shape == (2, 16)
    client.close()
    assert "exited with code" not in server.log()


def test_fuzz_cases_are_deterministic() -> None:
    """A failure's index rebuilds its request: same seed and index, same bytes."""
    for i in (0, 1, 977, 9999):
        a, b = rest_case(FUZZ_SEED, i), rest_case(FUZZ_SEED, i)
        assert (a.path, a.headers, a.body) == (b.path, b.headers, b.body)
        assert grpc_case(FUZZ_SEED, i).body == grpc_case(FUZZ_SEED, i).body
    assert rest_case(FUZZ_SEED, 1).body != rest_case(FUZZ_SEED + 1, 1).body


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fuzz_rest_never_answers_5xx(server) -> None:
    out = await _fuzz_rest(f"http://{server.http_url}", FUZZ_SEED, FUZZ_CASES)
    print(f"REST fuzz: {FUZZ_CASES} cases in {out.seconds:.1f}s: {dict(out.counts)}")
    assert not out.failures, out.report()
    assert sum(out.counts.values()) - out.counts["resent"] == FUZZ_CASES
    assert out.counts["resent"] < FUZZ_CASES // 100
    assert out.counts[200] > 0 and out.counts[400] > 0  # it reached the worker, too
    _still_serves(server)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_fuzz_grpc_never_answers_5xx(server) -> None:
    out = await _fuzz_grpc(server.grpc_url, FUZZ_SEED, FUZZ_CASES)
    print(f"gRPC fuzz: {FUZZ_CASES} cases in {out.seconds:.1f}s: {dict(out.counts)}")
    assert not out.failures, out.report()
    assert sum(out.counts.values()) == FUZZ_CASES
    assert out.counts["OK"] > 0 and out.counts["INVALID_ARGUMENT"] > 0
    _still_serves(server)


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
