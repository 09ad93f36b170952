"""A Hypothesis state machine over the copy manager: acquire, release, evict, cancel,
fail a load, lose a worker, in any order. After every step the manager's books must
balance (in-flight equals live leases, nothing kept for gone copies); whenever nothing
is loading, no worker holds a copy the store does not know (no orphan) and every READY
copy's recorded bytes are what its worker holds (reservations equal resident bytes).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from modelpool.gateway.copies import Lease
from modelpool.gateway.deadlines import Deadline
from modelpool.placement.errors import ModelLoadError, ModelpoolError
from tests.core_fakes import Core, make_core

MODELS = {"a": 300, "b": 300, "c": 300, "d": 500}
WORKERS = ["w1", "w2"]


class CopyManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.core: Core = self.loop.run_until_complete(
            make_core(Path(self.tmp.name), MODELS, workers=WORKERS, total_bytes=1000)
        )
        self.leases: list[Lease] = []
        self.pending: list[asyncio.Task[Lease]] = []

    def run(self, coro=None, turns: int = 20) -> None:
        async def go() -> None:
            if coro is not None:
                await coro
            for _ in range(turns):
                await asyncio.sleep(0)

        self.loop.run_until_complete(go())
        self._collect()

    def _collect(self) -> None:
        for task in [t for t in self.pending if t.done()]:
            self.pending.remove(task)
            if task.cancelled():
                continue
            err = task.exception()
            if err is None:
                self.leases.append(task.result())
            else:
                assert isinstance(err, ModelpoolError), f"not a typed error: {err!r}"

    @rule(model=st.sampled_from(sorted(MODELS)), client=st.booleans())
    def acquire(self, model: str, client: bool) -> None:
        deadline = Deadline.after(0.05, client_set=client)
        self.pending.append(self.loop.create_task(self.core.manager.acquire(model, 1, deadline)))
        self.run()

    @precondition(lambda self: self.leases)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        lease = data.draw(st.sampled_from(self.leases))
        self.leases.remove(lease)
        self.core.manager.release(lease)
        self.run()

    @precondition(lambda self: self.pending)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        data.draw(st.sampled_from(self.pending)).cancel()
        self.run()

    @rule(model=st.sampled_from(sorted(MODELS)), reason=st.sampled_from(["pressure", "unload"]))
    def evict(self, model: str, reason: str) -> None:
        copies = [c for c in self.core.manager.view.all_copies() if c.model == model]
        for c in copies:
            self.run(self.core.manager.evict(c, reason))

    @rule(model=st.sampled_from(sorted(MODELS)), broken=st.booleans())
    def break_model(self, model: str, broken: bool) -> None:
        for w in WORKERS:
            if broken:
                self.core.worker(w).fail_load[model] = ModelLoadError(f"model '{model}': broken")
            else:
                self.core.worker(w).fail_load.pop(model, None)
        if not broken:
            self.core.manager.failures.pop((model, 1), None)

    @rule(worker=st.sampled_from(WORKERS))
    def lose_worker(self, worker: str) -> None:
        self.run(self.core.lose_worker(worker))
        self.run(self.core.restart_worker(worker))

    @rule()
    def wait(self) -> None:
        self.run(asyncio.sleep(0.06))

    @invariant()
    def books_balance(self) -> None:
        assert self.core.manager.invariant_errors() == []

    @invariant()
    def no_orphans_when_quiet(self) -> None:
        m = self.core.manager
        if m._placements or m._loads or m._tasks:
            return
        assert self.core.orphans() == []
        assert self.core.reservation_errors() == []

    def teardown(self) -> None:
        for lease in self.leases:
            self.core.manager.release(lease)
        self.loop.run_until_complete(self.core.manager.close())
        self.loop.close()
        self.tmp.cleanup()


CopyManagerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_copy_manager_state_machine = CopyManagerMachine.TestCase
