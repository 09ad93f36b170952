"""Prometheus metrics of one gateway, on a registry passed in (tests use a fresh one).

Label values for ``model`` come from the repository only: a request for an unknown
model counts under ``_unknown`` so clients cannot grow the series without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNKNOWN_MODEL = "_unknown"
#: The ``tenant`` label of requests to a server without an auth config. Tenant names
#: come from the auth config only, so the label's values stay bounded.
NO_TENANT = "_none"

# Latency buckets from 1 ms (a warm small model) to a minute (a cold multi-GB load).
_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "modelpool_requests",
            "Inference requests by model, protocol (http, grpc), outcome (success, "
            "client_error, rate_limited, unavailable, deadline, cancelled, error) and tenant.",
            ["model", "protocol", "outcome", "tenant"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "modelpool_request_duration_seconds",
            "Time from a request's arrival to its reply, waiting for a load included, by "
            "model and tenant.",
            ["model", "tenant"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "modelpool_queue_wait_seconds",
            "Time before compute starts: waiting for a copy, a load or capacity.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "modelpool_compute_duration_seconds",
            "Time a worker took to answer a forwarded request (transfer and compute).",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.loads = Counter(
            "modelpool_model_loads",
            "Model loads this gateway started, by outcome (success, failure) and source: "
            "host (promoted from the worker's host tier) or disk (read from the "
            "repository; every failure counts here).",
            ["model", "outcome", "source"],
            registry=registry,
        )
        self.load_duration = Histogram(
            "modelpool_model_load_duration_seconds",
            "Time to load a model onto a worker, as the gateway saw it, by source (host, disk).",
            ["model", "source"],
            buckets=_LOAD_BUCKETS,
            registry=registry,
        )
        self.evictions = Counter(
            "modelpool_model_evictions",
            "Copies this gateway unloaded, by reason: capacity (room for a load), pressure "
            "(device above its high watermark), cooled (an extra replica no longer needed), "
            "unload (asked by a client), worker_lost (its worker died), removed (its "
            "files left the repository).",
            ["model", "reason"],
            registry=registry,
        )
        self.recycles = Counter(
            "modelpool_worker_recycles",
            "Worker processes restarted by this gateway once drained, by reason: "
            "retained_memory (an unload left more than the limit in the allocator).",
            ["reason"],
            registry=registry,
        )
        self.recycles.labels("retained_memory")  # exported at zero: alerts see a first one
        self.worker_restarts = Counter(
            "modelpool_worker_restarts",
            "Local worker processes started again after they exited or failed to start, by device.",
            ["device"],
            registry=registry,
        )
        self.cold_starts = Counter(
            "modelpool_cold_starts",
            "Requests that had to wait for a load of their model.",
            ["model"],
            registry=registry,
        )
        self.admission_deferrals = Counter(
            "modelpool_admission_deferrals",
            "Loads held back because the copies they would evict were worth more than the "
            "model (admission); each is loaded at the end of --admission-window at most.",
            ["model"],
            registry=registry,
        )
        self.replications = Counter(
            "modelpool_model_replications",
            "Extra copies this gateway loaded because a model was hot.",
            ["model"],
            registry=registry,
        )
        self.resident_models = Gauge(
            "modelpool_resident_models",
            "Model copies READY on workers, as this gateway sees them.",
            registry=registry,
        )
        self.device_memory = Gauge(
            "modelpool_device_memory_bytes",
            "Device memory by kind (total, used, free, reserved, ours).",
            ["device", "kind"],
            registry=registry,
        )
        self.inflight = Gauge(
            "modelpool_inflight_requests",
            "Requests this gateway is serving now.",
            registry=registry,
        )
        self.draining = Gauge(
            "modelpool_draining",
            "1 while this process drains after SIGTERM: not ready, finishing what it "
            "accepted within --drain-timeout, then leaving the registry.",
            registry=registry,
        )
        # Autoscaling signals (docs/observability.md#autoscaling): per model, what
        # waits and what runs; per device, how full its tier is.
        self.model_queue_depth = Gauge(
            "modelpool_model_queue_depth",
            "Requests waiting before compute, by model: for a copy, a load or a turn at "
            "the model's capacity (the waiting modelpool_queue_wait_seconds times).",
            ["model"],
            registry=registry,
        )
        self.model_inflight = Gauge(
            "modelpool_model_inflight_requests",
            "Requests at a worker now (forwarded, not yet answered), by model.",
            ["model"],
            registry=registry,
        )
        self.device_copies = Gauge(
            "modelpool_device_copies",
            "Model copies on each device by state (loading, ready, unloading).",
            ["device", "state"],
            registry=registry,
        )
        self.device_occupancy = Gauge(
            "modelpool_device_occupancy_ratio",
            "(used + reserved) / total of each device's memory: how full its tier is.",
            ["device"],
            registry=registry,
        )
        self.store_up = Gauge(
            "modelpool_store_up",
            "1 while the residency store answers (always 1 in memory), 0 during a Redis "
            "outage: warm routes still serve, loads and new workers wait.",
            registry=registry,
        )
        self.out_of_memory = Counter(
            "modelpool_out_of_memory",
            "Loads refused or failed for device memory, by model and stage: placement (the "
            "model is bigger than any device's share) or load (the worker ran out).",
            ["model", "stage"],
            registry=registry,
        )
        self.workers = Gauge(
            "modelpool_workers",
            "Workers registered and alive, as this gateway sees them.",
            registry=registry,
        )
        # Route names and targets come from the routing table only (bounded).
        self.route_requests = Counter(
            "modelpool_route_requests",
            "Requests to a public name of the routing table (--routing, /v2/routes), by "
            "the target model and version that served them (gateway/routing.py).",
            ["route", "model", "version"],
            registry=registry,
        )
