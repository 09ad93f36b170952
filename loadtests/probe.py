"""Reads the gateway's /metrics: the counters that give the cold-start rate, and the
residency and memory gauges plotted over time."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetricsSample:
    requests_total: float
    cold_starts_total: float
    resident_models: float | None
    #: Summed over devices; None when the gateway knows no device yet.
    device_memory_used_bytes: float | None
    device_memory_total_bytes: float | None


def parse_metrics(text: str) -> MetricsSample:
    sums: dict[str, float] = {}
    memory: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "modelpool_device_memory_bytes":
                kind = s.labels.get("kind", "")
                memory[kind] = memory.get(kind, 0.0) + s.value
            else:
                sums[s.name] = sums.get(s.name, 0.0) + s.value
    return MetricsSample(
        requests_total=sums.get("modelpool_requests_total", 0.0),
        cold_starts_total=sums.get("modelpool_cold_starts_total", 0.0),
        resident_models=sums.get("modelpool_resident_models"),
        device_memory_used_bytes=memory.get("used"),
        device_memory_total_bytes=memory.get("total"),
    )


class MetricsProbe:
    """Scrapes one HOST:PORT. A failed scrape returns None (logged once): the run goes
    on without the server-side figures rather than failing."""

    def __init__(self, hostport: str, timeout_s: float = 2.0) -> None:
        self.url = f"http://{hostport}/metrics"
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s))
        self._warned = False

    async def scrape(self) -> MetricsSample | None:
        try:
            async with self._session.get(self.url) as resp:
                resp.raise_for_status()
                return parse_metrics(await resp.text())
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            if not self._warned:
                log.warning(
                    "cannot scrape %s (%s); server-side figures will be missing", self.url, e
                )
                self._warned = True
            return None

    async def close(self) -> None:
        await self._session.close()
