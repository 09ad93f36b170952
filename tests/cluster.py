"""Separate ``modelpool worker`` and ``modelpool gateway`` processes sharing a Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from modelpool.loadtests.servers import wait_for_line
from tests.conftest import READY_RE, ROOT, Served

WORKER_RE = re.compile(r"MODELPOOL_WORKER_READY address=(\S+) worker_id=(\S+)")


@dataclass
class WorkerProc:
    proc: subprocess.Popen[str]
    address: str
    worker_id: str
    #: Its HTTP port (--metrics-port), when it has one.
    metrics_port: int | None = None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _env() -> dict[str, str]:
    return dict(os.environ, MODELPOOL_FORCE_CPU="1", PYTHONUNBUFFERED="1")


def _wait_line(
    proc: subprocess.Popen[str], pattern: re.Pattern[str], log: Path, timeout: float = 60
) -> re.Match[str]:
    m = wait_for_line(proc, pattern, timeout)
    if m is None:
        raise RuntimeError(f"process did not start:\n{log.read_text()}")
    return m


def start_worker(
    repo: Path, redis_url: str, log: Path, worker_id: str, budget: str = "256MB", *extra: str
) -> WorkerProc:
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "worker", "--model-repository", str(repo),
        "--redis-url", redis_url, "--port", "0", "--worker-id", worker_id,
        "--device-memory-budget", budget, "--threads", "1", "--node", worker_id, *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT, env=_env()
    )
    m = _wait_line(proc, WORKER_RE, log)
    metrics = re.search(r"metrics=(\d+)", m.string)
    return WorkerProc(proc, m[1], m[2], int(metrics[1]) if metrics else None)


def start_gateway(repo: Path, redis_url: str, log: Path, *extra: str) -> Served:
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "gateway", "--model-repository", str(repo),
        "--redis-url", redis_url, "--host", "127.0.0.1",
        "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, cwd=ROOT, env=_env()
    )
    m = _wait_line(proc, READY_RE, log)
    return Served(proc, int(m[1]), int(m[2]), int(m[3]), log, repo)


def status(gateway: Served, key: str | None = None) -> dict:
    """The gateway's status view; ``key``: an admin's, where it has an auth config."""
    request = urllib.request.Request(f"http://{gateway.http_url}/v2/modelpool/status")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.load(r)


def wait_for(condition, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
