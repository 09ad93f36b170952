"""Warm restarts of ``modelpool serve``: what was resident at a graceful stop is
preloaded before the next start reports ready, so its first requests are warm; with
``--no-warm-restart`` they are cold."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as thttp

from modelpool.cache.records import Footprint
from modelpool.gateway.warm_restart import (
    ResidentModel,
    ServeState,
    choose,
    read_state,
    state_path,
    write_state,
)
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized

MB = 1_000_000
HOT = ("m1", "m2", "m3")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warm-repo")
    for name in (*HOT, "m4"):
        write_sized(out, name, 1 * MB)
    return out


def _serve(repo: Path, state_dir: Path, log: Path, *extra: str) -> Served:
    return start_serve(
        repo, log, "--device-memory-budget", "64MB", "--state-dir", str(state_dir), *extra
    )


def _infer(server: Served, model: str) -> None:
    client = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    np.testing.assert_allclose(client.infer(model, [x]).as_numpy("y"), 2 * np.ones((1, 4)))


def _resident(server: Served) -> set[str]:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/modelpool/status", timeout=10) as r:
        body = json.load(r)
    return {c["model"] for c in body["copies"] if c["state"] == "READY"}


def _ready(server: Served) -> bool:
    with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=10) as r:
        return r.status == 200


def _cold(server: Served, model: str) -> float:
    return server.metric("modelpool_cold_starts_total", model=model)


@pytest.fixture(scope="module")
def state_dir(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir holding what a first run left: m1..m3 used (m1 most), SIGTERM."""
    out = tmp_path_factory.mktemp("warm-state")
    first = _serve(repo, out, out / "first.log")
    try:
        for model, uses in zip(HOT, (3, 2, 1), strict=True):
            for _ in range(uses):
                _infer(first, model)
        assert all(_cold(first, m) == 1 for m in HOT)
    finally:
        assert first.stop(signal.SIGTERM) == 0
    return out


def test_graceful_stop_saves_what_was_resident(repo: Path, state_dir: Path) -> None:
    state = read_state(state_path(state_dir, repo))
    assert state is not None
    uses = {m.model: m.uses for m in state.models}
    assert uses == {"m1": 3, "m2": 2, "m3": 1}
    assert {f.model for f in state.footprints} == set(HOT)
    assert all(f.device_kind == "cpu" and f.peak_bytes >= MB for f in state.footprints)


def test_warm_restart_serves_preloaded_models_without_cold_starts(
    repo: Path, state_dir: Path
) -> None:
    server = _serve(repo, state_dir, state_dir / "second.log")
    try:
        # The ready line came after the preload: resident and ready from the start.
        assert _resident(server) == set(HOT)
        assert _ready(server)
        assert "warm restart: preloading 3 models" in server.log()
        for model in HOT:
            _infer(server, model)
        for model in HOT:
            assert _cold(server, model) == 0, model
        _infer(server, "m4")  # never resident before: cold, as it should be
        assert _cold(server, "m4") == 1
    finally:
        assert server.stop(signal.SIGTERM) == 0
    # This run's state carries the last run's uses: m1 stays the hottest.
    state = read_state(state_path(state_dir, repo))
    assert state is not None
    uses = {m.model: m.uses for m in state.models}
    assert uses["m1"] == 4 and uses["m4"] == 1


def test_no_warm_restart_starts_cold(repo: Path, state_dir: Path) -> None:
    before = state_path(state_dir, repo).read_bytes()
    server = _serve(repo, state_dir, state_dir / "cold.log", "--no-warm-restart")
    try:
        assert _resident(server) == set()
        for model in HOT:
            _infer(server, model)
            assert _cold(server, model) == 1, model
        assert "warm restart" not in server.log()
    finally:
        server.stop(signal.SIGTERM)
    # Off means off: the saved state is neither used nor overwritten.
    assert state_path(state_dir, repo).read_bytes() == before


# -- the state file and the choice, without processes ------------------------------------


def _model(name: str, uses: int, last: float = 0.0) -> ResidentModel:
    return ResidentModel(name, 1, uses, last)


def test_choose_takes_the_hottest_that_fit_the_budget() -> None:
    models = [_model("a", 1), _model("b", 9), _model("c", 5), _model("d", 5, last=10.0)]
    size = {"a": 10, "b": 60, "c": 30, "d": 30}
    chosen = choose(models, [100], lambda m: size[m.model])
    # b (hottest), then d (as used as c, but more recent); c no longer fits; a does.
    assert [m.model for m in chosen] == ["b", "d", "a"]
    # Two devices: each model goes where most room is left, so all four fit.
    two = choose(models, [70, 70], lambda m: size[m.model])
    assert [m.model for m in two] == ["b", "d", "c", "a"]
    assert choose(models, [], lambda m: 1) == []


def test_state_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = state_path(tmp_path / "state", tmp_path / "repo")
    assert read_state(path) is None  # nothing saved: a cold start
    state = ServeState(
        "/repo",
        123.0,
        (_model("a", 2, 5.0),),
        (Footprint("a", 1, "cpu", 100, 150, 0.5, 5.0),),
    )
    write_state(path, state)
    assert read_state(path) == state
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left
    path.write_text("{not json")
    assert read_state(path) is None
    path.write_text(json.dumps({"version": 99}))
    assert read_state(path) is None
    # Another repository's server keeps another file.
    assert state_path(tmp_path / "state", tmp_path / "other") != path
