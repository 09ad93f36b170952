"""Triton's dynamic batching in the worker: concurrent requests run as one forward,
each gets its own rows back, and a bad input fails alone."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc.aio as tgrpc_aio

from modelpool.gpu.batching import Batcher
from tests.modelgen import Crashy, write_model, write_sized


def _forward_recording(sizes: list[int], delay_s: float = 0.02):
    def forward(args: list[torch.Tensor]) -> list[torch.Tensor]:
        x = args[0]
        if bool((x < 0).any()):
            raise RuntimeError("negative input")
        time.sleep(delay_s)  # a forward that takes a moment, so others queue behind it
        sizes.append(int(x.shape[0]))
        return [x * 2]

    return forward


async def _run(fn, args):
    return await asyncio.to_thread(fn, args)


async def test_concurrent_requests_share_a_forward_and_get_their_rows() -> None:
    sizes: list[int] = []
    batcher = Batcher("m", _forward_recording(sizes), _run, max_batch=8, max_delay_s=0.0)
    try:
        inputs = [torch.full((1, 4), float(i)) for i in range(12)]
        outs = await asyncio.gather(*(batcher.submit([x]) for x in inputs))
    finally:
        await batcher.close()
    for x, [y] in zip(inputs, outs, strict=True):
        assert torch.equal(y, x * 2)
    assert sum(sizes) == 12 and len(sizes) < 12 and max(sizes) <= 8


async def test_a_bad_input_fails_alone() -> None:
    sizes: list[int] = []
    batcher = Batcher("m", _forward_recording(sizes), _run, max_batch=8, max_delay_s=0.05)
    try:
        good = [torch.ones(1, 4) * i for i in range(1, 4)]
        bad = -torch.ones(1, 4)
        results = await asyncio.gather(
            *(batcher.submit([x]) for x in [*good, bad]), return_exceptions=True
        )
    finally:
        await batcher.close()
    assert isinstance(results[-1], RuntimeError)
    for x, r in zip(good, results[:-1], strict=True):
        assert not isinstance(r, BaseException) and torch.equal(r[0], x * 2)


async def test_different_shapes_do_not_mix() -> None:
    sizes: list[int] = []
    batcher = Batcher("m", _forward_recording(sizes), _run, max_batch=8, max_delay_s=0.05)
    try:
        a, b = torch.ones(1, 4), torch.ones(2, 3)
        (ya,), (yb,) = await asyncio.gather(batcher.submit([a]), batcher.submit([b]))
    finally:
        await batcher.close()
    assert ya.shape == (1, 4) and yb.shape == (2, 3)


def _worker_address(http_url: str) -> str:
    with urllib.request.urlopen(f"http://{http_url}/v2/modelpool/status", timeout=10) as r:
        return json.load(r)["workers"][0]["address"]


async def test_dynamic_batching_through_modelpool_serve(tmp_path: Path, serve) -> None:
    write_sized(tmp_path, "batched", 1 << 20)
    cfg = tmp_path / "batched" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    write_model(tmp_path, "crashy", Crashy())
    cfg = tmp_path / "crashy" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    server = serve(tmp_path)
    client = tgrpc_aio.InferenceServerClient(server.grpc_url)
    try:

        async def one(model: str, value: float) -> np.ndarray:
            x = tgrpc_aio.InferInput("x", [1, 4], "FP32")
            x.set_data_from_numpy(np.full((1, 4), value, np.float32))
            return (await client.infer(model, [x])).as_numpy("y")

        results = await asyncio.gather(*(one("batched", i) for i in range(16)))
        mixed = await asyncio.gather(
            *(one("crashy", v) for v in (1.0, 2.0, -1.0, 3.0)), return_exceptions=True
        )
    finally:
        await client.close()
    for i, y in enumerate(results):
        np.testing.assert_allclose(y, np.full((1, 4), 2.0 * i))
    assert "negative input" in str(mixed[2])
    assert [float(r[0, 0]) for r in (mixed[0], mixed[1], mixed[3])] == [2.0, 4.0, 6.0]
    # The worker's own counters: fewer forwards than requests.
    address = await asyncio.to_thread(_worker_address, server.http_url)
    from modelpool.gateway.workers import WorkerClient

    worker = WorkerClient("w", address)
    status = await worker.status(timeout_s=10)
    await worker.close()
    [copy] = [c for c in status.copies if c.model == "batched"]
    assert copy.inferences == 16 and copy.executions < 16
