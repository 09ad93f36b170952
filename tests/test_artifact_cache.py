"""The artifact cache (one download per entry, however many ask; LRU eviction that
spares entries in use; a failed fetch leaves nothing) and checksum verification of a
local repository, which goes through the same code as an S3 one."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from modelpool.gpu.artifact_cache import ArtifactCache
from modelpool.gpu.repository import ModelRepository
from modelpool.placement.errors import ModelLoadError
from tests.test_versions import write_versions


def test_concurrent_fetches_of_one_entry_download_once(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, 1 << 20)
    calls = []
    started = threading.Event()

    def fill(tmp: Path) -> None:
        calls.append(tmp)
        started.set()
        tmp.write_bytes(b"x" * 100)

    results: list[bytes] = []

    def fetch() -> None:
        with cache.entry("m/1/model.pt", 100, fill) as path:
            results.append(path.read_bytes())

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(calls) == 1 and results == [b"x" * 100] * 8


def test_least_recently_used_goes_first_and_held_entries_stay(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, 250)

    def put(data: bytes):
        return lambda tmp: tmp.write_bytes(data)

    with cache.entry("a", 100, put(b"a" * 100)):
        pass
    with cache.entry("b", 100, put(b"b" * 100)):
        pass
    with cache.entry("a", 100, put(b"?")):  # a hit: a is now the most recent
        pass
    with cache.entry("c", 100, put(b"c" * 100)):
        pass
    assert cache.cached("a") and not cache.cached("b") and cache.cached("c")
    with cache.entry("a", 100, put(b"?")):  # held: not evictable
        with cache.entry("d", 100, put(b"d" * 100)):
            assert cache.cached("a") and not cache.cached("c")


def test_a_failed_fetch_leaves_nothing_and_evicts_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path, 150)
    with cache.entry("a", 100, lambda tmp: tmp.write_bytes(b"a" * 100)):
        pass

    def broken(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("connection reset")

    with pytest.raises(OSError), cache.entry("b", 100, broken):
        pass
    assert cache.cached("a") and not cache.cached("b")
    assert cache.usage() == 100


def _sidecar(model: Path, digest: str) -> None:
    (model / "1" / "model.pt.sha256").write_text(f"{digest}  model.pt\n")


def test_local_artifacts_are_verified_against_declared_checksums(tmp_path: Path) -> None:
    good = write_versions(tmp_path, "good", [1])
    _sidecar(good, hashlib.sha256((good / "1" / "model.pt").read_bytes()).hexdigest())
    bad = write_versions(tmp_path, "bad", [1])
    _sidecar(bad, "f" * 64)
    cfg = write_versions(tmp_path, "cfg", [1])
    (cfg / "config.pbtxt").write_text(
        (cfg / "config.pbtxt").read_text()
        + 'parameters { key: "modelpool.sha256" value { string_value: "nothex" } }\n'
    )
    repo = ModelRepository(tmp_path)
    with repo.artifact(repo.get("good"), 1) as path:
        assert path == good / "1" / "model.pt"
    with pytest.raises(ModelLoadError) as e, repo.artifact(repo.get("bad"), 1):
        pass
    assert "model 'bad' version 1" in e.value.message
    assert "checksum mismatch" in e.value.message and "model.pt.sha256" in e.value.message
    # A malformed declaration in the config is a config error: the model is listed
    # unavailable with the reason.
    assert "modelpool.sha256 must be a sha256" in (repo.get("cfg").error or "")
