"""Fixtures that start the real ``modelpool`` processes on ephemeral ports."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from modelpool.gateway.server import READY_RE
from modelpool.loadtests.servers import child_pids, wait_for_line

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Served:
    """A running ``modelpool serve``: its ports, process and log."""

    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    repo: Path
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics_text(self) -> str:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10
        ) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0.0 when absent), parsed from a real scrape."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return float(s.value)
        return 0.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def worker_pids(self) -> list[int]:
        return child_pids(self.proc.pid)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in self.worker_pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_serve(
    repo: Path,
    log_path: Path,
    *args: str,
    timeout: float = 90.0,
    env: Mapping[str, str] | None = None,
) -> Served:
    """``env``: variables added to this environment (e.g. OTEL_* for tracing)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    # Each server its own warm-restart state, so that one test's residency is never
    # preloaded by the next; tests of warm restarts pass --state-dir.
    env["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="state-", dir=log_path.parent)
    if "--devices" not in args:
        env["MODELPOOL_FORCE_CPU"] = "1"
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "serve",
        "--model-repository", str(repo),
        "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        "--threads", "1",
        *args,
    ]  # fmt: skip
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT, env=env)
    m = wait_for_line(proc, READY_RE, timeout)
    if m is None:
        raise RuntimeError(f"modelpool serve did not start:\n{log_path.read_text()}")
    return Served(proc, int(m[1]), int(m[2]), int(m[3]), log_path, repo)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator:
    """Factory: ``serve(repo, *args, env=None)`` starts ``modelpool serve``; all stop at
    teardown."""
    started: list[Served] = []

    def start(repo: Path, *args: str, env: Mapping[str, str] | None = None) -> Served:
        s = start_serve(repo, tmp_path / f"serve-{len(started)}.log", *args, env=env)
        started.append(s)
        return s

    yield start
    for s in reversed(started):
        s.stop()


@pytest.fixture(scope="session")
def example_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded example repository, generated once per test session."""
    from modelpool.gpu.examples import write_examples

    out = tmp_path_factory.mktemp("examples")
    write_examples(out, count=8, seed=0)
    return out


@pytest.fixture(scope="session")
def served_examples(
    example_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One shared server over the example repository, for read-mostly tests."""
    log = tmp_path_factory.mktemp("served") / "serve.log"
    s = start_serve(example_repo, log, "--device-memory-budget", "1GiB")
    yield s
    s.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator:
    """A fresh redis-server on an ephemeral port, killed at teardown."""
    from tests.redis_server import RedisServer, need_redis

    need_redis()
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()
