"""Aliases and canary splits through the real ``modelpool serve --routing``: a public name
``fraud`` over versions 3 and 4 of the model ``scorer``, where version ``v`` computes
``y = x + v`` so every answer says which target served it. The split over 10,000 gRPC
requests, the public name in replies and metadata, pins, sticky sessions, promotion by
the admin endpoint (through ``modelpool route set``) and rollback by editing the file,
with no failed request across either switch; admin-only edits under an auth config."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
import yaml
from tritonclient.utils import InferenceServerException

from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import ROOT, Served, start_serve
from tests.test_versions import X, write_versions

pytestmark = pytest.mark.slow

N = 10_000
ROUTE = "fraud"
MODEL = "scorer"
SPLIT = {ROUTE: {"targets": [{"model": MODEL, "version": 3, "weight": 90},
                             {"model": MODEL, "version": 4, "weight": 10}]}}  # fmt: skip


@dataclass
class Routed:
    served: Served
    routing: Path
    admin: dict[str, str]
    tenant: dict[str, str]


def _write_routing(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Routed]:
    root = tmp_path_factory.mktemp("routing")
    repo = root / "models"
    write_versions(repo, MODEL, [3, 4], "version_policy: { all: {} }")
    keys = {"ops": new_key(), "acme": new_key()}
    auth = root / "auth.yaml"
    auth.write_text(
        yaml.safe_dump(
            {
                "tenants": [
                    {"name": "ops", "role": "admin", "keys": [hash_key(keys["ops"])]},
                    {"name": "acme", "keys": [hash_key(keys["acme"])], "models": ["*"]},
                ]
            }
        )
    )
    routing = root / "routes.yaml"
    _write_routing(routing, SPLIT)
    served = start_serve(
        repo,
        root / "serve.log",
        "--auth-config", str(auth),
        "--routing", str(routing),
        "--auth-reload-interval", "0.2",
        "--max-inflight-per-copy", "64",
    )  # fmt: skip
    try:
        yield Routed(
            served,
            routing,
            {"authorization": f"Bearer {keys['ops']}"},
            {"authorization": f"Bearer {keys['acme']}"},
        )
    finally:
        served.stop()


def _grpc(routed: Routed, model: str = ROUTE, **kwargs: Any) -> tuple[int, Any]:
    """One gRPC request as the admin: (the version that computed it, the response)."""
    client = tgrpc.InferenceServerClient(routed.served.grpc_url)
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    headers = {**routed.admin, **kwargs.pop("headers", {})}
    result = client.infer(model, [x], headers=headers, **kwargs)
    return _served_by(result.as_numpy("y")), result.get_response()


def _rest(
    routed: Routed,
    model: str = ROUTE,
    headers: dict[str, str] | None = None,
    parameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": X.ravel().tolist()}]
    }
    if parameters:
        body["parameters"] = parameters
    return _http(routed, "POST", f"/v2/models/{model}/infer", body, headers)


def _http(
    routed: Routed,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    key: dict[str, str] | None = None,
) -> Any:
    request = urllib.request.Request(
        f"http://{routed.served.http_url}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": (key or routed.admin)["authorization"], **(headers or {})},
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


def _http_error(routed: Routed, *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(urllib.error.HTTPError) as e:
        _http(routed, *args, **kwargs)
    return e.value.code, json.loads(e.value.read())["error"]


def _served_by(y: np.ndarray | None) -> int:
    assert y is not None
    diff = np.unique(y - X)
    assert diff.size == 1, y
    return int(diff[0])


def _route_counts(routed: Routed) -> dict[int, float]:
    return {
        v: routed.served.metric(
            "modelpool_route_requests_total", route=ROUTE, model=MODEL, version=str(v)
        )
        for v in (3, 4)
    }


async def _many_grpc(routed: Routed, n: int, concurrency: int = 64) -> Counter[int]:
    """``n`` requests for the route over gRPC, ``concurrency`` at a time: how many each
    version computed."""
    client = tgrpc_aio.InferenceServerClient(routed.served.grpc_url)
    x = tgrpc_aio.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    counts: Counter[int] = Counter()
    names: set[str] = set()

    async def worker(count: int) -> None:
        for _ in range(count):
            result = await client.infer(ROUTE, [x], headers=routed.admin)
            counts[_served_by(result.as_numpy("y"))] += 1
            names.add(result.get_response().model_name)

    try:
        share, extra = divmod(n, concurrency)
        await asyncio.gather(*(worker(share + (i < extra)) for i in range(concurrency)))
    finally:
        await client.close()
    assert names == {ROUTE}
    return counts


def test_split_over_10000_grpc_requests_matches_the_weights(routed: Routed) -> None:
    before = _route_counts(routed)
    counts = asyncio.run(_many_grpc(routed, N))
    after = _route_counts(routed)
    assert sum(counts.values()) == N
    by_output = {v: 100.0 * counts[v] / N for v in (3, 4)}
    by_metric = {v: 100.0 * (after[v] - before[v]) / N for v in (3, 4)}
    assert sum(after[v] - before[v] for v in (3, 4)) == N
    print(f"split of {N} requests, weights 90/10: by output {by_output}, by metric {by_metric}")
    for shares in (by_output, by_metric):
        assert abs(shares[3] - 90.0) <= 2.0, shares
        assert abs(shares[4] - 10.0) <= 2.0, shares
    assert by_output == by_metric
    # Per-model metrics carry the target that served, not the public name.
    metric = routed.served.metric
    assert metric("modelpool_requests_total", model=MODEL, outcome="success") >= N
    assert metric("modelpool_requests_total", model=ROUTE) == 0.0


def test_replies_and_metadata_name_the_public_name(routed: Routed) -> None:
    version, response = _grpc(routed)
    assert response.model_name == ROUTE
    assert response.model_version == str(version)
    reply = _rest(routed)
    assert reply["model_name"] == ROUTE
    assert reply["model_version"] in ("3", "4")

    http = thttp.InferenceServerClient(routed.served.http_url)
    grpc = tgrpc.InferenceServerClient(routed.served.grpc_url)
    h = http.get_model_metadata(ROUTE, headers=routed.admin)
    g = grpc.get_model_metadata(ROUTE, headers=routed.admin, as_json=True)
    for meta in (h, g):
        assert meta["name"] == ROUTE
        assert meta["versions"] == ["3", "4"]
        assert [t["name"] for t in meta["inputs"]] == ["x"]
        assert [t["name"] for t in meta["outputs"]] == ["y"]
    assert grpc.get_model_metadata(ROUTE, "4", headers=routed.admin).versions == ["4"]
    assert http.is_model_ready(ROUTE, headers=routed.admin)
    assert grpc.is_model_ready(ROUTE, headers=routed.admin)
    assert http.get_model_config(ROUTE, headers=routed.admin)["name"] == ROUTE
    with pytest.raises(InferenceServerException, match="route 'fraud' has no target of version 7"):
        grpc.get_model_metadata(ROUTE, "7", headers=routed.admin)


def test_pins_by_header_metadata_and_parameter(routed: Routed) -> None:
    pin = {"modelpool-target": f"{MODEL}:4"}
    assert {_grpc(routed, headers=pin)[0] for _ in range(20)} == {4}
    assert {_grpc(routed, parameters={"modelpool_target": f"{MODEL}:4"})[0] for _ in range(20)} == {
        4
    }
    assert {
        _served_by(np.array(_rest(routed, headers=pin)["outputs"][0]["data"]).reshape(1, 4))
        for _ in range(20)
    } == {4}
    rest = _rest(routed, parameters={"modelpool_target": f"{MODEL}:4"})
    assert rest["model_version"] == "4" and rest["model_name"] == ROUTE
    # The parameter wins over the header.
    both = _rest(routed, headers=pin, parameters={"modelpool_target": f"{MODEL}:3"})
    assert both["model_version"] == "3"
    # A version in the request pins it too.
    assert {_grpc(routed, model_version="4")[0] for _ in range(10)} == {4}

    status, message = _http_error(
        routed, "POST", f"/v2/models/{ROUTE}/infer",
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [0, 0, 0, 0]}]},
        {"modelpool-target": f"{MODEL}:9"},
    )  # fmt: skip
    assert status == 400
    assert f"route '{ROUTE}'" in message and f"'{MODEL}:9'" in message
    with pytest.raises(InferenceServerException) as e:
        _grpc(routed, headers={"modelpool-target": "other"})
    assert e.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "route 'fraud': target 'other' is not one of its targets" in str(e.value)


def test_a_stream_is_routed_and_pinned_by_its_metadata(routed: Routed) -> None:
    replies: list[Any] = []
    got = threading.Semaphore(0)

    def callback(result: Any, error: Any) -> None:
        replies.append(error if error is not None else result)
        got.release()

    client = tgrpc.InferenceServerClient(routed.served.grpc_url)
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(X)
    client.start_stream(callback, headers={**routed.admin, "modelpool-target": f"{MODEL}:4"})
    try:
        for _ in range(5):
            client.async_stream_infer(ROUTE, [x])
        for _ in range(5):
            assert got.acquire(timeout=30)
    finally:
        client.stop_stream()
    assert all(not isinstance(r, Exception) for r in replies), replies
    assert {_served_by(r.as_numpy("y")) for r in replies} == {4}
    assert {r.get_response().model_name for r in replies} == {ROUTE}


def test_a_session_key_sticks_to_one_target(routed: Routed) -> None:
    first: dict[str, int] = {}
    for i in range(60):
        key = f"user-{i}"
        got = {_grpc(routed, headers={"modelpool-session": key})[0] for _ in range(3)}
        assert len(got) == 1, (key, got)
        first[key] = got.pop()
    # The same keys as a request parameter land where the header sent them.
    for key in list(first)[:10]:
        reply = _rest(routed, parameters={"modelpool_session": key})
        assert reply["model_version"] == str(first[key])
    assert set(first.values()) == {3, 4}  # 60 keys at 90/10: both sides, by the hash


class Load:
    """Requests for the route in a loop on a thread, until stopped: what each got."""

    def __init__(self, routed: Routed) -> None:
        self.routed = routed
        self.versions: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = tgrpc.InferenceServerClient(self.routed.served.grpc_url)
        x = tgrpc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(X)
        while not self._stop.is_set():
            try:
                result = client.infer(ROUTE, [x], headers=self.routed.admin)
                self.versions.append(_served_by(result.as_numpy("y")))
            except BaseException as e:  # every failure is the test's finding
                self.errors.append(e)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _route_cli(routed: Routed, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelpool.gateway.cli", "route", *args,
         "--url", f"http://{routed.served.http_url}",
         "--api-key", routed.admin["authorization"].removeprefix("Bearer ")],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_promotion_by_the_cli_and_rollback_by_the_file_without_restart(routed: Routed) -> None:
    pid = routed.served.proc.pid
    with Load(routed) as load:
        _until(lambda: len(load.versions) >= 20, "requests before the switch")
        done = _route_cli(routed, "set", ROUTE, f"{MODEL}:3=0", f"{MODEL}:4=100")
        assert done.returncode == 0, done.stderr
        assert "scorer:4" in done.stdout and "100.0%" in done.stdout
        mark = len(load.versions)
        _until(lambda: len(load.versions) >= mark + 50, "requests after promotion")
        promoted = load.versions[mark:]
        assert set(promoted) == {4}, Counter(promoted)

        shown = _route_cli(routed, "show", ROUTE)
        assert shown.returncode == 0, shown.stderr
        assert "runtime" in shown.stdout and "scorer:3" in shown.stdout

        # Rollback: the file says 100/0; the gateway picks it up by itself.
        _write_routing(
            routed.routing,
            {ROUTE: {"targets": [{"model": MODEL, "version": 3, "weight": 100},
                                 {"model": MODEL, "version": 4, "weight": 0}]}},
        )  # fmt: skip
        _until(lambda: load.versions[-1] == 3, "the rolled-back file to take effect")
        mark = len(load.versions)
        _until(lambda: len(load.versions) >= mark + 50, "requests after rollback")
        assert set(load.versions[mark:]) == {3}
    assert load.errors == []
    assert routed.served.proc.pid == pid and routed.served.proc.poll() is None
    _write_routing(routed.routing, SPLIT)
    _until(
        lambda: _http(routed, "GET", f"/v2/routes/{ROUTE}")["targets"][1]["weight"] == 10,
        "the canary file back",
    )


def test_a_route_wins_over_a_model_of_its_name_until_deleted(routed: Routed) -> None:
    assert _grpc(routed, model=MODEL)[0] == 4  # the model: its latest version
    _http(routed, "PUT", f"/v2/routes/{MODEL}", {"targets": [{"model": MODEL, "version": 3}]})
    assert {_grpc(routed, model=MODEL)[0] for _ in range(10)} == {3}
    grpc = tgrpc.InferenceServerClient(routed.served.grpc_url)
    assert grpc.is_model_ready(MODEL, headers=routed.admin)  # a target of its own name
    assert grpc.get_model_metadata(MODEL, headers=routed.admin).versions == ["3"]
    names = [r["name"] for r in _http(routed, "GET", "/v2/routes")]
    assert names == [ROUTE, MODEL]
    _http(routed, "DELETE", f"/v2/routes/{MODEL}")
    assert _grpc(routed, model=MODEL)[0] == 4
    status, message = _http_error(routed, "GET", f"/v2/routes/{MODEL}")
    assert (status, message) == (404, f"route '{MODEL}' does not exist")


def test_invalid_edits_are_400s_naming_the_problem(routed: Routed) -> None:
    for body, needle in (
        ({"targets": [{"model": MODEL, "version": 9, "weight": 1}]},
         "route 'fraud': target scorer:9: model 'scorer' has no version 9"),
        ({"targets": [{"model": MODEL, "version": 3, "weight": -5}]},
         "route 'fraud': targets[0] (model 'scorer'): field 'weight'"),
        ({"targets": [{"model": "ghost", "weight": 1}]},
         "route 'fraud': target ghost: model 'ghost' is not in the model repository"),
        ({"targets": []}, "route 'fraud': 'targets' must be a non-empty list"),
    ):  # fmt: skip
        status, message = _http_error(routed, "PUT", f"/v2/routes/{ROUTE}", body)
        assert status == 400, message
        assert needle in message
    assert _http(routed, "GET", f"/v2/routes/{ROUTE}")["targets"][0]["weight"] == 90
    bad = _route_cli(routed, "set", ROUTE, "scorer:3=lots")
    assert bad.returncode == 2 and "weight 'lots' is not a number" in bad.stderr


def test_only_admins_read_or_change_routes(routed: Routed) -> None:
    body = {"targets": [{"model": MODEL, "version": 4}]}
    for method, path, payload in (
        ("PUT", f"/v2/routes/{ROUTE}", body),
        ("DELETE", f"/v2/routes/{ROUTE}", None),
        ("GET", "/v2/routes", None),
    ):
        status, message = _http_error(routed, method, path, payload, key=routed.tenant)
        assert status == 403, message
        assert "admin call" in message and "tenant 'acme'" in message
    assert _http(routed, "GET", f"/v2/routes/{ROUTE}")["targets"][0]["weight"] == 90
    # The tenant still uses the route.
    reply = _rest(routed, headers={"Authorization": routed.tenant["authorization"]})
    assert reply["model_name"] == ROUTE


def test_a_bad_routing_file_fails_the_start(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_versions(repo, MODEL, [3])
    routing = tmp_path / "routes.yaml"
    _write_routing(routing, {ROUTE: {"targets": [{"model": MODEL, "version": 4}]}})
    done = subprocess.run(
        [sys.executable, "-m", "modelpool.gateway.cli", "serve", "--model-repository",
         str(repo), "--routing", str(routing), "--http-port", "0", "--grpc-port", "0",
         "--metrics-port", "0"],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
        env=dict(os.environ, MODELPOOL_FORCE_CPU="1"),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "route 'fraud': target scorer:4: model 'scorer' has no version 4" in done.stderr
