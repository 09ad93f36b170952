"""A worker's HTTP side (``modelpool worker --metrics-port``): Prometheus metrics and
the health endpoints orchestrators probe.

``/v2/health/live`` is 200 while the process runs; ``/v2/health/ready`` is 503 from the
moment the worker starts draining, so Kubernetes and compose stop counting on it
before it leaves. Metrics are read from the worker at scrape time: nothing is counted
on the inference path.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from modelpool.gpu.worker import Worker


class WorkerCollector(Collector):
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[GaugeMetricFamily]:
        w = self.worker
        labels = [w.worker_id, w.config.device]
        models = list(w.runtime.models.values())
        held = GaugeMetricFamily(
            "modelpool_worker_models",
            "Model copies this worker holds.",
            labels=["worker", "device"],
        )
        held.add_metric(labels, len(models))
        yield held
        inflight = GaugeMetricFamily(
            "modelpool_worker_inflight_requests",
            "Inference calls this worker is answering now.",
            labels=["worker", "device"],
        )
        inflight.add_metric(labels, w.inflight)
        yield inflight
        memory = GaugeMetricFamily(
            "modelpool_worker_memory_bytes",
            "This worker's device as it reads it (NVML on a GPU, the budget on CPU): "
            "total, used, free, and ours (the copies it holds).",
            labels=["worker", "device", "kind"],
        )
        read = w.probe.read(w.runtime.ours_bytes())
        for kind, value in (
            ("total", read.total_bytes),
            ("used", read.used_bytes),
            ("free", read.free_bytes),
            ("ours", read.ours_bytes),
        ):
            memory.add_metric([*labels, kind], value)
        yield memory
        draining = GaugeMetricFamily(
            "modelpool_draining",
            "1 while this process drains after SIGTERM: not ready, finishing what it "
            "accepted within --drain-timeout, then leaving the registry.",
        )
        draining.add_metric([], 1 if w.draining else 0)
        yield draining


def create_app(worker: Worker) -> web.Application:
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def live(_request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(_request: web.Request) -> web.Response:
        ready = not worker.draining
        return web.json_response({"ready": ready}, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    return app


async def serve_http(worker: Worker, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start the HTTP side; returns its runner and the port it bound (``port`` 0: any)."""
    runner = web.AppRunner(create_app(worker), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    sockets = getattr(site._server, "sockets", None) or []
    return runner, int(sockets[0].getsockname()[1]) if sockets else port
