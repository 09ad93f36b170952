"""A copy manager over the in-memory store and fake workers, for in-process tests.

The fake workers hold what they were asked to load, take as long as a test lets them
(a gate per model), and fail the way real ones do (lost, broken artifact, retained
memory). Everything else is the product: the manager, the store, the view, the
repository on disk, the pure policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2 as pb

from modelpool.cache.records import CopyState, DeviceRecord, WorkerRecord
from modelpool.cache.store import InMemoryStore
from modelpool.cache.view import ResidencyView
from modelpool.gateway.copies import CopyManager, ManagerConfig
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.workers import AWAIT_LOAD
from modelpool.gpu import protocol
from modelpool.gpu.repository import ModelRepository
from modelpool.placement.errors import ModelLoadError, ModelNotReady, WorkerUnavailable
from modelpool.placement.pressure import Watermarks

CONFIG = """name: "{name}"
platform: "pytorch_libtorch"
max_batch_size: 8
input {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }}
output {{ name: "y" data_type: TYPE_FP32 dims: [ 4 ] }}
parameters {{ key: "modelpool.estimated_bytes" value {{ string_value: "{size}" }} }}
"""

DEVICE = "n/cpu"


def write_repo(root: Path, sizes: dict[str, int]) -> Path:
    """Models whose declared size is exact (the fake worker reports the same)."""
    for name, size in sizes.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "config.pbtxt").write_text(CONFIG.format(name=name, size=size))
        (root / name / "1" / "model.pt").write_bytes(b"not read by fake workers")
    return root


class FakeWorker:
    """One worker process: what it holds, and hooks to make it slow or fail."""

    def __init__(self, worker_id: str, sizes: dict[str, int]) -> None:
        self.worker_id = worker_id
        self.address = f"fake:{worker_id}"
        self.sizes = sizes
        self.held: dict[tuple[str, int], int] = {}
        self.loads: list[str] = []
        #: The peak the gateway said it knew, per load (0: none).
        self.known_peaks: list[int] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.alive = True
        self.fail_load: dict[str, Exception] = {}
        #: Models whose next infer this process dies in (as under kill -9), after
        #: awaiting the load the call asked to await.
        self.die_on_infer: set[str] = set()
        self.retained_bytes = 0
        #: (model, keep) of every unload, in order: whether the gateway asked to keep.
        self.unload_keeps: list[tuple[str, bool]] = []
        self.load_started = asyncio.Event()
        #: (model, metadata, whether the copy was held then) of every parsed infer.
        self.infers: list[tuple[str, tuple[tuple[str, str], ...], bool]] = []
        self.infer_sent = asyncio.Event()
        #: Set and replaced when a load finishes: wakes infers awaiting their load.
        self.loaded = asyncio.Event()

    def gate(self, model: str) -> asyncio.Event:
        """Loads of ``model`` wait until the returned event is set."""
        return self.gates.setdefault(model, asyncio.Event())

    def _check(self) -> None:
        if not self.alive:
            raise WorkerUnavailable(f"worker {self.worker_id} is unreachable (UNAVAILABLE)")

    async def load(
        self, model: str, version: int, timeout_s: float, known_peak_bytes: int = 0
    ) -> protocol.LoadResult:
        self._check()
        self.loads.append(model)
        self.known_peaks.append(known_peak_bytes)
        self.load_started.set()
        gate = self.gates.get(model)
        if gate is not None:
            await asyncio.wait_for(gate.wait(), timeout_s)
        self._check()
        if model in self.fail_load:
            raise self.fail_load[model]
        size = self.sizes[model]
        self.held[(model, version)] = size
        self.loaded.set()
        self.loaded = asyncio.Event()
        return protocol.LoadResult(model, version, size, size, 0.01)

    async def unload(
        self, model: str, version: int, timeout_s: float, keep: bool = False
    ) -> protocol.UnloadResult:
        self._check()
        self.unload_keeps.append((model, keep))
        freed = self.held.pop((model, version), 0)
        return protocol.UnloadResult(model, version, freed, self.retained_bytes)

    async def status(self, timeout_s: float) -> protocol.WorkerStatus:
        self._check()
        memory = protocol.DeviceMemory("cpu", 0, 0, 0, 0, "budget")
        return protocol.WorkerStatus(self.worker_id, "cpu", 1, memory)

    async def infer(self, request: Any, timeout_s: float, metadata: Any = None) -> Any:
        """Like the real worker: a copy not held is NOT_READY, unless the call asks to
        await its load (``AWAIT_LOAD``), which it then does within ``timeout_s``."""
        self._check()
        key = (request.model_name, int(request.model_version or 1))
        metadata = tuple(metadata or ())
        self.infers.append((request.model_name, metadata, key in self.held))
        self.infer_sent.set()
        if AWAIT_LOAD in metadata:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    while key not in self.held:
                        await self.loaded.wait()
        if request.model_name in self.die_on_infer:
            self.alive = False
        self._check()
        if key not in self.held:
            raise ModelNotReady(f"model '{key[0]}' is not loaded on {self.worker_id}")
        return pb.ModelInferResponse(model_name=key[0], model_version=str(key[1]))

    async def infer_raw(
        self, model: str, request: bytes, timeout_s: float, metadata: Any = None
    ) -> bytes:
        self._check()
        return b""

    def restart(self) -> None:
        """A fresh process: nothing held, alive again."""
        self.held.clear()
        self.alive = True


class FakePool:
    def __init__(self, workers: dict[str, FakeWorker]) -> None:
        self.workers = workers
        self.dropped: list[str] = []

    def get(self, worker_id: str, address: str) -> FakeWorker:
        return self.workers[worker_id]

    def drop(self, worker_id: str) -> None:
        self.dropped.append(worker_id)


@dataclasses.dataclass
class Core:
    manager: CopyManager
    store: InMemoryStore
    pool: FakePool
    metrics: Metrics
    registry: CollectorRegistry
    repo: Path
    pids: dict[str, int] = dataclasses.field(default_factory=dict)

    def worker(self, worker_id: str) -> FakeWorker:
        return self.pool.workers[worker_id]

    async def lose_worker(self, worker_id: str) -> None:
        """The process died: the supervisor's view of it."""
        self.worker(worker_id).alive = False
        await self.store.remove_worker(worker_id)

    async def restart_worker(self, worker_id: str) -> None:
        """A new process under the same id and address (a Unix socket path is reused),
        told apart only by its pid."""
        self.worker(worker_id).restart()
        self.pids[worker_id] = self.pids.get(worker_id, 1) + 1
        await self.store.register_worker(
            WorkerRecord(worker_id, f"fake:{worker_id}", DEVICE, "n", self.pids[worker_id])
        )

    def stored(self) -> dict[tuple[str, int, str], Any]:
        return {c.key: c for c in self.manager.view.copies.values()}

    def orphans(self) -> list[str]:
        """Copies a live fake worker holds with no READY/UNLOADING record, and READY
        records whose worker does not hold them."""
        problems = []
        stored = self.stored()
        for w in self.pool.workers.values():
            if not w.alive or w.worker_id not in self.manager.view.workers:
                continue
            for (model, version), _size in w.held.items():
                c = stored.get((model, version, w.worker_id))
                if c is None:
                    problems.append(f"{model} held by {w.worker_id} without a record")
        for key, c in stored.items():
            if c.state == CopyState.READY and (key[0], key[1]) not in self.worker(key[2]).held:
                problems.append(f"{key} READY in the store but not held")
        return problems

    def reservation_errors(self) -> list[str]:
        """A READY copy's recorded bytes must be what its worker holds for it."""
        problems = []
        for key, c in self.stored().items():
            held = self.worker(key[2]).held.get((key[0], key[1]))
            if c.state == CopyState.READY and held != c.footprint_bytes:
                problems.append(f"{key}: recorded {c.footprint_bytes}, held {held}")
        return problems

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


