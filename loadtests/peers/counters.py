"""A system's own count of model loads, read from its Prometheus endpoint.

Ray pushes metrics from its workers to the export port periodically (every second
here, ``ray_server.METRICS_REPORT_INTERVAL_MS``), so the final count of a run is read
once it stops changing rather than right after the last reply.
"""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

#: Seconds for one scrape.
SCRAPE_TIMEOUT_S = 5.0
#: Seconds between reads while waiting for a pushed counter to settle.
SETTLE_STEP_S = 1.5
#: Give up waiting for it to settle after this many seconds and take the last read.
SETTLE_MAX_S = 10.0


def sum_samples(text: str, name: str) -> float:
    """Sum of every sample called ``name`` (all label sets); 0 when there is none yet,
    which is what a counter that nothing has incremented reads as."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                total += s.value
    return total


async def read_counter(hostport: str, name: str) -> float | None:
    """The counter's sum, None when the endpoint cannot be read."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=SCRAPE_TIMEOUT_S)) as s,
            s.get(f"http://{hostport}/metrics") as resp,
        ):
            resp.raise_for_status()
            return sum_samples(await resp.text(), name)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def settled_counter(hostport: str, name: str) -> float | None:
    """Read until two reads ``SETTLE_STEP_S`` apart agree (at most ``SETTLE_MAX_S``)."""
    last = await read_counter(hostport, name)
    waited = 0.0
    while waited < SETTLE_MAX_S:
        await asyncio.sleep(SETTLE_STEP_S)
        waited += SETTLE_STEP_S
        now = await read_counter(hostport, name)
        if now is not None and now == last:
            return now
        last = now
    return last
