"""Two "nodes" on one machine that share nothing but Redis and the model files: each
its own loopback address (127.0.0.2, 127.0.0.3), its own copy of the repository at its
own path, its own state, and a worker of its own. A gateway on one routes to copies
on the other, over the address the worker advertised."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp

from modelpool.loadtests.servers import wait_for_line
from tests.cluster import WORKER_RE, wait_for
from tests.conftest import READY_RE, ROOT
from tests.modelgen import write_sized

MB = 1_000_000
pytestmark = pytest.mark.slow


def _bindable(host: str) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, 0))
        except OSError:
            return False
    return True


def _start(cmd: list[str], log: Path, pattern, tmp: Path) -> tuple[subprocess.Popen[str], object]:
    env = dict(os.environ, MODELPOOL_FORCE_CPU="1", PYTHONUNBUFFERED="1")
    env["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="state-", dir=tmp)
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelpool.gateway.cli", *cmd],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        cwd=ROOT,
        env=env,
    )
    m = wait_for_line(proc, pattern, 90)
    if m is None:
        raise RuntimeError(f"{cmd[0]} did not start:\n{log.read_text()}")
    return proc, m


def _infer_http(url: str, model: str) -> np.ndarray:
    client = thttp.InferenceServerClient(url, network_timeout=60)
    try:
        inp = thttp.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        out = client.infer(model, [inp]).as_numpy("y")
        assert out is not None
        return out
    finally:
        client.close()


def test_a_gateway_routes_to_copies_on_the_other_node(tmp_path: Path, redis_server) -> None:
    if not (_bindable("127.0.0.2") and _bindable("127.0.0.3")):
        pytest.skip("this host cannot bind 127.0.0.2 and 127.0.0.3")
    # One set of model files, copied to each node's own path.
    files = tmp_path / "files"
    write_sized(files, "small", 1 * MB)
    write_sized(files, "big", 8 * MB)
    repo_a, repo_b = tmp_path / "node-a" / "models", tmp_path / "node-b" / "srv" / "repo"
    shutil.copytree(files, repo_a)
    shutil.copytree(files, repo_b)
    procs: list[subprocess.Popen[str]] = []
    try:
        # Node A: gateway and a worker too small for "big"; node B: a worker alone.
        a, ready = _start(
            ["serve", "--model-repository", str(repo_a), "--redis-url", redis_server.url,
             "--host", "127.0.0.2", "--node", "a", "--http-port", "0", "--grpc-port", "0",
             "--metrics-port", "0", "--threads", "1", "--device-memory-budget", "4MB",
             "--no-warm-restart", "--housekeeping-interval", "0.2"],
            tmp_path / "a.log", READY_RE, tmp_path,
        )  # fmt: skip
        procs.append(a)
        http_a, grpc_a = f"127.0.0.2:{ready[1]}", f"127.0.0.2:{ready[2]}"
        b, line = _start(
            ["worker", "--model-repository", str(repo_b), "--redis-url", redis_server.url,
             "--host", "127.0.0.3", "--port", "0", "--worker-id", "b-w0", "--node", "b",
             "--device-memory-budget", "64MB", "--threads", "1"],
            tmp_path / "b.log", WORKER_RE, tmp_path,
        )  # fmt: skip
        procs.append(b)
        assert line[1].startswith("127.0.0.3:"), line[1]

        # The registry holds addresses another host can dial, not Unix sockets.
        wait_for(
            lambda: len(_status(http_a)["workers"]) == 2 and len(_status(http_a)["devices"]) == 2,
            what="both workers and their devices seen",
        )
        registered = {
            w["worker_id"]: w["address"]
            for w in _status(http_a)["workers"]
            if w["worker_id"] in ("a-cpu-w0", "b-w0")
        }
        assert registered["b-w0"] == line[1]
        assert registered["a-cpu-w0"].startswith("127.0.0.2:"), registered

        # "big" fits only on node B: A's gateway loads it there and routes to it, over
        # HTTP and gRPC, the repository paths differing.
        assert np.allclose(_infer_http(http_a, "big"), 2.0)
        copies = {(c["model"], c["worker_id"]) for c in _status(http_a)["copies"]}
        assert ("big", "b-w0") in copies
        client = tgrpc.InferenceServerClient(grpc_a)
        inp = tgrpc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
        out = client.infer("big", [inp]).as_numpy("y")
        client.close()
        assert out is not None and np.allclose(out, 6.0)
        # "small" fits at home.
        assert np.allclose(_infer_http(http_a, "small"), 2.0)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _status(http: str) -> dict:
    import json
    import urllib.request

    with urllib.request.urlopen(f"http://{http}/v2/modelpool/status", timeout=10) as r:
        return json.load(r)
