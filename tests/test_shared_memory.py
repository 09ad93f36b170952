"""Triton's system shared memory extension through the real ``modelpool serve``, with
tritonclient's own shared memory utilities, over HTTP and gRPC: register, status,
unregister, inputs and outputs in regions, bad regions, objects shrunk or removed
under a registered region, regions kept apart per tenant, and CUDA shared memory
refused clearly.

The server runs with an auth config (two tenants), so every call carries a key."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import tritonclient.utils.shared_memory as shm
import yaml
from tritonclient.utils import InferenceServerException

from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized

MODEL = "double"  # y = 2x, x and y FP32 [-1, 4]
X = np.arange(8, dtype=np.float32).reshape(2, 4)
NBYTES = X.nbytes  # 32


class Tenant:
    def __init__(self, served: Served, key: str) -> None:
        self.headers = {"authorization": f"Bearer {key}"}  # lower case: gRPC metadata
        self.http = thttp.InferenceServerClient(served.http_url)
        self.grpc = tgrpc.InferenceServerClient(served.grpc_url)
        self.served = served

    def rest(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://{self.served.http_url}{path}", data=data, method=method, headers=self.headers
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Tenant, Tenant]]:
    root = tmp_path_factory.mktemp("shm")
    write_sized(root / "models", MODEL, 4096)
    keys = {"acme": new_key(), "beta": new_key()}
    config = root / "auth.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"name": name, "keys": [hash_key(k)], "models": ["*"]}
                    for name, k in keys.items()
                ]
            }
        )
    )
    s = start_serve(
        root / "models", root / "serve.log", "--auth-config", str(config),
        "--device-memory-budget", "256MB", "--system-shared-memory", "on",
    )  # fmt: skip
    yield s, Tenant(s, keys["acme"]), Tenant(s, keys["beta"])
    s.stop()


@pytest.fixture
def regions() -> Iterator[Any]:
    """Factory: ``regions(nbytes)`` -> (key, handle) of a fresh POSIX object; all
    destroyed at teardown (those a test destroyed itself are skipped)."""
    made: list[Any] = []

    def make(nbytes: int) -> tuple[str, Any]:
        key = f"/modelpool-test-{uuid.uuid4().hex[:12]}"
        handle = shm.create_shared_memory_region(key.strip("/"), key, nbytes, create_only=True)
        made.append(handle)
        return key, handle

    yield make
    for handle in made:
        if handle._shm_key in shm.mapped_shared_memory_regions():
            shm.destroy_shared_memory_region(handle)


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_server_metadata_lists_system_shared_memory(served) -> None:
    _, acme, _ = served
    meta = acme.http.get_server_metadata()
    assert "system_shared_memory" in meta["extensions"]
    assert "cuda_shared_memory" not in meta["extensions"]


def test_http_inputs_and_outputs_in_shared_memory(served, regions) -> None:
    _, acme, _ = served
    in_key, in_handle = regions(NBYTES)
    out_key, out_handle = regions(NBYTES)
    shm.set_shared_memory_region(in_handle, [X])
    name_in, name_out = _unique("in"), _unique("out")
    acme.http.register_system_shared_memory(name_in, in_key, NBYTES, headers=acme.headers)
    acme.http.register_system_shared_memory(name_out, out_key, NBYTES, headers=acme.headers)
    status = acme.http.get_system_shared_memory_status(headers=acme.headers)
    assert {"name": name_in, "key": in_key, "offset": 0, "byte_size": NBYTES} in status
    one = acme.http.get_system_shared_memory_status(name_out, headers=acme.headers)
    assert one == [{"name": name_out, "key": out_key, "offset": 0, "byte_size": NBYTES}]

    x = thttp.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory(name_in, NBYTES)
    y = thttp.InferRequestedOutput("y", binary_data=True)
    y.set_shared_memory(name_out, NBYTES)
    result = acme.http.infer(MODEL, [x], outputs=[y], headers=acme.headers)
    out = result.get_output("y")
    assert "data" not in out and out["shape"] == [2, 4]
    assert out["parameters"]["shared_memory_region"] == name_out
    got = shm.get_contents_as_numpy(out_handle, np.float32, [2, 4])
    np.testing.assert_array_equal(got, X * 2)

    # An input in shared memory with the output over the wire.
    shm.set_shared_memory_region(in_handle, [X + 1])
    result = acme.http.infer(
        MODEL, [x], outputs=[thttp.InferRequestedOutput("y")], headers=acme.headers
    )
    np.testing.assert_array_equal(result.as_numpy("y"), (X + 1) * 2)

    acme.http.unregister_system_shared_memory(name_in, headers=acme.headers)
    names = {r["name"] for r in acme.http.get_system_shared_memory_status(headers=acme.headers)}
    assert name_in not in names and name_out in names
    acme.http.unregister_system_shared_memory(headers=acme.headers)  # all of acme's
    assert acme.http.get_system_shared_memory_status(headers=acme.headers) == []


def test_grpc_inputs_and_outputs_in_shared_memory_with_an_offset(served, regions) -> None:
    _, acme, _ = served
    # One object holds both tensors: the input at 0, the output at NBYTES.
    key, handle = regions(2 * NBYTES)
    shm.set_shared_memory_region(handle, [X])
    name = _unique("both")
    acme.grpc.register_system_shared_memory(name, key, 2 * NBYTES, headers=acme.headers)
    status = acme.grpc.get_system_shared_memory_status(name, headers=acme.headers)
    assert status.regions[name].key == key and status.regions[name].byte_size == 2 * NBYTES

    x = tgrpc.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory(name, NBYTES)
    y = tgrpc.InferRequestedOutput("y")
    y.set_shared_memory(name, NBYTES, offset=NBYTES)
    result = acme.grpc.infer(MODEL, [x], outputs=[y], headers=acme.headers)
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["y"]
    assert list(response.raw_output_contents) == [b""]  # the bytes went to the region
    got = shm.get_contents_as_numpy(handle, np.float32, [2, 4], offset=NBYTES)
    np.testing.assert_array_equal(got, X * 2)
    np.testing.assert_array_equal(shm.get_contents_as_numpy(handle, np.float32, [2, 4]), X)

    # The output over the wire, the input from the region.
    result = acme.grpc.infer(MODEL, [x], headers=acme.headers)
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)

    acme.grpc.unregister_system_shared_memory(name, headers=acme.headers)
    assert name not in acme.grpc.get_system_shared_memory_status(headers=acme.headers).regions


def _http_error(call) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == "400", e.value
    return e.value.message()


def _grpc_error(call) -> str:
    with pytest.raises(InferenceServerException) as e:
        call()
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT", e.value
    return e.value.message()


def test_bad_regions_are_400s_that_say_what_is_wrong(served, regions) -> None:
    _, acme, _ = served
    h = acme.headers
    key, handle = regions(NBYTES)
    shm.set_shared_memory_region(handle, [X])

    # Registering: no such object, a range past its end, a key outside /dev/shm, twice.
    missing = f"/modelpool-test-missing-{uuid.uuid4().hex[:8]}"
    msg = _http_error(lambda: acme.http.register_system_shared_memory("r1", missing, 8, headers=h))
    assert "'r1'" in msg and missing in msg and "no such object" in msg
    msg = _grpc_error(lambda: acme.grpc.register_system_shared_memory("r1", missing, 8, headers=h))
    assert "no such object" in msg
    msg = _http_error(
        lambda: acme.http.register_system_shared_memory("r1", key, NBYTES, offset=8, headers=h)
    )
    assert "runs past the end" in msg and f"({NBYTES} bytes)" in msg
    for bad in ("/../etc/passwd", "a/b", "/"):
        msg = _http_error(
            lambda b=bad: acme.http.register_system_shared_memory("r1", b, 8, headers=h)
        )
        assert "not a POSIX shared memory name" in msg
    status, body = acme.rest("POST", "/v2/systemsharedmemory/region/r1/register", {"key": key})
    assert status == 400 and "byte_size" in body["error"]
    name = _unique("bad")
    acme.http.register_system_shared_memory(name, key, NBYTES, headers=h)
    msg = _grpc_error(lambda: acme.grpc.register_system_shared_memory(name, key, 8, headers=h))
    assert "already registered" in msg

    # Inferring: an unknown region, a byte_size too small for the tensor, a range past
    # the region, an output region too small for the output.
    def http_infer(region: str, size: int, offset: int = 0) -> None:
        x = thttp.InferInput("x", [2, 4], "FP32")
        x.set_shared_memory(region, size, offset=offset)
        acme.http.infer(MODEL, [x], headers=h)

    msg = _http_error(lambda: http_infer("nope", NBYTES))
    assert "'nope'" in msg and "not registered" in msg and "input 'x'" in msg
    msg = _http_error(lambda: http_infer(name, NBYTES - 4))
    assert f"model '{MODEL}'" in msg and "input 'x'" in msg and f"{NBYTES - 4} bytes" in msg
    msg = _http_error(lambda: http_infer(name, NBYTES, offset=4))
    assert "outside shared memory region" in msg

    x = tgrpc.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory("nope", NBYTES)
    msg = _grpc_error(lambda: acme.grpc.infer(MODEL, [x], headers=h))
    assert "'nope'" in msg and "not registered" in msg
    x.set_shared_memory(name, NBYTES)
    y = tgrpc.InferRequestedOutput("y")
    y.set_shared_memory(name, NBYTES // 2)
    msg = _grpc_error(lambda: acme.grpc.infer(MODEL, [x], outputs=[y], headers=h))
    assert "output 'y'" in msg and f"{NBYTES} bytes" in msg
    # Only one of the two required parameters.
    status, body = acme.rest(
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32",
                     "parameters": {"shared_memory_region": name}}]},
    )  # fmt: skip
    assert status == 400 and "shared_memory_byte_size" in body["error"]
    # Data beside shared memory.
    status, body = acme.rest(
        "POST",
        f"/v2/models/{MODEL}/infer",
        {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP32", "data": X.ravel().tolist(),
                     "parameters": {"shared_memory_region": name,
                                    "shared_memory_byte_size": NBYTES}}]},
    )  # fmt: skip
    assert status == 400 and "must not also have 'data'" in body["error"]
    acme.http.unregister_system_shared_memory(name, headers=h)
    # Status of a region that is not there names it.
    msg = _http_error(lambda: acme.http.get_system_shared_memory_status(name, headers=h))
    assert f"'{name}'" in msg


def test_object_removed_or_shrunk_under_a_registered_region(served, regions) -> None:
    _, acme, _ = served
    h = acme.headers
    key, handle = regions(NBYTES)
    shm.set_shared_memory_region(handle, [X])
    name = _unique("gone")
    acme.grpc.register_system_shared_memory(name, key, NBYTES, headers=h)
    x = tgrpc.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory(name, NBYTES)

    # Removed (unlinked) by its client: the region still holds what it held.
    shm.destroy_shared_memory_region(handle)
    assert not Path("/dev/shm" + key).exists()
    np.testing.assert_array_equal(
        acme.grpc.infer(MODEL, [x], headers=h).as_numpy("y"), X * 2
    )  # fmt: skip
    acme.grpc.unregister_system_shared_memory(name, headers=h)

    # Shrunk by its client: a clear 400, and the gateway carries on.
    key2, _ = regions(NBYTES)
    acme.grpc.register_system_shared_memory(name, key2, NBYTES, headers=h)
    os.truncate("/dev/shm" + key2, 8)
    msg = _grpc_error(lambda: acme.grpc.infer(MODEL, [x], headers=h))
    assert "shrunk" in msg and f"'{name}'" in msg
    assert acme.grpc.is_server_live()
    acme.grpc.unregister_system_shared_memory(name, headers=h)


def test_regions_belong_to_their_tenant(served, regions) -> None:
    _, acme, beta = served
    key, handle = regions(NBYTES)
    shm.set_shared_memory_region(handle, [X])
    name = _unique("mine")
    acme.http.register_system_shared_memory(name, key, NBYTES, headers=acme.headers)

    # beta neither sees, uses nor unregisters acme's region by its name.
    listed = beta.http.get_system_shared_memory_status(headers=beta.headers)
    assert name not in {r["name"] for r in listed}
    assert name not in beta.grpc.get_system_shared_memory_status(headers=beta.headers).regions
    x = thttp.InferInput("x", [2, 4], "FP32")
    x.set_shared_memory(name, NBYTES)
    msg = _http_error(lambda: beta.http.infer(MODEL, [x], headers=beta.headers))
    assert "not registered" in msg
    beta.http.unregister_system_shared_memory(headers=beta.headers)
    beta.grpc.unregister_system_shared_memory(name, headers=beta.headers)
    assert acme.http.get_system_shared_memory_status(name, headers=acme.headers)[0]["key"] == key
    # The same name is free for beta: its own region.
    beta.http.register_system_shared_memory(name, key, NBYTES, headers=beta.headers)
    beta.http.unregister_system_shared_memory(name, headers=beta.headers)
    result = acme.http.infer(MODEL, [x], headers=acme.headers)
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)
    acme.http.unregister_system_shared_memory(name, headers=acme.headers)

    # Without a key: 401 / UNAUTHENTICATED, as every call but health and metadata.
    with pytest.raises(InferenceServerException) as e:
        acme.http.get_system_shared_memory_status()
    assert e.value.status() == "401"
    with pytest.raises(InferenceServerException) as e:
        acme.grpc.register_system_shared_memory("r", key, NBYTES)
    assert e.value.status() == "StatusCode.UNAUTHENTICATED"


def test_cuda_shared_memory_is_refused_clearly(served) -> None:
    _, acme, _ = served
    with pytest.raises(InferenceServerException) as e:
        acme.grpc.get_cuda_shared_memory_status(headers=acme.headers)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "CUDA shared memory is not supported" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        acme.grpc.register_cuda_shared_memory("c", b"\0" * 64, 0, 64, headers=acme.headers)
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    for method, path in (
        ("GET", "/v2/cudasharedmemory/status"),
        ("POST", "/v2/cudasharedmemory/region/c/register"),
        ("POST", "/v2/cudasharedmemory/unregister"),
    ):
        status, body = acme.rest(method, path, {} if method == "POST" else None)
        assert status == 400 and "CUDA shared memory is not supported" in body["error"], path
