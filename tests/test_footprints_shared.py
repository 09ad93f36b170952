"""Measured footprints live in Redis: a gateway started after the load (a restart, or
another replica) plans with the measured bytes, not the operator's estimate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as thttp

from tests.cluster import start_gateway, start_worker, status, wait_for
from tests.modelgen import write_sized

MB = 1_000_000
#: What the config declares: far above what the model holds (about 2 MB).
ESTIMATE = 40 * MB
pytestmark = pytest.mark.slow


def _declare_estimate(model_dir: Path, nbytes: int) -> None:
    config = model_dir / "config.pbtxt"
    config.write_text(
        config.read_text()
        + f'parameters {{ key: "modelpool.estimated_bytes" value {{ string_value: "{nbytes}" }} }}\n'
    )


def _infer(gateway, model: str) -> None:
    client = thttp.InferenceServerClient(gateway.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    np.testing.assert_allclose(client.infer(model, [x]).as_numpy("y"), 2 * np.ones((1, 4)))


def _measured(gateway, model: str) -> dict:
    [row] = [f for f in status(gateway)["footprints"] if f["model"] == model]
    return row


def test_restarted_gateway_plans_with_footprints_from_redis(tmp_path: Path, redis_server) -> None:
    repo = tmp_path / "repo"
    _declare_estimate(write_sized(repo, "m1", 2 * MB), ESTIMATE)
    _declare_estimate(write_sized(repo, "m2", 2 * MB), ESTIMATE)
    worker = start_worker(repo, redis_server.url, tmp_path / "w1.log", "w1")
    gateways = []
    try:

        def gateway(name: str):
            g = start_gateway(repo, redis_server.url, tmp_path / f"{name}.log")
            gateways.append(g)
            wait_for(lambda: len(status(g)["workers"]) == 1, what="the worker in the view")
            return g

        a = gateway("a")
        assert status(a)["footprints"] == []  # nothing measured yet
        _infer(a, "m1")
        first = _measured(a, "m1")
        assert first["device_kind"] == "cpu"
        assert 2 * MB <= first["peak_bytes"] < ESTIMATE
        assert first["planned_bytes"] == first["peak_bytes"]
        stored = redis_server.client().hgetall("modelpool:v1:footprints")
        assert set(stored) == {"m1|1|cpu"}
        a.stop()

        c = gateway("c")  # a fresh process: it measured nothing itself
        after = _measured(c, "m1")
        assert after == first
        # m2 was never loaded: its plan still uses the estimate.
        assert all(f["model"] != "m2" for f in status(c)["footprints"])
        assert c.metric("modelpool_model_loads_total", model="m1", outcome="success") == 0
        # A load through the new gateway is measured and shared in turn.
        _infer(c, "m2")
        assert _measured(c, "m2")["planned_bytes"] < ESTIMATE
        assert set(redis_server.client().hgetall("modelpool:v1:footprints")) == {
            "m1|1|cpu",
            "m2|1|cpu",
        }
    finally:
        for g in gateways:
            g.stop()
        worker.stop()
