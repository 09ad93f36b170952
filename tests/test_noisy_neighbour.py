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
    assert v["quiet_p99_ratio"] == r["quiet_p99_ratio"] > 0 and v["target_p99_ratio"] == 1.5
    assert isinstance(v["passed"], bool)
    assert doc["server_log_errors"] == [], doc["server_log_errors"]
