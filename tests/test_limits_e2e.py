"""Tenant limits through the real ``modelpool serve`` with an auth config: a rate
limit and a concurrency limit answer 429 / RESOURCE_EXHAUSTED with Retry-After to that
tenant only, a device-memory quota evicts the tenant's own copies first and then
answers 429, and requests are counted per tenant."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from modelpool.gateway.tenants import hash_key, new_key
from tests.conftest import Served
from tests.modelgen import write_sized

MB = 1_000_000
pytestmark = pytest.mark.slow


def _infer(server: Served, model: str, key: str) -> tuple[int, dict, dict]:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), dict(e.headers)


@pytest.fixture
def tenants(tmp_path: Path, serve) -> tuple[Served, dict[str, str]]:
    repo = tmp_path / "repo"
    for name in ("acme-a", "acme-b", "acme-c", "shared", "slow-x"):
        write_sized(repo, name, 2 * MB)
    keys = {name: new_key() for name in ("acme", "quiet", "tight", "ops")}
    doc = {
        "tenants": [
            {
                "name": "acme",
                "keys": [hash_key(keys["acme"])],
                "models": ["acme-*", "shared"],
                "device_memory_quota": "6MB",
            },
            {"name": "quiet", "keys": [hash_key(keys["quiet"])], "models": ["shared"]},
            {
                "name": "tight",
                "keys": [hash_key(keys["tight"])],
                "models": ["shared"],
                "rate_limit_rps": 1,
                "burst": 2,
            },
            {"name": "ops", "role": "admin", "keys": [hash_key(keys["ops"])]},
        ]
    }
    config = tmp_path / "auth.yaml"
    config.write_text(yaml.safe_dump(doc))
    # LRU: the quota's victim is then the tenant's least recently used copy. Under the
    # default GDSF it is the one with the lowest value, which weighs each copy's
    # measured load time: acme-a or acme-b by a millisecond of noise.
    server = serve(
        repo, "--auth-config", str(config), "--device-memory-budget", "64MB", "--policy", "lru"
    )
    return server, keys


def test_a_rate_limit_is_a_429_for_that_tenant_only(tenants) -> None:
    server, keys = tenants
    codes = [_infer(server, "shared", keys["tight"])[0] for _ in range(6)]
    assert codes[:2] == [200, 200] and 429 in codes
    _, doc, headers = next(
        r for r in (_infer(server, "shared", keys["tight"]) for _ in range(3)) if r[0] == 429
    )
    assert "Retry-After" in headers and "tight" in doc["error"]
    # Another tenant on the same model is not affected.
    assert all(_infer(server, "shared", keys["quiet"])[0] == 200 for _ in range(6))
    assert server.metric("modelpool_requests_total", tenant="tight", outcome="rate_limited") >= 1
    assert server.metric("modelpool_requests_total", tenant="quiet", outcome="rate_limited") == 0
    assert server.metric("modelpool_requests_total", tenant="quiet", outcome="success") == 6


def test_a_quota_evicts_the_tenants_own_copies_first(tenants) -> None:
    server, keys = tenants
    for model in ("shared", "acme-a", "acme-b", "acme-c"):
        code, doc, _ = _infer(server, model, keys["acme"])
        assert code == 200, doc
    # 3 x ~2.5 MB estimates against a 6 MB quota: acme-a (its oldest) made room for
    # acme-c; 'shared' counts against no one's quota and stayed.
    assert server.metric("modelpool_model_evictions_total", model="acme-a", reason="quota") == 1
    assert server.metric("modelpool_model_evictions_total", model="shared") == 0
    status = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(
                f"http://{server.http_url}/v2/modelpool/status",
                headers={"Authorization": f"Bearer {keys['ops']}"},
            ),
            timeout=10,
        ).read()
    )
    acme = next(t for t in status["tenants"] if t["name"] == "acme")
    assert 0 < acme["resident_bytes"] <= acme["device_memory_quota"] == 6 * MB
