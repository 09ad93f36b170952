"""A closed loop for throughput benchmarks: ``concurrency`` lanes each send their next
request as soon as the last one is answered. (``python -m loadtests run`` is the open
loop; this one finds what a server sustains.)"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from typing import Any


async def drive(
    client: Any,
    payloads: Sequence[tuple[str, list[Any]]],
    total: int,
    concurrency: int,
    label: str = "",
) -> float:
    """Send ``total`` requests round-robin over ``payloads`` (model name, inputs) with
    ``concurrency`` in flight through an async tritonclient; returns requests/second.
    Prints progress on stderr every tenth of the way."""
    sent = 0
    step = max(1, total // 10)

    async def lane() -> None:
        nonlocal sent
        while sent < total:
            name, inputs = payloads[sent % len(payloads)]
            sent += 1
            await client.infer(name, inputs)
            if sent % step == 0:
                print(f"  {label}{sent}/{total}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    await asyncio.gather(*(lane() for _ in range(concurrency)))
    return total / (time.perf_counter() - started)
