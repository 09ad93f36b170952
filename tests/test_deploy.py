"""deploy/ against the real server: every metric the Grafana dashboard and the alert
rules query is one a gateway exports after traffic, the rules and the config pass
promtool (and the rules' unit tests), and so does a real scrape."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests.conftest import Served, start_serve

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "modelpool-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DOC = ROOT / "docs" / "observability.md"

#: Series Prometheus makes itself for every target, not exported by the gateway.
SYNTHETIC = {"up"}
#: Labels Prometheus attaches to every scraped series.
TARGET_LABELS = {"job", "instance"}
_KEYWORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip
_IDENT = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers left after removing
    strings, label matchers, ranges and grouping clauses that are neither functions
    nor keywords."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in _IDENT.finditer(s):
        if m.group() in _KEYWORDS or s[m.end() :].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names


def promql_label_matchers(expr: str) -> set[tuple[str, str]]:
    """(metric, label) for each label matcher written directly after a metric name."""
    pairs = set()
    for m in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}", expr):
        for label in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)):
            pairs.add((m.group(1), label))
    return pairs


def test_the_extractor_itself() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job=~"$job", x="y{z}"}[5m]))) '
        '/ ignoring(kind) b_total offset 1h > 1e3 and on() absent(up{job="m"})'
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "up"}
    assert promql_label_matchers(expr) == {("a_bucket", "job"), ("a_bucket", "x"), ("up", "job")}


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = []
    stack = list(doc["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for var in doc.get("templating", {}).get("list", []):
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        # Grafana's label_values(METRIC, label) is not PromQL; only its selector is.
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text)
        if m:
            exprs.append(m.group(1))
    return exprs


def alert_exprs() -> list[str]:
    """``expr:`` of each rule, as one line or a ``|`` / ``>`` block (no YAML parser here)."""
    lines = ALERTS.read_text().splitlines()
    exprs = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)expr:\s*(.*)$", line)
        if not m:
            continue
        indent, value = len(m.group(1)), m.group(2).strip()
        if value and value[0] not in "|>":
            exprs.append(value.strip("'\""))
            continue
        block = []
        for follow in lines[i + 1 :]:
            if follow.strip() and len(follow) - len(follow.lstrip()) <= indent:
                break
            block.append(follow.strip())
        exprs.append(" ".join(b for b in block if b))
    assert len(exprs) == sum(1 for ln in lines if re.match(r"^\s*- alert:", ln)), (
        "an alert without expr"
    )
    return exprs


def grafana_to_promql(expr: str) -> str:
    return expr.replace("$__rate_interval", "1m").replace("$job", ".*").replace("$model", ".*")


# -- a real scrape ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(example_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # Its own server: the test unloads a model, which the shared one must not see. Its
    # budget is smaller than mlp_04_32mb, so that the out-of-memory counter has a sample.
    s = start_serve(
        example_repo, tmp_path_factory.mktemp("deploy") / "serve.log",
        "--device-memory-budget", "24MB",
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="module")
def scrape(server: Served) -> str:
    """/metrics after a request per protocol, a bad request, a model bigger than the
    budget and an unload, so that every family has samples (evictions need the unload,
    modelpool_out_of_memory_total the big model)."""
    data = np.zeros((1, 64), dtype=np.float32)
    h = thttp.InferenceServerClient(server.http_url)
    x = thttp.InferInput("input", [1, 64], "FP32")
    x.set_data_from_numpy(data)
    h.infer("mlp_00_2mb", [x])
    g = tgrpc.InferenceServerClient(server.grpc_url)
    y = tgrpc.InferInput("input", [1, 64], "FP32")
    y.set_data_from_numpy(data)
    g.infer("mlp_00_2mb", [y])
    with pytest.raises(InferenceServerException, match="no_such_model"):
        h.infer("no_such_model", [x])
    with pytest.raises(InferenceServerException, match="mlp_04_32mb"):
        big = thttp.InferInput("input", [1, 64], "FP32")
        big.set_data_from_numpy(data)
        h.infer("mlp_04_32mb", [big])
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/mlp_00_2mb/unload", data=b"", method="POST"
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    return server.metrics_text()


def _exported(scrape_text: str) -> tuple[set[str], dict[str, set[str]]]:
    """Sample names as exported (counters as name_total, histograms as _bucket, _sum,
    _count) and the label names seen on each."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(scrape_text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return set(labels), labels


