"""The execution core through the real ``modelpool serve``: recycles under load fail no
request, a model whose files vanish affects no other model, and readiness tracks
devices without a worker.

Recycling needs a worker whose allocator keeps memory after an unload, which only a
GPU does; ``MODELPOOL_FAKE_RETAINED_BYTES`` makes a CPU worker report that it did
(gpu/accounting.py), and everything else is the product as it runs.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.modelgen import write_sized

MB = 1_000_000
pytestmark = pytest.mark.slow


def _x() -> np.ndarray:
    return np.arange(4, dtype=np.float32).reshape(1, 4)


async def _drive(url: str, models: list[str], seconds: float, concurrency: int) -> list[str]:
    """Closed-loop gRPC requests over ``models`` for ``seconds``; the failures."""
    client = tgrpc_aio.InferenceServerClient(url)
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    rng = random.Random(7)

    async def one_client() -> None:
        while loop.time() < end:
            model = rng.choice(models)
            x = tgrpc_aio.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(_x())
            try:
                y = (await client.infer(model, [x], client_timeout=120)).as_numpy("y")
                np.testing.assert_allclose(y, _x() * 2)
            except InferenceServerException as e:
                failures.append(f"{model}: {e.status()} {e.message()}")

    try:
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    finally:
        await client.close()
    return failures


async def test_recycles_under_load_fail_no_request(
    tmp_path: Path, serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = [f"m{i}" for i in range(6)]
    for name in models:
        write_sized(tmp_path, name, 4 * MB)
    # Every unload reports 300 MiB kept in the allocator: over the 256 MiB limit.
    monkeypatch.setenv("MODELPOOL_FAKE_RETAINED_BYTES", str(300 << 20))
    server = serve(
        tmp_path,
        "--workers", "2",
        "--device-memory-budget", "14MB",
        "--recycle-interval", "2",
    )  # fmt: skip
    failures = await _drive(server.grpc_url, models, seconds=12, concurrency=6)
    assert failures == [], server.log()[-3000:]
    recycles = server.metric("modelpool_worker_recycles_total", reason="retained_memory")
    assert recycles >= 1, server.log()[-3000:]
    assert "recycling worker" in server.log()
    # Rate-limited: one device, at most one recycle per 2 s over ~12 s (and some slack
    # for the drive's ramp-down).
    assert recycles <= 8
    ready = thttp.InferenceServerClient(server.http_url)
    assert ready.is_server_ready()


async def test_a_model_whose_file_vanished_breaks_no_other_model(tmp_path: Path, serve) -> None:
    for name in ("gone", "a", "b", "c", "d"):
        write_sized(tmp_path, name, 2 * MB)
    server = serve(tmp_path, "--device-memory-budget", "7MB")
    client = thttp.InferenceServerClient(server.http_url)

    def infer(model: str) -> np.ndarray:
        x = thttp.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(_x())
        return client.infer(model, [x]).as_numpy("y")

    infer("gone")
    (tmp_path / "gone" / "1" / "model.pt").unlink()
    # Every other model still loads cold, evicting as the budget needs.
    for model in ("a", "b", "c", "d"):
        np.testing.assert_allclose(infer(model), _x() * 2)
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["gone"]["state"] == "UNAVAILABLE"
    assert "model.pt" in index["gone"]["reason"]
    with pytest.raises(InferenceServerException) as err:
        infer("gone")
    assert err.value.status() == "400" and "gone" in err.value.message()
    # Its files come back: it serves again.
    shutil.copy(tmp_path / "a" / "1" / "model.pt", tmp_path / "gone" / "1" / "model.pt")
    client.load_model("gone")
    np.testing.assert_allclose(infer("gone"), _x() * 2)


def _post_infer(url: str, model: str, body: dict, headers: dict | None = None):
    req = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


def _slow_body(iters: int) -> dict:
    return {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]},
            {"name": "iters", "shape": [1, 1], "datatype": "INT64", "data": [iters]},
        ]
    }


def test_a_client_deadline_is_504_and_a_capacity_wait_is_503(tmp_path: Path, serve) -> None:
    from tests.modelgen import write_slow

    write_slow(tmp_path, "slow", 10 * MB)
    write_sized(tmp_path, "other", 10 * MB)
    server = serve(tmp_path, "--device-memory-budget", "20MB", "--acquire-timeout", "1")
    url = server.http_url
    code, doc, _ = _post_infer(url, "slow", _slow_body(1))
    assert code == 200, doc
    # The forward takes far longer than the client allows: 504, naming the model.
    code, doc, headers = _post_infer(url, "slow", _slow_body(20_000), {"Modelpool-Timeout": "0.3"})
    assert code == 504, doc
    assert "slow" in doc["error"] and "Retry-After" not in headers
    # Triton's timeout parameter (microseconds) works the same way.
    body = {**_slow_body(20_000), "parameters": {"timeout": 300_000}}
    code, doc, _ = _post_infer(url, "slow", body)
    assert code == 504, doc
    # 'other' needs the room 'slow' holds while a long request is in flight: waiting
    # past --acquire-timeout is a capacity problem, 503 with Retry-After.
    busy = threading.Thread(
        target=_post_infer, args=(url, "slow", _slow_body(3000), {"Modelpool-Timeout": "90"})
    )
    busy.start()
    try:
        until = time.monotonic() + 30
        while server.metric("modelpool_inflight_requests") < 1 and time.monotonic() < until:
            time.sleep(0.02)
        other = {
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]
        }
        code, doc, headers = _post_infer(url, "other", other)
        assert code == 503, doc
        assert "Retry-After" in headers and "other" in doc["error"]
    finally:
        busy.join(120)
    assert (
        server.metric("modelpool_requests_total", model="slow", protocol="http", outcome="deadline")
        == 2
    )
