"""Placement through the real ``modelpool serve``: one load per cold model, LRU eviction
order under a small budget, in-flight copies never evicted, and models that can never
fit get a plain "does not fit"."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from modelpool.gpu.worker import FAKE_LOAD_DELAY_ENV
from tests.modelgen import write_sized, write_slow

MB = 1_000_000


def _x(batch: int = 1) -> np.ndarray:
    return np.arange(4 * batch, dtype=np.float32).reshape(batch, 4)


def _infer_http(url: str, model: str) -> np.ndarray:
    client = thttp.InferenceServerClient(url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(_x())
    return client.infer(model, [x]).as_numpy("y")


def _resident(url: str) -> set[str]:
    client = thttp.InferenceServerClient(url)
    return {m["name"] for m in client.get_model_repository_index() if m["state"] == "READY"}


async def test_twenty_concurrent_requests_to_a_cold_model_load_it_once(
    tmp_path: Path, serve
) -> None:
    write_sized(tmp_path, "cold", 4 * MB)
    # The load held 1 s: all twenty arrive while it runs, however busy the machine
    # (on a loaded CI machine two once came after it and were warm).
    server = serve(tmp_path, "--device-memory-budget", "64MB", env={FAKE_LOAD_DELAY_ENV: "1.0"})
    client = tgrpc_aio.InferenceServerClient(server.grpc_url)
    try:

        async def one() -> np.ndarray:
            x = tgrpc_aio.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(_x())
            return (await client.infer("cold", [x])).as_numpy("y")

        results = await asyncio.gather(*(one() for _ in range(20)))
    finally:
        await client.close()
    for y in results:
        np.testing.assert_allclose(y, _x() * 2)
    assert server.metric("modelpool_model_loads_total", model="cold", outcome="success") == 1
    assert server.metric("modelpool_cold_starts_total", model="cold") == 20
    assert (
        server.metric("modelpool_requests_total", model="cold", protocol="grpc", outcome="success")
        == 20
    )


def test_lru_eviction_order_under_a_small_budget(tmp_path: Path, serve) -> None:
    # Each model holds 10 MB; before its first load it is estimated at 12.5 MB (file
    # size plus headroom), so 32 MB holds two of them and the third evicts one.
    for name in ("a", "b", "c", "d"):
        write_sized(tmp_path, name, 10 * MB)
    # LRU's order, with no minimum residency: what this test is about.
    server = serve(
        tmp_path, "--device-memory-budget", "32MB", "--policy", "lru", "--min-residency", "0"
    )
    url = server.http_url
    _infer_http(url, "a")
    _infer_http(url, "b")
    _infer_http(url, "a")  # a is now more recently used than b
    _infer_http(url, "c")  # evicts b, the least recently used
    assert _resident(url) == {"a", "c"}
    assert server.metric("modelpool_model_evictions_total", model="b", reason="capacity") == 1
    _infer_http(url, "d")  # evicts a (used before c)
    assert _resident(url) == {"c", "d"}
    assert server.metric("modelpool_model_evictions_total", model="a", reason="capacity") == 1
    assert server.metric("modelpool_model_evictions_total", model="c", reason="capacity") == 0
    # Device memory as exported: ours never above the budget.
    assert server.metric("modelpool_device_memory_bytes", kind="total") == 32 * MB
    assert server.metric("modelpool_device_memory_bytes", kind="ours") <= 32 * MB


def test_model_with_requests_in_flight_is_not_evicted(tmp_path: Path, serve) -> None:
    write_slow(tmp_path, "slow", 10 * MB)
    write_sized(tmp_path, "other", 10 * MB)
    write_sized(tmp_path, "third", 10 * MB)
    server = serve(tmp_path, "--device-memory-budget", "32MB")
    url = server.grpc_url
    client = tgrpc.InferenceServerClient(url)

    def slow_call(iters: int) -> tgrpc.InferResult:
        x = tgrpc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(_x())
        n = tgrpc.InferInput("iters", [1, 1], "INT64")
        n.set_data_from_numpy(np.array([[iters]], dtype=np.int64))
        return tgrpc.InferenceServerClient(url).infer("slow", [x, n], client_timeout=120)

    slow_call(1)  # resident, and least recently used from here on
    _infer_http(server.http_url, "other")
    result: dict[str, object] = {}
    t = threading.Thread(target=lambda: result.update(r=slow_call(2000)))
    t.start()
    deadline = time.monotonic() + 30
    while server.metric("modelpool_inflight_requests") < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.metric("modelpool_inflight_requests") >= 1
    # 'third' needs room: LRU would pick 'slow', but it is busy, so 'other' goes.
    x = tgrpc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(_x())
    client.infer("third", [x])
    # The eviction decision was taken while 'slow' was still being computed.
    assert t.is_alive() and server.metric("modelpool_inflight_requests") >= 1
    t.join(120)
    np.testing.assert_allclose(result["r"].as_numpy("y"), _x() * 2)
    assert server.metric("modelpool_model_evictions_total", model="slow", reason="capacity") == 0
    assert server.metric("modelpool_model_evictions_total", model="other", reason="capacity") == 1
    assert "slow" in _resident(server.http_url)


def test_model_larger_than_any_device_does_not_fit(tmp_path: Path, serve) -> None:
    write_sized(tmp_path, "small", 1 * MB)
    write_sized(tmp_path, "giant", 40 * MB)
    server = serve(tmp_path, "--device-memory-budget", "16MB")
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(_x())
    with pytest.raises(InferenceServerException) as err:
        client.infer("giant", [x])
    assert err.value.status() == "503" and "does not fit" in err.value.message()
    assert "giant" in err.value.message()
    gclient = tgrpc.InferenceServerClient(server.grpc_url)
    gx = tgrpc.InferInput("x", [1, 4], "FP32")
    gx.set_data_from_numpy(_x())
    with pytest.raises(InferenceServerException) as gerr:
        gclient.infer("giant", [gx])
    assert gerr.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    # Everyone else is still served.
    np.testing.assert_allclose(_infer_http(server.http_url, "small"), _x() * 2)
