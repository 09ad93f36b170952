"""An adapter wrapper that counts slow answers: the client-side cold-start signal.

A system's own load counter says how many loads it did; this says how many requests
*felt* one (or queued behind one), measured the same way for every system, so it
also covers a peer whose metrics are missing.
"""

from __future__ import annotations

import time
from typing import Any

from modelpool.loadtests.client import Adapter, IndexEntry, ModelInfo


class SlowCounter:
    def __init__(self, inner: Adapter, slow_s: float) -> None:
        self._inner = inner
        self._slow_s = slow_s
        self.slow = 0

    async def index(self) -> list[IndexEntry]:
        return await self._inner.index()

    async def model_info(self, name: str) -> ModelInfo:
        return await self._inner.model_info(name)

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        return self._inner.prepare(info, seed)

    async def infer(self, model: str, prepared: Any) -> None:
        started = time.perf_counter()
        await self._inner.infer(model, prepared)
        # Failures raise past this line: a slow error is an error, not a cold start.
        if time.perf_counter() - started > self._slow_s:
            self.slow += 1

    async def close(self) -> None:
        await self._inner.close()
