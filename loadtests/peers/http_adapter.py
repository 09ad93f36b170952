"""The runner's ``Adapter`` for KServe v2 JSON over HTTP, for any system that speaks it.

Models and their inputs come from the repository (``signatures``), not the server, so
every system gets the same bodies. ``model_header`` names a header that carries the
model name on every inference: Ray Serve routes multiplexed models by
``serve_multiplexed_model_id`` and ignores the path.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from modelpool.loadtests.client import IndexEntry, ModelInfo, RequestFailed, random_inputs
from modelpool.loadtests.peers.signatures import Signature
from modelpool.loadtests.peers.v2json import encode_request

#: Characters of an error body kept in the failure's message.
ERROR_BODY_CHARS = 200


class V2JsonAdapter:
    def __init__(
        self,
        url: str,
        signatures: dict[str, Signature],
        timeout_s: float,
        connections: int,
        model_header: str | None = None,
    ) -> None:
        self._base = f"http://{url}"
        self._signatures = signatures
        self._timeout_s = timeout_s
        self._connections = connections
        self._model_header = model_header
        # Made on first use: aiohttp sessions belong to the loop that runs them.
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                # One connection per outstanding request, as the tritonclient adapter:
                # a smaller pool would queue inside the client, hiding server latency.
                connector=aiohttp.TCPConnector(limit=self._connections),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            )
        return self._session

    async def index(self) -> list[IndexEntry]:
        return [IndexEntry(name, "1", "") for name in sorted(self._signatures)]

    async def model_info(self, name: str) -> ModelInfo:
        return self._signatures[name].model_info()

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        datatypes = {s.name: s.datatype for s in info.inputs}
        return encode_request(random_inputs(info, seed), datatypes)

    async def infer(self, model: str, prepared: Any) -> None:
        headers = {"Content-Type": "application/json"}
        if self._model_header is not None:
            headers[self._model_header] = model
        url = f"{self._base}/v2/models/{model}/infer"
        try:
            async with self._client().post(url, data=prepared, headers=headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    text = body[:ERROR_BODY_CHARS].decode(errors="replace")
                    raise RequestFailed(f"http_{resp.status}", f"{model}: {text}")
        except asyncio.CancelledError:
            raise
        except RequestFailed:
            raise
        except TimeoutError as e:
            raise RequestFailed("timeout", f"{model}: no answer in {self._timeout_s:g} s") from e
        except Exception as e:
            # Anything else must still be a RequestFailed: the runner records only those.
            raise RequestFailed(type(e).__name__, f"{model}: {e}") from e

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
