"""The soak benchmark: its pure pieces (error kinds, the verdict, the metrics it reads),
and ``python -m loadtests.soak`` end to end on CPU with tiny models, kill -9 included."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from modelpool.loadtests import soak
from modelpool.loadtests.soak import (
    UNAVAILABLE_RETRY,
    SoakConfig,
    count_for,
    error_kind,
    foreign_target_bytes,
    judge,
    longest_zero_s,
    parse_server_metrics,
)

ROOT = Path(__file__).resolve().parent.parent


# -- pure pieces -------------------------------------------------------------------


def test_unavailable_is_told_apart_by_retry_after() -> None:
    assert error_kind(grpc.StatusCode.UNAVAILABLE, (("retry-after", "1"),)) == UNAVAILABLE_RETRY
    assert error_kind(grpc.StatusCode.UNAVAILABLE, (("Retry-After", b"2"),)) == UNAVAILABLE_RETRY
    assert error_kind(grpc.StatusCode.UNAVAILABLE, ()) == "UNAVAILABLE"
    assert error_kind(grpc.StatusCode.UNAVAILABLE, None) == "UNAVAILABLE"
    # Retry-After only excuses an UNAVAILABLE.
    assert error_kind(grpc.StatusCode.INTERNAL, (("retry-after", "1"),)) == "INTERNAL"
    assert error_kind(grpc.StatusCode.DEADLINE_EXCEEDED, ()) == "DEADLINE_EXCEEDED"


def test_longest_zero_stretch() -> None:
    assert longest_zero_s([(0, 2), (1, 1), (2, 2)]) == 0.0
    assert longest_zero_s([(0, 2), (1, 0), (2, None), (4, 0), (5, 2)]) == 4.0
    # Still at zero when the run ended: up to the last sample.
    assert longest_zero_s([(0, 2), (3, 0), (10, 0)]) == 7.0
    assert longest_zero_s([]) == 0.0


@pytest.mark.parametrize(
    ("errors", "zero_s", "final", "passed"),
    [
        ({}, 0.0, 2.0, True),
        ({UNAVAILABLE_RETRY: 5, "DEADLINE_EXCEEDED": 4}, 0.0, 2.0, True),
        ({"UNAVAILABLE": 1}, 0.0, 2.0, False),  # a 503 without Retry-After
        ({UNAVAILABLE_RETRY: 11}, 0.0, 2.0, False),  # 98.9% success
        ({}, 31.0, 2.0, False),
        ({}, 0.0, 0.0, False),
    ],
)
def test_verdict(errors: dict[str, int], zero_s: float, final: float, passed: bool) -> None:
    requests = 1000
    verdict = judge(
        requests, requests - sum(errors.values()), errors, zero_s, final, None, 30.0, None
    )
    assert verdict.passed is passed
    assert bool(verdict.reasons) is not passed


def test_verdict_needs_the_killed_worker_back_when_there_was_time_to_see_it() -> None:
    def passes(kill: dict[str, object] | None, serve_exit: int | None = None) -> bool:
        return judge(10, 10, {}, 0.0, 1.0, kill, 30.0, serve_exit).passed

    assert passes({"pid": 1, "recovered_after_s": 8.0, "observed_for_s": 8.0})
    assert not passes({"pid": 1, "recovered_after_s": None, "observed_for_s": 40.0})
    assert not passes({"pid": 1, "recovered_after_s": 35.0, "observed_for_s": 35.0})
    # Killed too near the end to watch a restart: not held against the run.
    assert passes({"pid": 1, "recovered_after_s": None, "observed_for_s": 5.0})
    assert not passes(None, serve_exit=1)


def test_server_metrics_recycles_read_as_zero_when_absent() -> None:
    text = "\n".join(
        [
            "# TYPE modelpool_workers gauge",
            "modelpool_workers 2.0",
            "# TYPE modelpool_model_loads_total counter",
            'modelpool_model_loads_total{model="a",outcome="success"} 3.0',
            'modelpool_model_loads_total{model="b",outcome="success"} 2.0',
            "# TYPE modelpool_model_evictions_total counter",
            'modelpool_model_evictions_total{model="a",reason="capacity"} 4.0',
            "# TYPE modelpool_device_memory_bytes gauge",
            'modelpool_device_memory_bytes{device="n/cpu",kind="used"} 10.0',
            'modelpool_device_memory_bytes{device="n/cpu",kind="total"} 16.0',
            "",
        ]
    )
    s = parse_server_metrics(text)
    assert s.workers == 2.0
    assert s.loads == {"success": 5.0}
    assert s.evictions == {"capacity": 4.0}
    assert s.recycles == 0.0
    assert s.memory_sum("used") == 10.0 and s.memory_sum("total") == 16.0
    with_recycles = text + (
        "# TYPE modelpool_worker_recycles_total counter\n"
        'modelpool_worker_recycles_total{worker="w0"} 2.0\n'
    )
    assert parse_server_metrics(with_recycles).recycles == 2.0


def test_loads_by_source_from_the_gateways_histogram() -> None:
    """Counts and load-time quantiles per source over the run (after - before),
    summed over models, as Prometheus' histogram_quantile interpolates them."""

    def scrape(disk: list[float], host: list[float]) -> str:
        lines = [
            "# TYPE modelpool_model_loads_total counter",
            "# TYPE modelpool_model_load_duration_seconds histogram",
        ]
        for source, cumulative in (("disk", disk), ("host", host)):
            for model in ("a", "b"):  # the same per model: sums are twice these
                lines.append(
                    f'modelpool_model_loads_total{{model="{model}",outcome="success",'
                    f'source="{source}"}} {cumulative[-1]}'
                )
                for le, n in zip(("0.1", "1.0", "+Inf"), cumulative, strict=True):
                    lines.append(
                        f'modelpool_model_load_duration_seconds_bucket{{model="{model}",'
                        f'source="{source}",le="{le}"}} {n}'
                    )
        lines.append('modelpool_model_loads_total{model="a",outcome="failure",source="disk"} 7.0')
        return "\n".join(lines) + "\n"

    before = parse_server_metrics(scrape([1, 1, 1], [0, 0, 0]))
    after = parse_server_metrics(scrape([1, 11, 11], [50, 50, 50]))
    assert after.loads == {"success": 122.0, "failure": 7.0}
    assert after.loads_by_source == {"disk": 22.0, "host": 100.0}
    got = soak.loads_by_source(after, before)
    assert got["disk"]["loads"] == 20 and got["host"]["loads"] == 100
    # disk: all 20 new loads took 0.1-1 s; host: all 100 under 0.1 s.
    assert got["disk"]["p50_s"] == pytest.approx(0.1 + 0.9 * 0.5)
    assert got["disk"]["p99_s"] == pytest.approx(0.1 + 0.9 * 0.99)
    assert got["host"]["p50_s"] == pytest.approx(0.05)
    assert soak.bucket_quantile({}, 0.5) is None
    assert soak.bucket_quantile({1.0: 0.0, float("inf"): 2.0}, 0.5) == 1.0  # past the last bound


