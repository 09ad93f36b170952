"""The host-RAM warm tier (issue 11, item 1): a copy evicted from a device moves to
its worker's host memory, and a later load of it is a host-to-device copy.

Unit tests of the bookkeeping (gpu/host_tier.py), of ModelRuntime on the fake device
(a CPU runtime with the test hook on), of the gateway's side (keep on which
evictions, loads by source), and one end-to-end run through ``modelpool serve``."""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from tritonclient.grpc import service_pb2 as pb

from modelpool.gpu import protocol
from modelpool.gpu.host_tier import HostEntry, HostTier
from modelpool.gpu.repository import ModelRepository
from modelpool.gpu.runtime import ModelRuntime
from tests.conftest import Served, start_serve
from tests.core_fakes import make_core, settle, soon
from tests.modelgen import write_sized

KiB = 1 << 10
MiB = 1 << 20


def entry(model: str, nbytes: int, last_used: float, version: int = 1) -> HostEntry:
    return HostEntry(model, version, object(), None, "stamp", nbytes, nbytes, last_used)


# -- gpu/host_tier.py ---------------------------------------------------------------------
def test_the_tier_keeps_entries_within_its_budget_evicting_the_least_recently_used() -> None:
    tier = HostTier(100)
    assert tier.put(entry("a", 40, last_used=1.0)) == []
    assert tier.put(entry("b", 40, last_used=3.0)) == []
    assert tier.used_bytes() == 80
    # c needs 30: a (used longest ago) goes, b stays although it came in later.
    evicted = tier.put(entry("c", 30, last_used=2.0))
    assert [e.model for e in evicted] == ["a"]
    assert ("a", 1) not in tier and ("b", 1) in tier and ("c", 1) in tier
    assert tier.used_bytes() == 70
    assert [e.model for e in tier.entries()] == ["b", "c"]  # most recently used first


def test_an_entry_bigger_than_the_budget_is_refused_and_nothing_is_evicted() -> None:
    tier = HostTier(100)
    tier.put(entry("a", 60, last_used=1.0))
    assert not tier.fits(101)
    with pytest.raises(ValueError, match=r"'big'.*101 bytes.*budget of 100"):
        tier.put(entry("big", 101, last_used=2.0))
    assert ("a", 1) in tier and tier.used_bytes() == 60


def test_take_removes_and_returns_the_entry_and_drop_removes_a_models_versions() -> None:
    tier = HostTier(100)
    tier.put(entry("a", 10, 1.0, version=1))
    tier.put(entry("a", 10, 1.0, version=2))
    tier.put(entry("b", 10, 1.0))
    taken = tier.take("a", 1)
    assert taken is not None and (taken.model, taken.version) == ("a", 1)
    assert tier.take("a", 1) is None
    assert [e.version for e in tier.drop("a")] == [2]
    assert [e.model for e in tier.entries()] == ["b"]


def test_a_zero_budget_is_off_and_a_negative_one_is_an_error() -> None:
    off = HostTier(0)
    assert not off.enabled and not off.fits(1)
    with pytest.raises(ValueError, match=">= 0"):
        HostTier(-1)


def test_putting_the_same_key_again_replaces_it() -> None:
    tier = HostTier(100)
    tier.put(entry("a", 50, 1.0))
    replaced = tier.put(entry("a", 60, 2.0))
    assert [e.nbytes for e in replaced] == [50]
    assert tier.used_bytes() == 60


