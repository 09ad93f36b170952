"""Gateway settings, validated at start-up with messages that say how to fix them."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpool.placement.pressure import Watermarks
from modelpool.placement.replication import ReplicationConfig
from modelpool.placement.units import parse_size

__all__ = ["GatewayConfig", "parse_size"]


@dataclass(frozen=True)
class GatewayConfig:
    """Timeouts are seconds; sizes are bytes."""

    model_repository: str
    host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    #: REST bodies over this get 413; gRPC messages over it get RESOURCE_EXHAUSTED.
    max_request_bytes: int = 64 << 20
    infer_timeout_s: float = 60.0
    load_timeout_s: float = 300.0
    #: How long a request may wait for a copy (a load by someone else, or capacity).
    acquire_timeout_s: float = 120.0
    #: Copies younger than this are not evicted (stops thrashing under bursts).
    min_residency_s: float = 0.0
    policy: str = "lru"
    #: How often device memory is read, pressure checked and replication planned.
    poll_interval_s: float = 1.0
    watermarks: Watermarks = field(default_factory=Watermarks)
    #: An unload that leaves more than this in a worker's allocator gets the worker
    #: recycled once drained (``modelpool serve`` only: it owns the processes).
    retained_limit_bytes: int = 256 << 20
    #: The least time between two recycles on one device.
    recycle_interval_s: float = 60.0
    #: None turns replication off.
    replication: ReplicationConfig | None = field(default_factory=ReplicationConfig)

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(
                    f"--{name.replace('_', '-')} {port} is not a port number (0-65535)"
                )
        if self.max_request_bytes <= 0:
            raise ValueError("--max-request-size must be positive")
