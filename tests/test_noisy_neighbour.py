"""``python -m loadtests.noisy_neighbour`` through the real ``modelpool serve
--auth-config``: both phases run, every request carries its tenant's key, the noisy
tenant is held to its limits (429 / RESOURCE_EXHAUSTED) and the quiet one is never
refused. Structure only: timings on a shared CPU machine are the benchmark's business,
not a test's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def test_noisy_neighbour_end_to_end(tmp_path: Path) -> None:
    protocol = "grpc"  # HTTP's keys and rows are the same code; one run keeps this short
    out = tmp_path / "nn.json"
    cmd = [
        sys.executable, "-m", "modelpool.loadtests.noisy_neighbour", "--protocol", protocol,
        "--duration", "3", "--rounds", "1", "--models", "2", "--quiet-rate", "10", "--noisy-limit", "10",
        "--noisy-concurrency", "2", "--workdir", str(tmp_path / "work"), "--out", str(out),
        "--serve-arg=--threads", "--serve-arg=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=ROOT)
    log = (tmp_path / "work" / "serve.log").read_text(errors="replace")[-3000:]
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- serve.log ---\n{log}"
    assert "quiet p99 with the neighbour / alone" in proc.stdout
    assert "1/1 (a) quiet alone" in proc.stderr and "1/1 (b) quiet at" in proc.stderr

    doc = json.loads(out.read_text())
    assert doc["protocol"] == protocol and len(doc["models"]) == 2
    [r] = doc["rounds"]
    alone, quiet = r["alone"]["quiet"], r["with_neighbour"]["quiet"]
    noisy = r["with_neighbour"]["noisy"]
    for row in (alone, quiet, noisy):
        assert row["sent"] > 0
        assert row["sent"] == row["ok"] + row["rejected"] + row["errors"]
    # The quiet tenant: every request of both phases answered, none refused.
    for row in (alone, quiet):
        assert row["ok"] == row["sent"], row["errors_by_kind"]
        assert 0 < row["p50"] <= row["p95"] <= row["p99"]
    assert doc["quiet"]["failed"] == 0 and doc["quiet"]["sent"] == alone["sent"] + quiet["sent"]
    assert doc["quiet"]["alone"]["p99_ms"] == alone["p99"]
    assert doc["quiet"]["with_neighbour"]["p99_ms"] == quiet["p99"]
    # The noisy one, at 10x its limit: refused (429 / RESOURCE_EXHAUSTED), some admitted.
    assert noisy["rate_rps"] == 100
    assert noisy["rejected"] > 0, noisy["errors_by_kind"]
    assert 0 < noisy["ok"] < noisy["sent"]
    assert doc["noisy"] == {
        "sent": noisy["sent"], "admitted": noisy["sent"] - noisy["rejected"], "ok": noisy["ok"],
        "rejected": noisy["rejected"], "errors": noisy["errors"],
    }  # fmt: skip
    # The gateway counted the same: its rate_limited outcomes are the client's 429s.
    assert r["server_counts_agree"], r["server_counted"]
    assert r["server_counted"]["with_neighbour"]["noisy"]["rate_limited"] == noisy["rejected"]
    v = doc["verdict"]
    assert v["checks"]["quiet_all_ok"] and v["checks"]["noisy_held_to_its_limits"], v["reasons"]
    # The verdict's p99s are over every answered request of quiet's, as recorded.
    lat = r["quiet_latencies_ms"]
    assert len(lat["alone"]) == alone["ok"] and len(lat["with_neighbour"]) == quiet["ok"]
    assert v["quiet_p99_alone_ms"] == pytest.approx(alone["p99"], abs=0.01)  # one round
    assert v["quiet_p99_with_neighbour_ms"] == pytest.approx(quiet["p99"], abs=0.01)
    assert v["quiet_p99_ratio"] == pytest.approx(quiet["p99"] / alone["p99"], rel=1e-3)
    assert v["quiet_p99_ratio_median_of_rounds"] == r["quiet_p99_ratio"] > 0
    assert v["target_p99_ratio"] == 1.5
    # The control phase: noisy at its limit (10 rps) is admitted throughout, quiet
    # answered in full, and the flood's own share is (b) over (c).
    assert "1/1 (c) quiet at" in proc.stderr
    control, noisy_c = r["at_limit"]["quiet"], r["at_limit"]["noisy"]
    assert control["ok"] == control["sent"] == len(lat["at_limit"]) > 0
    assert noisy_c["rate_rps"] == 10 and noisy_c["ok"] > 0
    assert v["quiet_p99_at_limit_ms"] == pytest.approx(control["p99"], abs=0.01)
    assert v["quiet_p99_ratio_flood_over_at_limit"] == pytest.approx(
        quiet["p99"] / control["p99"], rel=1e-3
    )
    assert isinstance(v["passed"], bool)
    assert doc["server_log_errors"] == [], doc["server_log_errors"]


def test_pooled_p99_uses_every_round() -> None:
    """Two rounds whose own ratios are 1.0x and 3.0x: the pooled p99 is that of the
    400 requests of each phase together, not the median of the rounds' ratios."""
    from modelpool.loadtests.noisy_neighbour import Setup, pooled_p99, verdict

    def phase(n: int, slow: int, slow_ms: float) -> list[float]:
        return [5.0] * (n - slow) + [slow_ms] * slow

    def row(ok: int) -> dict[str, object]:
        return {"rate_rps": 10.0, "sent": ok, "ok": ok, "rejected": 0, "errors": 0,
                "errors_by_kind": {}, "p50": 5.0, "p95": 5.0, "p99": 5.0, "max": 5.0}  # fmt: skip

    noisy = dict(row(100), sent=1000, ok=100, rejected=900, rate_rps=100.0)
    rounds = [
        {"alone": {"quiet": row(200)}, "with_neighbour": {"quiet": row(200), "noisy": noisy},
         "with_neighbour_elapsed_s": 4.0, "quiet_p50_ratio": 1.0, "quiet_p99_ratio": ratio,
         "quiet_latencies_ms": {"alone": alone, "with_neighbour": with_}}
        for ratio, alone, with_ in (
            (1.0, phase(200, 4, 40.0), phase(200, 4, 40.0)),
            (3.0, phase(200, 0, 0.0), phase(200, 4, 120.0)),
        )
    ]  # fmt: skip
    for phase_name in ("alone", "with_neighbour"):
        pooled = [v for r in rounds for v in r["quiet_latencies_ms"][phase_name]]
        assert len(pooled) == 400
        assert pooled_p99(rounds, phase_name) == pytest.approx(np.percentile(pooled, 99))
    v = verdict(Setup(10.0, 10.0, 10.0, 2), rounds)
    assert v["quiet_p99_ratio_median_of_rounds"] == 2.0
    assert v["quiet_p99_ratio"] == pytest.approx(
        v["quiet_p99_with_neighbour_ms"] / v["quiet_p99_alone_ms"]
    )
    assert not v["checks"]["quiet_p99_within_target"]