def _families(scrape_text: str) -> set[str]:
    """Family names without the exposition suffixes (the names gateway/metrics.py uses)."""
    return {
        f.name
        for f in text_string_to_metric_families(scrape_text)
        if f.name.startswith("modelpool_") and not f.name.endswith("_created")
    }


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_is_exported(source: str, scrape: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert len(exprs) >= 5
    names, labels = _exported(scrape)
    queried: set[str] = set()
    for expr in exprs:
        queried |= promql_metric_names(expr)
        for metric, label in promql_label_matchers(expr):
            if metric in names:
                assert label in labels[metric] | TARGET_LABELS, (
                    f"{metric} has no label {label}: {expr}"
                )
    missing = sorted(queried - names - SYNTHETIC)
    assert not missing, f"{source} queries metrics the server does not export: {missing}"
    assert any(n.endswith("_bucket") for n in queried) or source == "alerts"


def test_dashboard_covers_what_the_issue_asks(scrape: str) -> None:
    queried = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    for name in (
        "modelpool_request_duration_seconds_bucket",
        "modelpool_cold_starts_total",
        "modelpool_model_loads_total",
        "modelpool_model_evictions_total",
        "modelpool_device_memory_bytes",
        "modelpool_inflight_requests",
        "modelpool_queue_wait_seconds_bucket",
        "modelpool_compute_duration_seconds_bucket",
        # the autoscaling row (docs/observability.md#autoscaling)
        "modelpool_model_queue_depth",
        "modelpool_model_inflight_requests",
        "modelpool_device_occupancy_ratio",
        "modelpool_device_copies",
    ):
        assert name in queried, name
    assert any("histogram_quantile" in e for e in dashboard_exprs())


def test_observability_doc_names_every_exported_metric(scrape: str) -> None:
    doc = DOC.read_text()
    undocumented = sorted(f for f in _families(scrape) if f not in doc)
    assert not undocumented, f"docs/observability.md lacks {undocumented}"


# -- promtool ----------------------------------------------------------------------------


def _promtool() -> str:
    found = shutil.which("promtool") or os.environ.get("PROMTOOL")
    cached = Path.home() / ".cache" / "modelpool" / "promtool"
    if not found and cached.is_file():
        found = str(cached)
    if not found:
        pytest.skip("promtool not installed: run scripts/install-services.sh")
    return found


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60)


def test_promtool_check_rules() -> None:
    r = _run(_promtool(), "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_alert_unit_tests() -> None:
    r = _run(_promtool(), "test", "rules", str(ALERT_TESTS))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_config() -> None:
    r = _run(_promtool(), "check", "config", str(PROMETHEUS_CONFIG))
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool has no PromQL linter of its own; recording rules get parsed."""
    rules = tmp_path / "dashboard_rules.yml"
    body = ["groups:", "  - name: dashboard", "    rules:"]
    for i, expr in enumerate(dashboard_exprs()):
        body += [
            f"      - record: dashboard:query_{i}",
            f"        expr: {json.dumps(grafana_to_promql(expr))}",
        ]
    rules.write_text("\n".join(body) + "\n")
    r = _run(_promtool(), "check", "rules", str(rules))
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_check_metrics_on_a_real_scrape(scrape: str) -> None:
    r = _run(_promtool(), "check", "metrics", stdin=scrape)
    assert r.returncode == 0, r.stdout + r.stderr
