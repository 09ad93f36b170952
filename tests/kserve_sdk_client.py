"""Calls a modelpool server with the real KServe Python SDK and prints what it saw as
one JSON object on stdout; run by tests/test_kserve_sdk.py in a process of its own.

Its own process because kserve's generated protos and tritonclient's both register
``inference.*`` messages in protobuf's default pool, and one process cannot hold both
("duplicate symbol 'inference.ServerLiveRequest'"); the gateway imports tritonclient's.

    echo '{"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8001", "model": "m"}' |
        python tests/kserve_sdk_client.py

Arguments come on stdin, not argv: importing kserve parses ``sys.argv`` with its model
server's own parser, which rejects other options. The model is one of tests/modelgen.py's (``x`` FP32 [n, 4] -> ``y`` = 2x + w[0]).
With ``"key"`` every call but health passes ``Authorization: Bearer KEY`` through the
SDK's ``headers=``, and the same calls are made once without it (``*_no_key``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.grpc import grpc_predict_v2_pb2 as kpb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import GRPCInferenceServiceStub
from kserve.protocol.infer_type import RequestedOutput

X = np.arange(8, dtype=np.float32).reshape(2, 4)


async def outcome(call: Callable[[], Awaitable[Any]]) -> dict[str, Any]:
    """``{"value": ...}``, or what failed: the HTTP status or the gRPC code."""
    try:
        return {"value": await call()}
    except httpx.HTTPStatusError as e:
        return {"error": "http", "status": e.response.status_code, "message": str(e)}
    except grpc.aio.AioRpcError as e:
        return {"error": "grpc", "status": e.code().name, "message": e.details()}


def request(model: str, binary: bool) -> InferRequest:
    x = InferInput("x", list(X.shape), "FP32")
    x.set_data_from_numpy(X, binary_data=binary)
    outputs = [RequestedOutput("y", parameters={"binary_data": True})] if binary else None
    return InferRequest(model_name=model, infer_inputs=[x], request_outputs=outputs)


def output(response: Any) -> list[Any]:
    y = response.get_output_by_name("y")
    return y.as_numpy().tolist()


async def rest_calls(base: str, model: str, headers: dict[str, str] | None) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=60))
    try:
        return {
            "live": await outcome(lambda: client.is_server_live(base)),
            "ready": await outcome(lambda: client.is_server_ready(base)),
            "model_ready": await outcome(lambda: client.is_model_ready(base, model, headers)),
            "missing_model_ready": await outcome(
                lambda: client.is_model_ready(base, "no-such-model", headers)
            ),
            "infer_json": await outcome(lambda: _rest_infer(client, base, model, False, headers)),
            "infer_binary": await outcome(lambda: _rest_infer(client, base, model, True, headers)),
        }
    finally:
        await client.close()


async def _rest_infer(
    client: InferenceRESTClient, base: str, model: str, binary: bool, headers: Any
) -> list[Any]:
    sent: dict[str, str] = {}
    response = await client.infer(
        base, request(model, binary), model_name=model, headers=headers, response_headers=sent
    )
    return [output(response), sent.get("content-type", "")]


async def grpc_calls(url: str, model: str, headers: Any) -> dict[str, Any]:
    client = InferenceGRPCClient(url, retries=0, timeout=60)
    # The SDK's client has no metadata calls; its generated stub does.
    channel = grpc.aio.insecure_channel(url)
    stub = GRPCInferenceServiceStub(channel)

    async def infer() -> list[Any]:
        return output(await client.infer(request(model, True), headers=headers))

    async def model_metadata() -> dict[str, Any]:
        m = await stub.ModelMetadata(
            kpb.ModelMetadataRequest(name=model), metadata=headers, timeout=60
        )
        return {
            "name": m.name,
            "versions": list(m.versions),
            "inputs": [[t.name, t.datatype, list(t.shape)] for t in m.inputs],
            "outputs": [[t.name, t.datatype, list(t.shape)] for t in m.outputs],
        }

    async def server_metadata() -> dict[str, Any]:
        m = await stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=60)
        return {"name": m.name, "version": m.version, "extensions": list(m.extensions)}

    try:
        return {
            "live": await outcome(lambda: client.is_server_live()),
            "ready": await outcome(lambda: client.is_server_ready()),
            "model_ready": await outcome(lambda: client.is_model_ready(model, headers=headers)),
            "infer": await outcome(infer),
            "model_metadata": await outcome(model_metadata),
            "server_metadata": await outcome(server_metadata),
        }
    finally:
        await client.close()
        await channel.close()


async def main(args: dict[str, str]) -> dict[str, Any]:
    """``args``: ``http`` and ``grpc`` (host:port), ``model``, optionally ``key``."""
    base, url, model, key = f"http://{args['http']}", args["grpc"], args["model"], args.get("key")
    result: dict[str, Any] = {"x": X.tolist()}
    if key is None:
        result["rest"] = await rest_calls(base, model, None)
        result["grpc"] = await grpc_calls(url, model, None)
        return result
    result["rest"] = await rest_calls(base, model, {"Authorization": f"Bearer {key}"})
    result["grpc"] = await grpc_calls(url, model, (("authorization", f"Bearer {key}"),))
    result["rest_no_key"] = await rest_calls(base, model, None)
    result["grpc_no_key"] = await grpc_calls(url, model, None)
    return result


if __name__ == "__main__":
    json.dump(asyncio.run(main(json.load(sys.stdin))), sys.stdout)
