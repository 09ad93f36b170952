"""PNG plots of a report. Agg backend: runs headless, in CI and over ssh."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from modelpool.loadtests.report import Report

PLOTS = ("latency_over_time.png", "latency_by_rank.png", "throughput.png", "residency.png")


def _xs(report: Report) -> list[float]:
    return [p.t for p in report.series]


def _none_to_nan(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else v for v in values]


def _latency_over_time(report: Report, ax: plt.Axes) -> None:
    xs = _xs(report)
    ax.plot(xs, _none_to_nan([p.p50_ms for p in report.series]), label="p50")
    ax.plot(xs, _none_to_nan([p.p99_ms for p in report.series]), label="p99")
    ax.set_yscale("log")
    ax.set(xlabel="seconds", ylabel="latency (ms)", title="Latency per second")
    ax.legend()


def _latency_by_rank(report: Report, ax: plt.Axes) -> None:
    rows = sorted(report.models.values(), key=lambda m: m.rank)
    ranks = [m.rank for m in rows]
    ax.plot(ranks, _none_to_nan([m.p50 for m in rows]), "o-", label="p50")
    ax.plot(ranks, _none_to_nan([m.p99 for m in rows]), "s-", label="p99")
    ax.set_yscale("log")
    ax.set(xlabel="popularity rank (1 = most requested)", ylabel="latency (ms)",
           title="Latency by model popularity")  # fmt: skip
    ax.legend(loc="upper left")
    counts = ax.twinx()
    counts.bar(ranks, [m.requests for m in rows], alpha=0.2, color="grey")
    counts.set_ylabel("requests")


def _throughput(report: Report, ax: plt.Axes) -> None:
    xs = _xs(report)
    ax.plot(xs, [p.sent for p in report.series], label="sent")
    ax.plot(xs, [p.done - p.errors for p in report.series], label="answered")
    ax.plot(xs, [p.errors for p in report.series], label="errors")
    ax.set(xlabel="seconds", ylabel="requests per second", title="Throughput")
    ax.legend()


def _residency(report: Report, ax: plt.Axes) -> None:
    xs = _xs(report)
    ax.step(xs, _none_to_nan([p.resident_models for p in report.series]), where="post",
            label="resident models")  # fmt: skip
    ax.set(xlabel="seconds", ylabel="resident models", title="Residency and device memory")
    mem = ax.twinx()
    used = [p.device_memory_used_bytes for p in report.series]
    mem.plot(xs, _none_to_nan([None if v is None else v / 2**20 for v in used]), color="tab:red",
             label="device memory used")  # fmt: skip
    mem.set_ylabel("device memory used (MiB)")
    # From zero: a change of a few models should not look like a cliff.
    ax.set_ylim(bottom=0)
    mem.set_ylim(bottom=0)
    ax.legend(loc="upper left")
    mem.legend(loc="lower right")


def write_plots(report: Report, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in zip(
        PLOTS, (_latency_over_time, _latency_by_rank, _throughput, _residency), strict=True
    ):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        try:
            draw(report, ax)
            fig.tight_layout()
            fig.savefig(out / name, dpi=100)
        finally:
            plt.close(fig)
        paths.append(out / name)
    return paths
