"""Start the real processes a benchmark measures: ``modelpool serve`` and a
redis-server, on ephemeral ports, stopped by the caller."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from modelpool.gateway.server import READY_RE


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    http_port: int
    grpc_port: int
    metrics_port: int

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


def start_serve(
    repo: Path,
    extra: list[str],
    log_path: Path,
    timeout_s: float = 120.0,
    env: Mapping[str, str] | None = None,
) -> Serve:
    """``env``: the server's whole environment (None: this process's)."""
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "serve", "--model-repository", str(repo),
        "--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0", "--metrics-port", "0",
        # A benchmark starts empty: a warm restart would preload the last run's models.
        "--no-warm-restart", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log_path.open("w"),
        text=True,
        env=None if env is None else dict(env),
    )
    m = wait_for_line(proc, READY_RE, timeout_s)
    if m is None:
        raise RuntimeError(f"modelpool serve did not start; see {log_path}")
    return Serve(proc, int(m[1]), int(m[2]), int(m[3]))


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (a ``modelpool serve``'s workers)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def wait_for_line(
    proc: subprocess.Popen[str], pattern: re.Pattern[str], timeout_s: float
) -> re.Match[str] | None:
    """Read ``proc``'s stdout until a line matches ``pattern``; None (and the process
    killed) if it exits first or ``timeout_s`` passes between lines."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = pattern.search(line)
        if m:
            return m
    proc.kill()
    proc.wait()
    return None


def stop(proc: subprocess.Popen[str] | subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def holder_address(http_url: str, model: str | None = None) -> str:
    """The gRPC address of the worker holding a READY copy of ``model`` (None: the
    first worker), from the gateway's status endpoint."""
    with urllib.request.urlopen(f"http://{http_url}/v2/modelpool/status", timeout=10) as r:
        status = json.load(r)
    if model is None:
        return str(status["workers"][0]["address"])
    holder = next(
        c["worker_id"] for c in status["copies"] if c["model"] == model and c["state"] == "READY"
    )
    return str(next(w["address"] for w in status["workers"] if w["worker_id"] == holder))


@contextlib.contextmanager
def serving(
    repo: Path, extra: list[str], log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[Serve]:
    s = start_serve(repo, extra, log_path, env=env)
    try:
        yield s
    finally:
        stop(s.proc)


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port; yields its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
