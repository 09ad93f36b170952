"""``--model-control-mode`` through the real ``modelpool serve``: explicit (an unload
sticks, ``--load-model`` preloads, a load may carry a config override), poll (new
versions and configs picked up, the old version answering until the new one is
ready), none (the repository API refused); and the flags' validation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from modelpool.gateway.model_control import ControlMode, ModelControl, ModelControlConfig
from modelpool.gpu.repository import ModelRepository
from modelpool.placement.errors import NotAllowed
from tests.conftest import ROOT, Served, start_serve
from tests.test_versions import X, added, grpc_infer, http_infer, write_versions


def _post(server: Served, path: str, body: object | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(
        f"http://{server.http_url}{path}",
        data=data,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read()
            return int(r.status), json.loads(text) if text else {}
    except urllib.error.HTTPError as e:
        text = e.read()
        return int(e.code), json.loads(text) if text else {}


def _index(server: Served) -> dict[tuple[str, str], dict]:
    _, entries = _post(server, "/v2/repository/index")
    assert isinstance(entries, list)
    return {(e["name"], e["version"]): e for e in entries}


def _wait_for(what: str, check, timeout: float = 30.0):
    """Poll ``check`` until it returns something truthy, against a deadline."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- explicit ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("explicit")
    write_versions(repo, "a", [1])
    write_versions(repo, "b", [1])
    write_versions(repo, "c", [1, 2])
    log = tmp_path_factory.mktemp("explicit-log") / "serve.log"
    s = start_serve(
        repo, log, "--model-control-mode", "explicit", "--load-model", "a",
        "--device-memory-budget", "512MiB",
    )  # fmt: skip
    yield s
    s.stop()


def test_explicit_preloads_load_model_and_refuses_the_rest(explicit: Served) -> None:
    # Loaded before the ready line: resident without any request.
    assert _index(explicit)[("a", "1")]["state"] == "READY"
    assert added(http_infer(explicit, "a")) == 1
    entry = _index(explicit)[("b", "1")]
    assert entry["state"] == "UNAVAILABLE" and "explicit" in entry["reason"]
    with pytest.raises(InferenceServerException) as e:
        http_infer(explicit, "b")
    assert e.value.status() == "400"
    assert "model 'b' is not loaded" in str(e.value)
    with pytest.raises(InferenceServerException) as g:
        grpc_infer(explicit, "b")
    assert g.value.status() == "StatusCode.UNAVAILABLE"
    assert not thttp.InferenceServerClient(explicit.http_url).is_model_ready("b")


def test_explicit_unload_sticks_until_loaded_again(explicit: Served) -> None:
    client = tgrpc.InferenceServerClient(explicit.grpc_url)
    client.load_model("b")
    assert added(http_infer(explicit, "b")) == 1
    assert client.is_model_ready("b")
    status, _ = _post(explicit, "/v2/repository/models/b/unload")
    assert status == 200
    # The next request does not bring it back.
    for _ in range(3):
        with pytest.raises(InferenceServerException) as e:
            http_infer(explicit, "b")
        assert "not loaded" in str(e.value)
    assert all(c["model"] != "b" for c in _status(explicit)["copies"])
    assert _index(explicit)[("b", "1")]["state"] == "UNAVAILABLE"
    status, _ = _post(explicit, "/v2/repository/models/b/load")
    assert status == 200
    assert added(http_infer(explicit, "b")) == 1


def _status(server: Served) -> dict:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/modelpool/status", timeout=10) as r:
        return json.load(r)


OVERRIDE = {
    "name": "c",
    "platform": "pytorch_libtorch",
    "max_batch_size": 8,
    "version_policy": {"all": {}},
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
    "output": [{"name": "z", "data_type": "TYPE_FP32", "dims": [4]}],
}


def _infer_output(server: Served, model: str, output: str, version: str = "") -> np.ndarray:
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    y = client.infer(model, [x], model_version=version).as_numpy(output)
    assert y is not None
    return y


def test_load_with_config_override_replaces_config_pbtxt(explicit: Served) -> None:
    http = thttp.InferenceServerClient(explicit.http_url)
    http.load_model("c")
    assert added(http_infer(explicit, "c")) == 2  # config.pbtxt: latest only, output y
    # Triton's override: both versions, output renamed. The worker reads it too: it
    # serves version 1, which its config.pbtxt does not.
    http.load_model("c", config=json.dumps(OVERRIDE))
    assert added(_infer_output(explicit, "c", "z", "1")) == 1
    assert added(_infer_output(explicit, "c", "z", "2")) == 2
    assert http.get_model_config("c")["output"][0]["name"] == "z"
    # Over gRPC too, and a load without a config goes back to config.pbtxt.
    grpc = tgrpc.InferenceServerClient(explicit.grpc_url)
    grpc.load_model(
        "c", config=json.dumps({**OVERRIDE, "version_policy": {"specific": {"versions": [1]}}})
    )
    assert added(_infer_output(explicit, "c", "z")) == 1
    grpc.load_model("c")
    assert added(http_infer(explicit, "c")) == 2
    assert http.get_model_config("c")["output"][0]["name"] == "y"


