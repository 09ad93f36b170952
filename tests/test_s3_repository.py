"""An S3 model repository through the real ``modelpool serve`` against a real
S3-compatible server (moto in server mode, on a free port): fetch on first request,
the bounded cache evicting least recently used artifacts, checksum mismatches
(UNAVAILABLE with the reason, never served), an outage with cached and uncached
models, a bucket that does not exist and refused credentials (serve fails at start
with the reason), and poll mode picking up and dropping versions."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import pytest
import tritonclient.http as thttp
from tritonclient.utils import InferenceServerException

from tests.conftest import ROOT, Served, start_serve
from tests.test_model_control import _index, _post, _wait_for
from tests.test_versions import added, http_infer, write_versions

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

BUCKET = "models"
PREFIX = "repo"
REPOSITORY = f"s3://{BUCKET}/{PREFIX}"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class S3:
    """A moto server in this process; its buckets outlive a stop and a start."""

    port: int
    server: object = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port)
        self.server.start()  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.server.stop()  # type: ignore[attr-defined]

    def client(self):
        return boto3.client("s3", endpoint_url=self.url)

    def upload(self, local_model: Path, prefix: str = PREFIX) -> None:
        """Every file of a local model directory under ``prefix/<model>/``."""
        client = self.client()
        for p in sorted(local_model.rglob("*")):
            if p.is_file():
                rel = p.relative_to(local_model.parent).as_posix()
                client.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=p.read_bytes())

    def delete(self, key: str) -> None:
        self.client().delete_object(Bucket=BUCKET, Key=key)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    with mock.patch.dict(os.environ, {**env, **CREDENTIALS}, clear=True):
        server = S3(_free_port())
        server.start()
        server.client().create_bucket(Bucket=BUCKET)
        staging = tmp_path_factory.mktemp("staging")
        for name in ("a", "b", "c"):
            server.upload(write_versions(staging, name, [1]))
        bad = write_versions(staging, "bad", [1])
        config = bad / "config.pbtxt"
        config.write_text(
            config.read_text()
            + 'parameters { key: "modelpool.sha256" value { string_value: "'
            + "0" * 64
            + '" } }\n'
        )
        server.upload(bad)
        sided = write_versions(staging, "sided", [1])
        digest = hashlib.sha256((sided / "1" / "model.pt").read_bytes()).hexdigest()
        (sided / "1" / "model.pt.sha256").write_text(f"{digest}  model.pt\n")
        server.upload(sided)
        yield server
        server.stop()


def _artifact_size(tmp: Path) -> int:
    return (write_versions(tmp, "sizer", [1]) / "1" / "model.pt").stat().st_size


@pytest.fixture(scope="module")
def served(s3: S3, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, Path]]:
    """On demand, with a cache smaller than two artifacts."""
    tmp = tmp_path_factory.mktemp("s3-serve")
    cache = tmp / "cache"
    size = int(_artifact_size(tmp) * 1.5)
    s = start_serve(
        REPOSITORY,  # type: ignore[arg-type]
        tmp / "serve.log",
        "--s3-endpoint-url", s3.url, "--repository-cache", str(cache),
        "--repository-cache-size", str(size), "--device-memory-budget", "512MiB",
    )  # fmt: skip
    yield s, cache
    s.stop()


def _cached(cache: Path, model: str) -> list[Path]:
    return sorted((cache / "s3" / BUCKET / PREFIX / model).rglob("model.pt"))


def _fetches(server: Served, model: str) -> int:
    return server.log().count(f"fetching {REPOSITORY}/{model}/1/model.pt (")


def test_artifacts_are_fetched_on_first_request(served: tuple[Served, Path]) -> None:
    server, cache = served
    index = _index(server)
    assert {("a", "1"), ("b", "1"), ("c", "1"), ("bad", "1"), ("sided", "1")} <= set(index)
    assert _cached(cache, "a") == []
    assert added(http_infer(server, "a")) == 1
    assert len(_cached(cache, "a")) == 1
    assert _fetches(server, "a") == 1
    assert added(http_infer(server, "a")) == 1  # resident: no second fetch
    assert _fetches(server, "a") == 1


def test_the_cache_evicts_the_least_recently_used_artifact(served: tuple[Served, Path]) -> None:
    server, cache = served
    http_infer(server, "a")
    assert added(http_infer(server, "b")) == 1
    assert _cached(cache, "a") == [] and len(_cached(cache, "b")) == 1
    # a is still resident in the worker; once unloaded, its next load fetches again.
    status, _ = _post(server, "/v2/repository/models/a/unload")
    assert status == 200
    assert added(http_infer(server, "a")) == 1
    assert _fetches(server, "a") == 2
    assert len(_cached(cache, "a")) == 1 and _cached(cache, "b") == []


def test_a_checksum_mismatch_is_unavailable_and_never_served(
    served: tuple[Served, Path],
) -> None:
    server, cache = served
    for _ in range(2):  # the second fails fast, from the recorded failure
        with pytest.raises(InferenceServerException) as e:
            http_infer(server, "bad")
        assert e.value.status() == "400"
        assert "model 'bad'" in str(e.value) and "checksum mismatch" in str(e.value)
        assert "0" * 64 in str(e.value)
    entry = _index(server)[("bad", "1")]
    assert entry["state"] == "UNAVAILABLE" and "checksum mismatch" in entry["reason"]
    assert not thttp.InferenceServerClient(server.http_url).is_model_ready("bad")
    assert _cached(cache, "bad") == []  # a bad download never enters the cache
    # A sidecar that matches: served.
    assert added(http_infer(server, "sided")) == 1


def test_an_outage_keeps_cached_models_loading_and_names_the_repository(
    s3: S3, served: tuple[Served, Path]
) -> None:
    server, cache = served
    assert added(http_infer(server, "a")) == 1
    status, _ = _post(server, "/v2/repository/models/a/unload")
    assert status == 200
    assert added(http_infer(server, "a")) == 1  # a is the cached one now
    assert len(_cached(cache, "a")) == 1
    s3.stop()
    try:
        assert _post(server, "/v2/repository/models/a/unload")[0] == 200
        status, body = _post(server, "/v2/repository/models/a/load")
        assert status == 200, body
        assert added(http_infer(server, "a")) == 1
        with pytest.raises(InferenceServerException) as e:
            http_infer(server, "c")
        assert e.value.status() == "503"
        assert f"model repository {REPOSITORY} is unavailable" in str(e.value)
        assert "model 'c'" in str(e.value)
        # The index still lists what was read before.
        assert ("c", "1") in _index(server)
    finally:
        s3.start()
    # Back: the uncached model fetches and serves (after the failure hold).
    _wait_for("c served", lambda: _infer_or_none(server, "c") == 1, timeout=20)


def _infer_or_none(server: Served, model: str) -> float | None:
    try:
        return added(http_infer(server, model))
    except InferenceServerException:
        return None


def test_poll_mode_picks_up_new_and_deleted_versions(
    s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("s3-poll")
    s3.upload(write_versions(tmp / "v1", "p", [1]), prefix="polled")
    s = start_serve(
        f"s3://{BUCKET}/polled",  # type: ignore[arg-type]
        tmp / "serve.log",
        "--s3-endpoint-url", s3.url, "--repository-cache", str(tmp / "cache"),
        "--model-control-mode", "poll", "--repository-poll-secs", "0.3",
        "--device-memory-budget", "512MiB",
    )  # fmt: skip
    try:
        assert added(http_infer(s, "p")) == 1
        s3.upload(write_versions(tmp / "v2", "p", [2]), prefix="polled")
        _wait_for("version 2 of p", lambda: _infer_or_none(s, "p") == 2)
        s3.delete("polled/p/2/model.pt")
        _wait_for("back to version 1", lambda: _infer_or_none(s, "p") == 1)
        assert ("p", "2") not in _index(s)
    finally:
        s.stop()


def _serve_fails(repository: str, endpoint: str, tmp: Path, **env: str) -> str:
    """Start serve expecting it to fail at once; its stderr."""
    cmd = [
        sys.executable, "-m", "modelpool.gateway.cli", "serve",
        "--model-repository", repository, "--s3-endpoint-url", endpoint,
        "--repository-cache", str(tmp / "cache"), "--http-port", "0", "--grpc-port", "0",
        "--metrics-port", "0",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=60, env={**os.environ, **env}
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_a_missing_bucket_fails_serve_at_start(
    s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> None:
    err = _serve_fails("s3://no-such-bucket/x", s3.url, tmp_path_factory.mktemp("nobucket"))
    assert "s3://no-such-bucket/x" in err and "bucket 'no-such-bucket' does not exist" in err


def test_refused_credentials_fail_serve_at_start(
    s3: S3, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A second moto server that enforces IAM: keys it never issued are refused."""
    port = _free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    moto = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.monotonic() < deadline, "moto_server did not start"
            time.sleep(0.1)
        err = _serve_fails(REPOSITORY, f"http://127.0.0.1:{port}", tmp_path_factory.mktemp("auth"))
        assert f"access to bucket '{BUCKET}' was refused (InvalidAccessKeyId)" in err
        assert "AWS_ACCESS_KEY_ID" in err
    finally:
        moto.terminate()
        moto.wait(10)
