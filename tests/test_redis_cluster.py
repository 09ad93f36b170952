"""Two workers and two gateways sharing a real Redis: warm routing across gateway
restarts, worker kill -9, a Redis outage, and one load for concurrent cold requests
through both gateways."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.cluster import start_gateway, start_worker, status, wait_for
from tests.modelgen import write_sized, write_slow

MB = 1_000_000
pytestmark = pytest.mark.slow


@pytest.fixture
def cluster(tmp_path: Path, redis_server):
    repo = tmp_path / "repo"
    for name in ("m1", "m2", "m3"):
        write_sized(repo, name, 2 * MB)
    write_slow(repo, "slow", 1 * MB)
    procs: dict = {"workers": [], "gateways": []}

    def worker(worker_id: str):
        w = start_worker(repo, redis_server.url, tmp_path / f"{worker_id}.log", worker_id)
        procs["workers"].append(w)
        return w

    def gateway(name: str):
        g = start_gateway(repo, redis_server.url, tmp_path / f"{name}.log")
        procs["gateways"].append(g)
        wait_for(
            lambda: len(status(g)["workers"]) == len(procs["workers"]), what="workers in the view"
        )
        return g

    yield worker, gateway, redis_server
    for g in procs["gateways"]:
        g.stop()
    for w in procs["workers"]:
        w.stop()


def _infer(gateway, model: str) -> np.ndarray:
    client = thttp.InferenceServerClient(gateway.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer(model, [x]).as_numpy("y")


def _holders(gateway, model: str) -> set[str]:
    return {
        c["worker_id"]
        for c in status(gateway)["copies"]
        if c["model"] == model and c["state"] == "READY"
    }


async def test_concurrent_cold_requests_through_two_gateways_load_once(cluster) -> None:
    worker, gateway, _ = cluster
    worker("w1")
    worker("w2")
    a, b = gateway("a"), gateway("b")
    clients = [tgrpc_aio.InferenceServerClient(g.grpc_url) for g in (a, b)]
    try:

        async def one(i: int) -> np.ndarray:
            x = tgrpc_aio.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), i, np.float32))
            return (await clients[i % 2].infer("m1", [x])).as_numpy("y")

        results = await asyncio.gather(*(one(i) for i in range(20)))
    finally:
        for c in clients:
            await c.close()
    for i, y in enumerate(results):
        np.testing.assert_allclose(y, np.full((1, 4), 2.0 * i))
    loads = sum(
        g.metric("modelpool_model_loads_total", model="m1", outcome="success") for g in (a, b)
    )
    assert loads == 1
    assert len(_holders(a, "m1")) == 1 and _holders(a, "m1") == _holders(b, "m1")


def test_restarted_gateway_routes_warm(cluster) -> None:
    worker, gateway, _ = cluster
    worker("w1")
    a = gateway("a")
    _infer(a, "m1")
    assert a.metric("modelpool_model_loads_total", model="m1", outcome="success") == 1
    a.stop()
    c = gateway("c")  # a fresh gateway process: its view comes from Redis
    np.testing.assert_allclose(_infer(c, "m1"), 2 * np.ones((1, 4)))
    assert c.metric("modelpool_model_loads_total", model="m1", outcome="success") == 0
    assert c.metric("modelpool_cold_starts_total", model="m1") == 0


def test_worker_kill_moves_its_models(cluster) -> None:
    worker, gateway, _ = cluster
    w1, w2 = worker("w1"), worker("w2")
    a = gateway("a")
    _infer(a, "m1")
    [holder] = _holders(a, "m1")
    victim, survivor = (w1, w2) if holder == "w1" else (w2, w1)
    victim.kill()
    # The next request finds the worker gone, drops it and loads on the survivor.
    np.testing.assert_allclose(_infer(a, "m1"), 2 * np.ones((1, 4)))
    assert _holders(a, "m1") == {survivor.worker_id}
    wait_for(
        lambda: [w["worker_id"] for w in status(a)["workers"]] == [survivor.worker_id],
        what="dead worker leaves",
    )


def test_request_in_flight_on_a_killed_worker_ends_cleanly(cluster) -> None:
    worker, gateway, _ = cluster
    w1 = worker("w1")
    a = gateway("a")
    outcome: dict[str, object] = {}

    def slow() -> None:
        client = tgrpc.InferenceServerClient(a.grpc_url)
        x = tgrpc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        n = tgrpc.InferInput("iters", [1, 1], "INT64")
        n.set_data_from_numpy(np.array([[4000]], dtype=np.int64))
        try:
            outcome["result"] = client.infer("slow", [x, n], client_timeout=60)
        except InferenceServerException as e:
            outcome["error"] = e

    t = threading.Thread(target=slow)
    t.start()
    wait_for(
        lambda: a.metric("modelpool_inflight_requests") >= 1 and bool(_holders(a, "slow")),
        what="slow in flight",
    )
    w1.kill()
    t.join(60)
    assert not t.is_alive(), "the request hung"
    # No other worker: the retry cannot load it anywhere, so a clean UNAVAILABLE.
    err = outcome.get("error")
    assert isinstance(err, InferenceServerException), outcome
    assert err.status() == "StatusCode.UNAVAILABLE"


def test_redis_outage_keeps_warm_routes_and_recovers(cluster) -> None:
    worker, gateway, redis = cluster
    w1 = worker("w1")
    a = gateway("a")
    _infer(a, "m1")
    redis.stop()
    # Warm: served from the local view, no Redis needed.
    for _ in range(5):
        np.testing.assert_allclose(_infer(a, "m1"), 2 * np.ones((1, 4)))
    # Cold: needs the cluster-wide lock, so 503 with Retry-After.
    client = thttp.InferenceServerClient(a.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InferenceServerException) as err:
        client.infer("m2", [x])
    assert err.value.status() == "503" and "redis" in err.value.message()
    req = urllib.request.Request(
        f"http://{a.http_url}/v2/models/m3/infer",
        data=json.dumps(
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}
        ).encode(),
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as http_err:
        urllib.request.urlopen(req, timeout=10)
    assert http_err.value.code == 503 and int(http_err.value.headers["Retry-After"]) >= 1
    redis.start()  # back, and empty
    # Within a heartbeat the worker re-announces its copy; the gateway resyncs.
    wait_for(
        lambda: bool(redis.client().hget("modelpool:v1:copies", "m1|1|w1")),
        what="worker re-announce",
    )
    wait_for(lambda: _holders(a, "m1") == {"w1"}, what="gateway resync")
    np.testing.assert_allclose(_infer(a, "m2"), 2 * np.ones((1, 4)))
    assert a.metric("modelpool_model_loads_total", model="m1", outcome="success") == 1
    assert w1.proc.poll() is None and a.proc.poll() is None  # nothing restarted
