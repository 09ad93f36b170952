"""The real KServe Python SDK (``kserve.InferenceRESTClient``, ``InferenceGRPCClient``)
against ``modelpool serve``, and the health bodies it reads.

kserve's protos and tritonclient's cannot live in one process, so this module never
imports kserve: ``tests/kserve_sdk_client.py`` makes the SDK's calls in a subprocess
and prints what it saw as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from aiohttp.test_utils import TestClient, TestServer

from modelpool.gateway.rest import create_rest_app
from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import ROOT, Served, start_serve
from tests.modelgen import write_sized

pytestmark = pytest.mark.slow

MODEL = "acme-m"
CLIENT = ROOT / "tests" / "kserve_sdk_client.py"
#: The client's input and the model's answer (y = 2x + 0).
X = np.arange(8, dtype=np.float32).reshape(2, 4)
Y = (X * 2).tolist()

needs_kserve = pytest.mark.skipif(
    importlib.util.find_spec("kserve") is None, reason="the kserve SDK is not installed"
)


def _repo(root: Path) -> Path:
    repo = root / "models"
    write_sized(repo, MODEL, 4096)
    return repo


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("kserve")
    s = start_serve(_repo(root), root / "serve.log", "--device-memory-budget", "256MB")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    root = tmp_path_factory.mktemp("kserve-auth")
    key = new_key()
    config = root / "auth.yaml"
    config.write_text(
        yaml.safe_dump(
            {"tenants": [{"name": "acme", "keys": [hash_key(key)], "models": ["acme-*"]}]}
        )
    )
    s = start_serve(
        _repo(root), root / "serve.log",
        "--auth-config", str(config), "--device-memory-budget", "256MB",
    )  # fmt: skip
    yield s, key
    s.stop()


def run_sdk(served: Served, key: str | None = None) -> dict[str, Any]:
    args = {"http": served.http_url, "grpc": served.grpc_url, "model": MODEL}
    if key is not None:
        args["key"] = key
    done = subprocess.run(
        [sys.executable, str(CLIENT)],
        input=json.dumps(args),
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


@needs_kserve
def test_kserve_sdk_rest_and_grpc(plain: Served) -> None:
    seen = run_sdk(plain)
    assert seen["x"] == X.tolist()
    rest, grpc = seen["rest"], seen["grpc"]
    # Health as the SDK reads it: from the JSON body over REST.
    assert rest["live"] == {"value": True}
    assert rest["ready"] == {"value": True}
    assert rest["model_ready"] == {"value": True}
    assert rest["missing_model_ready"] == {"value": False}
    # JSON in, JSON out; binary in, binary out (the tensor extension).
    assert rest["infer_json"] == {"value": [Y, "application/json"]}
    assert rest["infer_binary"] == {"value": [Y, "application/octet-stream"]}
    assert grpc["live"] == grpc["ready"] == grpc["model_ready"] == {"value": True}
    assert grpc["infer"] == {"value": Y}
    assert grpc["model_metadata"] == {
        "value": {
            "name": MODEL,
            "versions": ["1"],
            "inputs": [["x", "FP32", [-1, 4]]],
            "outputs": [["y", "FP32", [-1, 4]]],
        }
    }
    server = grpc["server_metadata"]["value"]
    assert server["name"] == "modelpool" and "binary_tensor_data" in server["extensions"]


@needs_kserve
def test_kserve_sdk_passes_the_key_as_a_header(authed: tuple[Served, str]) -> None:
    served, key = authed
    seen = run_sdk(served, key)
    rest, grpc = seen["rest"], seen["grpc"]
    assert rest["infer_json"]["value"][0] == Y
    assert rest["infer_binary"]["value"][0] == Y
    assert rest["model_ready"] == {"value": True}
    assert grpc["infer"] == {"value": Y}
    assert grpc["model_ready"] == {"value": True}
    assert grpc["model_metadata"]["value"]["name"] == MODEL
    # Without the key: health and server metadata stay open, the rest is refused.
    rest, grpc = seen["rest_no_key"], seen["grpc_no_key"]
    assert rest["live"] == rest["ready"] == {"value": True}
    assert rest["model_ready"] == {"value": False}  # the SDK reads any non-2xx as False
    assert rest["infer_json"]["status"] == 401
    # The server's message reaches the SDK's exception.
    assert "Authorization" in rest["infer_json"]["message"], rest["infer_json"]
    assert rest["infer_binary"]["status"] == 401
    assert grpc["live"] == grpc["ready"] == {"value": True}
    assert grpc["server_metadata"]["value"]["name"] == "modelpool"
    for call in ("infer", "model_ready", "model_metadata"):
        assert grpc[call]["status"] == "UNAUTHENTICATED", call
    assert key not in json.dumps(seen["rest_no_key"]) + json.dumps(seen["grpc_no_key"])


def _get(served: Served, path: str, key: str | None = None) -> tuple[int, str, Any]:
    request = urllib.request.Request(f"http://{served.http_url}{path}")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.headers["Content-Type"], json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], json.loads(e.read())


def test_health_bodies(plain: Served) -> None:
    """The KServe v2 bodies, with Triton's status codes."""
    assert _get(plain, "/v2/health/live") == (
        200,
        "application/json; charset=utf-8",
        {"live": True},
    )
    assert _get(plain, "/v2/health/ready")[::2] == (200, {"ready": True})
    assert _get(plain, f"/v2/models/{MODEL}/ready")[::2] == (200, {"name": MODEL, "ready": True})
    assert _get(plain, f"/v2/models/{MODEL}/versions/1/ready")[::2] == (
        200,
        {"name": MODEL, "ready": True},
    )
    status, _, body = _get(plain, "/v2/models/no-such-model/ready")
    assert status == 404 and "no-such-model" in body["error"]


