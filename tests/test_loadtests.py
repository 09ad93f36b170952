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
from modelpool.loadtests.options import (
    SCENARIO_DIR,
    TenantSpec,
    default_metrics_url,
    load_scenario,
    merge,
    merge_tenants,
    parse_tenant,
)
from modelpool.loadtests.plots import PLOTS
from modelpool.loadtests.report import DROPPED, Outcome, latency_ms, percentile, tenant_figures
from modelpool.loadtests.workload import (
    arrival_times,
    arrivals,
    combined_rank,
    merge_streams,
    plan_workload,
    stream_seed,
    tenant_arrivals,
    zipf_weights,
)

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


# -- keyed tenants: options, streams, rows -----------------------------------------------

KEY = "k3y-with:colon_-Zz09"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("quiet:abc:20", TenantSpec("quiet", "abc", 20.0)),
        ("open::5", TenantSpec("open", "", 5.0)),
        ("q:abc", TenantSpec("q", "abc", None)),
        ("q:abc:", TenantSpec("q", "abc", None)),
        ("q:", TenantSpec("q", "", None)),
        (f"q:{KEY}:2.5", TenantSpec("q", KEY, 2.5)),
    ],
)
def test_parse_tenant(text: str, want: TenantSpec) -> None:
    assert parse_tenant(text) == want


@pytest.mark.parametrize(
    "text", ["quiet", "q:k:fast", "q:k:-1", "q:k:0", "q:k:inf", "bad name:k:1", ":k:1",
             "q:a b:1", "q:a\nb:1"],
)  # fmt: skip
def test_parse_tenant_refuses(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_tenant(text)
    if "a b" in text:
        assert "a b" not in str(e.value), "a key must never be echoed"


def test_scenario_tenants_list_and_flags_over_it(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"duration": 5, "rate": 7, "tenants": [
        {"name": "quiet", "key": "", "rate": 20, "zipf": 0.5, "models": ["a", "b"]},
        {"name": "noisy", "rate": 200},
        {"name": "lazy", "key": "kept"},
    ]}))  # fmt: skip
    scenario = load_scenario(str(path))
    flags = [parse_tenant("quiet:QK:"), parse_tenant("noisy:NK:50"), parse_tenant("lazy::"),
             parse_tenant("extra::3")]  # fmt: skip
    scenario["tenant_specs"] = merge_tenants(scenario["tenant_specs"], flags)
    o = merge({"url": "h:8001", "protocol": "grpc"}, scenario, {})
    by = {t.name: t for t in o.tenant_specs}
    assert list(by) == ["quiet", "noisy", "lazy", "extra"]
    assert by["quiet"] == TenantSpec("quiet", "QK", 20.0, 0.5, ("a", "b")), "flag set the key"
    assert (by["noisy"].key, by["noisy"].rate) == ("NK", 50.0), "flag's rate wins"
    assert (by["lazy"].key, by["lazy"].rate) == ("kept", None), "empty flag key keeps"
    assert o.rate_of(by["lazy"]) == 7.0, "no rate of its own: the run's"
    assert o.total_rate == 20 + 50 + 7 + 3
    doc = json.dumps(o.to_dict())
    assert "QK" not in doc and "NK" not in doc and "kept" not in doc, "report.json holds keys"
    assert o.to_dict()["tenant_specs"][0]["keyed"] is True


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ({"tenants": []}, "empty list"),
        ({"tenants": [{"name": "a", "rate": 1, "burst": 3}]}, "unknown keys"),
        ({"tenants": [{"name": "a", "rate": "fast"}]}, "'rate' must be a number"),
        ({"tenants": [{"rate": 1}]}, "'name' must be a string"),
        ({"tenants": [{"name": "a", "models": 3}]}, "'models'"),
    ],
)
def test_bad_scenario_tenants(tmp_path: Path, doc: dict, match: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match):
        load_scenario(str(path))


