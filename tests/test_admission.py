"""Admission: a cold model does not throw out copies worth more than it, at once.

The pure verdict (``placement.admission.judge``), the decayed demand it prices with, and
the copy manager holding a load back for at most its window while the model's requests
gather behind one load.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelpool.gateway.copies import CopyManager
from modelpool.placement.admission import Demand, judge
from modelpool.placement.cluster import (
    ClusterView,
    CopyState,
    CopyView,
    DeviceView,
    ModelInfo,
    WorkerView,
)
from modelpool.placement.policy import Load
from tests.core_fakes import make_core, settle, soon

MB = 1 << 20


def _view(*copies: CopyView, load_s: float = 0.01) -> ClusterView:
    names = {c.model for c in copies} | {"new"}
    return ClusterView(
        devices=(DeviceView("d", 100 * MB),),
        workers=(WorkerView("w", "d"),),
        copies=copies,
        models={m: ModelInfo(m, 10 * MB, load_seconds=load_s) for m in names},
    )


def _copy(model: str, size_mb: int) -> CopyView:
    return CopyView(model, 1, "w", CopyState.READY, size_mb * MB)


def test_a_load_into_free_room_is_always_admitted() -> None:
    plan = Load("w", "d", 10 * MB)
    assert judge(plan, _view(), "new", {}).admit


def test_a_colder_model_does_not_evict_a_hotter_copy() -> None:
    hot = _copy("hot", 10)
    plan = Load("w", "d", 10 * MB, evict=(hot,))
    verdict = judge(plan, _view(hot), "new", {"hot": 50.0, "new": 2.0})
    assert not verdict.admit and verdict.loss > verdict.gain
    assert "model 'new'" in verdict.describe("new")


def test_several_copies_together_outweigh_one_model_each_of_them_is_colder_than() -> None:
    victims = tuple(_copy(f"s{i}", 2) for i in range(4))
    plan = Load("w", "d", 8 * MB, evict=victims)
    demand = {"new": 10.0, **{v.model: 4.0 for v in victims}}
    assert not judge(plan, _view(*victims), "new", demand).admit
    demand["new"] = 20.0
    assert judge(plan, _view(*victims), "new", demand).admit


def test_demand_halves_every_half_life() -> None:
    d = Demand(half_life_s=10.0)
    for _ in range(8):
        d.observe("a", 100.0)
    assert d.count("a", 100.0) == 8.0
    assert d.count("a", 110.0) == pytest.approx(4.0)
    assert d.count("missing", 110.0) == 0.0
    assert d.snapshot(110.0) == {"a": pytest.approx(4.0)}
    with pytest.raises(ValueError):
        Demand(half_life_s=0)


async def _use(manager: CopyManager, model: str, times: int) -> None:
    for _ in range(times):
        manager.release(await manager.acquire(model, 1, soon()))


async def test_a_deferred_load_serves_every_waiter_with_one_load_at_the_window_end(
    tmp_path: Path,
) -> None:
    core = await make_core(tmp_path, {"hot": 600, "cold": 600}, admission_window_s=0.4)
    m, w = core.manager, core.worker("w1")
    await _use(m, "hot", 20)
    waiters = [asyncio.create_task(m.acquire("cold", 1, soon())) for _ in range(3)]
    await asyncio.sleep(0.15)
    # Held back: the hot copy stays, nothing was loaded for the cold model yet.
    assert w.loads == ["hot"] and not any(t.done() for t in waiters)
    assert core.metric("modelpool_admission_deferrals_total", model="cold") == 1
    leases = await asyncio.gather(*waiters)
    assert all(lease.copy.model == "cold" for lease in leases)
    assert w.loads == ["hot", "cold"]  # one load for the three requests
    for lease in leases:
        m.release(lease)
    await settle(core)
    assert m.invariant_errors() == []


async def test_a_hot_model_is_admitted_at_once(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"once": 600, "busy": 600}, admission_window_s=5.0)
    m, w = core.manager, core.worker("w1")
    await _use(m, "once", 1)
    for _ in range(10):
        m.demand.observe("busy", m.demand._counts["once"].at)
    lease = await m.acquire("busy", 1, soon(2.0))
    assert lease.cold and w.loads == ["once", "busy"]
    assert core.metric("modelpool_admission_deferrals_total", model="busy") == 0
    m.release(lease)


async def test_without_a_window_every_load_is_admitted(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"hot": 600, "cold": 600})
    m, w = core.manager, core.worker("w1")
    await _use(m, "hot", 20)
    await _use(m, "cold", 1)
    assert w.loads == ["hot", "cold"]
    assert core.metric("modelpool_admission_deferrals_total", model="cold") == 0


async def test_waiting_for_room_wears_down_the_minimum_residency(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100}, min_residency_s=2.0)
    m = core.manager
    assert m._request("a", 1).min_residency_s == 2.0
    assert m._request("a", 1, waited_s=0.5).min_residency_s == pytest.approx(1.5)
    assert m._request("a", 1, waited_s=3.0).min_residency_s == 0.0


async def test_a_placement_blocked_for_room_loads_before_younger_ones(tmp_path: Path) -> None:
    """Without this a large model starves: small ones take every byte that frees up."""
    core = await make_core(tmp_path, {"big": 800, "a": 400, "small": 200})
    m, w = core.manager, core.worker("w1")
    busy = await m.acquire("a", 1, soon())  # 400 held: big cannot make room yet
    big = asyncio.create_task(m.acquire("big", 1, soon()))
    await asyncio.sleep(0.05)
    small = asyncio.create_task(m.acquire("small", 1, soon()))
    await asyncio.sleep(0.1)
    # small would fit in the free 600 bytes, but big asked first and is blocked.
    assert w.loads == ["a"] and not small.done()
    m.release(busy)
    lease = await big
    assert w.loads[:2] == ["a", "big"]
    m.release(lease)
    m.release(await small)
    assert w.loads == ["a", "big", "small"]
    await settle(core)
    assert m.invariant_errors() == []


async def test_past_its_window_a_blocked_load_drains_busy_victims(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"big": 800, "a": 400}, admission_window_s=0.2)
    m, w = core.manager, core.worker("w1")
    busy = await m.acquire("a", 1, soon())
    big = asyncio.create_task(m.acquire("big", 1, soon()))
    await asyncio.sleep(0.4)
    # Claimed for the drain: a's request in flight finishes, no new one is routed to it.
    assert m.try_acquire("a", 1) is None and not big.done()
    assert ("big", 1) not in w.held and ("a", 1) in w.held
    m.release(busy)
    lease = await big
    assert w.loads == ["a", "big"] and ("a", 1) not in w.held
    m.release(lease)
    await settle(core)
    assert m.invariant_errors() == []
