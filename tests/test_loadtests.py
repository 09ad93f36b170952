"""The load generator: its workload is pure and seeded (unit tests), its driver is open
loop and bounded (a fake adapter), and ``python -m loadtests run`` against the real
server writes a sane report and real PNGs, over both protocols."""

from __future__ import annotations

import asyncio
import itertools
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from modelpool.loadtests import LoadOptions, run_load
from modelpool.loadtests.client import (
    IndexEntry,
    ModelInfo,
    RequestFailed,
    TensorSpec,
    concrete_shape,
    random_inputs,
)
from modelpool.loadtests.options import SCENARIO_DIR, default_metrics_url, load_scenario, merge
from modelpool.loadtests.plots import PLOTS
from modelpool.loadtests.report import DROPPED, latency_ms, percentile
from modelpool.loadtests.workload import arrival_times, arrivals, plan_workload, zipf_weights

ROOT = Path(__file__).resolve().parent.parent
MODELS = [f"m{i}" for i in range(8)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _schedule(seed: int = 0, **kw: Any) -> list:
    opts = {"zipf": 1.1, "tenants": 1, "rate": 200.0, "duration": 20.0, "arrival": "poisson"} | kw
    w = plan_workload(MODELS, opts["zipf"], opts["tenants"], seed)
    return list(arrivals(w, opts["rate"], opts["duration"], opts["arrival"], seed))


# -- workload ----------------------------------------------------------------------


def test_same_seed_same_schedule_other_seed_another() -> None:
    a, b = _schedule(seed=7), _schedule(seed=7)
    assert a == b
    assert a != _schedule(seed=8)
    assert all(x.t < y.t for x, y in itertools.pairwise(a))
    assert all(0 <= x.t < 20.0 for x in a)


def test_schedule_ignores_the_order_models_are_listed_in() -> None:
    w1 = plan_workload(MODELS, 1.1, 3, seed=1)
    w2 = plan_workload(list(reversed(MODELS)), 1.1, 3, seed=1)
    assert w1 == w2


def test_zipf_rank_one_gets_the_most_requests() -> None:
    w = plan_workload(MODELS, 1.1, 1, seed=3)
    counts = Counter(a.model for a in arrivals(w, 500.0, 20.0, "poisson", 3))
    by_rank = sorted(MODELS, key=lambda m: w.rank[m])
    assert counts.most_common(1)[0][0] == by_rank[0]
    assert counts[by_rank[0]] > 3 * counts[by_rank[-1]]
    # Roughly the Zipf share: rank 1 of 8 at a=1.1 is about 37%.
    assert counts[by_rank[0]] / sum(counts.values()) == pytest.approx(w.share[by_rank[0]], abs=0.03)


def test_rank_order_is_shuffled_by_seed() -> None:
    firsts = {
        min(MODELS, key=lambda m: plan_workload(MODELS, 1.1, 1, s).rank[m]) for s in range(10)
    }
    assert len(firsts) > 1, "the most popular model should depend on the seed"


def test_zipf_weights() -> None:
    w = zipf_weights(5, 1.0)
    assert sum(w) == pytest.approx(1.0)
    assert list(w) == sorted(w, reverse=True)
    assert zipf_weights(4, 0.0) == pytest.approx((0.25,) * 4)


def test_tenants_have_their_own_skew_and_hot_set() -> None:
    w = plan_workload(MODELS, 1.2, 4, seed=0)
    assert len({t.exponent for t in w.tenants}) == 4
    assert len({t.order[0] for t in w.tenants}) > 1
    assert sum(w.share.values()) == pytest.approx(1.0)
    assert sorted(w.rank.values()) == list(range(1, 9))
    counts = Counter(a.tenant for a in _schedule(tenants=4))
    assert set(counts) == {0, 1, 2, 3}


@pytest.mark.parametrize("arrival", ["poisson", "bursty"])
def test_mean_rate_is_roughly_the_asked_rate(arrival: str) -> None:
    n = sum(1 for _ in arrival_times(100.0, 100.0, arrival, seed=5))
    assert n == pytest.approx(10_000, rel=0.1)


def test_bursty_is_burstier_than_poisson() -> None:
    def per_second_spread(arrival: str) -> float:
        counts = Counter(int(t) for t in arrival_times(100.0, 60.0, arrival, seed=2))
        return float(np.std([counts[s] for s in range(60)]))

    assert per_second_spread("bursty") > 2 * per_second_spread("poisson")


# -- options, payloads, figures --------------------------------------------------------


def test_every_bundled_scenario_makes_valid_options() -> None:
    names = sorted(p.stem for p in SCENARIO_DIR.glob("*.json"))
    assert {"smoke", "steady_zipf", "bursty_tenants"} <= set(names)
    for name in names:
        merge({"url": "127.0.0.1:8001", "protocol": "grpc"}, load_scenario(name), {})


def test_flags_override_the_scenario(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"rate": 5, "zipf": 0.3, "models": "a,b", "tenants": 2}))
    o = merge(
        {"url": "h:8000", "protocol": "http"}, load_scenario(str(path)), {"rate": 9.0, "zipf": None}
    )
    assert (o.rate, o.zipf, o.models, o.tenants) == (9.0, 0.3, ("a", "b"), 2)
    path.write_text(json.dumps({"url": "elsewhere:1"}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_scenario(str(path))


def test_options_are_bounded() -> None:
    for bad in (
        {"duration": 1e6},
        {"rate": 0},
        {"tenants": 0},
        {"protocol": "udp"},
        {"url": "http://h:1"},
    ):
        with pytest.raises(ValueError):
            LoadOptions(**({"url": "127.0.0.1:8000"} | bad))
    assert default_metrics_url("h:8000", "http") == "h:8002"
    assert default_metrics_url("h:8001", "grpc") == "h:8002"


def test_payloads_follow_metadata() -> None:
    info = ModelInfo("m", (TensorSpec("a", "FP16", (-1, 3)), TensorSpec("b", "INT64", (-1, -1)),
                           TensorSpec("c", "BYTES", (2,)), TensorSpec("d", "BOOL", (1, 2))))  # fmt: skip
    x = random_inputs(info, seed=1)
    assert x["a"].dtype == np.float16 and x["a"].shape == (1, 3)
    assert x["b"].dtype == np.int64 and x["b"].shape == (1, 4) and x["b"].min() >= 0
    assert x["c"].dtype == object and x["c"].shape == (2,)
    assert x["d"].dtype == np.bool_
    assert concrete_shape((3, -1)) == (3, 4)
    np.testing.assert_array_equal(random_inputs(info, seed=1)["a"], x["a"])


def test_percentiles_match_numpy() -> None:
    data = sorted(np.random.default_rng(0).exponential(size=101).tolist())
    for q in (50, 95, 99):
        assert percentile(data, q) == pytest.approx(np.percentile(data, q))
    lat = latency_ms([0.001, 0.002, 0.1])
    assert lat.p50 is not None and lat.p99 is not None and lat.max is not None
    assert lat.p50 <= lat.p99 <= lat.max == pytest.approx(100.0)
    assert latency_ms([]).p50 is None


# -- the driver, with a fake server ------------------------------------------------------


class SlowFake:
    """Three models, each reply after ``delay`` s; records when each request was sent."""

    def __init__(self, delay: float, fail: str | None = None) -> None:
        self.delay = delay
        self.fail = fail
        self.sent = 0
        self.closed = False

    async def index(self) -> list[IndexEntry]:
        return [IndexEntry(n, "1", "UNAVAILABLE") for n in ("a", "b", "c")] + [
            IndexEntry("broken", "", "UNAVAILABLE")
        ]

    async def model_info(self, name: str) -> ModelInfo:
        return ModelInfo(name, (TensorSpec("x", "FP32", (-1, 2)),))

    def prepare(self, info: ModelInfo, seed: int) -> Any:
        return None

    async def infer(self, model: str, prepared: Any) -> None:
        self.sent += 1
        await asyncio.sleep(self.delay)
        if self.fail and model == "a":
            raise RequestFailed(self.fail, "injected")

    async def close(self) -> None:
        self.closed = True


def _fake_options(**kw: Any) -> LoadOptions:
    # Port 9 (discard) refuses: the run must go on without server metrics.
    base = {"url": "127.0.0.1:9", "metrics_url": "127.0.0.1:9", "duration": 1.0, "rate": 100.0}
    return LoadOptions(**(base | kw))


async def test_open_loop_does_not_wait_for_replies() -> None:
    fake = SlowFake(delay=0.5)
    lines: list[str] = []
    report = await asyncio.wait_for(
        run_load(_fake_options(), progress=lines.append, adapter=fake), 10
    )
    assert fake.closed
    assert set(report.models) == {"a", "b", "c"}, "a model without a version is not servable"
    # Closed loop with 0.5 s replies would manage a handful; open loop sends them all.
    assert report.requests == fake.sent > 60
    assert report.errors == 0
    assert report.elapsed_s < 3.0
    assert report.latency_ms.p50 == pytest.approx(500, rel=0.3)
    assert report.cold_start_rate is None
    assert lines and "sent=" in lines[0] and "p99=" in lines[0]
    assert sum(p.sent for p in report.series) == report.requests
    assert sum(p.done for p in report.series) == report.requests


async def test_outstanding_cap_drops_and_counts_errors() -> None:
    fake = SlowFake(delay=0.5, fail="UNAVAILABLE")
    report = await asyncio.wait_for(
        run_load(_fake_options(max_outstanding=5), progress=None, adapter=fake), 10
    )
    assert fake.sent <= 15
    assert report.errors_by_kind[DROPPED] == report.requests - fake.sent > 0
    assert report.errors == sum(report.errors_by_kind.values())
    # Injected failures of model "a" count under their kind, and under the model.
    failed = report.errors_by_kind["UNAVAILABLE"]
    assert 0 < failed <= report.models["a"].errors
    assert report.latency_ms.max is not None, "answered requests still have latencies"


# -- against the real server ----------------------------------------------------------


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_cli_run_against_the_server(
    protocol: str, served_examples, example_repo: Path, tmp_path: Path
) -> None:
    url = served_examples.http_url if protocol == "http" else served_examples.grpc_url
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "modelpool.loadtests", "run", "--url", url, "--protocol", protocol,
        "--metrics-url", f"127.0.0.1:{served_examples.metrics_port}",
        "--duration", "3", "--rate", "20", "--zipf", "1.1", "--out", str(out),
    ]  # fmt: skip
    if protocol == "http":
        cmd += ["--scenario", "smoke"]  # its zipf 0.5 is overridden by the flag, tenants kept
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "rank" in proc.stdout and "p99" in proc.stdout
    assert "sent=" in proc.stderr, "no per-second progress on stderr"

    report = json.loads((out / "report.json").read_text())
    assert report["options"]["zipf"] == 1.1 and report["options"]["duration"] == 3
    assert report["requests"] > 0
    assert report["errors"] == 0, report["errors_by_kind"]
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert report["throughput_rps"] > 0
    assert 0.0 <= report["cold_start_rate"] <= 1.0
    repo_models = {p.name for p in example_repo.iterdir() if (p / "config.pbtxt").exists()}
    assert set(report["models"]) <= repo_models
    assert sum(m["requests"] for m in report["models"].values()) == report["requests"]
    assert sorted(m["rank"] for m in report["models"].values()) == list(
        range(1, len(report["models"]) + 1)
    )
    for m in report["models"].values():
        if m["requests"]:
            assert m["p50"] <= m["p99"]
    series = report["series"]
    assert series and sum(p["sent"] for p in series) == report["requests"]
    assert any(p["resident_models"] for p in series), "metrics endpoint was not read"
    assert any(p["device_memory_used_bytes"] for p in series)

    assert sorted(report["plots"]) == sorted(PLOTS)
    for name in PLOTS:
        width, height = _png_size(out / name)
        assert width > 100 and height > 100
