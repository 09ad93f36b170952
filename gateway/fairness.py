"""Fair, bounded queues in front of each model's copies.

A model's copies take at most ``capacity`` forwards at once from this gateway; past
that, requests queue per tenant and are let in round-robin across tenants, so a
tenant with a thousand queued requests delays another tenant's next request by at
most one of its own, not by a thousand. The queue is bounded: a request that would be
queued beyond ``max_queued`` gets 503 with Retry-After at once instead of waiting
behind work that cannot finish in time.

Timeline with capacity 1, tenants A (noisy) and B::

    A1 enters (active)   A2 A3 A4 queue (A)   B1 queues (B)
    A1 leaves -> A2 (A's turn)   A2 leaves -> B1 (B's turn)   B1 leaves -> A3 ...
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable

from modelpool.gateway.deadlines import Deadline
from modelpool.placement.errors import Unavailable


class FairGate:
    """Admission to one model's copies. ``capacity`` is read on every entry, so it can
    follow the number of copies."""

    def __init__(self, name: str, capacity: Callable[[], int], max_queued: int) -> None:
        self.name = name
        self._capacity = capacity
        self.max_queued = max_queued
        self.active = 0
        #: Waiters per tenant, tenants in the order their turn comes.
        self._queues: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = (
            collections.OrderedDict()
        )
        self.queued = 0

    async def enter(self, tenant: str, deadline: Deadline) -> None:
        """Wait for a turn. Pair every successful ``enter`` with one ``leave``.

        Raises:
            Unavailable: the model's queue is full (Retry-After), or the server's wait
                bound passed.
            DeadlineExceeded: the client's deadline passed while queued.
        """
        if self.active < max(1, self._capacity()) and not self.queued:
            self.active += 1
            return
        if self.queued >= self.max_queued:
            raise Unavailable(
                f"model '{self.name}': {self.queued} requests already queued", retry_after_s=1.0
            )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queues.setdefault(tenant, collections.deque()).append(turn)
        self.queued += 1
        try:
            await asyncio.wait_for(asyncio.shield(turn), deadline.remaining())
        except BaseException as e:
            if turn.done() and not turn.cancelled():
                self.leave()  # granted as we gave up: pass the turn on
            else:
                turn.cancel()
                self._forget(tenant, turn)
            if isinstance(e, TimeoutError):
                raise deadline.error(f"model '{self.name}': queued") from None
            raise

    def leave(self) -> None:
        """A forward ended: the next tenant in turn goes in."""
        self.active -= 1
        self._grant()

    def _grant(self) -> None:
        while self._queues and self.active < max(1, self._capacity()):
            tenant, waiters = next(iter(self._queues.items()))
            turn = waiters.popleft()
            self.queued -= 1
            if waiters:
                self._queues.move_to_end(tenant)  # its next request waits its turn
            else:
                del self._queues[tenant]
            if turn.done():
                continue
            self.active += 1
            turn.set_result(None)

    def _forget(self, tenant: str, turn: asyncio.Future[None]) -> None:
        waiters = self._queues.get(tenant)
        if waiters is None or turn not in waiters:
            return
        waiters.remove(turn)
        self.queued -= 1
        if not waiters:
            del self._queues[tenant]


class FairGates:
    """One gate per model version, made on first use."""

    def __init__(self, capacity: Callable[[str, int], int], max_queued: int) -> None:
        self._capacity = capacity
        self.max_queued = max_queued
        self._gates: dict[tuple[str, int], FairGate] = {}

    def gate(self, model: str, version: int) -> FairGate:
        gate = self._gates.get((model, version))
        if gate is None:
            gate = FairGate(model, lambda: self._capacity(model, version), self.max_queued)
            self._gates[(model, version)] = gate
        return gate
