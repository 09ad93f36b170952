"""Triton's perf_analyzer, unchanged, against the real ``modelpool serve``: over gRPC
and HTTP, at concurrency 1 to 8 and at a request rate, on a warm model, a dynamically
batched one and under eviction pressure. perf_analyzer reads the server's statistics
around every measurement and aborts when they do not add up (e.g. "Server side
statistics compute counts must be the same"), so an exit of 0 with server figures in
its report is the check.

perf_analyzer comes from scripts/install-perf-analyzer.sh (scripts/test.sh runs it);
without it these tests fail rather than skip."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT, Served, start_serve
from tests.modelgen import write_sized

pytestmark = pytest.mark.slow

PERF_ANALYZER = ROOT / "build" / "perf-analyzer" / "bin" / "perf_analyzer"
MIB = 1 << 20
#: Windows end after this many requests, not after a time: under eviction pressure a
#: time window can close with no request finished, which perf_analyzer rejects.
WINDOWS = ["--measurement-mode", "count_windows", "--measurement-request-count", "30"]
#: Figures on 2 shared cores vary, and under eviction pressure a window with a load in
#: it is many times slower than one without: the check here is the protocol, not
#: stability, so any spread is "stable" (100000%) and a run gets 10 windows to show it.
STABLE = ["-s", "100000", "-r", "10"]


@dataclass
class Report:
    stdout: str
    rows: list[dict[str, str]]
    #: Per measurement: (inference count, execution count, successful requests).
    server: list[tuple[int, int, int]]


@pytest.fixture(scope="module")
def perf_analyzer() -> Path:
    if not PERF_ANALYZER.exists():
        pytest.fail(
            f"perf_analyzer is not installed at {PERF_ANALYZER}: "
            "run scripts/install-perf-analyzer.sh (scripts/test.sh does)"
        )
    return PERF_ANALYZER


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """Four 1 MiB models and room for two: one model at a time stays warm, more
    evict each other."""
    repo = tmp_path_factory.mktemp("pa-repo")
    for i in range(4):
        write_sized(repo, f"m{i}", MIB)
    cfg = write_sized(repo, "batched", MIB) / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "dynamic_batching { max_queue_delay_microseconds: 20000 }\n")
    log = tmp_path_factory.mktemp("pa-log") / "serve.log"
    # Short admission and residency windows: four models fighting for room at full
    # speed would otherwise spend most of each window waiting for their slot, and the
    # check here is the statistics protocol, not the placement defaults.
    s = start_serve(
        repo, log, "--device-memory-budget", f"{2 * MIB}",
        "--admission-window", "0.05", "--min-residency", "0.05",
    )  # fmt: skip
    yield s
    s.stop()


def _popen(pa: Path, served: Served, protocol: str, model: str, csv_path: Path, *args: str):
    url = served.grpc_url if protocol == "grpc" else served.http_url
    cmd = [str(pa), "-m", model, "-u", url, "-i", protocol, *WINDOWS, *STABLE]
    cmd += ["-f", str(csv_path), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen[str], csv_path: Path) -> Report:
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"perf_analyzer ran past 60 s:\n{out[-3000:]}")
    assert proc.returncode == 0, f"perf_analyzer exited {proc.returncode}:\n{out[-3000:]}"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    server = [
        (int(m[1]), int(m[2]), int(m[3]))
        for m in re.finditer(
            r"Inference count: (\d+)\s+Execution count: (\d+)\s+"
            r"Successful request count: (\d+)",
            out,
        )
    ]
    assert rows and len(server) == len(rows), out[-3000:]
    for inferences, executions, successes in server:
        # Batch size 1: one inference per request; at most one forward per inference.
        assert inferences == successes > 0 and 0 < executions <= inferences
    for row in rows:
        assert float(row["Inferences/Second"]) > 0
    return Report(out, rows, server)


def _run(pa: Path, served: Served, protocol: str, model: str, tmp: Path, *args: str) -> Report:
    csv_path = tmp / f"{protocol}-{model}.csv"
    return _finish(_popen(pa, served, protocol, model, csv_path, *args), csv_path)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_concurrency_1_to_8_on_a_warm_model(
    perf_analyzer: Path, served: Served, protocol: str, tmp_path: Path
) -> None:
    report = _run(perf_analyzer, served, protocol, "m0", tmp_path, "--concurrency-range", "1:8:7")
    assert [r["Concurrency"] for r in report.rows] == ["1", "8"]
    # No dynamic batching for m0: every request is a forward of its own.
    assert all(executions == inferences for inferences, executions, _ in report.server)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_request_rate(perf_analyzer: Path, served: Served, protocol: str, tmp_path: Path) -> None:
    report = _run(
        perf_analyzer, served, protocol, "m0", tmp_path, "--request-rate-range", "40:80:40"
    )
    assert [r["Request Rate"] for r in report.rows] == ["40", "80"]


def test_dynamic_batching_shows_fewer_executions(
    perf_analyzer: Path, served: Served, tmp_path: Path
) -> None:
    # Eight requests always in flight and a batcher that waits 20 ms for company.
    report = _run(perf_analyzer, served, "grpc", "batched", tmp_path, "--concurrency-range", "8")
    inferences, executions, _ = report.server[0]
    assert executions < inferences, report.stdout[-2000:]


def test_under_eviction_pressure(perf_analyzer: Path, served: Served, tmp_path: Path) -> None:
    """Two perf_analyzers on two models and a third client on two more, with room for
    two of the four: copies are evicted and loaded throughout the measurements."""
    evicted_before = served.metric("modelpool_model_evictions_total", reason="capacity")
    churn = subprocess.Popen(
        [sys.executable, "-c", _CHURN, served.http_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        runs = {
            protocol: (
                _popen(perf_analyzer, served, protocol, model, tmp_path / f"{model}.csv",
                       "--concurrency-range", "1:4:3"),
                tmp_path / f"{model}.csv",
            )
            for protocol, model in (("grpc", "m1"), ("http", "m2"))
        }  # fmt: skip
        reports = {protocol: _finish(proc, path) for protocol, (proc, path) in runs.items()}
    finally:
        churn.terminate()
        out, _ = churn.communicate(timeout=30)
    assert "churned" in out, out[-2000:]
    for report in reports.values():
        assert len(report.rows) == 2, report.stdout[-3000:]
    evicted = served.metric("modelpool_model_evictions_total", reason="capacity")
    assert evicted > evicted_before


#: Requests to m3 and m0 in turn until stopped: two more models wanting room.
_CHURN = """
import signal, sys
import numpy as np
import tritonclient.http as th
signal.signal(signal.SIGTERM, lambda *_: (print("churned", n, flush=True), sys.exit(0)))
client = th.InferenceServerClient(sys.argv[1])
n = 0
while True:
    for model in ("m3", "m0"):
        x = th.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        client.infer(model, [x])
        n += 1
"""
