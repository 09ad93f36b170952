"""The worker's ``modelpool_`` response parameters (gpu/execution.py) stay inside the
pool: the gateway reads them for its statistics and cuts them out of the worker's raw
reply without re-encoding the tensors, so no client sees them, over gRPC (unary and
streaming) or REST."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import service_pb2 as pb

from modelpool.gateway.stats import Statistics, execution_of
from modelpool.gpu import execution
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized

RAN = execution.Execution(rows=3, lead=True, queue_s=0.001, infer_s=0.002, output_s=0.003)
# Tensor bytes that look like protobuf: varint continuation bytes and the prefix.
TENSOR = (b"\x80\x22" + execution.PREFIX.encode()) * 1000


def _user_reply() -> pb.ModelInferResponse:
    """A reply as a client should see it: outputs, raw contents, its own parameters
    (some whose names merely resemble the internal ones)."""
    r = pb.ModelInferResponse(model_name="m", model_version="1", id="req-7")
    r.outputs.add(name="y", datatype="FP32", shape=[3, 4]).parameters[
        "modelpool_on_a_tensor"
    ].string_param = "an output's own parameter, not the reply's"
    r.outputs.add(name="z", datatype="BYTES", shape=[1])
    r.raw_output_contents.extend([TENSOR, b""])
    r.parameters["triton_final_response"].bool_param = True
    r.parameters["modelpool"].string_param = "no underscore: not ours"
    r.parameters["x_modelpool_y"].int64_param = 5
    r.parameters["sequence_id"].int64_param = 12
    return r


def _worker_reply() -> pb.ModelInferResponse:
    r = _user_reply()
    execution.write(r, RAN)
    r.parameters["modelpool_added_later"].string_param = "any internal key goes"
    return r


def _parse(raw: bytes) -> pb.ModelInferResponse:
    return pb.ModelInferResponse.FromString(raw)


def test_split_removes_internal_parameters_and_keeps_the_rest_verbatim() -> None:
    raw = _worker_reply().SerializeToString()
    ran, stripped = execution.split_raw(raw)
    assert ran == RAN
    assert _parse(stripped) == _user_reply()
    assert not any(k.startswith(execution.PREFIX) for k in _parse(stripped).parameters)
    # Only the parameter entries went: every other byte is where it was, in order.
    assert len(stripped) < len(raw)
    assert TENSOR in stripped
    assert execution.read_raw(raw) == RAN  # the reader alone, as before


def test_split_finds_entries_wherever_they_are_in_the_message() -> None:
    # Protobuf readers merge a message's fields in any order (a parser merges
    # concatenated messages), so internal entries after and between the tensors count.
    internal = pb.ModelInferResponse()
    execution.write(internal, RAN)
    user = _user_reply()
    raw = (
        pb.ModelInferResponse(model_name="m").SerializeToString()
        + internal.SerializeToString()
        + user.SerializeToString()
        + internal.SerializeToString()
    )
    ran, stripped = execution.split_raw(raw)
    assert ran == RAN
    assert _parse(stripped) == user


def test_split_without_internal_parameters_returns_the_same_bytes() -> None:
    raw = _user_reply().SerializeToString()
    ran, stripped = execution.split_raw(raw)
    assert ran is None and stripped is raw  # nothing to cut: not even copied
    assert execution.split_raw(b"") == (None, b"")


def test_an_entry_is_judged_by_its_last_key() -> None:
    # A map entry's key is a singular field: a parser keeps the last one it reads.
    value = pb.InferParameter(string_param="v").SerializeToString()

    def entry(*keys: bytes) -> bytes:
        body = b"".join(b"\x0a" + bytes([len(k)]) + k for k in keys)
        body += b"\x12" + bytes([len(value)]) + value
        return b"\x22" + bytes([len(body)]) + body

    raw = entry(b"modelpool_x", b"user") + entry(b"user2", b"modelpool_y")
    ran, stripped = execution.split_raw(raw)
    assert ran is None  # internal parameters, but not an execution's
    assert set(_parse(stripped).parameters) == {"user"}
    assert set(_parse(raw).parameters) == {"user", "modelpool_y"}


def test_malformed_reply_comes_back_unchanged_without_an_execution() -> None:
    raw = _worker_reply().SerializeToString()
    at = raw.index(TENSOR) + 100
    cases = {
        "cut in a tensor": raw[:at],
        "cut in a varint": raw + b"\x80",
        "a group (wire type 3)": raw + b"\x0b",
        "a parameter entry longer than its field": b"\x22\x02\x0a\x05modelpool_x",
        "an internal entry whose value is not an InferParameter": (
            b"\x22\x14\x0a\x0emodelpool_rows\x12\x02\xff\xff"
        ),
    }
    for what, bad in cases.items():
        assert execution.split_raw(bad) == (None, bad), what
        assert execution.split_raw(bad)[1] is bad, what
        assert execution.read_raw(bad) is None, what


def test_every_truncation_is_survived() -> None:
    # Whatever a cut leaves, no exception; what comes back is the cut bytes as they
    # were, or (a cut on a field boundary is a valid message) one without our keys.
    raw = pb.ModelInferResponse(model_name="m", raw_output_contents=[b"\x80" * 40])
    execution.write(raw, RAN)
    data = raw.SerializeToString()
    for n in range(len(data)):
        cut = data[:n]
        ran, stripped = execution.split_raw(cut)
        if stripped is not cut:
            assert _internal(_parse(stripped).parameters) == []
        assert ran is None or isinstance(ran, execution.Execution)


def test_parsed_reply_loses_every_internal_key() -> None:
    r = _worker_reply()
    assert execution.read(r, strip=True) == RAN
    assert r == _user_reply()


def test_statistics_take_an_execution_already_read() -> None:
    assert execution_of(RAN) is RAN
    stats = Statistics()
    lead = execution.Execution(rows=6, lead=True, queue_s=0.0, infer_s=0.1)
    stats.record_success("m", 1, 2, started=0.0, compute_started=0.5, done=1.0, reply=lead)
    stats.record_success(
        "m", 1, 2, started=0.0, compute_started=0.5, done=1.0,
        reply=execution.Execution(rows=6, lead=False, queue_s=0.0, infer_s=0.1),
    )  # fmt: skip
    s = stats.of("m", 1)
    assert s.execution_count == 1 and s.inference_count == 4 and set(s.batch) == {6}


# -- end to end: what clients of a real `modelpool serve` see -------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    repo = tmp_path_factory.mktemp("params-repo")
    for name in ("unary", "rest", "stream"):
        write_sized(repo, name, 1 << 12)
    s = start_serve(repo, tmp_path_factory.mktemp("params-log") / "serve.log")
    yield s
    s.stop()


def _x(module: Any, rows: int = 2) -> Any:
    x = module.InferInput("x", [rows, 4], "FP32")
    x.set_data_from_numpy(np.ones((rows, 4), np.float32))
    return x


def _internal(parameters: Any) -> list[str]:
    return [k for k in parameters if k.startswith(execution.PREFIX)]


def _worker_figures_counted(s: Served, model: str, requests: int) -> None:
    """The gateway still read the worker's figures: compute_output is only the
    worker's (a reply without them counts none)."""
    got = tgrpc.InferenceServerClient(s.grpc_url).get_inference_statistics(model)
    m = got.model_stats[0]
    assert m.inference_stats.success.count == requests
    assert m.execution_count == requests
    assert m.inference_stats.compute_output.ns > 0


