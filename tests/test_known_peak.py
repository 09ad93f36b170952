"""A reload skips the warm-up forward: the gateway hands the worker the peak it
measured before, and the worker takes it instead of measuring again (issue 11, one
forward for a cold request instead of two)."""

from __future__ import annotations

from pathlib import Path

import torch

from modelpool.gpu.repository import ModelRepository
from modelpool.gpu.runtime import ModelRuntime
from tests.core_fakes import make_core, settle, soon

MiB = 1 << 20


async def test_a_reload_carries_the_peak_measured_on_the_first_load(tmp_path: Path) -> None:
    core = await make_core(tmp_path, {"a": 600, "b": 600})
    m, w = core.manager, core.worker("w1")
    for model in ("a", "b", "a"):  # b evicts a; a comes back
        m.release(await m.acquire(model, 1, soon()))
        await settle(core)
    assert w.loads == ["a", "b", "a"]
    assert w.known_peaks == [0, 0, 600]


def test_the_runtime_takes_a_known_peak_over_its_own_measurement(tmp_path: Path) -> None:
    from tests.modelgen import write_model

    write_model(tmp_path, "lin", torch.nn.Linear(4, 4))
    fresh = ModelRuntime(ModelRepository(tmp_path), "cpu").load("lin", 1)
    known = ModelRuntime(ModelRepository(tmp_path), "cpu").load("lin", 1, known_peak_bytes=64 * MiB)
    assert fresh.peak_bytes < 64 * MiB
    assert known.peak_bytes == 64 * MiB
    assert known.footprint_bytes == fresh.footprint_bytes