def test_bad_config_override_is_a_400_naming_the_model(explicit: Served) -> None:
    for body, problem in [
        ({"parameters": {"config": "{not json"}}, "not a valid model config"),
        ({"parameters": {"config": json.dumps({"no_such_field": 1})}}, "no_such_field"),
        ({"parameters": {"config": json.dumps({**OVERRIDE, "input": []})}}, "at least one input"),
        ({"parameters": {"config": json.dumps({**OVERRIDE, "name": "other"})}}, "does not match"),
        ({"parameters": {"config": 7}}, "must be a string"),
        ({"parameters": []}, "must be a JSON object"),
    ]:
        status, doc = _post(explicit, "/v2/repository/models/c/load", body)
        assert status == 400, (body, doc)
        assert "model 'c'" in doc["error"] and problem in doc["error"], doc
    with pytest.raises(InferenceServerException) as e:
        tgrpc.InferenceServerClient(explicit.grpc_url).load_model("c", config="[")
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT" and "model 'c'" in str(e.value)
    # The model kept its config.
    status, _ = _post(explicit, "/v2/repository/models/c/load")
    assert status == 200
    assert added(http_infer(explicit, "c")) == 2


def test_unknown_model_load_is_404(explicit: Served) -> None:
    status, doc = _post(explicit, "/v2/repository/models/nope/load")
    assert status == 404 and "nope" in doc["error"]


# -- poll ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def poll(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("poll")
    write_versions(repo, "p", [1])
    write_versions(repo, "q", [1])
    log = tmp_path_factory.mktemp("poll-log") / "serve.log"
    s = start_serve(
        repo, log, "--model-control-mode", "poll", "--repository-poll-secs", "0.3",
        "--device-memory-budget", "512MiB",
    )  # fmt: skip
    yield s
    s.stop()


def test_poll_serves_the_old_version_until_the_new_is_ready(poll: Served) -> None:
    assert added(http_infer(poll, "p")) == 1
    write_versions(poll.repo, "p", [2])
    seen = []

    def answered_by_2() -> bool:
        # Every request in the switch is answered, by the old version or the new.
        seen.append(added(http_infer(poll, "p")))
        return seen[-1] == 2

    _wait_for("version 2 of p", answered_by_2)
    assert set(seen) <= {1, 2}
    # The poller loaded version 2 before switching: no request waited for that load.
    assert poll.metric("modelpool_cold_starts_total", model="p") == 1
    assert added(grpc_infer(poll, "p")[0]) == 2
    # Version 1 left the policy (latest 1): it no longer serves, and its copy goes.
    with pytest.raises(InferenceServerException):
        http_infer(poll, "p", "1")
    _wait_for(
        "p version 1 unloaded",
        lambda: not any(c["model"] == "p" and c["version"] == 1 for c in _status(poll)["copies"]),
    )


def test_poll_picks_up_config_changes_and_new_models(poll: Served) -> None:
    assert added(http_infer(poll, "q")) == 1
    write_versions(poll.repo, "q", [2], "version_policy: { all: {} }")

    def both_served() -> bool:
        try:
            return added(http_infer(poll, "q", "1")) == 1 and added(http_infer(poll, "q", "2")) == 2
        except InferenceServerException:
            return False

    _wait_for("q versions 1 and 2", both_served)
    write_versions(poll.repo, "fresh", [4])
    _wait_for("model fresh", lambda: ("fresh", "4") in _index(poll))
    assert added(http_infer(poll, "fresh")) == 4


def test_poll_refuses_the_repository_api(poll: Served) -> None:
    status, doc = _post(poll, "/v2/repository/models/p/load")
    assert status == 400 and "poll" in doc["error"]
    status, doc = _post(poll, "/v2/repository/models/p/unload")
    assert status == 400 and "poll" in doc["error"]
    with pytest.raises(InferenceServerException) as e:
        tgrpc.InferenceServerClient(poll.grpc_url).unload_model("p")
    assert e.value.status() == "StatusCode.FAILED_PRECONDITION"


def test_poll_keeps_serving_when_the_new_config_is_broken(poll: Served) -> None:
    write_versions(poll.repo, "broken", [1])
    _wait_for("model broken", lambda: ("broken", "1") in _index(poll))
    assert added(http_infer(poll, "broken")) == 1
    (poll.repo / "broken" / "config.pbtxt").write_text("this is not { a config")
    # Give the poller a few scans, observed through its log line.
    _wait_for("the poll's warning", lambda: "broken keeps its previous config" in poll.log())
    assert added(http_infer(poll, "broken")) == 1


# -- none and flags ------------------------------------------------------------------
async def test_none_mode_refuses_load_and_unload(tmp_path: Path) -> None:
    write_versions(tmp_path, "m", [1])
    repo = ModelRepository(tmp_path)
    control = ModelControl(
        ModelControlConfig(mode=ControlMode.NONE),
        repo,
        manager=None,  # type: ignore[arg-type]  # refused before the manager is asked
        load_timeout_s=1.0,
        unload_timeout_s=1.0,
    )
    for call in (control.load("m"), control.unload("m")):
        with pytest.raises(NotAllowed) as e:
            await call
        assert e.value.http_status == 400 and "none" in e.value.message
    assert control.is_loaded("m")


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--model-control-mode", "lazy"], "invalid choice: 'lazy'"),
        (["--repository-poll-secs", "0"], "--repository-poll-secs must be positive"),
        (["--load-model", "../etc"], "--load-model: model name '../etc' is not allowed"),
        (["--load-model", "missing"], "--load-model missing: not in the model repository"),
    ],
)
def test_bad_flags_fail_at_start(tmp_path: Path, args: list[str], problem: str) -> None:
    write_versions(tmp_path, "m", [1])
    proc = subprocess.run(
        [
            sys.executable, "-m", "modelpool.gateway.cli", "serve",
            "--model-repository", str(tmp_path), "--http-port", "0", "--grpc-port", "0",
            "--metrics-port", "0", "--devices", "cpu", *args,
        ],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert problem in proc.stderr
