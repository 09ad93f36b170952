"""compare.png: latency percentiles and throughput per (system, protocol), side by side.
Agg backend, like loadtests.plots: headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt

from modelpool.loadtests.peers.table import Row


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def write_plot(rows: list[Row], path: Path, title: str) -> Path:
    labels = [f"{r.system}\n{r.protocol}" for r in rows]
    xs = list(range(len(rows)))
    fig, (lat, thr) = plt.subplots(1, 2, figsize=(11, 4.5))
    try:
        width = 0.27
        for i, (name, values) in enumerate(
            (
                ("p50", [r.p50_ms for r in rows]),
                ("p95", [r.p95_ms for r in rows]),
                ("p99", [r.p99_ms for r in rows]),
            )
        ):
            lat.bar([x + (i - 1) * width for x in xs], [_nan(v) for v in values], width, label=name)
        # Log scale: warm medians are milliseconds, cold-start tails hundreds of them.
        lat.set_yscale("log")
        lat.set(xticks=xs, ylabel="latency (ms)", title="Latency")
        lat.set_xticklabels(labels)
        lat.legend()
        thr.bar(xs, [r.offered_rps for r in rows], 0.6, color="lightgrey", label="offered")
        thr.bar(xs, [r.throughput_rps for r in rows], 0.4, label="answered")
        thr.bar(xs, [r.errors / max(r.requests, 1) * r.offered_rps for r in rows], 0.4,
                color="tab:red", label="errors")  # fmt: skip
        thr.set(xticks=xs, ylabel="requests per second", title="Throughput")
        thr.set_xticklabels(labels)
        thr.legend()
        fig.suptitle(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path