def _config(**kw: object) -> SoakConfig:
    values: dict[str, object] = {
        "device": "cpu", "sizes_mb": (1, 2, 4), "count": 24, "budget_bytes": 16 << 20,
        "rate": 20.0, "duration_s": 30.0, "zipf": 1.1, "deadline_s": None, "workers": 2,
        "threads": 1, "seed": 0, "foreign_at_s": 9.0, "foreign_hold_s": 5.0,
        "foreign_bytes": None, "foreign_share": 0.5, "kill_at_s": 18.0,
        "restart_limit_s": 30.0, "progress_s": 5.0,
    }  # fmt: skip
    return SoakConfig(**(values | kw))  # type: ignore[arg-type]


def test_repository_must_be_three_times_the_budget() -> None:
    assert _config().repository_bytes == 56_000_000
    with pytest.raises(ValueError, match=r"--count 23 or more"):
        _config(count=12)
    assert count_for((1, 2, 4), 3 * (16 << 20)) == 23
    with pytest.raises(ValueError, match="cuda:N"):
        _config(device="gpu0")


def test_foreign_process_takes_its_share_of_the_budget() -> None:
    gib = 1 << 30
    # 100 GiB device, 2 GiB budget, 1 GiB used by others now: others may use 98 GiB
    # for free; taking half the budget's share means 99 GiB in all, 98 more than now.
    assert foreign_target_bytes(100 * gib, 2 * gib, 1 * gib, 0.5) == 98 * gib


class _FakeNvml:
    def used_total(self) -> tuple[int, int]:
        return 3 << 30, 100 << 30