def test_health_with_auth(authed: tuple[Served, str]) -> None:
    served, key = authed
    assert _get(served, "/v2/health/live")[::2] == (200, {"live": True})
    assert _get(served, "/v2/health/ready")[::2] == (200, {"ready": True})
    assert _get(served, f"/v2/models/{MODEL}/ready")[0] == 401
    assert _get(served, f"/v2/models/{MODEL}/ready", key)[::2] == (
        200,
        {"name": MODEL, "ready": True},
    )


def test_tritonclient_health_still_works(plain: Served) -> None:
    http = thttp.InferenceServerClient(plain.http_url)
    grpc = tgrpc.InferenceServerClient(plain.grpc_url)
    try:
        assert http.is_server_live() and http.is_server_ready()
        assert http.is_model_ready(MODEL) and http.is_model_ready(MODEL, "1")
        assert not http.is_model_ready("no-such-model")
        assert grpc.is_server_live() and grpc.is_server_ready() and grpc.is_model_ready(MODEL)
    finally:
        http.close()
        grpc.close()


class _NotReady:
    """What the health handlers ask of the data plane, answering "not ready"."""

    def live(self) -> bool:
        return True

    def server_ready(self) -> bool:
        return False

    def authenticate(self, *args: Any, **kwargs: Any) -> None:
        return None

    def spec(self, *args: Any) -> None:
        return None

    def check_known(self, *args: Any) -> None:
        return None

    def model_ready(self, *args: Any, **kwargs: Any) -> bool:
        return False


async def test_not_ready_bodies() -> None:
    """A server without workers: 503 with ``{"ready": false}`` (Kubernetes and the
    KServe SDK both see it); a model that cannot serve: 400 as in Triton, with its body."""
    app = create_rest_app(_NotReady(), 1 << 20)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        r = await client.get("/v2/health/ready")
        assert (r.status, await r.json()) == (503, {"ready": False})
        r = await client.get("/v2/health/live")
        assert (r.status, await r.json()) == (200, {"live": True})
        r = await client.get("/v2/models/m/ready")
        assert (r.status, await r.json()) == (400, {"name": "m", "ready": False})
