"""Pure placement pieces the gateway's housekeeping runs: watermarks, replication, and
the rule that a model is never loaded where its copy is still being unloaded."""

from __future__ import annotations

import pytest

from modelpool.placement.cluster import (
    ClusterView,
    CopyState,
    CopyView,
    DeviceView,
    ModelInfo,
    WorkerView,
)
from modelpool.placement.policy import Load, PlacementRequest, Wait, plan_lru
from modelpool.placement.pressure import Watermarks, pressure_victims
from modelpool.placement.replication import Replicate, ReplicationConfig, Shrink, plan_replication

D = DeviceView("d0", total_bytes=1000)
W0 = WorkerView("w0", "d0")


def c(
    model: str,
    size: int,
    used: float,
    worker: str = "w0",
    state: CopyState = CopyState.READY,
    inflight: int = 0,
) -> CopyView:
    return CopyView(model, 1, worker, state, size, last_used=used, loaded_at=0.0, inflight=inflight)


def view(*copies: CopyView, devices=(D,), workers=(W0,), models=None) -> ClusterView:
    infos = models or {x.model: ModelInfo(x.model, x.footprint_bytes) for x in copies}
    return ClusterView(tuple(devices), tuple(workers), tuple(copies), infos)


def test_no_pressure_under_the_high_mark() -> None:
    v = view(c("a", 500, 1), c("b", 440, 2))
    assert pressure_victims(v, D, Watermarks(0.95, 0.8), now=10) == ()


def test_pressure_evicts_lru_idle_down_to_the_low_mark() -> None:
    foreign = DeviceView("d0", 1000, used_other_bytes=300)
    v = view(
        c("old", 200, 1),
        c("busy", 200, 0, inflight=1),
        c("mid", 200, 2),
        c("new", 200, 3),
        devices=(foreign,),
    )
    # 300 + 800 = 1100 > 950: evict idle ones by last use until <= 800 (busy stays).
    assert [x.model for x in pressure_victims(v, foreign, Watermarks(0.95, 0.8), now=10)] == [
        "old",
        "mid",
    ]
    v2 = view(c("old", 200, 1), c("mid", 200, 2), c("new", 200, 3), devices=(foreign,))
    assert [x.model for x in pressure_victims(v2, foreign, Watermarks(0.85, 0.8), now=10)] == [
        "old"
    ]


def test_watermarks_validate() -> None:
    with pytest.raises(ValueError):
        Watermarks(high=0.5, low=0.9)


def test_unloading_copy_makes_a_new_load_wait() -> None:
    v = view(c("m", 100, 1, state=CopyState.UNLOADING))
    assert isinstance(plan_lru(v, PlacementRequest("m", 1, now=5)), Wait)
    gone = ClusterView((D,), (WorkerView("w0", "d0"),), (), {"m": ModelInfo("m", 100)})
    assert isinstance(plan_lru(gone, PlacementRequest("m", 1, now=5)), Load)


def test_replicate_hot_onto_a_free_worker_and_shrink_when_cool() -> None:
    workers = (WorkerView("w0", "d0"), WorkerView("w1", "d1"))
    devices = (D, DeviceView("d1", 1000))
    cfg = ReplicationConfig(hot_rps_per_copy=10, cool_rps_per_copy=2, max_copies=2)
    v = view(c("hot", 100, 1), c("calm", 100, 1), devices=devices, workers=workers)
    actions = plan_replication(v, {("hot", 1): 50.0, ("calm", 1): 1.0}, cfg, now=10)
    assert actions == [Replicate("hot", 1, "w1", "d1", 100)]
    # At max copies nothing more; once cool, the least recently used extra goes.
    two = view(c("hot", 100, 5), c("hot", 100, 1, worker="w1"), devices=devices, workers=workers)
    assert plan_replication(two, {("hot", 1): 50.0}, cfg, now=10) == []
    [shrink] = plan_replication(two, {("hot", 1): 1.0}, cfg, now=10)
    assert isinstance(shrink, Shrink) and shrink.copy.worker_id == "w1"


