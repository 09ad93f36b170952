"""Process lifecycle of ``modelpool serve``: Ctrl-C and SIGTERM stop everything within
seconds, even with a hung worker; a killed worker is restarted and its models load
again on demand."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import tritonclient.http as thttp

from tests.modelgen import write_sized

MB = 1_000_000


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _infer(url: str, model: str) -> np.ndarray:
    client = thttp.InferenceServerClient(url)
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer(model, [x]).as_numpy("y")


def _repo(tmp_path: Path) -> Path:
    write_sized(tmp_path, "m", 1 * MB)
    return tmp_path


def test_ctrl_c_stops_everything(tmp_path: Path, serve) -> None:
    server = serve(_repo(tmp_path), "--workers", "2")
    _infer(server.http_url, "m")
    workers = server.worker_pids()
    assert len(workers) == 2
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(15) == 0
    assert _wait_gone(workers, 5) == []


def test_sigterm_with_a_hung_worker_still_stops(tmp_path: Path, serve) -> None:
    server = serve(_repo(tmp_path))
    workers = server.worker_pids()
    os.kill(workers[0], signal.SIGSTOP)  # hung: ignores SIGTERM until killed
    try:
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(20) == 0
        assert _wait_gone(workers, 5) == []
    finally:
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def test_gateway_killed_hard_takes_its_workers_along(tmp_path: Path, serve) -> None:
    server = serve(_repo(tmp_path))
    workers = server.worker_pids()
    server.proc.kill()
    server.proc.wait(5)
    assert _wait_gone(workers, 10) == []


def test_killed_worker_is_restarted_and_models_reload(tmp_path: Path, serve) -> None:
    server = serve(_repo(tmp_path))
    np.testing.assert_allclose(_infer(server.http_url, "m"), 2 * np.ones((1, 4)))
    [worker] = server.worker_pids()
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pids = server.worker_pids()
        if (
            pids
            and pids != [worker]
            and thttp.InferenceServerClient(server.http_url).is_server_ready()
        ):
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"no new worker after kill:\n{server.log()}")
    # The dead worker's copy left residency; the next request loads the model again.
    np.testing.assert_allclose(_infer(server.http_url, "m"), 2 * np.ones((1, 4)))
    assert server.metric("modelpool_model_loads_total", model="m", outcome="success") == 2
    assert server.metric("modelpool_model_evictions_total", model="m", reason="worker_lost") == 1
    assert "exited with code" in server.log()
