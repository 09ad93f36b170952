"""Messages between gateway and worker that Triton's proto has no room for.

Inference itself travels as Triton's ``ModelInferRequest``/``ModelInferResponse`` so the
gateway forwards tensors without re-encoding them. Control calls (load with a
footprint in the reply, unload, status) are frozen dataclasses sent as JSON over
generic gRPC methods, which keeps the wire typed without a protoc step at build time.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

#: First word of the line a worker prints on stdout once it listens; the supervisor
#: reads the address and id from the rest of it.
READY_LINE = "MODELPOOL_WORKER_READY"

SERVICE = "modelpool.Worker"
LOAD = f"/{SERVICE}/Load"
UNLOAD = f"/{SERVICE}/Unload"
STATUS = f"/{SERVICE}/Status"

#: Trailing-metadata key carrying the ``placement.errors`` class name of a failure, so
#: the gateway re-raises the same typed error the worker raised.
ERROR_CLASS_KEY = "modelpool-error"


@dataclass(frozen=True)
class LoadRequest:
    """``known_peak_bytes``: the peak a previous load of this model measured on this
    kind of device (0: unknown). When known, the worker skips the warm-up forward that
    exists only to measure it, and a cold request pays one forward instead of two."""

    model: str
    version: int
    known_peak_bytes: int = 0
    #: JSON of a ModelConfig that replaces the model's config.pbtxt (a repository
    #: load with a ``config`` parameter); "": the file.
    config_override: str = ""


@dataclass(frozen=True)
class LoadResult:
    """``footprint_bytes``: what the copy holds once loaded; ``peak_bytes``: the most it
    held during load and warm-up, which is what admission must reserve next time."""

    model: str
    version: int
    footprint_bytes: int
    peak_bytes: int
    load_seconds: float
    #: Where the copy came from: "disk" (the artifact) or "host" (the worker's host
    #: tier, a host-to-device copy). Older workers send none: "disk".
    source: str = "disk"


@dataclass(frozen=True)
class UnloadRequest:
    """``keep``: demote the copy to the worker's host tier rather than drop it, if the
    tier is on (the gateway asks for capacity, pressure and cooled evictions; never
    for a client's unload, a removed model or a drain)."""

    model: str
    version: int
    keep: bool = False


@dataclass(frozen=True)
class UnloadResult:
    """``retained_bytes``: what the worker's device allocator still holds, after the
    copy went and ``empty_cache()`` ran, that no live tensor uses (reserved minus
    allocated): memory only a new process gets back. Worker-wide, not the copy's share;
    other models' loads and forwards do not count in it. Above a threshold the worker
    process is recycled to get it back."""

    model: str
    version: int
    freed_bytes: int
    retained_bytes: int = 0
    #: Bytes the copy holds in the worker's host tier now; 0: it was dropped.
    kept_bytes: int = 0


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on the worker's device, as the device reports them. ``source`` is where
    the figures came from: ``nvml`` (real device memory, other processes included),
    ``torch`` (CUDA allocator fallback) or ``budget`` (CPU: total is the budget, used is
    our models). ``budget_bytes`` is the configured cap, None for the whole device."""

    device: str
    total_bytes: int
    used_bytes: int
    free_bytes: int
    ours_bytes: int
    source: str
    budget_bytes: int | None = None


@dataclass(frozen=True)
class CopyStatus:
    model: str
    version: int
    footprint_bytes: int
    peak_bytes: int
    load_seconds: float
    inflight: int
    last_used: float
    #: Forward calls and requests answered since the load; fewer executions than
    #: inferences means dynamic batching merged requests.
    executions: int = 0
    inferences: int = 0


@dataclass(frozen=True)
class HostCopyStatus:
    """A copy in the worker's host tier (``gpu/host_tier.py``): off the device, one
    host-to-device copy away from serving."""

    model: str
    version: int
    bytes: int
    last_used: float


@dataclass(frozen=True)
class WorkerStatus:
    """``allocated_bytes`` / ``reserved_bytes``: the worker's own device allocator (the
    torch CUDA caching allocator), bytes in live tensors / bytes it holds from the
    device, cache included; their difference is what an unload's ``retained_bytes``
    reports once ``empty_cache()`` has run. Both 0 on CPU and from older workers."""

    worker_id: str
    device: str
    pid: int
    memory: DeviceMemory
    copies: tuple[CopyStatus, ...] = field(default_factory=tuple)
    allocated_bytes: int = 0
    reserved_bytes: int = 0
    #: The host tier: its copies, budget and bytes held (all empty/0 when it is off,
    #: on CPU, and from older workers).
    host_copies: tuple[HostCopyStatus, ...] = field(default_factory=tuple)
    host_budget_bytes: int = 0
    host_used_bytes: int = 0


T = TypeVar("T")


def encode(obj: Any) -> bytes:
    return json.dumps(dataclasses.asdict(obj), separators=(",", ":")).encode()


def decoder(cls: type[T]):
    """A grpc response/request deserializer building ``cls`` from JSON bytes."""

    def decode(data: bytes) -> T:
        raw = json.loads(data)
        if cls is WorkerStatus:
            raw["memory"] = DeviceMemory(**raw["memory"])
            raw["copies"] = tuple(CopyStatus(**c) for c in raw["copies"])
            raw["host_copies"] = tuple(HostCopyStatus(**c) for c in raw.get("host_copies", ()))
        return cls(**raw)

    return decode