def test_keyed_tenants_options_are_bounded() -> None:
    base = {"url": "127.0.0.1:8001"}
    with pytest.raises(ValueError, match="given twice"):
        LoadOptions(**base, tenant_specs=(TenantSpec("a"), TenantSpec("a")))
    with pytest.raises(ValueError, match="--tenants N"):
        LoadOptions(**base, tenants=3, tenant_specs=(TenantSpec("a"),))
    with pytest.raises(ValueError, match="add up"):
        LoadOptions(**base, tenant_specs=(TenantSpec("a", rate=15_000), TenantSpec("b", rate=6000)))
    assert TenantSpec("a", "K").headers == {"authorization": "Bearer K"}
    assert TenantSpec("a").headers is None


def test_cli_tenant_flags_make_options() -> None:
    from modelpool.loadtests.__main__ import build_parser, options_from

    def options(*argv: str) -> LoadOptions:
        args = build_parser().parse_args(["run", "--url", "h:8001", "--protocol", "grpc",
                                          "--out", "o", *argv])  # fmt: skip
        return options_from(args)

    o = options("--tenant", "quiet:QK:20", "--tenant", "noisy::200")
    assert o.tenant_specs == (TenantSpec("quiet", "QK", 20.0), TenantSpec("noisy", "", 200.0))
    assert options().tenant_specs == (), "no --tenant: the single stream, as before"
    o = options("--scenario", "noisy_neighbour", "--tenant", "quiet:QK:", "--tenant", "noisy:NK:")
    assert [(t.name, t.key, t.rate) for t in o.tenant_specs] == [
        ("quiet", "QK", 20.0), ("noisy", "NK", 200.0)
    ]  # fmt: skip
    with pytest.raises(SystemExit):
        options("--tenant", "quiet:QK:fast")


def test_a_tenants_stream_does_not_depend_on_its_neighbours() -> None:
    def stream(name: str, index: int, rate: float) -> list:
        seed = stream_seed(0, name)
        w = plan_workload(MODELS, 1.1, 1, seed)
        return list(tenant_arrivals(w, rate, 10.0, "poisson", seed, index))

    quiet, noisy = stream("quiet", 0, 20.0), stream("noisy", 1, 200.0)
    merged = list(merge_streams([iter(quiet), iter(noisy)]))
    assert all(x.t <= y.t for x, y in itertools.pairwise(merged))
    assert [a for a in merged if a.tenant == 0] == quiet
    assert len(quiet) == pytest.approx(200, rel=0.25) and len(noisy) == pytest.approx(2000, rel=0.1)
    assert [(a.t, a.model) for a in stream("quiet", 5, 20.0)] == [(a.t, a.model) for a in quiet]
    assert stream("other", 0, 20.0) != quiet
    ranks = combined_rank([plan_workload(["a", "b"], 2.0, 1, 1), plan_workload(["c"], 1, 1, 1)],
                          [1.0, 100.0])  # fmt: skip
    assert ranks["c"] == 1 and sorted(ranks.values()) == [1, 2, 3]


def test_tenant_rows_count_429s_apart_from_other_errors() -> None:
    o = LoadOptions(url="h:1", rate=9.0, tenant_specs=(TenantSpec("q", rate=2.0), TenantSpec("n")))

    def out(tenant: int, latency: float | None, error: str | None = None) -> Outcome:
        return Outcome("m", tenant, 0.0, 0.0, 0.0, latency, error)

    rows = tenant_figures(o, [out(0, 0.010), out(0, 0.020), out(0, None, "timeout"),
                              out(1, None, "http_429"), out(1, None, "RESOURCE_EXHAUSTED"),
                              out(1, None, DROPPED), out(1, 0.005)])  # fmt: skip
    q, n = rows["q"], rows["n"]
    assert (q.rate_rps, q.sent, q.ok, q.rejected, q.errors) == (2.0, 3, 2, 0, 1)
    assert q.p50 == pytest.approx(15.0) and q.p95 is not None and q.p99 == pytest.approx(19.9)
    assert (n.rate_rps, n.sent, n.ok, n.rejected, n.errors) == (9.0, 4, 1, 2, 1)
    assert n.errors_by_kind == {"http_429": 1, "RESOURCE_EXHAUSTED": 1, DROPPED: 1}
    assert tenant_figures(LoadOptions(url="h:1"), [out(0, 0.01)]) == {}


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


