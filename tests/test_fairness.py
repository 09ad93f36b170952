"""Fair, bounded queues per model: round-robin across tenants, a bound, deadlines and
cancellation that never leak a turn."""

from __future__ import annotations

import asyncio

import pytest

from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.fairness import FairGate
from modelpool.placement.errors import DeadlineExceeded, Unavailable


def later(s: float = 5.0) -> Deadline:
    return Deadline.after(s, client_set=True)


async def _queue(gate: FairGate, tenant: str, order: list[str], tag: str) -> None:
    await gate.enter(tenant, later())
    order.append(tag)


async def test_turns_go_round_robin_across_tenants() -> None:
    gate = FairGate("m", lambda: 1, max_queued=100)
    await gate.enter("A", later())
    order: list[str] = []
    tasks = [asyncio.create_task(_queue(gate, "A", order, f"A{i}")) for i in range(2, 6)]
    tasks.append(asyncio.create_task(_queue(gate, "B", order, "B1")))
    await asyncio.sleep(0)
    assert gate.queued == 5
    for _ in range(5):
        gate.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    # B's one request went in second, not behind all of A's.
    assert order == ["A2", "B1", "A3", "A4", "A5"]
    gate.leave()
    assert gate.active == 0 and gate.queued == 0


async def test_the_queue_is_bounded() -> None:
    gate = FairGate("m", lambda: 1, max_queued=2)
    await gate.enter("A", later())
    waiting = [asyncio.create_task(gate.enter("A", later())) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(Unavailable, match="'m'") as err:
        await gate.enter("B", later())
    assert err.value.retry_after_s > 0
    for _ in range(3):
        gate.leave()
        await asyncio.sleep(0)
    await asyncio.gather(*waiting)


async def test_a_deadline_while_queued_leaves_no_trace() -> None:
    gate = FairGate("m", lambda: 1, max_queued=10)
    await gate.enter("A", later())
    with pytest.raises(DeadlineExceeded):
        await gate.enter("B", Deadline.after(0.01, client_set=True))
    with pytest.raises(Unavailable):
        await gate.enter("B", Deadline.after(0.01, client_set=False))
    assert gate.queued == 0
    gate.leave()
    assert gate.active == 0


async def test_a_turn_granted_to_a_cancelled_waiter_is_passed_on() -> None:
    gate = FairGate("m", lambda: 1, max_queued=10)
    await gate.enter("A", later())
    first = asyncio.create_task(gate.enter("B", later()))
    second = asyncio.create_task(gate.enter("C", later()))
    await asyncio.sleep(0)
    gate.leave()  # B's turn: granted...
    first.cancel()  # ...and B is cancelled as it gets it
    try:
        await first
    except asyncio.CancelledError:
        pass  # the turn went on to C
    else:
        gate.leave()  # B got in before the cancellation landed: it leaves as usual
    await asyncio.wait_for(second, 1)  # either way C gets a turn; none is lost
    assert gate.active == 1
    gate.leave()
    assert gate.active == 0 and gate.queued == 0


async def test_capacity_follows_the_copies() -> None:
    copies = [1]
    gate = FairGate("m", lambda: 2 * copies[0], max_queued=10)
    await gate.enter("A", later())
    await gate.enter("A", later())
    third = asyncio.create_task(gate.enter("A", later()))
    await asyncio.sleep(0)
    assert not third.done()
    copies[0] = 2
    gate.leave()
    await asyncio.wait_for(third, 1)
    # queue empty, capacity 4, 2 active: B enters at once
    await asyncio.wait_for(gate.enter("B", later()), 1)
    assert gate.active == 3
