"""The supervisor keeps a slot alive whatever its worker does: a worker that keeps
failing to start is retried with capped backoff for as long as the gateway runs, and
registered as soon as one start succeeds; an overlong output line kills no reader."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry

from modelpool.cache.records import StoreEvent, WorkerUp
from modelpool.cache.store import InMemoryStore
from modelpool.gateway.metrics import Metrics
from modelpool.gateway.supervisor import LocalWorkers, SupervisorConfig, WorkerSlot
from modelpool.gateway.workers import WorkerClients
from modelpool.gpu.protocol import READY_LINE


def flaky_worker(tmp_path: Path, failures: int) -> list[str]:
    """A stand-in worker process: exits with an error ``failures`` times (once with a
    1 MiB line on stdout), then prints the ready line and stays up."""
    script = tmp_path / "flaky.py"
    counter = tmp_path / "starts"
    script.write_text(
        textwrap.dedent(
            f"""
            import pathlib, sys, time
            c = pathlib.Path({str(counter)!r})
            n = int(c.read_text()) if c.exists() else 0
            c.write_text(str(n + 1))
            if n < {failures}:
                if n == 0:
                    print("x" * (1 << 21), flush=True)
                sys.exit(3)
            print("{READY_LINE} address=unix:/tmp/none.sock worker_id=w pid=1", flush=True)
            time.sleep(60)
            """
        )
    )
    return [sys.executable, str(script)]


async def test_a_worker_that_keeps_failing_is_retried_until_it_starts(tmp_path: Path) -> None:
    store = InMemoryStore()
    events: list[StoreEvent] = []
    store.subscribe(events.append)
    registry = CollectorRegistry()
    command = flaky_worker(tmp_path, failures=4)

    class Flaky(LocalWorkers):
        def _command(self, slot: WorkerSlot) -> list[str]:
            return command

    config = SupervisorConfig(
        model_repository=str(tmp_path),
        node="n",
        device_memory_budget=1 << 20,
        restart_backoff_s=0.01,
        max_restart_backoff_s=0.05,
        start_timeout_s=20,
    )
    slot = WorkerSlot("w", "cpu", "n/cpu")
    supervisor = Flaky(config, [slot], store, WorkerClients(), Metrics(registry))
    try:
        await asyncio.wait_for(supervisor.start(), 30)
        assert any(isinstance(e, WorkerUp) for e in events)
        assert supervisor.restarts["w"] == 4
        assert (
            registry.get_sample_value("modelpool_worker_restarts_total", {"device": "n/cpu"}) == 4
        )
        assert not supervisor._tasks[0].done()  # still supervising
    finally:
        await supervisor.stop()