# -- ModelRuntime on the fake device --------------------------------------------------------
class CountingLoads:
    """Counts torch.jit.load calls: a promotion must not read the file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = torch.jit.load

        def load(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.jit, "load", load)


def request(model: str, value: float = 1.0) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, model_version="1")
    t = r.inputs.add()
    t.name, t.datatype = "x", "FP32"
    t.shape.extend([1, 4])
    r.raw_input_contents.append(np.full((1, 4), value, dtype=np.float32).tobytes())
    return r


def output(response: pb.ModelInferResponse) -> list[float]:
    return np.frombuffer(response.raw_output_contents[0], dtype=np.float32).tolist()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_sized(tmp_path, "a", 256 * KiB)
    write_sized(tmp_path, "b", 256 * KiB)
    return tmp_path


def test_device_to_host_to_device_on_the_fake_device(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = CountingLoads(monkeypatch)
    rt = ModelRuntime(ModelRepository(repo), "cpu", host_budget_bytes=1 * MiB, fake_host_tier=True)
    first = rt.load("a", 1)
    assert first.source == "disk" and loads.calls == 1
    footprint = first.footprint_bytes
    assert rt.ours_bytes() == footprint

    done = rt.release("a", 1, keep=True)
    assert (done.freed_bytes, done.kept_bytes) == (footprint, footprint)
    assert rt.ours_bytes() == 0  # off the device account ...
    assert rt.host.used_bytes() == footprint  # ... onto the host account
    assert [(e.model, e.version) for e in rt.host.entries()] == [("a", 1)]

    again = rt.load("a", 1)
    assert again.source == "host"
    assert loads.calls == 1  # no file read, no deserialisation
    assert again.footprint_bytes == footprint and again.peak_bytes == first.peak_bytes
    assert rt.host.used_bytes() == 0 and rt.ours_bytes() == footprint
    assert output(rt.infer(request("a", 1.5))) == [3.0] * 4


def test_host_eviction_when_the_budget_fills_sends_the_next_load_to_disk(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = CountingLoads(monkeypatch)
    # Room for one copy of 256 KiB on the host, not two.
    rt = ModelRuntime(
        ModelRepository(repo), "cpu", host_budget_bytes=300 * KiB, fake_host_tier=True
    )
    rt.load("a", 1)
    rt.load("b", 1)
    assert rt.release("a", 1, keep=True).kept_bytes > 0
    time.sleep(0.01)  # b's last use must be later than a's (epoch clock)
    rt.models[("b", 1)].last_used = time.time()
    assert rt.release("b", 1, keep=True).kept_bytes > 0
    assert [e.model for e in rt.host.entries()] == ["b"]  # a went to disk (dropped)
    assert rt.load("a", 1).source == "disk"
    assert rt.load("b", 1).source == "host"
    assert loads.calls == 3


def test_an_unload_without_keep_drops_the_copy_and_any_host_copy(repo: Path) -> None:
    rt = ModelRuntime(ModelRepository(repo), "cpu", host_budget_bytes=1 * MiB, fake_host_tier=True)
    rt.load("a", 1)
    assert rt.release("a", 1).kept_bytes == 0
    assert rt.host.entries() == [] and rt.load("a", 1).source == "disk"
    rt.release("a", 1, keep=True)
    rt.release("a", 1)  # a client's unload of a copy already on the host: dropped too
    assert rt.host.entries() == []


def test_a_version_whose_files_changed_since_demotion_is_loaded_from_disk(repo: Path) -> None:
    rt = ModelRuntime(ModelRepository(repo), "cpu", host_budget_bytes=1 * MiB, fake_host_tier=True)
    rt.load("a", 1)
    rt.release("a", 1, keep=True)
    path = repo / "a" / "1" / "model.pt"
    write_sized(repo, "a", 128 * KiB)  # new weights under the same version
    os.utime(path, (time.time() + 5, time.time() + 5))
    reloaded = rt.load("a", 1)
    assert reloaded.source == "disk"
    assert reloaded.footprint_bytes < 256 * KiB
    assert rt.host.entries() == []


def test_on_cpu_without_the_hook_the_budget_is_ignored_never_an_error(
    repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="modelpool.gpu.runtime"):
        rt = ModelRuntime(ModelRepository(repo), "cpu", host_budget_bytes=1 * MiB)
    assert "--host-memory-budget ignored on device=cpu" in caplog.text
    assert not rt.host.enabled
    rt.load("a", 1)
    done = rt.release("a", 1, keep=True)
    assert done.kept_bytes == 0 and done.freed_bytes > 0
    assert rt.load("a", 1).source == "disk"


def test_a_copy_bigger_than_the_host_budget_is_dropped(repo: Path) -> None:
    rt = ModelRuntime(ModelRepository(repo), "cpu", host_budget_bytes=64 * KiB, fake_host_tier=True)
    rt.load("a", 1)
    assert rt.release("a", 1, keep=True).kept_bytes == 0
    assert rt.host.entries() == []


# -- the protocol ------------------------------------------------------------------------
def test_old_peers_messages_decode_with_the_defaults() -> None:
    old_unload = b'{"model":"a","version":1}'
    assert protocol.decoder(protocol.UnloadRequest)(old_unload).keep is False
    old_load = b'{"model":"a","version":1,"footprint_bytes":1,"peak_bytes":1,"load_seconds":0.1}'
    assert protocol.decoder(protocol.LoadResult)(old_load).source == "disk"
    memory = protocol.DeviceMemory("cpu", 1, 0, 1, 0, "budget")
    status = protocol.WorkerStatus(
        "w", "cuda:0", 1, memory, host_copies=(protocol.HostCopyStatus("a", 1, 10, 2.0),),
        host_budget_bytes=100, host_used_bytes=10,
    )  # fmt: skip
    assert protocol.decoder(protocol.WorkerStatus)(protocol.encode(status)) == status
    raw = json.loads(protocol.encode(status))
    for key in ("host_copies", "host_budget_bytes", "host_used_bytes"):
        del raw[key]
    old = protocol.decoder(protocol.WorkerStatus)(json.dumps(raw).encode())
    assert old.host_copies == () and old.host_budget_bytes == 0


# -- the gateway: which evictions keep ----------------------------------------------------
async def test_capacity_evictions_ask_to_keep_and_a_clients_unload_does_not(
    tmp_path: Path,
) -> None:
    core = await make_core(tmp_path, {"a": 600, "b": 600})
    m, w = core.manager, core.worker("w1")
    for model in ("a", "b"):  # b evicts a for capacity
        m.release(await m.acquire(model, 1, soon()))
        await settle(core)
    assert w.unload_keeps == [("a", True)]
    assert await m.unload_model("b", soon()) == 1
    assert w.unload_keeps == [("a", True), ("b", False)]
    assert (
        core.metric("modelpool_model_loads_total", model="b", outcome="success", source="disk") == 1
    )


# -- end to end through modelpool serve ----------------------------------------------------
def _status(server: Served) -> dict:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server.http_port}/v2/modelpool/status", timeout=10
    ) as r:
        return json.load(r)


def _infer(server: Served, model: str) -> None:
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert json.load(r)["outputs"][0]["data"] == [2.0, 4.0, 6.0, 8.0]


@pytest.fixture(scope="module")
def e2e_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("host_tier_repo")
    write_sized(root, "one", 3 * MiB)
    write_sized(root, "two", 3 * MiB)
    return root


def _serve(repo: Path, log_path: Path, host_budget: str) -> Iterator[Served]:
    # The device fits one model (under the high watermark), the host tier both.
    server = start_serve(
        repo,
        log_path,
        "--device-memory-budget", "5MiB",
        "--host-memory-budget", host_budget,
        "--min-residency", "0",
        "--admission-window", "0",
        "--housekeeping-interval", "0.2",
        env={"MODELPOOL_FAKE_HOST_TIER": "1"},
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tiered(e2e_repo: Path) -> Iterator[Served]:
    yield from _serve(e2e_repo, e2e_repo.parent / "tiered.log", "64MiB")


@pytest.fixture(scope="module")
def untiered(e2e_repo: Path) -> Iterator[Served]:
    yield from _serve(e2e_repo, e2e_repo.parent / "untiered.log", "0")


def _loads(server: Served, source: str) -> float:
    return sum(
        server.metric("modelpool_model_loads_total", model=m, outcome="success", source=source)
        for m in ("one", "two")
    )


def test_alternating_models_reload_from_the_host_tier(tiered: Served) -> None:
    for model in ("one", "two", "one", "two", "one"):
        _infer(tiered, model)
    # The first round read the disk; every reload after it came from host memory.
    assert _loads(tiered, "disk") == 2
    assert _loads(tiered, "host") == 3
    assert (
        tiered.metric("modelpool_model_load_duration_seconds_count", model="one", source="host")
        == 2
    )
    deadline = time.monotonic() + 10
    while True:  # the housekeeper reads the worker's host tier every tick
        status = _status(tiered)
        host = [(c["model"], c["tier"]) for c in status["host_copies"]]
        if host == [("two", "host")] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert host == [("two", "host")]
    assert {(c["model"], c["tier"]) for c in status["copies"]} == {("one", "device")}
    [worker] = status["workers"]
    assert worker["host_budget_bytes"] == 64 * MiB and worker["host_used_bytes"] >= 3 * MiB


def test_without_a_host_budget_every_load_reads_the_disk(untiered: Served) -> None:
    for model in ("one", "two", "one"):
        _infer(untiered, model)
    assert _loads(untiered, "disk") == 3
    assert _loads(untiered, "host") == 0
    assert _status(untiered)["host_copies"] == []


def test_modelpool_status_shows_the_tier_of_each_copy() -> None:
    from modelpool.gateway.status_view import render

    status = {
        "server": {"version": "x", "models": 2},
        "devices": [],
        "workers": [],
        "copies": [
            {
                "model": "one", "version": 1, "worker_id": "w0", "state": "READY",
                "footprint_bytes": 3 * MiB, "last_used": 95.0, "inflight": 0, "tier": "device",
            }
        ],
        "host_copies": [
            {"model": "two", "version": 1, "worker_id": "w0", "tier": "host",
             "bytes": 3 * MiB, "last_used": 90.0}
        ],
    }  # fmt: skip
    lines = render(status, "gw", now=100.0).splitlines()
    header = next(line for line in lines if line.startswith("MODEL"))
    assert header.split()[:5] == ["MODEL", "VERSION", "WORKER", "TIER", "STATE"]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :]}
    assert rows["one"][3:5] == ["device", "READY"]
    assert rows["two"][3:5] == ["host", "-"]


@pytest.mark.slow
def test_the_host_tier_benchmark_reloads_from_host(tmp_path: Path) -> None:
    """loadtests/host_tier.py on a CPU (the fake tier): every model of the alternating
    pair is loaded from disk once, then from host RAM each later round; no bandwidth
    figure is invented where there is no device copy to measure."""
    from modelpool.loadtests import host_tier

    out = tmp_path / "host_tier.json"
    assert (
        host_tier.main(["--device", "cpu", "--sizes", "2", "--rounds", "2", "--out", str(out)]) == 0
    )
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2
    for row in rows:
        assert row["disk_loads"] == 1 and row["host_loads"] >= 1, row
        assert row["h2d_gb_s"] is None and row["ratio"] is None