async def make_core(
    tmp_path: Path,
    sizes: dict[str, int],
    workers: Iterator[str] | list[str] = ("w1",),
    total_bytes: int = 1000,
    **config: Any,
) -> Core:
    repo = write_repo(tmp_path / "repo", sizes)
    store = InMemoryStore()
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    pool = FakePool({w: FakeWorker(w, sizes) for w in workers})
    config.setdefault("watermarks", Watermarks(high=1.0, low=0.9))
    manager = CopyManager(
        ModelRepository(repo), store, ResidencyView(), pool, metrics, ManagerConfig(**config)
    )
    for w in pool.workers:
        await store.register_worker(WorkerRecord(w, f"fake:{w}", DEVICE, "n", 1))
    await store.put_device(DeviceRecord(DEVICE, total_bytes))
    return Core(manager, store, pool, metrics, registry, repo)


def soon(seconds: float = 5.0, client_set: bool = False) -> Deadline:
    return Deadline.after(seconds, client_set)


async def settle(core: Core, timeout_s: float = 5.0) -> None:
    """Wait until no placement, load or recycle is running."""
    m = core.manager
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while m._placements or m._loads or m._tasks:
        if loop.time() > end:
            raise AssertionError(
                f"still running: {list(m._placements)} {list(m._loads)} {len(m._tasks)}"
            )
        await asyncio.sleep(0.005)


__all__ = ["Core", "FakePool", "FakeWorker", "ModelLoadError", "make_core", "settle", "soon"]