def test_no_replica_without_room_or_while_loading() -> None:
    workers = (WorkerView("w0", "d0"), WorkerView("w1", "d1"))
    full = DeviceView("d1", 1000, used_other_bytes=950)
    cfg = ReplicationConfig(hot_rps_per_copy=10, cool_rps_per_copy=2)
    v = view(c("hot", 100, 1), devices=(D, full), workers=workers)
    assert plan_replication(v, {("hot", 1): 99.0}, cfg, now=10) == []
    loading = view(
        c("hot", 100, 1),
        c("hot", 100, 1, worker="w1", state=CopyState.LOADING),
        devices=(D, DeviceView("d1", 1000)),
        workers=workers,
    )
    assert plan_replication(loading, {("hot", 1): 99.0}, cfg, now=10) == []


def test_device_record_counts_foreign_memory_only_inside_our_share() -> None:
    from modelpool.gateway.housekeeping import device_record
    from modelpool.gpu.protocol import DeviceMemory

    GiB = 1 << 30
    # 80 GiB GPU, our copies 2 GiB, a foreign job 70 GiB (plus our 2): used 72 GiB.
    whole = device_record(
        "g", DeviceMemory("cuda:0", 80 * GiB, 72 * GiB, 8 * GiB, 2 * GiB, "nvml"), 2 * GiB
    )
    assert (whole.total_bytes, whole.other_bytes) == (80 * GiB, 70 * GiB)
    # With an 8 GiB budget the foreign job leaves 8 GiB free on the device: 6 GiB of
    # room for us beyond our 2, so it eats nothing of our share.
    capped = device_record(
        "g", DeviceMemory("cuda:0", 80 * GiB, 72 * GiB, 8 * GiB, 2 * GiB, "nvml", 8 * GiB), 2 * GiB
    )
    assert (capped.total_bytes, capped.other_bytes) == (8 * GiB, 0)
    # The job grows to 75 GiB: 3 GiB free on the device, so 3 GiB of our share is gone.
    grown = device_record(
        "g", DeviceMemory("cuda:0", 80 * GiB, 77 * GiB, 3 * GiB, 2 * GiB, "nvml", 8 * GiB), 2 * GiB
    )
    assert grown.other_bytes == 3 * GiB
    assert grown.total_bytes - grown.other_bytes - 2 * GiB == 3 * GiB  # = device free
    cpu = device_record("c", DeviceMemory("cpu", GiB, 0, GiB, 0, "budget", GiB), 100)
    assert (cpu.total_bytes, cpu.used_bytes, cpu.other_bytes) == (GiB, 100, 0)


def test_min_copies_are_not_evicted_and_not_shrunk() -> None:
    from modelpool.placement.policy import evictable

    workers = (W0, WorkerView("w1", "d1"))
    devices = (D, DeviceView("d1", 1000))
    models = {"m": ModelInfo("m", 100, min_copies=2)}
    two = view(
        c("m", 100, 1), c("m", 100, 1, worker="w1"), devices=devices, workers=workers, models=models
    )
    req = PlacementRequest("x", 1, now=10)
    assert not any(evictable(x, two, req) for x in two.copies)
    assert plan_replication(two, {("m", 1): 0.0}, ReplicationConfig(10, 2), now=10) == []
    one = view(c("m", 100, 1), devices=devices, workers=workers, models=models)
    # Below its floor: a second copy whatever the rate.
    assert plan_replication(one, {}, ReplicationConfig(10, 2), now=10) == [
        Replicate("m", 1, "w1", "d1", 100)
    ]


def test_pressure_evicts_in_the_policys_order() -> None:
    """--policy decides pressure evictions too: GDSF keeps the small, often-asked model
    that LRU would evict for being the least recent."""
    from modelpool.placement.policies import Requested, make_policy

    foreign = DeviceView("d0", 1000, used_other_bytes=300)
    v = view(c("popular", 100, 1), c("big", 500, 5), c("other", 200, 6), devices=(foreign,))
    lru, gdsf = make_policy("lru"), make_policy("gdsf")
    for _ in range(50):
        gdsf.observe(Requested("popular", 1, 0.5))
    gdsf.observe(Requested("big", 1, 5.0))
    marks = Watermarks(0.95, 0.8)
    by_lru = pressure_victims(v, foreign, marks, 10, rank=lru.eviction_rank(v, 10))
    by_gdsf = pressure_victims(v, foreign, marks, 10, rank=gdsf.eviction_rank(v, 10))
    assert [x.model for x in by_lru] == ["popular", "big"]
    assert "popular" not in [x.model for x in by_gdsf]
