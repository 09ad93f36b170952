"""The copy manager in-process: fake workers, the in-memory store, the real policy.

Each test drives one race or failure the GPU run exposed or the code review found:
a cancelled first requester, waiters that time out, concurrent loads on one worker, a
worker lost mid-load, a recycle under load, and a model whose files vanished.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from modelpool.cache.records import CopyState
from modelpool.gateway.deadlines import Deadline
from modelpool.gateway.housekeeping import Housekeeper
from modelpool.placement.errors import (
    DeadlineExceeded,
    ModelLoadError,
    Unavailable,
    WorkerUnavailable,
)
from tests.core_fakes import make_core, settle, soon


async def test_warm_path_leases_and_releases_once(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m = core.manager
    first = await m.acquire("a", 1, soon())
    assert first.cold
    second = await m.acquire("a", 1, soon())
    assert not second.cold
    assert m.copies()[0].inflight == 2
    m.release(first)
    m.release(first)  # twice is ignored
    assert m.copies()[0].inflight == 1
    m.release(second)
    assert m.copies()[0].inflight == 0
    assert core.worker("w1").loads == ["a"]
    assert m.invariant_errors() == []


async def test_cancelled_first_requester_leaves_the_load_and_other_waiters_alone(
    tmp_path: Path,
) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    first = asyncio.create_task(m.acquire("a", 1, soon()))
    second = asyncio.create_task(m.acquire("a", 1, soon()))
    await w.load_started.wait()  # the load started on behalf of the first
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    lease = await second
    assert lease.copy.state == CopyState.READY
    assert w.loads == ["a"]  # one load, not restarted by the cancellation
    m.release(lease)
    await settle(core)
    assert core.orphans() == [] and core.reservation_errors() == []
    assert m.invariant_errors() == []


async def test_every_waiter_cancelled_still_finishes_the_load(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    waiters = [asyncio.create_task(m.acquire("a", 1, soon())) for _ in range(3)]
    await w.load_started.wait()
    for t in waiters:
        t.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    gate.set()
    await settle(core)
    (copy,) = core.stored().values()
    assert copy.state == CopyState.READY and w.held == {("a", 1): 100}
    assert not (await m.acquire("a", 1, soon())).cold


async def test_a_client_deadline_is_deadline_exceeded_and_a_server_bound_is_503(
    tmp_path: Path,
) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    gate = w.gate("a")
    with pytest.raises(DeadlineExceeded, match="'a'"):
        await m.acquire("a", 1, Deadline.after(0.05, client_set=True))
    with pytest.raises(Unavailable) as server:
        await m.acquire("a", 1, Deadline.after(0.05, client_set=False))
    assert server.value.retry_after_s > 0
    assert not isinstance(server.value, DeadlineExceeded)
    gate.set()
    await settle(core)
    # The load the timed-out waiters started finished for the next request.
    lease = await m.acquire("a", 1, soon())
    assert not lease.cold and w.loads == ["a"]


async def test_deadline_from_client_takes_the_earlier_bound() -> None:
    assert Deadline.from_client(1.0, 120.0).client_set
    assert not Deadline.from_client(500.0, 120.0).client_set
    assert not Deadline.from_client(None, 120.0).client_set
    assert Deadline.from_client(1.0, 120.0).remaining() <= 1.0


async def test_concurrent_cold_loads_on_one_worker_load_each_model_once(tmp_path: Path) -> None:
    sizes = {f"m{i}": 100 for i in range(6)}
    core = await make_core(tmp_path, sizes, total_bytes=1000)
    m, w = core.manager, core.worker("w1")
    leases = await asyncio.gather(*(m.acquire(name, 1, soon()) for name in sizes for _ in range(3)))
    assert sorted(w.loads) == sorted(sizes)
    assert {lease.copy.model for lease in leases} == set(sizes)
    for lease in leases:
        m.release(lease)
    await settle(core)
    assert core.orphans() == [] and core.reservation_errors() == []
    assert m.invariant_errors() == []


async def test_eviction_never_takes_a_copy_in_flight(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 600, "b": 600})
    m = core.manager
    busy = await m.acquire("a", 1, soon())
    # b needs a's room, but a has a request in flight: b waits, then gets it.
    waiting = asyncio.create_task(m.acquire("b", 1, soon()))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    assert ("a", 1) in core.worker("w1").held
    m.release(busy)
    lease = await waiting
    assert lease.copy.model == "b"
    assert core.worker("w1").held == {("b", 1): 600}
    assert core.metric("modelpool_model_evictions_total", model="a", reason="capacity") == 1


async def test_a_worker_lost_mid_load_places_the_copy_elsewhere(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100}, workers=["w1", "w2"])
    m = core.manager
    w1, w2 = core.worker("w1"), core.worker("w2")
    g1 = w1.gate("a")
    # The plan picks the least loaded worker, w1 by name; it dies while loading.
    waiter = asyncio.create_task(m.acquire("a", 1, soon()))
    await w1.load_started.wait()
    w1.alive = False
    g1.set()
    lease = await waiter
    assert lease.copy.worker_id == "w2" and w2.loads == ["a"]
    assert "w1" not in m.view.workers  # it did not answer status: dropped
    m.release(lease)
    await settle(core)
    assert core.orphans() == [] and m.invariant_errors() == []


async def test_a_failed_load_never_drops_the_worker_that_replaced_the_dead_one(
    tmp_path: Path,
) -> None:
    """The soak's lost worker: a load to a dead process fails after its replacement
    registered under the same id and address; the check must not remove the new one."""
    core = await make_core(tmp_path, {"a": 100}, max_load_attempts=1)
    m, w1 = core.manager, core.worker("w1")
    gate = w1.gate("a")
    waiter = asyncio.create_task(m.acquire("a", 1, soon(2)))
    await w1.load_started.wait()
    await core.lose_worker("w1")
    await core.restart_worker("w1")  # new record (pid 2), same address
    w1.alive = False  # the old channel still fails, status included
    gate.set()
    with pytest.raises(Unavailable):
        await waiter
    assert "w1" in m.view.workers and m.view.workers["w1"].pid == 2
    w1.alive = True
    w1.gates.clear()
    lease = await m.acquire("a", 1, soon())
    assert lease.worker.pid == 2
    m.release(lease)


async def test_a_loaded_copy_is_held_for_the_request_that_asked(tmp_path: Path) -> None:
    """A placement's copy is not evicted before a request has leased it: otherwise two
    cold models that each need the other's room evict each other's fresh copies and
    the pool loads without serving (the CPU soak saw copies live 0.1 s)."""
    core = await make_core(tmp_path, {"a": 600, "b": 600}, fresh_grace_s=60)
    m = core.manager
    await m._placement("a", 1)  # placed; its waiter has not resumed yet
    copy = m.view.copies[("a", 1, "w1")]
    assert not await m.evict(copy, reason="capacity")
    b = asyncio.create_task(m.acquire("b", 1, soon(0.2)))
    with pytest.raises(Unavailable):
        await b  # b waits for room rather than evicting a's unserved copy
    lease = await m.acquire("a", 1, soon())  # the request it was loaded for
    m.release(lease)
    assert await m.evict(m.view.copies[("a", 1, "w1")], reason="capacity")


async def test_a_worker_lost_with_leases_out_keeps_the_books_straight(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m = core.manager
    lease = await m.acquire("a", 1, soon())
    await core.lose_worker("w1")
    assert m.copies() == []
    m.release(lease)  # the copy is gone; its lease still ends cleanly
    assert m.invariant_errors() == []
    await core.restart_worker("w1")
    again = await m.acquire("a", 1, soon())
    assert again.cold
    m.release(again)


async def test_a_broken_artifact_fails_fast_and_alone(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"bad": 100, "good": 100})
    m = core.manager
    core.worker("w1").fail_load["bad"] = ModelLoadError("model 'bad': cannot load model.pt")
    with pytest.raises(ModelLoadError):
        await m.acquire("bad", 1, soon())
    loads = len(core.worker("w1").loads)
    with pytest.raises(ModelLoadError):
        await m.acquire("bad", 1, soon())
    assert len(core.worker("w1").loads) == loads  # failed fast, no second load
    lease = await m.acquire("good", 1, soon())
    m.release(lease)
    assert core.stored().keys() == {("good", 1, "w1")}


async def test_a_vanished_artifact_affects_no_other_model(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"gone": 400, "b": 400, "c": 400})
    m = core.manager
    m.release(await m.acquire("b", 1, soon()))
    m.release(await m.acquire("gone", 1, soon()))  # the newer: LRU evicts b for c
    # The resident model's files go; the next cold load must still plan (the plan
    # prices "gone" by what its copy holds, no disk read) and evict as usual.
    for f in sorted((core.repo / "gone").rglob("*"), reverse=True):
        f.unlink() if f.is_file() else f.rmdir()
    (core.repo / "gone").rmdir()
    lease = await m.acquire("c", 1, soon())
    m.release(lease)
    assert ("gone", 1) in core.worker("w1").held and ("b", 1) not in core.worker("w1").held
    # The warm copy of "gone" still serves until housekeeping retires it.
    core.manager.repository.refresh()
    keeper = Housekeeper(core.store, m.view, core.pool, m, None, 0.0)
    await keeper.retire_removed()
    assert ("gone", 1) not in core.worker("w1").held
    assert core.metric("modelpool_model_evictions_total", model="gone", reason="removed") == 1
    assert m.invariant_errors() == [] and core.orphans() == []


async def test_a_recycle_waits_for_requests_and_fails_none(tmp_path: Path) -> None:
    core = await make_core(
        tmp_path,
        {"a": 400, "b": 400, "c": 400},
        workers=["w1", "w2"],
        retained_limit_bytes=10,
        recycle_interval_s=3600,
    )
    m = core.manager
    w1 = core.worker("w1")
    recycled: list[str] = []

    async def recycler(worker_id: str) -> None:
        assert not m._busy(worker_id), "recycled before it drained"
        await core.lose_worker(worker_id)
        await core.restart_worker(worker_id)
        recycled.append(worker_id)

    m.recycler = recycler
    a = await m.acquire("a", 1, soon())  # on w1
    b = await m.acquire("b", 1, soon())  # on w2
    assert a.copy.worker_id == "w1" and b.copy.worker_id == "w2"
    w1.retained_bytes = 1 << 20
    # Unloading an idle copy on w1 reports memory kept: w1 drains (a is in flight).
    m.release(b)
    c_on_w1 = await m.acquire("c", 1, soon())
    assert c_on_w1.copy.worker_id == "w1"
    m.release(c_on_w1)
    assert await m.evict(core.manager.view.copies[("c", 1, "w1")], reason="pressure")
    assert "w1" in m.draining() and not recycled
    # While draining, requests for a copy on w1 are not routed there and do not fail.
    second_a = asyncio.create_task(m.acquire("a", 1, soon()))
    await asyncio.sleep(0.05)
    m.release(a)
    lease = await second_a
    m.release(lease)
    await settle(core)
    assert recycled == ["w1"] and "w1" not in m.draining()
    assert core.metric("modelpool_worker_recycles_total", reason="retained_memory") == 1
    assert m.invariant_errors() == [] and core.orphans() == []


async def test_recycles_are_rate_limited_per_device(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100}, workers=["w1", "w2"], recycle_interval_s=3600)
    m = core.manager
    calls: list[str] = []

    async def recycler(worker_id: str) -> None:
        calls.append(worker_id)

    m.recycler = recycler
    assert m.request_recycle("w1", "retained_memory")
    assert not m.request_recycle("w2", "retained_memory")  # same device, too soon
    await settle(core)
    assert calls == ["w1"]


async def test_no_worker_at_all_is_a_prompt_503(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    await core.lose_worker("w1")
    with pytest.raises(Unavailable, match="no worker"):
        await core.manager.acquire("a", 1, soon(30))


async def test_a_model_bigger_than_the_device_does_not_fit(tmp_path: Path) -> None:
    from modelpool.placement.errors import DoesNotFit

    core = await make_core(tmp_path, {"huge": 5000})
    with pytest.raises(DoesNotFit):
        await core.manager.acquire("huge", 1, soon())


async def test_worker_unavailable_during_unload_still_frees_the_copy(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m = core.manager
    m.release(await m.acquire("a", 1, soon()))
    core.worker("w1").alive = False
    copy = m.view.copies[("a", 1, "w1")]
    assert await m.evict(copy, reason="pressure")
    assert ("a", 1, "w1") not in m.view.copies


async def test_close_cancels_loads_and_leaves_no_reservation(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 100})
    m, w = core.manager, core.worker("w1")
    w.gate("a")
    waiter = asyncio.create_task(m.acquire("a", 1, soon()))
    await w.load_started.wait()
    await m.close()
    with pytest.raises((Unavailable, asyncio.CancelledError, WorkerUnavailable)):
        await waiter
    assert core.stored() == {}


async def test_a_draining_workers_copies_still_count_and_nothing_spins(tmp_path: Path) -> None:
    """The first e2e recycle run froze the gateway for 120 s: the plan left a draining
    worker's copies out of the device's bytes, the store refused every reservation,
    and the placement re-planned without ever yielding."""
    core = await make_core(tmp_path, {"a": 600, "b": 600}, workers=["w1", "w2"])
    m = core.manager
    release_recycle = asyncio.Event()

    async def recycler(worker_id: str) -> None:
        await release_recycle.wait()

    m.recycler = recycler
    lease = await m.acquire("a", 1, soon())
    assert lease.copy.worker_id == "w1"
    assert m.request_recycle("w1", "retained_memory")
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    tick = asyncio.create_task(ticker())
    try:
        # a's 600 bytes are still on the device: b (600 of 1000) cannot be placed.
        with pytest.raises(Unavailable):
            await m.acquire("b", 1, Deadline.after(0.3, client_set=False))
        assert ticks >= 10  # the event loop kept running meanwhile
        assert ("b", 1) not in core.worker("w2").held
    finally:
        tick.cancel()
        m.release(lease)
        release_recycle.set()
        await settle(core)
    lease = await m.acquire("b", 1, soon())
    m.release(lease)


async def test_a_tenant_quota_evicts_its_own_copies_first_then_refuses(tmp_path: Path) -> None:
    from modelpool.gateway.copies import Quota
    from modelpool.placement.errors import QuotaExceeded

    sizes = {"acme-a": 300, "acme-b": 300, "acme-c": 300, "shared": 300}
    core = await make_core(tmp_path, sizes, total_bytes=2000)
    m = core.manager
    acme = Quota("acme", 600, lambda name: name.startswith("acme-"))
    m.quota_of = lambda name: acme if acme.owns(name) else None
    m.release(await m.acquire("shared", 1, soon()))  # shared: counts against no quota
    m.release(await m.acquire("acme-a", 1, soon()))
    m.release(await m.acquire("acme-b", 1, soon()))
    # acme-c would make 900 > 600: acme's least recently used own copy goes, not
    # 'shared', although the device has room for all.
    m.release(await m.acquire("acme-c", 1, soon()))
    held = set(core.worker("w1").held)
    assert ("acme-a", 1) not in held and {("acme-b", 1), ("acme-c", 1), ("shared", 1)} <= held
    assert core.metric("modelpool_model_evictions_total", model="acme-a", reason="quota") == 1
    # With both of acme's copies busy, nothing of its own can make room: 429.
    b = await m.acquire("acme-b", 1, soon())
    c = await m.acquire("acme-c", 1, soon())
    with pytest.raises(QuotaExceeded, match="acme") as err:
        await m.acquire("acme-a", 1, soon())
    assert err.value.http_status == 429 and err.value.retry_after_s > 0
    m.release(b)
    m.release(c)
    assert m.invariant_errors() == []
