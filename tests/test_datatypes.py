"""Every Triton datatype, in and out, over every encoding, through the real
``modelpool serve`` (tests/dtype_models.py holds the models and sample values):

- HTTP JSON (``data`` lists: numbers, BF16 as floats, BYTES as strings),
- HTTP binary data extension (raw bytes; BYTES length-prefixed),
- gRPC typed ``contents`` (FP16 and BF16 have no field: a clear 400, as in Triton),
- gRPC raw_input_contents (what tritonclient sends).

Plus BYTES models listed READY, a tokenizer-like model (List[str] in, tensor and
List[str] out), malformed BYTES as 400s naming model, tensor and problem, and the codec
functions against torch and tritonclient.
"""

from __future__ import annotations

import concurrent.futures
import json
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import ml_dtypes
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import (
    InferenceServerException,
    deserialize_bytes_tensor,
    serialize_byte_tensor,
    triton_to_np_dtype,
)

from modelpool.gateway.rest_codec import json_values, parse_infer
from modelpool.gpu.tensors import (
    CONTENTS_FIELD,
    DATATYPES,
    TensorFormatError,
    bf16_from_float,
    bf16_to_float,
    bytes_problem,
    deserialize_bytes,
    serialize_bytes,
)
from modelpool.placement.errors import InvalidInput
from tests.conftest import Served, start_serve
from tests.dtype_models import (
    DATATYPES as TRITON_DATATYPES,
)
from tests.dtype_models import (
    json_data,
    model_name,
    sample,
    write_datatype_repo,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = write_datatype_repo(tmp_path_factory.mktemp("dtypes"))
    s = start_serve(
        repo, tmp_path_factory.mktemp("dtypes-log") / "serve.log", "--device-memory-budget", "1GiB"
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(server: Served) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def _equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == np.object_:
        assert [bytes(b) for b in got.flatten()] == list(want.flatten())
    else:
        assert got.dtype == want.dtype
        # Bitwise: -0.0 stays -0.0, and no float comparison can hide a lost bit.
        assert got.tobytes() == want.tobytes()


def _post(server: Served, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://{server.http_url}{path}", data=body, method="POST", headers=headers or {}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


# -- every datatype, both ways, every encoding -------------------------------------------
@pytest.mark.parametrize("datatype", TRITON_DATATYPES)
def test_http_json(server: Served, datatype: str) -> None:
    want = sample(datatype)
    name = model_name(datatype)
    if datatype == "BF16":
        # tritonclient refuses to send BF16 as JSON; the protocol allows it (floats).
        body = {
            "inputs": [{"name": "x", "datatype": "BF16", "shape": [2, 3], "data": json_data(want)}],
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        }
        status, reply = _post(server, f"/v2/models/{name}/infer", json.dumps(body).encode())
        assert status == 200, reply
        (out,) = reply["outputs"]
        assert out["datatype"] == "BF16" and out["shape"] == [2, 3]
        _equal(np.array(out["data"], dtype=np.float32).astype(ml_dtypes.bfloat16), want.flatten())
        return
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [2, 3], datatype)
    x.set_data_from_numpy(want, binary_data=False)
    result = client.infer(name, [x], outputs=[thttp.InferRequestedOutput("y", binary_data=False)])
    out = result.get_output("y")
    assert "data" in out and "binary_data_size" not in out.get("parameters", {})
    assert out["datatype"] == datatype
    got = result.as_numpy("y")
    if datatype == "BYTES":  # JSON carries text: tritonclient gives str back
        got = np.array([s.encode("utf-8") for s in got.flatten()], dtype=np.object_).reshape(
            got.shape
        )
    _equal(got, want)


@pytest.mark.parametrize("datatype", TRITON_DATATYPES)
def test_http_binary(server: Served, datatype: str) -> None:
    want = sample(datatype)
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [2, 3], datatype)
    x.set_data_from_numpy(want, binary_data=True)
    result = client.infer(
        model_name(datatype), [x], outputs=[thttp.InferRequestedOutput("y", binary_data=True)]
    )
    out = result.get_output("y")
    assert "data" not in out and out["parameters"]["binary_data_size"] > 0
    _equal(result.as_numpy("y"), want)


@pytest.mark.parametrize("datatype", TRITON_DATATYPES)
def test_grpc_raw(server: Served, datatype: str) -> None:
    want = sample(datatype)
    client = tgrpc.InferenceServerClient(server.grpc_url)
    x = tgrpc.InferInput("x", [2, 3], datatype)
    x.set_data_from_numpy(want)
    result = client.infer(model_name(datatype), [x])
    assert result.get_output("y").datatype == datatype
    _equal(result.as_numpy("y"), want)


@pytest.mark.parametrize("datatype", TRITON_DATATYPES)
def test_grpc_contents(stub, datatype: str) -> None:
    want = sample(datatype)
    request = pb.ModelInferRequest(model_name=model_name(datatype))
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 3])
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        # Triton's proto has no typed field for FP16 and BF16: they go raw only.
        assert datatype in ("FP16", "BF16")
        tensor.contents.fp32_contents.extend([1.0] * 6)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request, timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = err.value.details()
        assert model_name(datatype) in detail and "'x'" in detail
        assert "not supported in typed contents" in detail
        return
    getattr(tensor.contents, field).extend(want.flatten().tolist())
    reply = stub.ModelInfer(request, timeout=60)
    (out,) = reply.outputs
    assert out.datatype == datatype and list(out.shape) == [2, 3]
    raw = reply.raw_output_contents[0]
    if datatype == "BYTES":
        got = deserialize_bytes_tensor(raw).reshape(2, 3)
    else:
        got = np.frombuffer(raw, dtype=triton_to_np_dtype(datatype)).reshape(2, 3)
    _equal(got, want)


