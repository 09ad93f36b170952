"""Fault injection for each runbook in docs/runbooks/: cause the failure through the
real processes, see the metric the runbook names move on the real /metrics, see the
alert it names fire in a real Prometheus, apply the runbook's remedy and see the
symptom clear.

One Prometheus serves the module (scrape and rule evaluation every second) with a
copy of deploy/prometheus/alerts.yml in which every ``for:`` is 0s: what is under
test here is each rule's expression on real data; how long a condition must hold
(``for``) is covered by the promtool unit tests (deploy/prometheus/alerts_test.yml),
and waiting it out here would take minutes. Targets come from a file_sd file the
tests rewrite; only the server under test is scraped at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized, write_slow
from tests.redis_server import RedisServer, free_port, need_redis

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"
MB = 1_000_000
ALERT_DEADLINE_S = 30.0


# -- Prometheus ---------------------------------------------------------------------------


class Prometheus:
    def __init__(self, url: str, targets: Path) -> None:
        self.url = url
        self.targets = targets

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=5) as r:
            return json.loads(r.read())["data"]

    def scrape(self, served: Served) -> None:
        """Scrape ``served`` only, and wait until Prometheus has scraped it once."""
        target = f"127.0.0.1:{served.metrics_port}"
        tmp = self.targets.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": [target]}]))
        tmp.replace(self.targets)  # whole, so the file watcher never reads half of it
        deadline = time.monotonic() + ALERT_DEADLINE_S
        while time.monotonic() < deadline:
            active = self._get("/api/v1/targets?state=active")["activeTargets"]
            if any(t["labels"].get("instance") == target and t["health"] == "up" for t in active):
                return
            time.sleep(0.2)
        raise AssertionError(f"Prometheus never scraped {target}")

    def alerts(self, name: str, state: str = "firing") -> list[dict[str, str]]:
        """Labels of the alerts named ``name`` in ``state``."""
        return [
            a["labels"]
            for a in self._get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == state
        ]

    def firing(self, name: str, **labels: str) -> bool:
        return any(all(a.get(k) == v for k, v in labels.items()) for a in self.alerts(name))

    def wait_firing(
        self, name: str, while_: Callable[[], object] | None = None, **labels: str
    ) -> None:
        """Until ``name`` fires (with ``labels``); ``while_`` runs between polls (the
        fault's traffic, when it must go on)."""
        deadline = time.monotonic() + ALERT_DEADLINE_S
        while time.monotonic() < deadline:
            if self.firing(name, **labels):
                return
            if while_ is not None:
                while_()
            else:
                time.sleep(0.25)
        raise AssertionError(
            f"alert {name} {labels} did not fire; active: {self._get('/api/v1/alerts')}"
        )

    def wait_resolved(self, name: str, **labels: str) -> None:
        deadline = time.monotonic() + ALERT_DEADLINE_S
        while time.monotonic() < deadline:
            if not self.firing(name, **labels):
                return
            time.sleep(0.25)
        raise AssertionError(f"alert {name} {labels} still firing")


def test_alert_copy_rewrites_every_for() -> None:
    text = _alerts_without_for()
    durations = re.findall(r"^\s*for:\s*(\S+)", text, re.M)
    assert durations and set(durations) == {"0s"}
    assert len(durations) == len(re.findall(r"^\s*for:", ALERTS.read_text(), re.M))


def _alerts_without_for() -> str:
    return re.sub(r"^(\s*)for:.*$", r"\1for: 0s", ALERTS.read_text(), flags=re.M)


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus server is not installed (Debian package prometheus)")
    d = tmp_path_factory.mktemp("prometheus")
    (d / "alerts.yml").write_text(_alerts_without_for())
    targets = d / "targets.json"
    targets.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(d / "alerts.yml")],
        "scrape_configs": [
            {
                "job_name": "modelpool",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    (d / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (d / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={d / 'prometheus.yml'}", f"--storage.tsdb.path={d / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    prom = Prometheus(f"http://127.0.0.1:{port}", targets)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(prom.url + "/-/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except (OSError, urllib.error.URLError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"prometheus did not start:\n{(d / 'prometheus.log').read_text()}")
        time.sleep(0.2)
    groups = prom._get("/api/v1/rules")["groups"]
    assert sum(len(g["rules"]) for g in groups) == ALERTS.read_text().count("- alert:")
    yield prom
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- the pool -------------------------------------------------------------------------------


def _infer(
    served: Served,
    model: str,
    key: str | None = None,
    iters: int | None = None,
    timeout: float = 60,
) -> int:
    inputs: list[dict[str, Any]] = [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}
    ]
    if iters is not None:
        inputs.append({"name": "iters", "shape": [1, 1], "datatype": "INT64", "data": [iters]})
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"http://{served.http_url}/v2/models/{model}/infer",
        data=json.dumps({"inputs": inputs}).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return e.code


def _load(served: Served, model: str, key: str) -> int:
    req = urllib.request.Request(
        f"http://{served.http_url}/v2/repository/models/{model}/load",
        data=b"",
        method="POST",
        headers={"Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class Pool:
    """The shared server: a small CPU budget, short queues, an auth config with an
    admin and a rate-limited tenant."""

    def __init__(self, served: Served, auth: Path, keys: dict[str, str]) -> None:
        self.served = served
        self.auth = auth
        self.keys = keys

    def infer(self, model: str, iters: int | None = None, tenant: str = "ops") -> int:
        return _infer(self.served, model, self.keys[tenant], iters)


def _auth_doc(keys: dict[str, str], tight_rps: float) -> dict[str, Any]:
    return {
        "tenants": [
            {"name": "ops", "role": "admin", "keys": [hash_key(keys["ops"])]},
            {
                "name": "tight",
                "keys": [hash_key(keys["tight"])],
                "models": ["good"],
                "rate_limit_rps": tight_rps,
                "burst": 1,
            },
        ]
    }


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    d = tmp_path_factory.mktemp("pool")
    repo = d / "repo"
    write_sized(repo, "good", 1 * MB)
    write_sized(repo, "broken", 1 * MB)
    (repo / "broken" / "1" / "model.pt").write_bytes(b"this is not a TorchScript archive")
    write_sized(repo, "huge", 24 * MB)  # estimated 30 MB: bigger than the whole budget
    for i in range(3):  # two fit in the budget, three do not
        write_sized(repo, f"t{i}", 7 * MB)
    write_slow(repo, "slow", 1 * MB)
    keys = {name: new_key() for name in ("ops", "tight")}
    auth = d / "auth.yaml"
    auth.write_text(yaml.safe_dump(_auth_doc(keys, tight_rps=2)))
    served = start_serve(
        repo, d / "serve.log",
        "--auth-config", str(auth), "--auth-reload-interval", "0",
        "--device-memory-budget", "20MB",
        "--min-residency", "0", "--admission-window", "0",
        "--housekeeping-interval", "0.5",
        "--max-inflight-per-copy", "1", "--max-queue-per-model", "2",
    )  # fmt: skip
    yield Pool(served, auth, keys)
    served.stop()


def _until(condition: Callable[[], bool], what: str, timeout: float = ALERT_DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_every_runbook_has_an_alert_that_links_it() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    linked = {r["annotations"].get("runbook_url") for r in rules} - {None}
    files = {f"docs/runbooks/{p.name}" for p in RUNBOOKS.glob("*.md") if p.name != "README.md"}
    assert len(files) == 8 and files <= linked, files - linked
    assert all((ROOT / url).is_file() for url in linked)
    index = (RUNBOOKS / "README.md").read_text()
    assert all(Path(f).name in index for f in files)


# -- 1. a model that fails to load -----------------------------------------------------------


def test_model_load_failure(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    assert not prometheus.firing("ModelpoolModelLoadFailures", model="broken")
    assert pool.infer("broken") == 400
    assert s.metric("modelpool_model_loads_total", model="broken", outcome="failure") >= 1
    prometheus.wait_firing("ModelpoolModelLoadFailures", model="broken")
    # Remedy: put a good artifact in place and load it again.
    write_sized(s.repo, "broken", 1 * MB)
    assert _load(s, "broken", pool.keys["ops"]) == 200
    assert pool.infer("broken") == 200
    failures = s.metric("modelpool_model_loads_total", model="broken", outcome="failure")
    assert pool.infer("broken") == 200
    assert s.metric("modelpool_model_loads_total", model="broken", outcome="failure") == failures


# -- 2. out of device memory -----------------------------------------------------------------


def test_device_oom(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    assert not prometheus.firing("ModelpoolOutOfDeviceMemory", model="huge")
    assert pool.infer("huge") == 503
    assert s.metric("modelpool_out_of_memory_total", model="huge", stage="placement") >= 1
    prometheus.wait_firing("ModelpoolOutOfDeviceMemory", model="huge")
    # Remedy: a model that fits the device (here a smaller artifact; in production
    # also a bigger device or --device-memory-budget), loaded again.
    write_sized(s.repo, "huge", 2 * MB)
    assert _load(s, "huge", pool.keys["ops"]) == 200
    before = s.metric("modelpool_out_of_memory_total", model="huge", stage="placement")
    assert pool.infer("huge") == 200
    assert s.metric("modelpool_out_of_memory_total", model="huge", stage="placement") == before


# -- 3. thrashing ----------------------------------------------------------------------------


def test_thrashing(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    assert not prometheus.firing("ModelpoolThrashing")
    cold = s.metric("modelpool_cold_starts_total", model="t0")
    turn = iter(range(1 << 30))

    def round_robin() -> None:
        assert pool.infer(f"t{next(turn) % 3}") == 200

    prometheus.wait_firing("ModelpoolThrashing", while_=round_robin)
    assert s.metric("modelpool_cold_starts_total", model="t0") > cold
    assert (
        sum(
            s.metric("modelpool_model_evictions_total", model=f"t{i}", reason="capacity")
            for i in range(3)
        )
        >= 2
    )
    # The tier is full, one device's copies are ready: what scales workers out.
    device = _device(s)
    assert s.metric("modelpool_device_occupancy_ratio", device=device) > 0.5
    assert s.metric("modelpool_device_copies", device=device, state="ready") >= 1
    # Remedy: a working set that fits (here fewer models; in production more memory
    # or workers). Two models then stay resident: no more cold starts.
    for _ in range(2):
        assert pool.infer("t0") == 200 and pool.infer("t1") == 200
    counts = [s.metric("modelpool_cold_starts_total", model=f"t{i}") for i in range(2)]
    for _ in range(5):
        assert pool.infer("t0") == 200 and pool.infer("t1") == 200
    assert [s.metric("modelpool_cold_starts_total", model=f"t{i}") for i in range(2)] == counts


def _device(s: Served) -> str:
    m = re.search(r'modelpool_device_occupancy_ratio\{device="([^"]+)"\}', s.metrics_text())
    assert m, "no device occupancy exported"
    return m.group(1)


# -- 6. overload -------------------------------------------------------------------------------


def test_gateway_overload(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    assert pool.infer("slow", iters=1) == 200  # resident: the burst meets queues, not a load
    assert not prometheus.firing("ModelpoolOverloaded")
    codes: list[int] = []
    depth: list[float] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            codes.append(pool.infer("slow", iters=300))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        prometheus.wait_firing(
            "ModelpoolOverloaded",
            while_=lambda: (depth.append(s.metric("modelpool_model_queue_depth", model="slow")),
                            time.sleep(0.2)),
        )  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert 503 in codes and 200 in codes
    assert max(depth) >= 1  # the queue the gauge shows is where the 503s come from
    assert s.metric("modelpool_requests_total", model="slow", outcome="unavailable") >= 1
    # Remedy: less load per replica (scale out, or clients back off): no more 503s.
    _until(lambda: s.metric("modelpool_model_queue_depth", model="slow") == 0, "queue empty")
    refused = s.metric("modelpool_requests_total", model="slow", outcome="unavailable")
    assert [pool.infer("slow", iters=50) for _ in range(4)] == [200] * 4
    assert s.metric("modelpool_requests_total", model="slow", outcome="unavailable") == refused


# -- 7. a tenant at its quota ---------------------------------------------------------------------


def test_tenant_at_quota(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    assert not prometheus.firing("ModelpoolTenantAtQuota", tenant="tight")
    codes: list[int] = []
    prometheus.wait_firing(
        "ModelpoolTenantAtQuota",
        while_=lambda: (codes.append(pool.infer("good", tenant="tight")), time.sleep(0.05)),
        tenant="tight",
    )
    assert 429 in codes
    assert s.metric("modelpool_requests_total", tenant="tight", outcome="rate_limited") >= 1
    # Remedy: raise the tenant's limit in the auth config and reload it (SIGHUP).
    pool.auth.write_text(yaml.safe_dump(_auth_doc(pool.keys, tight_rps=1000)))
    s.proc.send_signal(signal.SIGHUP)
    _until(
        lambda: [pool.infer("good", tenant="tight") for _ in range(5)] == [200] * 5,
        "the raised limit",
    )
    limited = s.metric("modelpool_requests_total", tenant="tight", outcome="rate_limited")
    assert [pool.infer("good", tenant="tight") for _ in range(10)] == [200] * 10
    assert s.metric("modelpool_requests_total", tenant="tight", outcome="rate_limited") == limited


# -- 4. a crash-looping worker (last on the pool: it loses every copy) -----------------------------


def _workers(s: Served) -> list[int]:
    pids = []
    for pid in s.worker_pids():
        with contextlib.suppress(OSError):
            if b"worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def test_worker_crash_loop(prometheus: Prometheus, pool: Pool) -> None:
    s = pool.served
    prometheus.scrape(s)
    device = _device(s)
    assert not prometheus.firing("ModelpoolWorkerCrashLooping", device=device)
    restarts = s.metric("modelpool_worker_restarts_total", device=device)
    killed: set[int] = set()
    for _ in range(3):  # the fault: the worker dies as soon as it is started
        _until(lambda: any(p not in killed for p in _workers(s)), "a worker process")
        for pid in _workers(s):
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
    _until(
        lambda: s.metric("modelpool_worker_restarts_total", device=device) >= restarts + 3,
        "three restarts",
    )
    prometheus.wait_firing("ModelpoolWorkerCrashLooping", device=device)
    # Remedy: the cause removed (here: nothing kills it any more), the worker stays up.
    _until(lambda: s.metric("modelpool_workers") == 1, "the worker back")
    _until(lambda: pool.infer("good") == 200, "a request served")
    after = s.metric("modelpool_worker_restarts_total", device=device)
    assert [pool.infer("good") for _ in range(3)] == [200] * 3
    assert s.metric("modelpool_worker_restarts_total", device=device) == after


# -- 5. a Redis outage ---------------------------------------------------------------------------


def test_redis_outage(prometheus: Prometheus, tmp_path: Path) -> None:
    need_redis()
    redis = RedisServer(tmp_path).start()
    repo = tmp_path / "repo"
    write_sized(repo, "good", 1 * MB)
    s = start_serve(
        repo, tmp_path / "serve.log", "--redis-url", redis.url,
        "--device-memory-budget", "64MB", "--housekeeping-interval", "0.5",
    )  # fmt: skip
    try:
        prometheus.scrape(s)
        assert _infer(s, "good") == 200
        assert s.metric("modelpool_store_up") == 1
        assert not prometheus.firing("ModelpoolStoreDown")
        redis.stop()
        _until(lambda: s.metric("modelpool_store_up") == 0, "store_up 0")
        prometheus.wait_firing("ModelpoolStoreDown")
        assert _infer(s, "good") == 200  # a warm route still serves
        # Remedy: Redis back on its address; the gateway reconnects by itself.
        redis.start()
        _until(lambda: s.metric("modelpool_store_up") == 1, "store_up 1")
        _until(lambda: _infer(s, "good") == 200, "a request served")
        prometheus.wait_resolved("ModelpoolStoreDown")
    finally:
        s.stop()
        redis.stop()


# -- 8. a drain (last: the server exits) ----------------------------------------------------------


def test_drain(prometheus: Prometheus, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_slow(repo, "slow", 1 * MB)
    s = start_serve(
        repo, tmp_path / "serve.log", "--device-memory-budget", "64MB",
        "--drain-timeout", "60", "--load-model", "slow",
    )  # fmt: skip
    try:
        prometheus.scrape(s)
        assert _infer(s, "slow", iters=1) == 200
        assert not prometheus.firing("ModelpoolDrainStuck")
        # A request that stays in flight about 6 s on this machine as loaded now: long
        # enough for a scrape and a rule evaluation during the drain.
        started = time.monotonic()
        assert _infer(s, "slow", iters=500) == 200
        iters = min(50_000, max(2_000, int(6.0 * 500 / (time.monotonic() - started))))
        result: list[int] = []
        slow = threading.Thread(target=lambda: result.append(_infer(s, "slow", iters=iters)))
        slow.start()
        _until(
            lambda: s.metric("modelpool_model_inflight_requests", model="slow") == 1,
            "the slow request at the worker",
        )
        s.proc.send_signal(signal.SIGTERM)
        _until(lambda: s.metric("modelpool_draining") == 1, "draining")
        prometheus.wait_firing("ModelpoolDrainStuck")
        assert slow.is_alive(), "the slow request ended before the alert could be seen"
        # Remedy: let the accepted request finish within --drain-timeout; the process
        # then leaves and exits 0, and the alert resolves with its series.
        slow.join(90)
        assert result == [200]
        assert s.proc.wait(60) == 0
        prometheus.wait_resolved("ModelpoolDrainStuck")
    finally:
        s.stop()
