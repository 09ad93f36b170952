"""Triton's statistics extension as Triton reports it: every duration's count moves
with the others (perf_analyzer refuses figures where they differ), executions are
forwards (fewer than requests with dynamic batching), batch_stats per forward size,
cache counters present as zeros, last_inference set; over HTTP and gRPC alike."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from modelpool.gateway.stats import Statistics, statistics_json
from modelpool.gpu import execution
from tests.conftest import Served, start_serve
from tests.modelgen import Crashy, write_model, write_sized

COUNTED = ("success", "queue", "compute_input", "compute_infer", "compute_output")
EVERY = (*COUNTED, "fail", "cache_hit", "cache_miss")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("stats-repo")
    write_sized(repo, "plain", 1 << 16)
    cfg = write_sized(repo, "batched", 1 << 16) / "config.pbtxt"
    # A long delay, so requests sent together surely share a forward.
    cfg.write_text(cfg.read_text() + "dynamic_batching { max_queue_delay_microseconds: 300000 }\n")
    write_model(repo, "crashy", Crashy())
    s = start_serve(repo, tmp_path_factory.mktemp("stats-log") / "serve.log")
    yield s
    s.stop()


def _x(module: Any, rows: int, value: float = 1.0) -> Any:
    x = module.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.full((rows, 4), value, np.float32))
    return x


def _http_stats(s: Served, name: str) -> dict[str, Any]:
    got = thttp.InferenceServerClient(s.http_url).get_inference_statistics(name)
    assert len(got["model_stats"]) == 1
    return got["model_stats"][0]


def _grpc_stats(s: Served, name: str) -> dict[str, Any]:
    got = tgrpc.InferenceServerClient(s.grpc_url).get_inference_statistics(name)
    assert len(got.model_stats) == 1
    # Protobuf's own JSON mapping leaves zeros out and makes 64-bit numbers strings;
    # Triton's REST rendering does neither, so compare through statistics_json.
    return statistics_json(pb.ModelStatisticsResponse(model_stats=got.model_stats))["model_stats"][
        0
    ]


def _check_counts_move_together(m: dict[str, Any]) -> None:
    stats = m["inference_stats"]
    for name in EVERY:  # every field present, zero or not: perf_analyzer reads them all
        assert set(stats[name]) == {"count", "ns"}, name
    counts = {name: stats[name]["count"] for name in COUNTED}
    assert len(set(counts.values())) == 1, counts
    assert stats["cache_hit"] == {"count": 0, "ns": 0}
    assert stats["cache_miss"] == {"count": 0, "ns": 0}
    # Every inference ran in exactly one counted forward (one gateway).
    assert (
        sum(b["batch_size"] * b["compute_infer"]["count"] for b in m["batch_stats"])
        == (m["inference_count"])
    )
    assert sum(b["compute_infer"]["count"] for b in m["batch_stats"]) == m["execution_count"]
    for b in m["batch_stats"]:
        assert b["compute_input"]["count"] == b["compute_infer"]["count"]
        assert b["compute_output"]["count"] == b["compute_infer"]["count"]


def test_untouched_model_reports_every_field_as_zero(served: Served) -> None:
    m = _http_stats(served, "crashy")
    assert m["name"] == "crashy" and m["version"] == "1"
    assert m["inference_count"] == 0 and m["execution_count"] == 0 and m["last_inference"] == 0
    assert all(m["inference_stats"][f] == {"count": 0, "ns": 0} for f in EVERY)
    assert m["batch_stats"] == []
    assert _grpc_stats(served, "crashy") == m


def test_requests_and_failures_counted_together(served: Served) -> None:
    http = thttp.InferenceServerClient(served.http_url)
    grpc = tgrpc.InferenceServerClient(served.grpc_url)
    before_ms = int(time.time() * 1000)
    for _ in range(3):
        result = http.infer("plain", [_x(thttp, 2)])
        # The worker's bookkeeping does not reach a REST client.
        assert not any(
            k.startswith("modelpool_") for k in result.get_response().get("parameters", {})
        )
    grpc.infer("plain", [_x(tgrpc, 1)])
    bad = thttp.InferInput("x", [2, 3], "FP32")
    bad.set_data_from_numpy(np.zeros((2, 3), np.float32))
    with pytest.raises(InferenceServerException):  # a bad shape: refused by the gateway
        http.infer("plain", [bad])
    with pytest.raises(InferenceServerException, match="negative"):  # the model raises
        grpc.infer("crashy", [_x(tgrpc, 1, -1.0)])
    grpc.infer("crashy", [_x(tgrpc, 2)])

    m = _http_stats(served, "plain")
    _check_counts_move_together(m)
    stats = m["inference_stats"]
    assert stats["success"]["count"] == 4 and stats["fail"]["count"] == 1
    assert m["inference_count"] == 7  # rows: 2 + 2 + 2 + 1
    # No dynamic batching: every request is its own forward, at its own batch size.
    assert m["execution_count"] == 4
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in m["batch_stats"]} == {2: 3, 1: 1}
    assert stats["success"]["ns"] >= stats["compute_infer"]["ns"] > 0
    assert before_ms <= m["last_inference"] <= int(time.time() * 1000)
    assert _grpc_stats(served, "plain") == m

    c = _http_stats(served, "crashy")
    _check_counts_move_together(c)
    assert c["inference_stats"]["fail"]["count"] == 1 and c["inference_stats"]["fail"]["ns"] > 0
    assert c["inference_stats"]["success"]["count"] == 1 and c["execution_count"] == 1


async def test_batched_requests_share_one_execution(served: Served) -> None:
    client = tgrpc_aio.InferenceServerClient(served.grpc_url)
    try:
        await client.infer("batched", [_x(tgrpc_aio, 1)])  # loaded: the rest meet no load
        before = _http_stats(served, "batched")
        results = await asyncio.gather(
            *(client.infer("batched", [_x(tgrpc_aio, rows, float(i))])
              for i, rows in enumerate((1, 2, 1, 3)))
        )  # fmt: skip
    finally:
        await client.close()
    for i, r in enumerate(results):
        np.testing.assert_allclose(r.as_numpy("y"), np.full_like(r.as_numpy("y"), 2.0 * i))
    # The worker's execution parameters feed the statistics and never reach a client.
    assert not any(
        k.startswith(execution.PREFIX) for r in results for k in r.get_response().parameters
    )

    m = _http_stats(served, "batched")
    _check_counts_move_together(m)
    assert (
        m["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
        == 4
    )
    assert m["inference_count"] - before["inference_count"] == 7
    assert m["execution_count"] - before["execution_count"] == 1  # four requests, one forward
    assert m["execution_count"] < m["inference_stats"]["success"]["count"]
    sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in m["batch_stats"]}
    assert sizes[7] == 1
    assert _grpc_stats(served, "batched") == m


def test_every_model_statistics(served: Served) -> None:
    every = thttp.InferenceServerClient(served.http_url).get_inference_statistics()
    assert {m["name"] for m in every["model_stats"]} == {"plain", "batched", "crashy"}
    for m in every["model_stats"]:
        _check_counts_move_together(m)


# -- the worker's execution parameters, without a server ------------------------------
def _reply(rows: int, lead: bool, *, tensor_bytes: int = 1 << 20) -> pb.ModelInferResponse:
    r = pb.ModelInferResponse(model_name="m", model_version="1", id="req")
    out = r.outputs.add(name="y", datatype="FP32", shape=[rows, tensor_bytes // 4 // rows])
    del out
    r.raw_output_contents.append(b"\x80" * tensor_bytes)  # bytes that look like varints
    r.parameters["client_param"].string_param = "kept"
    execution.write(r, execution.Execution(rows, lead, 0.001, 0.002, 0.003))
    return r


def test_execution_read_from_raw_bytes_and_parsed_reply() -> None:
    reply = _reply(4, lead=False)
    ran = execution.read_raw(reply.SerializeToString())
    assert ran == execution.Execution(4, False, 0.001, 0.002, 0.003)
    assert execution.read(reply, strip=True) == ran
    assert set(reply.parameters) == {"client_param"}  # stripped, the client's own kept
    assert execution.read(reply) is None
    assert execution.read_raw(reply.SerializeToString()) is None
    assert execution.read_raw(b"\xff\xff\xff") is None  # truncated: no figures, no crash


def test_statistics_count_an_execution_once_per_forward() -> None:
    stats = Statistics()
    for lead in (True, False, False):
        stats.record_success(
            "m", 1, 2, started=0.0, compute_started=0.5, done=1.0,
            reply=_reply(6, lead).SerializeToString(),
        )  # fmt: skip
    stats.record_success("m", 1, 1, started=0.0, compute_started=0.1, done=0.2, reply=None)
    stats.record_failure("m", 1, 0.3)
    m = statistics_json(stats.response([("m", 1)]))["model_stats"][0]
    _check_counts_move_together(m)
    assert m["inference_count"] == 7 and m["execution_count"] == 2
    assert [(b["batch_size"], b["compute_infer"]["count"]) for b in m["batch_stats"]] == [
        (1, 1),
        (6, 1),
    ]
    s = m["inference_stats"]
    # queue: the gateway's wait plus the worker's; compute_input: the forward's rest.
    # (Within a few ns: seconds are floats.)
    assert s["queue"]["ns"] == pytest.approx(3 * 501_000_000 + 100_000_000, abs=10)
    assert s["compute_infer"]["ns"] == pytest.approx(3 * 2_000_000 + 100_000_000, abs=10)
    assert s["compute_output"]["ns"] == pytest.approx(3 * 3_000_000, abs=10)
    assert s["compute_input"]["ns"] == pytest.approx(3 * 494_000_000, abs=10)
    assert s["fail"]["count"] == 1
    assert s["fail"]["ns"] == pytest.approx(300_000_000, abs=10)
    # The same figures over gRPC's protobuf.
    proto = json_format.MessageToDict(stats.response([("m", 1)]), preserving_proto_field_name=True)
    assert int(proto["model_stats"][0]["execution_count"]) == 2