# -- BYTES models and their shapes -------------------------------------------------------
def test_string_models_are_ready(server: Served) -> None:
    client = thttp.InferenceServerClient(server.http_url)
    # Not loaded yet is UNAVAILABLE with this reason; a config refused names the problem.
    index = {m["name"]: m for m in client.get_model_repository_index()}
    for name in ("tokenizer", *map(model_name, TRITON_DATATYPES)):
        entry = index[name]
        assert entry["state"] == "READY" or entry["reason"].startswith("unloaded"), entry
    client.load_model("tokenizer")
    client.load_model("id_bf16")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["tokenizer"]["state"] == "READY" and index["id_bf16"]["state"] == "READY"
    meta = client.get_model_metadata("tokenizer")
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [o["datatype"] for o in meta["outputs"]] == ["INT64", "BYTES"]
    assert client.get_model_config("id_bf16")["input"][0]["data_type"] == "TYPE_BF16"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tokenizer_mixed_outputs_and_batch(server: Served, protocol: str) -> None:
    texts = [["one two"], ["fünf"], [""], ["a\x00b"]]
    module = torch.jit.load(str(server.repo / "tokenizer" / "1" / "model.pt"))
    want_lengths, want_upper = module([t[0] for t in texts])  # List[str]: flat, row-major
    lib = thttp if protocol == "http" else tgrpc
    url = server.http_url if protocol == "http" else server.grpc_url

    def one(i: int) -> None:
        client = lib.InferenceServerClient(url)
        rows = texts[: 1 + i % len(texts)]
        x = lib.InferInput("text", [len(rows), 1], "BYTES")
        x.set_data_from_numpy(np.array([[t[0].encode()] for t in rows], dtype=np.object_))
        result = client.infer("tokenizer", [x])
        assert result.as_numpy("lengths").tolist() == want_lengths[: len(rows)].tolist()
        upper = result.as_numpy("upper")
        assert upper.shape == (len(rows), 1)
        assert [u.decode("utf-8") for u in upper.flatten()] == want_upper[: len(rows)]

    # Concurrent requests to a dynamic_batching model: BYTES ones run each alone.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(8)))


# -- malformed BYTES are 400s naming model, tensor and problem -----------------------------
def _binary_body(raw: bytes, shape: list[int]) -> tuple[bytes, dict]:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "BYTES",
                    "shape": shape,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ]
        }
    ).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (
            struct.pack("<I", 1) + b"a" + struct.pack("<I", 9) + b"xy",
            "element 1 of 2 has length prefix 9 at byte 5, but only 2 bytes follow it",
        ),
        (
            struct.pack("<I", 3) + b"abc" + b"\x01\x00",
            "element 1 of 2 needs a 4-byte length prefix at byte 7",
        ),
        (serialize_bytes([b"a", b"b"]) + b"zz", "2 bytes follow the last"),
        (b"\x01", "cannot hold 2 length-prefixed elements"),
    ],
)
def test_http_malformed_length_prefix_is_400(server: Served, raw: bytes, problem: str) -> None:
    body, headers = _binary_body(raw, [1, 2])
    status, reply = _post(server, "/v2/models/id_bytes/infer", body, headers)
    assert status == 400, reply
    assert "id_bytes" in reply["error"] and "'x'" in reply["error"]
    assert problem in reply["error"]


def test_grpc_malformed_length_prefix_is_invalid_argument(stub) -> None:
    request = pb.ModelInferRequest(model_name="id_bytes")
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 2])
    request.raw_input_contents.append(struct.pack("<I", 2**32 - 1) + b"abcd")
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "id_bytes" in err.value.details() and "length prefix 4294967295" in err.value.details()


def test_grpc_bytes_contents_count_mismatch(stub) -> None:
    request = pb.ModelInferRequest(model_name="id_bytes")
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 3]).contents.bytes_contents.extend(
        [b"a", b"b"]
    )
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "has 2 elements" in err.value.details() and "'x'" in err.value.details()