# Stands in for the CUDA tenant: the same argv and the same two report lines.
_FAKE_TENANT = """
import sys, time
print("started", 500, int(sys.argv[2]) - 500, flush=True)
time.sleep(float(sys.argv[3]))
print("held", int(sys.argv[2]) - 500, 0.1, flush=True)
"""


async def test_foreign_event_reads_what_the_tenant_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA event's plumbing, without a GPU: target, report lines, release."""
    monkeypatch.setattr(soak, "FOREIGN", _FAKE_TENANT)
    cfg = _config(device="cuda:0", foreign_at_s=0.0, foreign_hold_s=0.2)
    run = soak.Soak(cfg, None, _FakeNvml())  # type: ignore[arg-type]
    run.seen.last = parse_server_metrics(
        'modelpool_device_memory_bytes{device="n/cuda:0",kind="ours"} 1073741824.0\n'
    )
    run.t0 = asyncio.get_running_loop().time()
    await run._foreign_memory()
    event = run.seen.events["foreign_memory"]
    # Others now: 3 GiB used - 1 GiB ours; half of a 16 MiB budget's share.
    want = foreign_target_bytes(100 << 30, 16 << 20, 2 << 30, 0.5)
    assert event["target_bytes"] == want
    assert event["wanted_bytes"] == want - 500 and event["held_bytes"] == want - 500
    assert event["exit_code"] == 0 and "error" not in event
    assert event["released_at_s"] >= event["at_s"]


async def test_cpu_has_no_foreign_memory_event() -> None:
    run = soak.Soak(_config(foreign_at_s=0.0), None, None)  # type: ignore[arg-type]
    run.t0 = asyncio.get_running_loop().time()
    await run._foreign_memory()
    assert "CPU" in run.seen.events["foreign_memory"]["skipped"]


# -- end to end ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_on_cpu_survives_kill_minus_nine(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    cmd = [
        sys.executable, "-m", "loadtests.soak",
        "--sizes-mb", "1,2,4", "--count", "24", "--budget", "16MiB", "--rate", "20",
        "--duration", "25", "--kill-at-s", "10", "--progress-s", "5",
        "--repo", str(tmp_path / "models"), "--out", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "MODELPOOL_FORCE_CPU"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "verdict" in proc.stdout
    assert any("workers=" in line for line in proc.stderr.splitlines()), "no progress lines"

    doc = json.loads(out.read_text())
    for key in (
        "requests", "successes", "success_rate", "errors_by_kind", "unavailable", "http_503",
        "loads", "evictions", "worker_recycles", "memory", "workers", "latency_ms", "events",
        "verdict", "verdict_reasons",
    ):  # fmt: skip
        assert key in doc, key
    assert doc["device"] == "cpu"
    assert doc["repository"]["bytes"] >= 3 * (16 << 20)
    assert doc["requests"] > 200
    assert doc["successes"] + sum(doc["errors_by_kind"].values()) == doc["requests"]
    assert set(doc["unavailable"]) >= {"with_retry_after", "without_retry_after"}
    assert doc["loads"] > 0 and doc["evictions"] > 0, "3x the budget must evict"
    # No host tier on CPU: every load read the disk, and its times are reported.
    assert set(doc["loads_by_source"]) == {"disk"}, doc["loads_by_source"]
    assert doc["loads_by_source"]["disk"]["loads"] == doc["server"]["loads"]["success"]
    assert doc["loads_by_source"]["disk"]["p99_s"] > 0
    assert "loads by source" in proc.stdout
    assert isinstance(doc["worker_recycles"], int)
    assert doc["latency_ms"]["p50"] is not None and doc["latency_ms"]["p99"] is not None
    gateway_memory = doc["memory"]["gateway"]
    assert doc["memory"]["source"] == "gateway"
    assert 0 < gateway_memory["peak_used_bytes"] and gateway_memory["total_bytes"] == 16 << 20
    assert doc["verdict"] in ("PASS", "FAIL")

    assert "CPU" in doc["events"]["foreign_memory"]["skipped"]
    kill = doc["events"]["worker_kill"]
    assert kill["pid"] in kill["children_before"], kill
    assert kill["new_pid"] != kill["pid"], "no replacement worker was started"
    workers = doc["workers"]
    assert workers["max"] == 2
    assert workers["final"] > 0, workers["series"]
    assert len(workers["series"]) >= 20
