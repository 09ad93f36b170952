"""Gateway settings, validated at start-up with messages that say how to fix them."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from modelpool.gpu.sources import RepositorySettings
from modelpool.placement.pressure import Watermarks
from modelpool.placement.replication import ReplicationConfig
from modelpool.placement.units import parse_size

__all__ = ["GatewayConfig", "is_loopback", "parse_size"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (127.0.0.0/8, ::1,
    localhost). Any other name counts as reachable from elsewhere."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GatewayConfig:
    """Timeouts are seconds; sizes are bytes."""

    model_repository: str
    #: The artifact cache and S3 settings of the repository (``gpu/sources.py``).
    repository_settings: RepositorySettings = field(default_factory=RepositorySettings)
    #: Loopback unless auth is on: see ``auth_config`` and ``insecure``.
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    #: REST bodies over this get 413; gRPC messages over it get RESOURCE_EXHAUSTED.
    max_request_bytes: int = 64 << 20
    infer_timeout_s: float = 60.0
    #: SIGTERM: how long accepted requests may run before the gateway stops anyway.
    drain_timeout_s: float = 30.0
    load_timeout_s: float = 300.0
    #: How long a request may wait for a copy (a load by someone else, or capacity).
    acquire_timeout_s: float = 15.0
    #: How long one placement (its lock, evictions and load) may take, whoever waits
    #: for it: a request gives up after ``acquire_timeout_s``, the load goes on.
    placement_timeout_s: float = 120.0
    #: Copies younger than this are not evicted (stops thrashing under bursts).
    min_residency_s: float = 0.5
    #: Longest a load is held back while the copies it would evict are worth more
    #: than the model (0: admit at once); see ``placement.admission``.
    admission_window_s: float = 0.5
    policy: str = "gdsf"
    #: System shared memory registration: "on", "off", or "auto" (on without an auth
    #: config, where only this host's own users can reach the server by default).
    system_shared_memory: str = "auto"
    #: How often device memory is read, pressure checked and replication planned.
    poll_interval_s: float = 1.0
    watermarks: Watermarks = field(default_factory=Watermarks)
    #: An unload that leaves more than this in a worker's allocator gets the worker
    #: recycled once drained (``modelpool serve`` only: it owns the processes).
    retained_limit_bytes: int = 256 << 20
    #: The least time between two recycles on one device.
    recycle_interval_s: float = 60.0
    #: Forwards one model may have in flight from this gateway, per routable copy;
    #: past that, requests queue per tenant and go in round-robin.
    max_inflight_per_copy: int = 32
    #: Requests one model may have queued past that before a 503 with Retry-After.
    max_queued_per_model: int = 1024
    #: None turns replication off.
    replication: ReplicationConfig | None = field(default_factory=ReplicationConfig)
    #: The tenants and key digests (YAML, ``gateway/tenants.py``); None: auth off, every
    #: caller sees every model and may make admin calls.
    auth_config: str | None = None
    #: How often the auth config's mtime is checked for a reload; 0: only on SIGHUP.
    auth_reload_interval_s: float = 1.0
    #: Aliases and canary splits (YAML, ``gateway/routing.py``); None: routes only from
    #: the admin endpoints. Checked for changes every ``auth_reload_interval_s`` too.
    routing: str | None = None
    #: JSON-lines audit log of admin actions and refused credentials; None: none.
    audit_log: str | None = None
    #: Serve without auth on an address other hosts can reach.
    insecure: bool = False

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port < 65536:
                raise ValueError(
                    f"--{name.replace('_', '-')} {port} is not a port number (0-65535)"
                )
        if self.max_inflight_per_copy < 1 or self.max_queued_per_model < 0:
            raise ValueError(
                "--max-inflight-per-copy must be at least 1 and --max-queue-per-model at least 0"
            )
        if self.max_request_bytes <= 0:
            raise ValueError("--max-request-size must be positive")
        if self.auth_reload_interval_s < 0:
            raise ValueError("--auth-reload-interval must be 0 (SIGHUP only) or positive")
        if self.auth_config is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"--host {self.host} without --auth-config would let anyone who can reach "
                "it use every model and the admin calls. Pass --auth-config FILE (tenants "
                "and key hashes; `modelpool keys new` makes a key; see docs/security.md), "
                "or keep the default --host 127.0.0.1, or pass --insecure to serve it "
                "open anyway (e.g. behind a proxy that authenticates)"
            )
