"""The Ray Serve side of the comparison: one deployment serving every model of the
repository with ``@serve.multiplexed``, routed by Ray's own model-id header.

It is written the way the Ray docs recommend for many models: the multiplexed loader
holds at most ``max_num_models_per_replica`` models per replica and evicts the least
recently used; a request names its model in ``serve_multiplexed_model_id`` and Ray's
router prefers a replica that already holds it. Loads and forwards run off the event
loop so a load does not stall warm requests, as modelpool's worker does.

Imports ray and torch: only ever imported by ``ray_server`` in its own process.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from ray import serve
from ray.serve.deployment import Application
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from modelpool.loadtests.peers.budget import BudgetMapping
from modelpool.loadtests.peers.signatures import Signature
from modelpool.loadtests.peers.v2json import BodyError, decode_inputs, encode_response

#: The header Ray Serve's HTTP proxy routes multiplexed requests by.
MODEL_ID_HEADER = "serve_multiplexed_model_id"
#: Forward threads per replica: modelpool's worker runs inference on a pool of two.
INFER_THREADS = 2

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/[^/]+)?/infer$")


def _error(status: int, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status)


def _forward(module: Any, arrays: list[np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*[torch.from_numpy(a) for a in arrays])
    tensors = list(out) if isinstance(out, tuple | list) else [out]
    return [t.detach().cpu().numpy() for t in tensors]


def _load(path: str) -> Any:
    return torch.jit.load(path, map_location="cpu").eval()


def build_app(
    signatures: dict[str, Signature],
    mapping: BudgetMapping,
    max_ongoing_requests: int,
    torch_threads: int,
) -> Application:
    """The application to ``serve.run``; the class is made here because the decorator's
    model count is a definition-time argument."""

    class MultiplexedTorchScript:
        def __init__(self) -> None:
            # Ray sets OMP_NUM_THREADS to an actor's CPUs, 1 for num_cpus=0; modelpool's
            # workers keep torch's default, so match it rather than measure Ray on one core.
            torch.set_num_threads(torch_threads)
            self._signatures = signatures
            self._pool = ThreadPoolExecutor(INFER_THREADS, thread_name_prefix="infer")

        @serve.multiplexed(max_num_models_per_replica=mapping.max_models_per_replica)
        async def get_model(self, model_id: str) -> Any:
            return await asyncio.to_thread(_load, str(self._signatures[model_id].artifact))

        async def __call__(self, request: Request) -> Response:
            path = request.url.path
            if request.method == "GET" and path == "/v2/health/ready":
                return Response(status_code=200)
            match = _INFER_PATH.match(path)
            if request.method != "POST" or match is None:
                return _error(404, f"no route {request.method} {path}")
            name = match[1]
            sig = self._signatures.get(name)
            if sig is None:
                return _error(404, f"model '{name}' is not in the repository")
            if serve.get_multiplexed_model_id() != name:
                return _error(400, f"header {MODEL_ID_HEADER} must name the model '{name}'")
            try:
                arrays = decode_inputs(
                    json.loads(await request.body()), [(t.name, t.datatype) for t in sig.inputs]
                )
            except (BodyError, json.JSONDecodeError) as e:
                return _error(400, f"model '{name}': {e}")
            module = await self.get_model(name)
            outputs = await asyncio.get_running_loop().run_in_executor(
                self._pool, _forward, module, arrays
            )
            return JSONResponse(
                encode_response(name, [(t.name, t.datatype) for t in sig.outputs], outputs)
            )

    deployment = serve.deployment(
        num_replicas=mapping.replicas,
        max_ongoing_requests=max_ongoing_requests,
        # Logical CPUs only gate scheduling; 0 keeps N replicas schedulable on a small
        # machine, where they share the cores as modelpool's workers do.
        ray_actor_options={"num_cpus": 0},
    )(MultiplexedTorchScript)
    app: Application = deployment.bind()
    return app