def test_grpc_client_sees_no_internal_parameters(served: Served) -> None:
    client = tgrpc.InferenceServerClient(served.grpc_url)
    for _ in range(2):
        result = client.infer("unary", [_x(tgrpc)], request_id="r1")
        np.testing.assert_allclose(result.as_numpy("y"), np.full((2, 4), 2.0))
        response = result.get_response()
        assert _internal(response.parameters) == []
        assert response.model_name == "unary" and response.id == "r1"
    _worker_figures_counted(served, "unary", 2)


def test_rest_client_sees_no_internal_parameters(served: Served) -> None:
    result = thttp.InferenceServerClient(served.http_url).infer("rest", [_x(thttp)])
    np.testing.assert_allclose(result.as_numpy("y"), np.full((2, 4), 2.0))
    assert _internal(result.get_response().get("parameters", {})) == []
    _worker_figures_counted(served, "rest", 1)


def test_stream_client_sees_no_internal_parameters(served: Served) -> None:
    got: queue.Queue[Any] = queue.Queue()
    client = tgrpc.InferenceServerClient(served.grpc_url)
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for _ in range(2):
            client.async_stream_infer("stream", [_x(tgrpc)])
        replies = [got.get(timeout=60) for _ in range(2)]
    finally:
        client.stop_stream()
    for result, error in replies:
        assert error is None, error
        np.testing.assert_allclose(result.as_numpy("y"), np.full((2, 4), 2.0))
        assert _internal(result.get_response().parameters) == []
    _worker_figures_counted(served, "stream", 2)
