"""Properties of the placement decisions (``plan_lru``, ``plan_gdsf``, the policy objects)
over random cluster views and random request sequences."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelpool.placement.cluster import (
    ClusterView,
    CopyState,
    CopyView,
    DeviceView,
    ModelInfo,
    WorkerView,
)
from modelpool.placement.gdsf import gdsf_value, plan_by_value, plan_gdsf, reload_cost
from modelpool.placement.policies import (
    POLICIES,
    Evicted,
    GdsfPolicy,
    Loaded,
    LruPolicy,
    PolicyState,
    Requested,
    make_policy,
)
from modelpool.placement.policy import (
    Load,
    PlacementRequest,
    Plan,
    Reject,
    Route,
    Wait,
    evictable,
    plan_lru,
)

PureDecision = Callable[[ClusterView, PlacementRequest], Plan]

PURE: dict[str, PureDecision] = {"lru": plan_lru, "gdsf": plan_gdsf}

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MODELS = [f"m{i}" for i in range(8)]


@dataclass(frozen=True)
class Case:
    view: ClusterView
    req: PlacementRequest


@st.composite
def model_infos(draw: st.DrawFn) -> dict[str, ModelInfo]:
    infos = {}
    for name in MODELS:
        estimated = draw(st.integers(1, 1200))
        infos[name] = ModelInfo(
            name=name,
            estimated_bytes=estimated,
            measured_bytes=draw(st.none() | st.integers(1, 1200)),
            load_seconds=draw(st.none() | st.floats(0, 20)),
            pinned=draw(st.booleans()),
            frequency=draw(st.floats(0, 50)),
            priority_base=draw(st.floats(0, 1e-6)),
        )
    return infos


@st.composite
def cases(draw: st.DrawFn) -> Case:
    """A consistent cluster: every device has a worker and no device holds more than it
    has room for; copies in every state, some busy, some young, some pinned."""
    n_devices = draw(st.integers(1, 3))
    devices = []
    workers = []
    for d in range(n_devices):
        total = draw(st.integers(100, 1000))
        devices.append(DeviceView(f"d{d}", total, draw(st.integers(0, total // 3))))
        for w in range(draw(st.integers(1, 2))):
            workers.append(WorkerView(f"d{d}w{w}", f"d{d}"))
    infos = draw(model_infos())
    view = ClusterView(tuple(devices), tuple(workers), (), infos)
    copies: list[CopyView] = []
    now = 1000.0
    for _ in range(draw(st.integers(0, 12))):
        model = draw(st.sampled_from(MODELS))
        version = draw(st.integers(1, 2))
        worker = draw(st.sampled_from(workers))
        if any(c.key == (model, version, worker.worker_id) for c in copies):
            continue
        footprint = draw(st.integers(1, 400))
        device = next(d for d in devices if d.device_id == worker.device_id)
        if replace(view, copies=tuple(copies)).free_bytes(device) < footprint:
            continue
        copies.append(
            CopyView(
                model=model,
                version=version,
                worker_id=worker.worker_id,
                state=draw(st.sampled_from(list(CopyState))),
                footprint_bytes=footprint,
                last_used=draw(st.floats(0, now)),
                loaded_at=draw(st.floats(0, now)),
                inflight=draw(st.sampled_from([0, 0, 0, 1, 3])),
            )
        )
    req = PlacementRequest(
        model=draw(st.sampled_from(MODELS)),
        version=draw(st.integers(1, 2)),
        now=now,
        min_residency_s=draw(st.sampled_from([0.0, 0.0, 100.0, 600.0])),
    )
    return Case(replace(view, copies=tuple(copies)), req)


def _mine(view: ClusterView, req: PlacementRequest, state: CopyState) -> list[CopyView]:
    return [
        c
        for c in view.copies
        if c.model == req.model and c.version == req.version and c.state == state
    ]


def _device(view: ClusterView, device_id: str) -> DeviceView:
    return next(d for d in view.devices if d.device_id == device_id)


def _room_after_evicting_all(view: ClusterView, d: DeviceView, req: PlacementRequest) -> int:
    idle = sum(c.footprint_bytes for c in view.copies_on(d.device_id) if evictable(c, view, req))
    return view.free_bytes(d) + idle


def check_plan(view: ClusterView, req: PlacementRequest, plan: Plan) -> None:
    """Every rule a plan must keep, whichever policy made it."""
    ready = _mine(view, req, CopyState.READY)
    # An UNLOADING copy is waited out too: a new copy on its worker would share its key.
    busy = _mine(view, req, CopyState.LOADING) + _mine(view, req, CopyState.UNLOADING)
    need = view.models[req.model].need_bytes
    if ready:
        # A READY copy always routes: never a second load.
        assert isinstance(plan, Route) and plan.copy in ready
        return
    if busy:
        # One load per cold model: later requests wait for it.
        assert isinstance(plan, Wait) and plan.copy in busy
        return
    match plan:
        case Load():
            device = _device(view, plan.device_id)
            assert view.device_of(plan.worker_id) == plan.device_id
            assert plan.reserve_bytes == need
            assert len({v.key for v in plan.evict}) == len(plan.evict)
            for v in plan.evict:
                assert v in view.copies
                assert view.device_of(v.worker_id) == plan.device_id
                # Never pinned, in flight, LOADING or younger than the minimum residency.
                assert v.state == CopyState.READY
                assert v.inflight == 0
                assert not view.models[v.model].pinned
                assert req.now - v.loaded_at >= req.min_residency_s
            freed = sum(v.footprint_bytes for v in plan.evict)
            # Capacity is never exceeded once the plan is applied...
            assert view.free_bytes(device) + freed >= need
            # ...and nothing is evicted that was not needed for that.
            if plan.evict:
                assert view.free_bytes(device) + freed - plan.evict[-1].footprint_bytes < need
                assert all(view.free_bytes(d) < need for d in view.devices)
        case Reject(retryable=False):
            # Final only when the model is bigger than every device.
            assert need > max(d.total_bytes for d in view.devices)
        case Reject(retryable=True):
            # Retryable only when no device can be made to fit right now.
            assert all(_room_after_evicting_all(view, d, req) < need for d in view.devices)
        case _:
            pytest.fail(f"unexpected plan {plan!r}")


@pytest.mark.parametrize("name", sorted(PURE))
@FAST
@given(case=cases())
def test_pure_plans_keep_the_rules(name: str, case: Case) -> None:
    check_plan(case.view, case.req, PURE[name](case.view, case.req))


@pytest.mark.parametrize("name", sorted(POLICIES))
@FAST
@given(case=cases())
def test_policy_objects_keep_the_rules(name: str, case: Case) -> None:
    policy = make_policy(name)
    policy.observe(Requested(case.req.model, case.req.version, case.req.now))
    check_plan(case.view, case.req, policy.plan(case.view, case.req))


@FAST
@given(case=cases())
def test_plan_by_value_with_last_use_is_plan_lru(case: Case) -> None:
    assert plan_by_value(case.view, case.req, lambda c: c.last_used) == plan_lru(
        case.view, case.req
    )


@FAST
@given(case=cases())
def test_gdsf_evicts_the_lowest_values(case: Case) -> None:
    plan = plan_gdsf(case.view, case.req)
    if not isinstance(plan, Load) or not plan.evict:
        return
    view = case.view

    def value(c: CopyView) -> float:
        return gdsf_value(c, view.models[c.model])

    kept = [
        c
        for c in view.copies_on(plan.device_id)
        if evictable(c, view, case.req) and c not in plan.evict
    ]
    assert max(value(v) for v in plan.evict) <= min((value(c) for c in kept), default=math.inf)


# --- request sequences ---------------------------------------------------------------


class Cluster:
    """A cluster driven through a policy the way the gateway does: loads take time,
    requests stay in flight, and the policy hears of every event."""

    def __init__(self, policy: PolicyState, totals: list[int], sizes: list[int]) -> None:
        self.policy = policy
        self.devices = tuple(DeviceView(f"d{i}", t) for i, t in enumerate(totals))
        self.workers = tuple(WorkerView(f"w{i}", f"d{i}") for i in range(len(totals)))
        self.models = {f"m{i}": ModelInfo(f"m{i}", s, pinned=(i == 0)) for i, s in enumerate(sizes)}
        self.copies: list[CopyView] = []
        self.now = 0.0
        self.loads = 0

    def view(self) -> ClusterView:
        return ClusterView(self.devices, self.workers, tuple(self.copies), self.models)

    def request(self, model: str, hold: bool, min_residency_s: float) -> Plan:
        req = PlacementRequest(model, 1, self.now, min_residency_s)
        self.policy.observe(Requested(model, 1, self.now))
        view = self.view()
        plan = self.policy.plan(view, req)
        check_plan(view, req, plan)
        match plan:
            case Route(copy):
                i = self.copies.index(copy)
                self.copies[i] = replace(
                    copy, last_used=self.now, inflight=copy.inflight + int(hold)
                )
            case Load():
                for victim in plan.evict:
                    self.copies.remove(victim)
                    self.policy.observe(Evicted(victim, self.now))
                self.copies.append(
                    CopyView(
                        model,
                        1,
                        plan.worker_id,
                        CopyState.LOADING,
                        plan.reserve_bytes,
                        last_used=self.now,
                        loaded_at=self.now,
                    )
                )
                self.loads += 1
        return plan

    def finish_load(self, pick: int) -> None:
        loading = [c for c in self.copies if c.state == CopyState.LOADING]
        if loading:
            c = loading[pick % len(loading)]
            ready = replace(c, state=CopyState.READY, loaded_at=self.now)
            self.copies[self.copies.index(c)] = ready
            self.policy.observe(Loaded(ready, self.now))

    def finish_request(self, pick: int) -> None:
        busy = [c for c in self.copies if c.inflight > 0]
        if busy:
            c = busy[pick % len(busy)]
            self.copies[self.copies.index(c)] = replace(c, inflight=c.inflight - 1)

    def check(self) -> None:
        view = self.view()
        for d in self.devices:
            assert view.free_bytes(d) >= 0, f"{d.device_id} overfilled"
        live = [(c.model, c.version) for c in self.copies if c.state != CopyState.FAILED]
        assert len(live) == len(set(live)), "a model was loaded twice"


operations = st.lists(
    st.one_of(
        st.tuples(st.just("request"), st.sampled_from(MODELS), st.booleans()),
        st.tuples(st.just("finish_load"), st.integers(0, 10), st.just(False)),
        st.tuples(st.just("finish_request"), st.integers(0, 10), st.just(False)),
    ),
    max_size=60,
)


@pytest.mark.parametrize("name", sorted(POLICIES))
@FAST
@given(
    totals=st.lists(st.integers(200, 1000), min_size=1, max_size=3),
    sizes=st.lists(st.integers(50, 1100), min_size=len(MODELS), max_size=len(MODELS)),
    ops=operations,
    min_residency_s=st.sampled_from([0.0, 5.0]),
)
def test_request_sequences_keep_capacity_and_load_once(
    name: str,
    totals: list[int],
    sizes: list[int],
    ops: list[tuple[str, object, bool]],
    min_residency_s: float,
) -> None:
    cluster = Cluster(make_policy(name), totals, sizes)
    for op, arg, hold in ops:
        cluster.now += 1.0
        if op == "request":
            assert isinstance(arg, str)
            cluster.request(arg, hold, min_residency_s)
        elif op == "finish_load":
            assert isinstance(arg, int)
            cluster.finish_load(arg)
        else:
            assert isinstance(arg, int)
            cluster.finish_request(arg)
        cluster.check()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_burst_for_a_cold_model_loads_it_once(name: str) -> None:
    cluster = Cluster(make_policy(name), [1000], [100] * len(MODELS))
    plans = [cluster.request("m3", hold=True, min_residency_s=0.0) for _ in range(5)]
    assert isinstance(plans[0], Load)
    assert all(isinstance(p, Wait) for p in plans[1:])
    cluster.finish_load(0)
    assert isinstance(cluster.request("m3", hold=False, min_residency_s=0.0), Route)
    assert cluster.loads == 1


# --- GDSF state ----------------------------------------------------------------------


def test_frequency_halves_every_half_life() -> None:
    policy = GdsfPolicy(half_life_s=10.0)
    for _ in range(4):
        policy.observe(Requested("a", 1, 100.0))
    assert policy.frequency("a", 100.0) == pytest.approx(4.0)
    assert policy.frequency("a", 110.0) == pytest.approx(2.0)
    assert policy.frequency("a", 130.0) == pytest.approx(0.5)
    assert policy.frequency("never", 130.0) == 0.0
    policy.observe(Requested("a", 1, 110.0))
    assert policy.frequency("a", 110.0) == pytest.approx(3.0)


def _one_device(copies: list[CopyView], infos: list[ModelInfo], total: int) -> ClusterView:
    return ClusterView(
        (DeviceView("d0", total),),
        (WorkerView("w0", "d0"),),
        tuple(copies),
        {i.name: i for i in infos},
    )


def test_gdsf_keeps_the_hot_model_where_lru_drops_it() -> None:
    infos = [ModelInfo(n, 100, load_seconds=1.0) for n in ("hot", "cold", "new")]
    policy = GdsfPolicy()
    for t in range(10):
        policy.observe(Requested("hot", 1, float(t)))
    policy.observe(Requested("cold", 1, 20.0))
    copies = [
        CopyView("hot", 1, "w0", CopyState.READY, 100, last_used=9.0),
        CopyView("cold", 1, "w0", CopyState.READY, 100, last_used=20.0),
    ]
    view = _one_device(copies, infos, 200)
    req = PlacementRequest("new", 1, 21.0)
    policy.observe(Requested("new", 1, 21.0))
    gdsf = policy.plan(view, req)
    lru = LruPolicy().plan(view, req)
    assert isinstance(gdsf, Load) and [c.model for c in gdsf.evict] == ["cold"]
    assert isinstance(lru, Load) and [c.model for c in lru.evict] == ["hot"]


def test_gdsf_prefers_evicting_cheap_reloads_per_byte() -> None:
    # Same demand; "slow" takes 10x as long to load per byte, so it stays.
    infos = [
        ModelInfo("slow", 100, load_seconds=10.0, frequency=1.0),
        ModelInfo("fast", 100, load_seconds=1.0, frequency=1.0),
        ModelInfo("new", 100, load_seconds=1.0),
    ]
    copies = [
        CopyView("slow", 1, "w0", CopyState.READY, 100, last_used=0.0),
        CopyView("fast", 1, "w0", CopyState.READY, 100, last_used=5.0),
    ]
    plan = plan_gdsf(_one_device(copies, infos, 200), PlacementRequest("new", 1, 10.0))
    assert isinstance(plan, Load) and [c.model for c in plan.evict] == ["fast"]


def test_reload_cost_guesses_from_size_when_never_loaded() -> None:
    assert reload_cost(ModelInfo("a", 10, load_seconds=3.0), 10) == 3.0
    assert reload_cost(ModelInfo("a", 10), 2 * 10**9) == pytest.approx(2.0)
    assert reload_cost(None, 10**9) == pytest.approx(1.0)


def test_aging_clock_rises_on_chosen_evictions_only() -> None:
    policy = GdsfPolicy(aging=True, half_life_s=math.inf, miss_penalty_s=0.0)
    info = ModelInfo("a", 100, load_seconds=2.0)
    copy = CopyView("a", 1, "w0", CopyState.READY, 100)
    policy.observe(Requested("a", 1, 0.0))
    policy.observe(Requested("a", 1, 1.0))
    view = _one_device([copy], [info, ModelInfo("b", 100)], 100)
    plan = policy.plan(view, PlacementRequest("b", 1, 1.0))
    assert isinstance(plan, Load) and plan.evict == (copy,)
    policy.observe(Evicted(copy, 2.0, chosen=False))
    assert policy.clock(2.0) == 0.0
    policy.observe(Evicted(copy, 2.0))
    assert policy.clock(2.0) == pytest.approx(2.0 * 2 / 100)
    # A newcomer starts level with the victim it displaced.
    policy.observe(Loaded(CopyView("b", 1, "w0", CopyState.READY, 100), 2.0))
    fed = policy.feed(
        _one_device([CopyView("b", 1, "w0", CopyState.READY, 100)], [ModelInfo("b", 100)], 100),
        2.0,
    )
    assert fed.models["b"].priority_base == pytest.approx(policy.clock(2.0))


def test_without_aging_the_clock_stays() -> None:
    policy = GdsfPolicy(aging=False)
    copy = CopyView("a", 1, "w0", CopyState.READY, 100)
    policy.observe(Requested("a", 1, 0.0))
    view = _one_device([copy], [ModelInfo("a", 100), ModelInfo("b", 100)], 100)
    assert isinstance(policy.plan(view, PlacementRequest("b", 1, 0.0)), Load)
    policy.observe(Evicted(copy, 1.0))
    assert policy.clock(1.0) == 0.0


def test_make_policy() -> None:
    assert isinstance(make_policy("lru"), LruPolicy)
    tuned = make_policy("gdsf", half_life_s=5.0, aging=True)
    assert isinstance(tuned, GdsfPolicy) and tuned.half_life_s == 5.0 and tuned.aging
    assert make_policy("gdsf").name == "gdsf"
    with pytest.raises(ValueError, match=r"only placement\.simulate"):
        make_policy("opt")
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("fifo")
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("gdsf", nope=1.0)
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("lru", half_life_s=1.0)
    with pytest.raises(ValueError, match="half_life_s > 0"):
        make_policy("gdsf", half_life_s=0.0)


# -- host tier preference --------------------------------------------------------------
def _two_devices(copies: tuple[CopyView, ...] = ()) -> ClusterView:
    """d0 emptier than d1; two workers on d1."""
    return ClusterView(
        (DeviceView("d0", 1000, 0), DeviceView("d1", 1000, 300)),
        (WorkerView("d0w0", "d0"), WorkerView("d1w0", "d1"), WorkerView("d1w1", "d1")),
        copies,
        {"m": ModelInfo("m", estimated_bytes=200), "x": ModelInfo("x", estimated_bytes=900)},
    )


@pytest.mark.parametrize("name", sorted(PURE))
def test_a_load_goes_where_the_host_tier_holds_the_model(name: str) -> None:
    view = _two_devices()
    cold = PURE[name](view, PlacementRequest("m", 1, now=1000.0))
    assert isinstance(cold, Load) and cold.device_id == "d0"  # the emptier device
    warm = PURE[name](view, PlacementRequest("m", 1, now=1000.0, host_workers=frozenset({"d1w1"})))
    assert isinstance(warm, Load) and (warm.device_id, warm.worker_id) == ("d1", "d1w1")
    assert warm.evict == ()


@pytest.mark.parametrize("name", sorted(PURE))
def test_the_host_tier_never_costs_an_eviction_another_device_avoids(name: str) -> None:
    # d1 is full of an idle copy; d0 has room: loading from disk on d0 evicts nothing,
    # which beats a cheap copy to d1 that would throw out another model.
    full = CopyView("x", 1, "d1w0", CopyState.READY, 700, last_used=0.0, loaded_at=0.0)
    view = _two_devices((full,))
    plan = PURE[name](view, PlacementRequest("m", 1, now=1000.0, host_workers=frozenset({"d1w0"})))
    assert isinstance(plan, Load) and plan.device_id == "d0" and plan.evict == ()


@pytest.mark.parametrize("name", sorted(PURE))
def test_a_draining_host_holder_is_not_chosen(name: str) -> None:
    view = _two_devices()
    draining = replace(view, workers=(view.workers[0], replace(view.workers[1], accepting=False)))
    plan = PURE[name](
        draining, PlacementRequest("m", 1, now=1000.0, host_workers=frozenset({"d1w0"}))
    )
    assert isinstance(plan, Load) and plan.device_id == "d0"