class Limited(SlowFake):
    """A tenant held to ``per_s`` admitted requests a second; the rest get 429 at once."""

    def __init__(self, delay: float, per_s: float, kind: str = "http_429") -> None:
        super().__init__(delay)
        self.per_s, self.kind, self.admitted, self.first = per_s, kind, 0, None

    async def infer(self, model: str, prepared: Any) -> None:
        now = asyncio.get_running_loop().time()
        self.first = self.first if self.first is not None else now
        if self.admitted >= 1 + (now - self.first) * self.per_s:
            self.sent += 1
            raise RequestFailed(self.kind, "over the limit")
        self.admitted += 1
        await super().infer(model, prepared)


async def test_keyed_tenants_each_get_their_stream_and_row() -> None:
    quiet, noisy = SlowFake(delay=0.01), Limited(delay=0.01, per_s=10, kind="RESOURCE_EXHAUSTED")
    opts = _fake_options(
        duration=2.0,
        tenant_specs=(TenantSpec("quiet", "QK", 20.0), TenantSpec("noisy", "NK", 200.0)),
    )
    lines: list[str] = []
    report = await asyncio.wait_for(
        run_load(opts, progress=lines.append, adapters={"quiet": quiet, "noisy": noisy}), 15
    )
    assert quiet.closed and noisy.closed
    q, n = report.tenants["quiet"], report.tenants["noisy"]
    assert q.sent == quiet.sent == pytest.approx(40, rel=0.4)
    assert (q.ok, q.rejected, q.errors) == (q.sent, 0, 0)
    assert n.sent == noisy.sent == pytest.approx(400, rel=0.2)
    assert n.ok == noisy.admitted and n.rejected == n.sent - n.ok > n.ok
    assert q.p50 is not None and q.p99 is not None and q.p50 <= q.p99
    assert report.requests == q.sent + n.sent
    assert report.errors_by_kind == {"RESOURCE_EXHAUSTED": n.rejected}
    assert "| quiet ok=" in lines[-1] and "| noisy ok=" in lines[-1]
    table = report.table()
    assert "keyed tenant(s)" in table and "429s" in table
    assert any(row.split()[:2] == ["noisy", "200"] for row in table.splitlines())
    assert report.to_dict()["tenants"]["noisy"]["rejected"] == n.rejected
    assert "QK" not in report.to_json()


async def test_a_tenants_outstanding_cap_is_its_own() -> None:
    """A neighbour stuck with replies that never come fills its own cap, not quiet's."""
    quiet, stuck = SlowFake(delay=0.01), SlowFake(delay=60.0)
    opts = _fake_options(duration=1.0, max_outstanding=5, timeout=0.5,
                         tenant_specs=(TenantSpec("quiet", rate=30.0), TenantSpec("stuck", rate=50.0)))  # fmt: skip
    report = await asyncio.wait_for(
        run_load(opts, progress=None, adapters={"quiet": quiet, "stuck": stuck}), 15
    )
    q, s = report.tenants["quiet"], report.tenants["stuck"]
    assert q.ok == q.sent > 0 and q.errors == 0
    assert s.errors_by_kind[DROPPED] == s.sent - stuck.sent > 0
    assert stuck.sent <= 5 + 1


async def test_keyed_tenants_take_adapters_not_adapter() -> None:
    opts = _fake_options(tenant_specs=(TenantSpec("a"),))
    with pytest.raises(ValueError, match="adapters="):
        await run_load(opts, progress=None, adapter=SlowFake(delay=0.0))


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
