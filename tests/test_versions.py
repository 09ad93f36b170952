"""Several versions of one model served at once, through the real ``modelpool serve``:
``version_policy`` all / specific / latest N in config.pbtxt, versioned URLs over REST
(``/v2/models/{m}/versions/{v}/infer``) and ``model_version`` over gRPC, and latest as
the default. Version ``v`` of every model here computes ``y = x + v``, so each answer
says which version computed it."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.conftest import Served, start_serve

CONFIG = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 8
{policy}
input {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }}
"""


class Plus(torch.nn.Module):
    """y = x + k: version k of a model adds k."""

    def __init__(self, k: float) -> None:
        super().__init__()
        self.register_buffer("k", torch.tensor(float(k)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.k


def write_versions(repo: Path, name: str, versions: list[int], policy: str = "") -> Path:
    """A model whose version ``v`` adds ``v``, under ``policy`` (config.pbtxt text)."""
    d = repo / name
    for v in versions:
        (d / str(v)).mkdir(parents=True, exist_ok=True)
        torch.jit.save(torch.jit.script(Plus(v)), str(d / str(v) / "model.pt"))
    (d / "config.pbtxt").write_text(CONFIG.format(name=name, policy=policy))
    return d


X = np.arange(4, dtype=np.float32).reshape(1, 4)


def http_infer(server: Served, model: str, version: str = "") -> np.ndarray:
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    result = client.infer(model, [x], model_version=version)
    y = result.as_numpy("y")
    assert y is not None
    return y


def grpc_infer(server: Served, model: str, version: str = "") -> tuple[np.ndarray, str]:
    client = tgrpc.InferenceServerClient(server.grpc_url)
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    result = client.infer(model, [x], model_version=version)
    y = result.as_numpy("y")
    assert y is not None
    return y, result.get_response().model_version


def added(y: np.ndarray) -> float:
    """Which version answered: what it added to X."""
    diff = np.unique(y - X)
    assert diff.size == 1, y
    return float(diff[0])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("versions")
    write_versions(repo, "plain", [1, 2, 3])
    write_versions(repo, "every", [1, 2], "version_policy: { all: {} }")
    write_versions(repo, "chosen", [1, 2, 3], "version_policy: { specific: { versions: [1, 3] } }")
    write_versions(repo, "newest2", [1, 2, 3], "version_policy: { latest: { num_versions: 2 } }")
    log = tmp_path_factory.mktemp("versions-log") / "serve.log"
    s = start_serve(repo, log, "--device-memory-budget", "512MiB")
    yield s
    s.stop()


def test_default_policy_serves_only_the_latest(served: Served) -> None:
    assert added(http_infer(served, "plain")) == 3
    y, version = grpc_infer(served, "plain")
    assert added(y) == 3 and version == "3"
    with pytest.raises(InferenceServerException) as e:
        http_infer(served, "plain", "1")
    assert e.value.status() == "404" and "no version 1" in str(e.value)


def test_all_policy_serves_both_versions_at_once(served: Served) -> None:
    for v in (1, 2):
        assert added(http_infer(served, "every", str(v))) == v
        y, version = grpc_infer(served, "every", str(v))
        assert added(y) == v and version == str(v)
    # Unversioned: the latest.
    assert added(http_infer(served, "every")) == 2
    # Both resident side by side, each its own copy.
    with urllib.request.urlopen(f"http://{served.http_url}/v2/modelpool/status", timeout=10) as r:
        status = json.load(r)
    versions = {c["version"] for c in status["copies"] if c["model"] == "every"}
    assert versions == {1, 2}
    client = thttp.InferenceServerClient(served.http_url)
    assert client.get_model_metadata("every")["versions"] == ["1", "2"]
    assert client.is_model_ready("every", "1") and client.is_model_ready("every", "2")


def test_specific_policy_serves_the_listed_versions(served: Served) -> None:
    assert added(http_infer(served, "chosen", "1")) == 1
    assert added(grpc_infer(served, "chosen", "3")[0]) == 3
    assert added(http_infer(served, "chosen")) == 3
    with pytest.raises(InferenceServerException) as e:
        http_infer(served, "chosen", "2")
    assert "no version 2" in str(e.value) and "available: 1, 3" in str(e.value)
    with pytest.raises(InferenceServerException) as g:
        grpc_infer(served, "chosen", "2")
    assert g.value.status() == "StatusCode.NOT_FOUND"


def test_latest_n_policy_serves_the_newest_n(served: Served) -> None:
    assert added(http_infer(served, "newest2")) == 3
    assert added(http_infer(served, "newest2", "2")) == 2
    assert added(grpc_infer(served, "newest2", "2")[0]) == 2
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(served, "newest2", "1")
    assert e.value.status() == "StatusCode.NOT_FOUND"
    assert _ready_status(served, "newest2", "1") == 404
    assert _ready_status(served, "newest2", "2") == 200
    client = thttp.InferenceServerClient(served.http_url)
    assert client.get_model_metadata("newest2")["versions"] == ["2", "3"]


def test_versioned_rest_url_on_the_wire(served: Served) -> None:
    """The raw versioned path, as curl would send it: the reply names the version."""
    body = json.dumps(
        {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X.ravel().tolist()}]}
    ).encode()
    req = urllib.request.Request(
        f"http://{served.http_url}/v2/models/every/versions/1/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        doc = json.load(r)
    assert doc["model_version"] == "1"
    assert doc["outputs"][0]["data"] == (X + 1).ravel().tolist()


def _ready_status(served: Served, model: str, version: str) -> int:
    url = f"http://{served.http_url}/v2/models/{model}/versions/{version}/ready"
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
