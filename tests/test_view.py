"""The gateway's local residency view: events, snapshots and its per-model index agree."""

from __future__ import annotations

from modelpool.cache.records import (
    CopyRemoved,
    CopyState,
    CopyUpserted,
    CopyView,
    Resynced,
    WorkerDown,
    WorkerRecord,
    WorkerUp,
)
from modelpool.cache.view import ResidencyView


def _copy(model: str, worker: str, state: CopyState = CopyState.READY) -> CopyView:
    return CopyView(model, 1, worker, state, 10)


def test_ready_copies_follow_events_snapshots_and_local_changes() -> None:
    view = ResidencyView()
    w1, w2 = WorkerRecord("w1", "a:1", "d", "n"), WorkerRecord("w2", "a:2", "d", "n")
    for event in (
        WorkerUp(w1),
        WorkerUp(w2),
        CopyUpserted(_copy("m", "w1")),
        CopyUpserted(_copy("m", "w2")),
    ):
        view.apply(event)
    view.apply(CopyUpserted(_copy("other", "w1")))
    assert {c.worker_id for c in view.ready_copies("m", 1)} == {"w1", "w2"}
    view.put(_copy("m", "w2", CopyState.UNLOADING))  # claimed for eviction
    assert [c.worker_id for c in view.ready_copies("m", 1)] == ["w1"]
    view.apply(CopyRemoved(("m", 1, "w2")))
    view.apply(WorkerDown("w1"))
    assert view.ready_copies("m", 1) == [] and view.ready_copies("other", 1) == []
    assert view.copies == {}
    view.apply(Resynced((w1,), (), (_copy("m", "w1"),)))
    assert [c.worker_id for c in view.ready_copies("m", 1)] == ["w1"]
    view.drop(("m", 1, "w1"))
    view.drop(("m", 1, "w1"))  # twice is harmless
    assert view.ready_copies("m", 1) == []
    view.put(_copy("m", "w1"))
    assert [c.worker_id for c in view.copies_of("m", 1)] == ["w1"]
