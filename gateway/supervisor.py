"""Starts and restarts local worker processes for ``modelpool serve``.

Each slot is one worker process with a stable id. When a worker dies its copies leave
the store at once (so requests load them elsewhere) and the slot starts a new process.
A slot never gives up: failed starts back off exponentially up to
``max_restart_backoff_s`` and go on trying for as long as the gateway runs (readiness
reports a device with no worker meanwhile). Stopping sends SIGTERM, then SIGKILL to
any worker that has not exited in ``kill_after_s``: a hung worker never keeps
``modelpool serve`` alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from modelpool.cache.records import WorkerRecord
from modelpool.cache.store import ResidencyStore
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.workers import WorkerClients
from modelpool.gpu.protocol import READY_LINE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSlot:
    worker_id: str
    device: str  # cpu, cuda:0
    device_id: str  # node/device: what workers sharing memory have in common


@dataclass(frozen=True)
class SupervisorConfig:
    model_repository: str
    node: str
    device_memory_budget: int | None
    threads: int | None = None
    start_timeout_s: float = 60.0
    kill_after_s: float = 5.0
    restart_backoff_s: float = 0.5
    max_restart_backoff_s: float = 30.0
    #: A worker that ran this long before exiting restarts at the base backoff again.
    healthy_after_s: float = 60.0
    log_level: str = "INFO"
    max_message_bytes: int = 1 << 30
    #: Workers heartbeat into this shared store too, so other gateways see them.
    redis_url: str | None = None
    redis_namespace: str = "modelpool"
    #: Where workers listen on TCP, and the host other machines dial them at (the
    #: address registered in the store); this gateway dials their Unix sockets.
    worker_host: str = "127.0.0.1"
    advertise_host: str | None = None
    #: The repository's cache and S3 flags, passed on as they are (``gpu/sources.py``).
    repository_args: tuple[str, ...] = ()
    #: ``--host-memory-budget`` of each worker (its host tier, ``gpu/host_tier.py``); 0: off.
    host_memory_budget: int = 0


class LocalWorkers:
    def __init__(
        self,
        config: SupervisorConfig,
        slots: list[WorkerSlot],
        store: ResidencyStore,
        clients: WorkerClients,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.slots = slots
        self.store = store
        self.clients = clients
        self.metrics = metrics
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.restarts: dict[str, int] = {s.worker_id: 0 for s in slots}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._ready: dict[str, asyncio.Event] = {s.worker_id: asyncio.Event() for s in slots}
        # Gateway-to-worker traffic on this host goes over Unix sockets: no TCP stack.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="modelpool-"))

    async def start(self) -> None:
        """Start every slot and wait until each worker first reports ready."""
        for slot in self.slots:
            self._tasks.append(
                asyncio.create_task(self._run_slot(slot), name=f"slot-{slot.worker_id}")
            )
        waits = [
            asyncio.wait_for(e.wait(), self.config.start_timeout_s) for e in self._ready.values()
        ]
        try:
            await asyncio.gather(*waits)
        except TimeoutError:
            raise RuntimeError(
                f"workers did not start within {self.config.start_timeout_s:.0f}s; see their log above"
            ) from None

    def _command(self, slot: WorkerSlot) -> list[str]:
        cmd = [
            # -P: the current directory is not on sys.path, so a user's own gpu/ or
            # modelpool/ folder there cannot shadow the installed package.
            sys.executable, "-P", "-m", "modelpool.gateway.cli", "worker",
            "--model-repository", self.config.model_repository,
            "--device", slot.device,
            "--host", self.config.worker_host,
            "--unix-socket", str(self.socket_dir / f"{slot.worker_id}.sock"),
            "--port", "0",
            "--worker-id", slot.worker_id,
            "--exit-with-parent",
            "--log-level", self.config.log_level,
            "--max-message-size", str(self.config.max_message_bytes),
        ]  # fmt: skip
        cmd += self.config.repository_args
        if self.config.advertise_host:
            cmd += ["--advertise", self.config.advertise_host]
        if self.config.device_memory_budget is not None:
            cmd += ["--device-memory-budget", str(self.config.device_memory_budget)]
        if self.config.threads:
            cmd += ["--threads", str(self.config.threads)]
        if self.config.host_memory_budget:
            cmd += ["--host-memory-budget", str(self.config.host_memory_budget)]
        if self.config.redis_url:
            cmd += [
                "--redis-url",
                self.config.redis_url,
                "--redis-namespace",
                self.config.redis_namespace,
            ]
            cmd += ["--node", self.config.node]
        return cmd

    async def _spawn(self, slot: WorkerSlot) -> tuple[asyncio.subprocess.Process, str, str]:
        """Start a worker; returns it, the address it advertises to other hosts, and
        the one this gateway dials (its Unix socket)."""
        env = dict(os.environ)
        if slot.device.startswith("cuda"):
            # Growable segments instead of fixed ones: far less memory stranded by
            # fragmentation after unloads, which is what would force a recycle.
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        proc = await asyncio.create_subprocess_exec(
            *self._command(slot),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.DEVNULL,
            limit=LINE_LIMIT,
        )
        self.procs[slot.worker_id] = proc
        assert proc.stdout is not None
        async with asyncio.timeout(self.config.start_timeout_s):
            while True:
                line = await read_line(proc.stdout)
                if not line:
                    raise RuntimeError(
                        f"worker {slot.worker_id} exited before it was ready (code {await proc.wait()})"
                    )
                text = line.decode(errors="replace").strip()
                if text.startswith(READY_LINE):
                    fields = dict(kv.split("=", 1) for kv in text.split()[1:])
                    return proc, fields.get("advertise", fields["address"]), fields["address"]
                log.info("[%s] %s", slot.worker_id, text)

    async def _drain(self, slot: WorkerSlot, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await read_line(proc.stdout):
            log.info("[%s] %s", slot.worker_id, line.decode(errors="replace").rstrip())

    async def _run_slot(self, slot: WorkerSlot) -> None:
        """Keep one worker running until stop(), whatever happens to it."""
        backoff = self.config.restart_backoff_s
        while not self._stopping:
            started = asyncio.get_running_loop().time()
            try:
                await self._run_once(slot)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a failed start, a store error: never fatal
                if self._stopping:
                    return  # stop() killed it mid-start
                log.error("worker %s failed: %s; retrying in %.1fs", slot.worker_id, e, backoff)
                with contextlib.suppress(Exception):
                    await self._kill(slot.worker_id)
                    await self.worker_lost(slot.worker_id)
            if self._stopping:
                return
            self.restarts[slot.worker_id] += 1
            self.metrics.worker_restarts.labels(slot.device_id).inc()
            if asyncio.get_running_loop().time() - started >= self.config.healthy_after_s:
                backoff = self.config.restart_backoff_s
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.config.max_restart_backoff_s)

    async def _run_once(self, slot: WorkerSlot) -> None:
        """Start a worker, register it, and wait for it to exit."""
        ready = self._ready[slot.worker_id]
        ready.clear()
        proc, address, local = await self._spawn(slot)
        self.clients.dial_locally(slot.worker_id, address, local)
        await self.store.register_worker(
            WorkerRecord(slot.worker_id, address, slot.device_id, self.config.node, proc.pid or 0)
        )
        ready.set()
        log.info("worker %s ready at %s pid=%s", slot.worker_id, address, proc.pid)
        drain = asyncio.create_task(self._drain(slot, proc))
        try:
            code = await proc.wait()
        finally:
            drain.cancel()
        if self._stopping:
            return
        ready.clear()
        log.warning(
            "worker %s (pid %s) exited with code %s; restarting", slot.worker_id, proc.pid, code
        )
        await self.worker_lost(slot.worker_id)

    async def recycle(self, worker_id: str) -> None:
        """Restart a drained worker to give its device memory back (the CUDA caching
        allocator can keep what unloads freed); returns once the new process is
        registered. The copy manager drains it first, so no request is in flight."""
        proc = self.procs.get(worker_id)
        ready = self._ready.get(worker_id)
        if proc is None or ready is None or proc.returncode is not None:
            return
        ready.clear()
        log.warning("recycling worker %s to return its device memory", worker_id)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.kill_after_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await asyncio.wait_for(ready.wait(), self.config.start_timeout_s * 2)

    async def worker_lost(self, worker_id: str) -> None:
        dropped = await self.store.remove_worker(worker_id)
        self.clients.drop(worker_id)
        for copy in dropped:
            self.metrics.evictions.labels(copy.model, "worker_lost").inc()

    async def _kill(self, worker_id: str) -> None:
        proc = self.procs.get(worker_id)
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.config.kill_after_s)
        except TimeoutError:
            log.warning(
                "worker %s did not stop in %.0fs; killing it", worker_id, self.config.kill_after_s
            )
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def stop(self) -> None:
        """Stop every worker (SIGTERM: each drains; with Redis it leaves the registry
        itself first), then remove what is left of them from the store, so no gateway
        waits for a heartbeat to lapse to stop routing here."""
        self._stopping = True
        await asyncio.gather(*(self._kill(wid) for wid in list(self.procs)))
        for wid in list(self.procs):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self.store.remove_worker(wid)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        shutil.rmtree(self.socket_dir, ignore_errors=True)


#: Longest line read from a worker's stdout in one piece; longer ones (a huge traceback)
#: are read in parts rather than killing the reader.
LINE_LIMIT = 1 << 20


async def read_line(stream: asyncio.StreamReader) -> bytes:
    """One line, or a LINE_LIMIT-sized part of an overlong one; b"" at the end."""
    try:
        return await stream.readline()
    except ValueError:  # asyncio's LimitOverrunError surfaces from readline as ValueError
        return await stream.read(LINE_LIMIT)


def local_slots(node: str, devices: list[str], per_device: int) -> list[WorkerSlot]:
    return [
        WorkerSlot(
            worker_id=f"{node}-{dev.replace(':', '')}-w{i}", device=dev, device_id=f"{node}/{dev}"
        )
        for dev in devices
        for i in range(per_device)
    ]


def detect_devices() -> list[str]:
    """CUDA devices through NVML (no torch import in the gateway), else the CPU."""
    if os.environ.get("MODELPOOL_FORCE_CPU"):
        return ["cpu"]
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception:  # pynvml.NVMLError (no driver), ImportError
        return ["cpu"]
    return [f"cuda:{i}" for i in range(count)] or ["cpu"]
