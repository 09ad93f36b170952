"""The comparison's one table: a row per (system, protocol) with ratios against
modelpool over the same protocol, as JSON and Markdown. Pure: no I/O."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

BASELINE = "modelpool"


@dataclass(frozen=True)
class Row:
    system: str
    protocol: str
    requests: int
    errors: int
    errors_by_kind: dict[str, int]
    offered_rps: float
    throughput_rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    #: Model loads during the run, by the system's own metrics; None if unreadable.
    cold_starts: float | None
    cold_start_source: str
    #: Requests answered slower than the comparison's threshold (client side).
    slow_requests: int
    startup_s: float
    #: Processes that outlived the system's shutdown and had to be killed.
    killed_after_stop: int = 0


@dataclass(frozen=True)
class Ratios:
    """This row over modelpool's row of the same protocol: > 1 means more throughput
    or a longer latency than modelpool."""

    throughput: float | None
    p50: float | None
    p95: float | None
    p99: float | None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def ratios(row: Row, rows: list[Row]) -> Ratios:
    base = next((r for r in rows if r.system == BASELINE and r.protocol == row.protocol), None)
    if base is None:
        return Ratios(None, None, None, None)
    return Ratios(
        _ratio(row.throughput_rps, base.throughput_rps),
        _ratio(row.p50_ms, base.p50_ms),
        _ratio(row.p95_ms, base.p95_ms),
        _ratio(row.p99_ms, base.p99_ms),
    )


def to_doc(rows: list[Row], setup: dict[str, Any]) -> dict[str, Any]:
    return {
        "setup": setup,
        "rows": [
            {**dataclasses.asdict(r), "vs_modelpool": dataclasses.asdict(ratios(r, rows))}
            for r in rows
        ],
    }


def to_json(rows: list[Row], setup: dict[str, Any]) -> str:
    return json.dumps(to_doc(rows, setup), indent=2)


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def to_markdown(rows: list[Row], slow_ms: float) -> str:
    head = (
        "| system | protocol | requests | errors | throughput rps | p50 ms | p95 ms | p99 ms "
        f"| cold starts | slow (>{slow_ms:g} ms) | throughput vs modelpool | p50 vs | p95 vs "
        "| p99 vs |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        x = ratios(r, rows)
        cold = "-" if r.cold_starts is None else f"{r.cold_starts:g}"
        lines.append(
            f"| {r.system} | {r.protocol} | {r.requests} | {r.errors} | {r.throughput_rps:.1f} "
            f"| {_num(r.p50_ms)} | {_num(r.p95_ms)} | {_num(r.p99_ms)} | {cold} "
            f"| {r.slow_requests} | {_x(x.throughput)} | {_x(x.p50)} | {_x(x.p95)} | {_x(x.p99)} |"
        )
    errors = [r for r in rows if r.errors_by_kind]
    if errors:
        lines.append("")
        for r in errors:
            kinds = ", ".join(f"{k} {n}" for k, n in sorted(r.errors_by_kind.items()))
            lines.append(f"Errors, {r.system} {r.protocol}: {kinds}.")
    return "\n".join(lines)
