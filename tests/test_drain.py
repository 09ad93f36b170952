"""Graceful drain through the real processes: a rolling restart of one of two gateways
under load loses no accepted request, and a worker drained under load fails none.

The load is driven as a balancer would drive it: requests go round-robin to the
replicas it believes ready; a replica that refuses (503 / UNAVAILABLE while
draining) or cannot be reached is skipped and the request is sent to the other. A
refused request was never accepted; what the tests forbid is any other failure.
"""

from __future__ import annotations

import re
import signal
import threading
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.cluster import start_gateway, start_worker, status, wait_for
from tests.conftest import Served, start_serve
from tests.modelgen import write_sized, write_slow

MB = 1_000_000
pytestmark = pytest.mark.slow


def _ready(port: int) -> int:
    """HTTP status of /v2/health/ready (0: nothing listening)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _fast(url: str, model: str = "m1") -> None:
    client = thttp.InferenceServerClient(url, network_timeout=30)
    try:
        x = np.ones((1, 4), np.float32)
        inp = thttp.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        out = client.infer(model, [inp]).as_numpy("y")
        assert out is not None and np.allclose(out, 2.0)
    finally:
        client.close()


def _slow(url: str, iters: int, model: str = "slow") -> np.ndarray:
    client = thttp.InferenceServerClient(url, network_timeout=120, connection_timeout=120)
    try:
        x = thttp.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        n = thttp.InferInput("iters", [1, 1], "INT64")
        n.set_data_from_numpy(np.array([[iters]], np.int64))
        out = client.infer(model, [x, n]).as_numpy("y")
        assert out is not None
        return out
    finally:
        client.close()


def _refused(e: Exception) -> bool:
    """A refusal before acceptance: the drain's 503, or no listener at all."""
    if isinstance(e, InferenceServerException):
        return e.status() == "503" or "draining" in str(e)
    return isinstance(e, ConnectionError | OSError)


@dataclass
class Balancer:
    """Round-robin over replicas; a refused request is sent to the next one."""

    urls: list[str]
    sent: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    done: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, model: str = "m1") -> None:
        i = 0
        while not self.stop.is_set():
            for attempt in range(2 * len(self.urls)):
                url = self.urls[(i + attempt) % len(self.urls)]
                self.sent[url] += 1
                try:
                    _fast(url, model)
                except Exception as e:
                    if _refused(e):
                        self.refused[url] += 1
                        continue
                    self.failures.append(f"{url}: {e!r}")
                    break
                self.done += 1
                break
            else:
                self.failures.append("every replica refused")
            i += 1


def _gateway_count(redis_server) -> int:
    return int(redis_server.client().zcard("modelpool:v1:gateways"))


def test_rolling_restart_of_one_gateway_loses_no_accepted_request(
    tmp_path: Path, redis_server
) -> None:
    repo = tmp_path / "repo"
    write_sized(repo, "m1", 1 * MB)
    write_slow(repo, "slow", 1 * MB)
    a = start_serve(
        repo, tmp_path / "a.log", "--redis-url", redis_server.url, "--node", "a",
        "--housekeeping-interval", "0.2", "--no-warm-restart",
    )  # fmt: skip
    b = start_gateway(
        repo, redis_server.url, tmp_path / "b.log", "--drain-timeout", "60",
        "--housekeeping-interval", "0.2",
    )  # fmt: skip
    restarted: Served | None = None
    balancer = Balancer([a.http_url, b.http_url])
    load = threading.Thread(target=balancer.run, daemon=True)
    try:
        _fast(b.http_url)
        _slow(b.http_url, 1)  # loaded: the slow call below is compute only
        wait_for(lambda: _gateway_count(redis_server) == 2, what="both gateways counted")
        load.start()
        wait_for(lambda: balancer.done > 20, what="load under way")

        # A request accepted by B that is still running when B is told to stop.
        slow_result: list[object] = []
        slow = threading.Thread(
            target=lambda: slow_result.append(_slow(b.http_url, 4000)), daemon=True
        )
        slow.start()
        wait_for(lambda: b.metric("modelpool_inflight_requests") >= 1, what="slow in flight")
        b.proc.send_signal(signal.SIGTERM)

        # At once: not ready, new work refused with 503 and Retry-After, still alive.
        wait_for(lambda: _ready(b.http_port) == 503, timeout=5, what="B not ready")
        assert slow.is_alive(), "the slow request should still be running"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://{b.http_url}/v2/models/m1/infer",
                    data=b'{"inputs":[{"name":"x","shape":[1,4],"datatype":"FP32",'
                    b'"data":[1,1,1,1]}]}',
                ),
                timeout=10,
            )
        assert refused.value.code == 503
        assert refused.value.headers.get("Retry-After")
        assert "draining" in refused.value.read().decode()
        assert b.metric("modelpool_draining") == 1

        # The accepted request finishes; then B leaves the gateway set and exits 0.
        slow.join(120)
        assert slow_result and np.allclose(slow_result[0], 2.0)
        assert b.proc.wait(60) == 0
        assert _gateway_count(redis_server) == 1, "B should have left the gateway set"
        assert "drained: every accepted request answered" in b.log()

        # The new B joins the rotation where the old one was.
        restarted = start_gateway(repo, redis_server.url, tmp_path / "b2.log")
        balancer.urls[1] = restarted.http_url
        served_before = balancer.sent[restarted.http_url]
        wait_for(
            lambda: balancer.sent[restarted.http_url] > served_before + 20,
            what="load through the restarted gateway",
        )
    finally:
        balancer.stop.set()
        load.join(30)
        for s in (restarted, b, a):
            if s is not None:
                s.stop()
    assert balancer.failures == [], balancer.failures
    assert balancer.done > 40
    assert balancer.refused[a.http_url] == 0


