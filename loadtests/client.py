"""Protocol adapters over tritonclient's asyncio clients: list models, read metadata,
send one inference. The runner sees only ``Adapter``; every call has a deadline."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from tritonclient.grpc import aio as grpc_aio
from tritonclient.http import aio as http_aio
from tritonclient.utils import InferenceServerException

#: Size for a variable (-1) dimension other than the batch dimension.
SMALL_DIM = 4

_NUMPY: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
    "BYTES": np.object_,
}  # fmt: skip


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # as the metadata gives it, -1 for variable


@dataclass(frozen=True)
class ModelInfo:
    name: str
    inputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    state: str


class RequestFailed(Exception):
    """One inference failed; ``kind`` is what the report groups errors by."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def concrete_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Batch 1 for a leading -1 (Triton's batch dimension), a small size for others."""
    return tuple((1 if i == 0 else SMALL_DIM) if d < 0 else d for i, d in enumerate(shape))


def random_inputs(info: ModelInfo, seed: int) -> dict[str, np.ndarray]:
    """Random data of each input's datatype and shape; integers stay small and
    non-negative since models often use them as indices."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for spec in info.inputs:
        if spec.datatype not in _NUMPY:
            raise ValueError(
                f"model '{info.name}': input '{spec.name}' has datatype {spec.datatype}"
            )
        shape = concrete_shape(spec.shape)
        dtype = _NUMPY[spec.datatype]
        if spec.datatype == "BYTES":
            flat = [b"modelpool-%d" % v for v in rng.integers(0, 1000, size=int(np.prod(shape)))]
            out[spec.name] = np.array(flat, dtype=np.object_).reshape(shape)
        elif spec.datatype == "BOOL":
            out[spec.name] = rng.integers(0, 2, size=shape).astype(np.bool_)
        elif np.issubdtype(dtype, np.floating):
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 100, size=shape).astype(dtype)
    return out


class Adapter(Protocol):
    async def index(self) -> list[IndexEntry]: ...

    async def model_info(self, name: str) -> ModelInfo: ...

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        """Built once per model and reused by every request to it (read-only)."""
        ...

    async def infer(self, model: str, prepared: Any) -> None: ...

    async def close(self) -> None: ...


def _kind_of(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timeout"
    if isinstance(e, InferenceServerException):
        # gRPC gives "StatusCode.UNAVAILABLE", HTTP the status code ("503").
        status = str(e.status() or "").removeprefix("StatusCode.")
        if status.isdigit():
            return f"http_{status}"
        return status or "client_error"
    return type(e).__name__


def _inputs(module: Any, info: ModelInfo, seed: int, **flags: bool) -> list[Any]:
    datatypes = {s.name: s.datatype for s in info.inputs}
    prepared = []
    for name, array in random_inputs(info, seed).items():
        x = module.InferInput(name, list(array.shape), datatypes[name])
        x.set_data_from_numpy(array, **flags)
        prepared.append(x)
    return prepared


class _Base:
    def __init__(self, timeout_s: float, headers: dict[str, str] | None) -> None:
        self.timeout_s = timeout_s
        #: Sent with every call (a tenant's ``authorization``); None: none.
        self.headers = headers

    async def _call(self, what: str, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout_s):
                return await coro
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise RequestFailed(_kind_of(e), f"{what}: {e}") from e


class GrpcAdapter(_Base):
    def __init__(self, url: str, timeout_s: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(timeout_s, headers)
        self._client = grpc_aio.InferenceServerClient(url)

    async def index(self) -> list[IndexEntry]:
        resp = await self._call(
            "repository index",
            self._client.get_model_repository_index(
                headers=self.headers, client_timeout=self.timeout_s
            ),
        )
        return [IndexEntry(m.name, m.version, m.state) for m in resp.models]

    async def model_info(self, name: str) -> ModelInfo:
        meta = await self._call(
            f"metadata of {name}",
            self._client.get_model_metadata(
                name, headers=self.headers, client_timeout=self.timeout_s
            ),
        )
        inputs = tuple(
            TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape)) for t in meta.inputs
        )
        return ModelInfo(name, inputs)

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        return _inputs(tgrpc, info, seed)

    async def infer(self, model: str, prepared: Any) -> None:
        await self._call(
            model,
            self._client.infer(
                model, prepared, headers=self.headers, client_timeout=self.timeout_s
            ),
        )

    async def close(self) -> None:
        await self._client.close()


class HttpAdapter(_Base):
    def __init__(
        self, url: str, timeout_s: float, connections: int, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(timeout_s, headers)
        # One connection per outstanding request: the default pool (100) would queue
        # requests inside the client, which an open-loop run must not do.
        self._client = http_aio.InferenceServerClient(
            url, conn_limit=connections, conn_timeout=timeout_s
        )

    async def index(self) -> list[IndexEntry]:
        doc = await self._call(
            "repository index", self._client.get_model_repository_index(headers=self.headers)
        )
        return [IndexEntry(m["name"], str(m.get("version", "")), m.get("state", "")) for m in doc]

    async def model_info(self, name: str) -> ModelInfo:
        meta = await self._call(
            f"metadata of {name}", self._client.get_model_metadata(name, headers=self.headers)
        )
        inputs = tuple(
            TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
            for t in meta["inputs"]
        )
        return ModelInfo(name, inputs)

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        return _inputs(thttp, info, seed, binary_data=True)

    async def infer(self, model: str, prepared: Any) -> None:
        await self._call(model, self._client.infer(model, prepared, headers=self.headers))

    async def close(self) -> None:
        await self._client.close()


def connect(
    protocol: str,
    url: str,
    timeout_s: float,
    connections: int,
    headers: dict[str, str] | None = None,
) -> Adapter:
    """``headers`` go with every call: ``{"authorization": "Bearer KEY"}`` for a tenant
    (lower-case: gRPC metadata keys must be)."""
    if protocol == "grpc":
        return GrpcAdapter(url, timeout_s, headers)
    if protocol == "http":
        return HttpAdapter(url, timeout_s, connections, headers)
    raise ValueError(f"unknown protocol {protocol!r}")