def test_non_utf8_string_to_torchscript_is_400(server: Served) -> None:
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 2], "BYTES")
    x.set_data_from_numpy(np.array([[b"ok", b"\xff\xfe"]], dtype=np.object_))
    with pytest.raises(InferenceServerException) as err:
        client.infer("id_bytes", [x])
    assert err.value.status() == "400"
    assert "id_bytes" in str(err.value) and "element 1 is not UTF-8" in str(err.value)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ([["a", 1]], "elements must be strings (got int)"),
        ([["a", None]], "elements must be strings (got NoneType)"),
        (["a", "b", "c"], "has 3 elements; shape [1, 2] needs 2"),
        (["a", "\ud800"], "element 1 is not valid Unicode"),
    ],
)
def test_http_json_bad_strings_are_400(server: Served, data: list, problem: str) -> None:
    body = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 2], "data": data}]}
    status, reply = _post(server, "/v2/models/id_bytes/infer", json.dumps(body).encode())
    assert status == 400, reply
    assert "id_bytes" in reply["error"] and "'x'" in reply["error"]
    assert problem in reply["error"]


def test_server_still_serves(server: Served) -> None:
    """Nothing above took a worker down."""
    test_grpc_raw(server, "BYTES")
    assert server.proc.poll() is None


# -- codec units -----------------------------------------------------------------------
def test_datatypes_are_tritons() -> None:
    assert set(TRITON_DATATYPES) == set(DATATYPES)


def test_bf16_matches_torch_rounding() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(5000).astype(np.float32) * 1e3,
            np.array(
                [
                    0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20,
                    np.inf, -np.inf, 3.4028235e38, -3.4028235e38, 1e-40, -1e-45,
                ],
                dtype=np.float32,
            ),
        ]
    )  # fmt: skip
    torch_bits = torch.from_numpy(values).to(torch.bfloat16).view(torch.uint16).numpy()
    assert bf16_from_float(values).tobytes() == torch_bits.tobytes()
    back = torch.from_numpy(torch_bits.copy()).view(torch.bfloat16).to(torch.float32).numpy()
    assert bf16_to_float(torch_bits).tobytes() == back.tobytes()
    nan = bf16_from_float(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(bf16_to_float(nan)).all()


def test_bytes_codec_matches_tritonclient() -> None:
    items = [b"", b"abc", "é".encode(), b"\x00" * 70000]
    ours = serialize_bytes(items)
    theirs = serialize_byte_tensor(np.array(items, dtype=np.object_)).item()
    assert ours == theirs
    assert deserialize_bytes(ours, 4) == items
    assert bytes_problem(ours, 4) is None
    assert "element 4 of 5" in (bytes_problem(ours + b"\x00\x00", 5) or "")
    with pytest.raises(TensorFormatError, match="cannot hold"):
        deserialize_bytes(b"", 1)
    assert deserialize_bytes(b"", 0) == []


def test_json_rendering_of_outputs() -> None:
    assert json_values(
        "BF16", [2], bf16_from_float(np.array([1.5, -2.0], np.float32)).tobytes()
    ) == [
        1.5,
        -2.0,
    ]
    assert json_values("BYTES", [2], serialize_bytes([b"a", "ü".encode()])) == ["a", "ü"]
    # Not UTF-8: JSON cannot carry it, so the output goes as binary data instead.
    assert json_values("BYTES", [1], serialize_bytes([b"\xff"])) is None
    assert json_values("UINT64", [1], np.array([2**64 - 1], np.uint64).tobytes()) == [2**64 - 1]


def test_rest_parse_builds_raw_bytes() -> None:
    body = {
        "inputs": [
            {"name": "s", "datatype": "BYTES", "shape": [2, 1], "data": [["x"], ["yz"]]},
            {"name": "b", "datatype": "BF16", "shape": [1], "data": [1.0 + 2**-8]},
        ]
    }
    request, _ = parse_infer("m", "", json.dumps(body).encode(), None)
    assert request.raw_input_contents[0] == serialize_bytes([b"x", b"yz"])
    # Halfway between two bfloat16s: ties to even (1.0), as torch rounds.
    assert request.raw_input_contents[1] == struct.pack("<H", 0x3F80)
    with pytest.raises(InvalidInput, match="unsupported datatype"):
        parse_infer("m", "", b'{"inputs":[{"name":"a","datatype":"STRING","shape":[1]}]}', None)


def test_repository_accepts_every_datatype(tmp_path: Path) -> None:
    from modelpool.gpu.repository import read_model

    repo = write_datatype_repo(tmp_path)
    for datatype in TRITON_DATATYPES:
        spec = read_model(repo / model_name(datatype))
        assert [t.datatype for t in (*spec.inputs, *spec.outputs)] == [datatype, datatype]
