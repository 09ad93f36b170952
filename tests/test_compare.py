"""``python -m loadtests compare``: the pure parts (budget mapping, table and ratios,
v2 JSON bodies, process reaping) without servers, then one smoke-size comparison of
the real processes that asserts the table, the files and that nothing is left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpool.loadtests.compare import CompareOptions
from modelpool.loadtests.peers import installed
from modelpool.loadtests.peers.budget import map_budget
from modelpool.loadtests.peers.processes import ServerProcess, naming
from modelpool.loadtests.peers.table import Row, ratios, to_doc, to_markdown
from modelpool.loadtests.peers.v2json import BodyError, decode_inputs, encode_request

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MB = 1_000_000
RAY = installed("ray")
NO_RAY = (
    "ray[serve] is not installed (pip install -e '.[peers]'): the Ray Serve peer is not compared"
)


# -- budget mapping -----------------------------------------------------------------


def test_budget_holds_models_of_the_mean_size_split_over_replicas() -> None:
    sizes = [2 * MB, 4 * MB, 8 * MB, 16 * MB, 32 * MB, 24 * MB, 12 * MB, 6 * MB]  # mean 13 MB
    one = map_budget(64 << 20, sizes, replicas=1)
    assert one.models_in_budget == 5  # 67.1 MB / 13 MB
    assert one.max_models_per_replica == 5 and one.models_held == 5 and one.evicts
    two = map_budget(64 << 20, sizes, replicas=2)
    assert two.max_models_per_replica == 2 and two.models_held == 4


def test_budget_mapping_edges() -> None:
    # Everything fits: capped at the repository, nothing evicted.
    roomy = map_budget(1 << 30, [MB, MB, MB], replicas=1)
    assert roomy.models_in_budget == 3 and not roomy.evicts
    # Too small for even one model of the mean size: still one per replica, or it
    # could answer nothing.
    tiny = map_budget(MB, [8 * MB, 8 * MB], replicas=2)
    assert tiny.models_in_budget == 0 and tiny.max_models_per_replica == 1
    for bad in (
        lambda: map_budget(0, [MB], 1),
        lambda: map_budget(MB, [], 1),
        lambda: map_budget(MB, [MB], 0),
    ):
        with pytest.raises(ValueError):
            bad()


# -- table --------------------------------------------------------------------------


def _row(system: str, protocol: str, rps: float, p50: float | None, **kw: Any) -> Row:
    base: dict[str, Any] = dict(
        system=system, protocol=protocol, requests=100, errors=0, errors_by_kind={},
        offered_rps=10.0, throughput_rps=rps, p50_ms=p50, p95_ms=p50 and p50 * 2,
        p99_ms=p50 and p50 * 4, cold_starts=3.0, cold_start_source="x", slow_requests=1,
        startup_s=1.0,
    )  # fmt: skip
    return Row(**(base | kw))


def test_ratios_are_against_modelpool_over_the_same_protocol() -> None:
    rows = [
        _row("modelpool", "http", 10.0, 4.0),
        _row("modelpool", "grpc", 10.0, 2.0),
        _row("ray", "http", 5.0, 12.0),
    ]
    assert ratios(rows[0], rows).throughput == 1.0 and ratios(rows[1], rows).p50 == 1.0
    ray = ratios(rows[2], rows)
    assert ray.throughput == pytest.approx(0.5)
    assert ray.p50 == pytest.approx(3.0) and ray.p99 == pytest.approx(3.0)
    # No baseline over that protocol, or no latency at all: no ratio rather than a guess.
    assert ratios(_row("ray", "grpc", 5.0, 1.0), rows[::2]).throughput is None
    assert ratios(_row("ray", "http", 0.0, None), rows).p50 is None


def test_markdown_and_json_have_a_row_each_with_ratios() -> None:
    rows = [
        _row("modelpool", "http", 10.0, 4.0),
        _row("ray", "http", 5.0, 12.0, errors=2, errors_by_kind={"http_500": 2}),
    ]
    md = to_markdown(rows, slow_ms=100)
    lines = md.splitlines()
    assert lines[0].startswith("| system | protocol |") and "slow (>100 ms)" in lines[0]
    assert lines[1].count("---") == lines[0].count("|") - 1
    assert lines[2].startswith("| modelpool | http | 100 | 0 | 10.0 |")
    assert lines[3].startswith("| ray | http |") and "| 0.50x | 3.00x |" in lines[3]
    assert "Errors, ray http: http_500 2." in md
    doc = to_doc(rows, {"budget_bytes": 1})
    assert doc["rows"][1]["vs_modelpool"]["throughput"] == pytest.approx(0.5)
    json.dumps(doc)  # serialisable as is


def test_options_need_modelpool_and_a_sane_budget(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="modelpool"):
        CompareOptions("smoke", tmp_path, 1 << 20, systems=("ray",))
    with pytest.raises(ValueError, match="budget"):
        CompareOptions("smoke", tmp_path, 0)
    with pytest.raises(ValueError):
        CompareOptions("smoke", tmp_path, 1 << 20, systems=("modelpool", "triton"))
    opts = CompareOptions("smoke", tmp_path, 1 << 20, duration=2.0)
    load = opts.workload("127.0.0.1:9", "http", "127.0.0.1:10")
    assert load.duration == 2.0 and load.rate == 10  # flag over scenario, scenario over default


# -- v2 JSON ------------------------------------------------------------------------


def test_v2_json_round_trips_in_the_models_input_order() -> None:
    x = np.arange(6, dtype=np.float32).reshape(1, 6)
    ids = np.array([[3, -1, 7]], dtype=np.int64)
    body = json.loads(encode_request({"x": x, "ids": ids}, {"x": "FP32", "ids": "INT64"}))
    got = decode_inputs(body, [("ids", "INT64"), ("x", "FP32")])
    assert got[0].dtype == np.int64 and np.array_equal(got[0], ids)
    assert got[1].dtype == np.float32 and np.array_equal(got[1], x)
    with pytest.raises(BodyError, match="'y' is missing"):
        decode_inputs(body, [("y", "FP32")])
    with pytest.raises(BodyError, match="datatype must be FP64"):
        decode_inputs(body, [("x", "FP64")])
    with pytest.raises(BodyError):
        decode_inputs({"inputs": [{"name": "x", "datatype": "FP32", "shape": [5], "data": [1]}]}, [("x", "FP32")])  # fmt: skip
    with pytest.raises(BodyError):
        decode_inputs([], [("x", "FP32")])


# -- processes ----------------------------------------------------------------------


def test_stop_reaps_children_and_orphans_that_outlive_the_server(tmp_path: Path) -> None:
    marker = f"{os.getpid()}{time.monotonic_ns() % 10**6}"
    # sleep sums its arguments: the marker rides in a fraction of a second. The shell
    # ignores SIGINT (so stop must escalate), leaves a child, and an orphan that only
    # its command line ties to us.
    script = f"trap '' INT; (sleep 300 0.{marker} &); sleep 301 0.{marker} & echo ready; wait"
    proc = ServerProcess(["sh", "-c", script], tmp_path / "server.log")
    proc.wait_ready(re.compile("ready"), timeout_s=10)
    deadline = time.monotonic() + 5
    while len(naming(marker)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed = proc.stop(timeout_s=1.0, marker=marker)
    assert len(killed) >= 2, killed
    assert not naming(marker), "a process outlived stop()"


def test_wait_ready_fails_fast_when_the_server_dies(tmp_path: Path) -> None:
    proc = ServerProcess(["sh", "-c", "echo starting; exit 3"], tmp_path / "s.log")
    with pytest.raises(RuntimeError, match="exited with 3"):
        proc.wait_ready(re.compile("ready"), timeout_s=30)
    proc.stop(timeout_s=1.0)


# -- the real thing -----------------------------------------------------------------


def _ray_daemons() -> set[int]:
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray/core/src/ray/" in cmd:  # gcs_server and raylet binaries
            out.add(int(pid))
    return out


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compare")
    scenario = tmp / "tiny.json"
    scenario.write_text(
        json.dumps({"duration": 3, "rate": 10, "zipf": 1.1, "seed": 0, "timeout": 30})
    )
    out = tmp / "out"
    systems = "modelpool,ray" if RAY else "modelpool"
    before = _ray_daemons()
    cmd = [
        sys.executable, "-m", "modelpool.loadtests", "compare", "--scenario", str(scenario),
        "--out", str(out), "--models-count", "3", "--budget", "64MiB", "--systems", systems,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    leftover = _ray_daemons() - before
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads((out / "compare.json").read_text())
    return {"out": out, "proc": proc, "doc": doc, "leftover": leftover}


def _rows(compared: dict[str, Any], system: str) -> list[dict[str, Any]]:
    return [r for r in compared["doc"]["rows"] if r["system"] == system]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compare_writes_the_table_json_and_plot(compared: dict[str, Any]) -> None:
    out: Path = compared["out"]
    assert (out / "compare.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "compare.md").read_text()
    assert md.startswith("| system | protocol |")
    assert "| modelpool | http |" in md and "| modelpool | grpc |" in md
    assert md.strip() in compared["proc"].stdout, "the table is printed too"
    stderr = compared["proc"].stderr
    assert "modelpool http: starting" in stderr and "sent=" in stderr, "no progress shown"
    setup = compared["doc"]["setup"]
    assert setup["budget_bytes"] == 64 << 20 and len(setup["models"]) == 3
    assert setup["workload"]["duration"] == 3 and setup["workload"]["rate"] == 10
    for r in compared["doc"]["rows"]:
        assert set(r["vs_modelpool"]) == {"throughput", "p50", "p95", "p99"}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_modelpool_rows_answer_everything(compared: dict[str, Any]) -> None:
    rows = _rows(compared, "modelpool")
    assert {r["protocol"] for r in rows} == {"http", "grpc"}
    for r in rows:
        assert r["requests"] > 0 and r["errors"] == 0, r["errors_by_kind"]
        assert r["throughput_rps"] > 0 and 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        # Each run starts empty, so it loads at least the first model it is sent.
        assert r["cold_starts"] is not None and 1 <= r["cold_starts"] <= 3
        assert r["vs_modelpool"] == {"throughput": 1.0, "p50": 1.0, "p95": 1.0, "p99": 1.0}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_installed_peer_has_a_row_with_ratios(compared: dict[str, Any]) -> None:
    if not RAY:
        pytest.skip(NO_RAY)
    rows = _rows(compared, "ray")
    assert [r["protocol"] for r in rows] == ["http"], compared["doc"]["setup"]["skipped"]
    (r,) = rows
    assert r["requests"] > 0 and r["errors"] == 0, r["errors_by_kind"]
    assert r["cold_starts"] is not None and 1 <= r["cold_starts"] <= 3, "Ray's load counter"
    assert all(v is not None and v > 0 for v in r["vs_modelpool"].values())
    mapping = compared["doc"]["setup"]["ray_mapping"]
    assert mapping["max_models_per_replica"] == 3 and not mapping["evicts"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nothing_is_left_running(compared: dict[str, Any]) -> None:
    assert not compared["leftover"], "raylet or gcs_server outlived the comparison"
    assert all(r["killed_after_stop"] == 0 for r in compared["doc"]["rows"]), (
        "a process had to be killed after a clean shutdown"
    )