def test_worker_drained_under_load_fails_no_request(tmp_path: Path, redis_server) -> None:
    repo = tmp_path / "repo"
    write_sized(repo, "m1", 1 * MB)
    write_slow(repo, "slow", 1 * MB)
    log1 = tmp_path / "w1.log"
    w1 = start_worker(repo, redis_server.url, log1, "w1", "256MB", "--metrics-port", "0")
    gateway = start_gateway(repo, redis_server.url, tmp_path / "g.log")
    w2 = None
    balancer = Balancer([gateway.http_url])
    load = threading.Thread(target=balancer.run, daemon=True)
    try:
        # Both models on w1 (the only worker yet), then a second worker to move to.
        _fast(gateway.http_url)
        _slow(gateway.http_url, 1)
        w2 = start_worker(repo, redis_server.url, tmp_path / "w2.log", "w2")
        wait_for(lambda: len(status(gateway)["workers"]) == 2, what="two workers")
        assert w1.metrics_port is not None
        assert _ready(w1.metrics_port) == 200
        load.start()
        wait_for(lambda: balancer.done > 20, what="load under way")

        slow_result: list[object] = []
        slow = threading.Thread(
            target=lambda: slow_result.append(_slow(gateway.http_url, 4000)), daemon=True
        )
        slow.start()
        wait_for(
            lambda: _worker_metric(w1.metrics_port, "modelpool_worker_inflight_requests") >= 1,
            what="slow request running on w1",
        )
        w1.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _ready(w1.metrics_port) == 503, timeout=5, what="w1 not ready")
        # Its copies leave the registry while it still runs: the gateway moves m1.
        wait_for(
            lambda: "w1" not in {w["worker_id"] for w in status(gateway)["workers"]},
            timeout=10,
            what="w1 gone from the registry",
        )
        assert w1.proc.poll() is None, "w1 should still be draining"
        done = balancer.done
        wait_for(lambda: balancer.done > done + 20, what="load on w2")
        slow.join(120)
        assert slow_result and np.allclose(slow_result[0], 2.0)
        assert w1.proc.wait(60) == 0
    finally:
        balancer.stop.set()
        load.join(30)
        for w in (w1, w2):
            if w is not None:
                w.stop()
        gateway.stop()
    assert balancer.failures == [], balancer.failures
    text = log1.read_text()
    assert text.index("left the registry") < text.index("stopped after")
    # Gone from the registry by its own hand, not by a lapsed heartbeat.
    r = redis_server.client()
    assert r.exists("modelpool:v1:worker:w1") == 0
    assert "w1" not in r.smembers("modelpool:v1:workers")
    assert not [k for k in r.hkeys("modelpool:v1:copies") if k.endswith("|w1")]


def _worker_metric(port: int | None, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    m = re.search(rf"^{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(m[1]) if m else 0.0


def test_serve_drains_then_exits_zero(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_slow(repo, "slow", 1 * MB)
    s = start_serve(repo, tmp_path / "s.log", "--no-warm-restart", "--drain-timeout", "60")
    try:
        _slow(s.http_url, 1)
        result: list[object] = []
        slow = threading.Thread(target=lambda: result.append(_slow(s.http_url, 4000)))
        slow.start()
        wait_for(lambda: s.metric("modelpool_inflight_requests") >= 1, what="in flight")
        s.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: _ready(s.http_port) == 503, timeout=5, what="not ready")
        slow.join(120)
        assert result and np.allclose(result[0], 2.0)
        assert s.proc.wait(60) == 0
    finally:
        s.stop()
    assert "drained: every accepted request answered" in s.log()
    assert "still running after" not in s.log()
