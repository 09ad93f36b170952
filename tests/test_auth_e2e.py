"""Tenants through the real ``modelpool serve`` (and two ``modelpool gateway``s over
Redis): every endpoint over REST and gRPC for no key, a wrong key, a tenant on its own
model, on another tenant's model (indistinguishable from a missing one), a tenant's
admin call, and the admin; the audit log; SIGHUP reloads under load."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
import yaml
from tritonclient.utils import InferenceServerException

from modelpool.gateway.tenants import hash_key, new_key
from tests.cluster import start_gateway, start_worker, wait_for
from tests.conftest import ROOT, Served, start_serve
from tests.modelgen import write_sized

pytestmark = pytest.mark.slow

OWN, OTHER = "acme-a", "beta-b"
SHARED = "shared-s"
#: Absent from the repository; a name acme's globs do not cover, the length of OTHER.
MISSING = "zzzz-z"
MODELS = (OWN, OTHER, SHARED)
WRONG_KEY = "not-a-key-anyone-holds"


def _auth_doc(keys: dict[str, str], extra: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "tenants": [
            {"name": "acme", "keys": [hash_key(keys["acme"])], "models": ["acme-*", "shared-*"],
             "rate_limit_rps": 1000, "max_concurrency": 64},
            {"name": "beta", "keys": [hash_key(keys["beta"])], "models": ["beta-*"]},
            {"name": "ops", "role": "admin", "keys": [hash_key(keys["ops"])]},
            *(extra or []),
        ]
    }  # fmt: skip


def _write_config(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc))
    tmp.replace(path)


@dataclass
class Authed:
    served: Served
    keys: dict[str, str]
    audit: Path
    config: Path


def _start(root: Path, *args: str) -> Authed:
    repo = root / "models"
    for name in MODELS:
        write_sized(repo, name, 4096)
    keys = {name: new_key() for name in ("acme", "beta", "ops")}
    config = root / "auth.yaml"
    _write_config(config, _auth_doc(keys))
    audit = root / "audit.jsonl"
    served = start_serve(
        repo,
        root / "serve.log",
        "--auth-config", str(config),
        "--audit-log", str(audit),
        "--device-memory-budget", "256MB",
        *args,
    )  # fmt: skip
    return Authed(served, keys, audit, config)


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Authed]:
    """One server for the whole matrix."""
    a = _start(tmp_path_factory.mktemp("auth"))
    yield a
    a.served.stop()


# -- calling every endpoint ------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What a client can observe: the status (HTTP number or gRPC code name), the error
    message, and (REST) the headers and body."""

    status: int | str
    error: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    body: Any = None


def _rest(served: Served, method: str, path: str, key: str | None, body: Any = None) -> Reply:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://{served.http_url}{path}", data=data, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            raw, status, headers = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, e.headers
    doc = json.loads(raw) if raw else None
    error = doc.get("error") if isinstance(doc, dict) else None
    kept = tuple(sorted((k, v) for k, v in headers.items() if k not in ("Date", "Content-Length")))
    return Reply(status, error, kept, doc)


INFER_BODY = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]}

#: endpoint -> (method, path with {m} for the model, body)
REST: dict[str, tuple[str, str, Any]] = {
    "live": ("GET", "/v2/health/live", None),
    "ready": ("GET", "/v2/health/ready", None),
    "server_metadata": ("GET", "/v2", None),
    "metadata": ("GET", "/v2/models/{m}", None),
    "metadata_version": ("GET", "/v2/models/{m}/versions/1", None),
    "config": ("GET", "/v2/models/{m}/config", None),
    "model_ready": ("GET", "/v2/models/{m}/ready", None),
    "infer": ("POST", "/v2/models/{m}/infer", INFER_BODY),
    "statistics": ("GET", "/v2/models/{m}/stats", None),
    "statistics_all": ("GET", "/v2/models/stats", None),
    "index": ("POST", "/v2/repository/index", {}),
    "load": ("POST", "/v2/repository/models/{m}/load", {}),
    "unload": ("POST", "/v2/repository/models/{m}/unload", {}),
    "status": ("GET", "/v2/modelpool/status", None),
}


def _grpc_call(endpoint: str) -> Callable[[tgrpc.InferenceServerClient, str, Any], Any]:
    def infer(c: tgrpc.InferenceServerClient, m: str, h: Any) -> Any:
        x = tgrpc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        return c.infer(m, [x], headers=h)

    return {
        "live": lambda c, m, h: c.is_server_live(headers=h),
        "ready": lambda c, m, h: c.is_server_ready(headers=h),
        "server_metadata": lambda c, m, h: c.get_server_metadata(headers=h),
        "metadata": lambda c, m, h: c.get_model_metadata(m, headers=h),
        "metadata_version": lambda c, m, h: c.get_model_metadata(m, "1", headers=h),
        "config": lambda c, m, h: c.get_model_config(m, headers=h),
        "model_ready": lambda c, m, h: c.is_model_ready(m, headers=h),
        "infer": infer,
        "statistics": lambda c, m, h: c.get_inference_statistics(m, headers=h),
        "statistics_all": lambda c, m, h: c.get_inference_statistics("", headers=h),
        "index": lambda c, m, h: c.get_model_repository_index(headers=h),
        "load": lambda c, m, h: c.load_model(m, headers=h),
        "unload": lambda c, m, h: c.unload_model(m, headers=h),
    }[endpoint]


def _grpc(served: Served, endpoint: str, model: str, key: str | None) -> Reply:
    headers = {"authorization": f"Bearer {key}"} if key is not None else None
    client = tgrpc.InferenceServerClient(served.grpc_url)
    try:
        result = _grpc_call(endpoint)(client, model, headers)
    except InferenceServerException as e:
        return Reply(str(e.status()).removeprefix("StatusCode."), e.message())
    finally:
        client.close()
    return Reply("OK", body=result)


def call(a: Authed, protocol: str, caller: str, endpoint: str, model: str) -> Reply:
    key = {"none": None, "wrong": WRONG_KEY}.get(caller, a.keys.get(caller))
    if protocol == "rest":
        method, path, body = REST[endpoint]
        return _rest(a.served, method, path.format(m=model), key, body)
    return _grpc(a.served, endpoint, model, key)


# -- the matrix --------------------------------------------------------------------------------

OPEN = {"live", "ready", "server_metadata"}
ADMIN = {"load", "unload", "status", "statistics_all"}
MODEL = {"metadata", "metadata_version", "config", "model_ready", "infer", "statistics"}
GRPC_CODE = {200: "OK", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}


def expected(caller: str, endpoint: str, target: str) -> int:
    """The HTTP status each case must get (gRPC: its code, GRPC_CODE)."""
    if endpoint in OPEN:
        return 200
    if caller in ("none", "wrong"):
        return 401
    if endpoint in ADMIN:
        return 200 if caller == "ops" else 403
    if endpoint in MODEL:
        visible = target == OWN or caller == "ops"
        return 200 if visible and target != MISSING else 404
    return 200  # index


def _cases() -> list[Any]:
    cases = []
    for protocol in ("rest", "grpc"):
        for endpoint in REST:
            if protocol == "grpc" and endpoint == "status":
                continue  # REST only
            targets = (OWN, OTHER, MISSING) if endpoint in MODEL else (OWN,)
            for caller in ("none", "wrong", "acme", "ops"):
                for target in targets:
                    if endpoint not in MODEL and endpoint not in ("load", "unload"):
                        target = ""
                    cases.append(
                        pytest.param(
                            protocol, caller, endpoint, target,
                            id=f"{protocol}-{caller}-{endpoint}" + (f"-{target}" if target else ""),
                        )
                    )  # fmt: skip
    return cases


@pytest.mark.parametrize(("protocol", "caller", "endpoint", "target"), _cases())
def test_matrix(authed: Authed, protocol: str, caller: str, endpoint: str, target: str) -> None:
    want = expected(caller, endpoint, target)
    reply = call(authed, protocol, caller, endpoint, target)
    if protocol == "rest":
        assert reply.status == want, reply
        if want == 401:
            assert dict(reply.headers).get("WWW-Authenticate", "").startswith("Bearer")
    else:
        assert reply.status == GRPC_CODE[want], reply
    if want == 404:
        # Word for word what the repository says of a model it does not hold.
        assert reply.error == f"model '{target}' is not in the model repository"
    if want == 403:
        assert reply.error is not None and "admin" in reply.error
    for key in authed.keys.values():
        assert key not in repr(reply)
    if want != 200 or endpoint != "index":
        return
    if protocol == "rest":
        names = {m["name"] for m in reply.body}
    else:
        names = {m.name for m in reply.body.models}
    assert names == ({OWN, SHARED} if caller == "acme" else set(MODELS))


@pytest.mark.parametrize("protocol", ["rest", "grpc"])
@pytest.mark.parametrize("endpoint", sorted(MODEL))
def test_invisible_model_is_indistinguishable_from_a_missing_one(
    authed: Authed, protocol: str, endpoint: str
) -> None:
    """Another tenant's model, a model that does not exist (asked by the tenant and by
    the admin): the same status, headers and message, the name aside."""
    invisible = call(authed, protocol, "acme", endpoint, OTHER)
    replies = [
        invisible,
        call(authed, protocol, "acme", endpoint, MISSING),
        call(authed, protocol, "ops", endpoint, MISSING),
    ]
    normal = {
        Reply(r.status, (r.error or "").replace(name, "<m>"), r.headers, None)
        for r, name in zip(replies, (OTHER, MISSING, MISSING), strict=True)
    }
    assert len(normal) == 1, replies
    assert invisible.status in (404, "NOT_FOUND")


def test_tritonclient_http_headers(authed: Authed) -> None:
    """The README's example: tritonclient.http with ``headers=``."""
    client = thttp.InferenceServerClient(authed.served.http_url)
    headers = {"Authorization": f"Bearer {authed.keys['acme']}"}
    x = thttp.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.full((1, 4), 3.0, np.float32))
    y = client.infer(OWN, [x], headers=headers).as_numpy("y")
    np.testing.assert_allclose(y, np.full((1, 4), 6.0))
    assert client.is_model_ready(SHARED, headers=headers)
    with pytest.raises(InferenceServerException) as e:
        client.infer(OWN, [x])
    assert e.value.status() == "401"
    with pytest.raises(InferenceServerException) as e:
        client.infer(OTHER, [x], headers=headers)
    assert e.value.status() == "404"
    client.close()


def test_system_shared_memory_is_off_by_default_with_an_auth_config(authed: Authed) -> None:
    """A shm key names any object in the host's /dev/shm: with tenants, registering
    one is refused unless the operator turned it on (--system-shared-memory on)."""
    import tritonclient.utils.shared_memory as shm

    handle = shm.create_shared_memory_region("off", f"/mp-off-{os.getpid()}", 64)
    try:
        headers = {"Authorization": f"Bearer {authed.keys['acme']}"}
        client = thttp.InferenceServerClient(authed.served.http_url)
        with pytest.raises(InferenceServerException, match="system shared memory is off"):
            client.register_system_shared_memory(
                "off", f"/mp-off-{os.getpid()}", 64, headers=headers
            )
        client.close()
        g = tgrpc.InferenceServerClient(authed.served.grpc_url)
        with pytest.raises(InferenceServerException) as e:
            g.register_system_shared_memory(
                "off",
                f"/mp-off-{os.getpid()}",
                64,
                headers={"authorization": headers["Authorization"]},
            )
        assert "FAILED_PRECONDITION" in str(e.value.status())
        g.close()
    finally:
        shm.destroy_shared_memory_region(handle)


def test_audit_log(authed: Authed) -> None:
    a = authed
    assert call(a, "rest", "acme", "load", SHARED).status == 403
    assert call(a, "grpc", "acme", "unload", SHARED).status == "PERMISSION_DENIED"
    assert call(a, "rest", "wrong", "status", "").status == 401
    assert call(a, "grpc", "none", "metadata", OWN).status == "UNAUTHENTICATED"
    assert call(a, "rest", "ops", "load", SHARED).status == 200
    assert call(a, "grpc", "ops", "unload", SHARED).status == "OK"
    assert call(a, "rest", "ops", "status", "").status == 200
    assert call(a, "grpc", "ops", "load", "no-such-model").status == "NOT_FOUND"
    lines = [json.loads(x) for x in a.audit.read_text().splitlines()]
    assert all(
        set(x) == {"ts", "tenant", "action", "model", "outcome", "status", "source"} for x in lines
    )

    def has(**want: Any) -> dict[str, Any]:
        for x in reversed(lines):
            if all(x[k] == v for k, v in want.items()):
                return x
        raise AssertionError(f"no audit line like {want} in {lines[-12:]}")

    rest_denied = has(tenant="acme", action="load", model=SHARED, outcome="denied", status=403)
    assert rest_denied["source"] == "127.0.0.1"
    grpc_denied = has(tenant="acme", action="unload", model=SHARED, outcome="denied")
    assert grpc_denied["source"].startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))
    has(tenant=None, action="status", outcome="unauthenticated", status=401)
    has(tenant=None, action="metadata", model=OWN, outcome="unauthenticated")
    has(tenant="ops", action="load", model=SHARED, outcome="ok", status=200)
    has(tenant="ops", action="unload", model=SHARED, outcome="ok")
    has(tenant="ops", action="status", model=None, outcome="ok")
    has(tenant="ops", action="load", model="no-such-model", outcome="error", status=404)
    # Reads by tenants are not admin actions.
    assert not any(x["action"] == "infer" and x["outcome"] == "ok" for x in lines)
    text = a.audit.read_text() + a.served.log()
    for key in (*a.keys.values(), WRONG_KEY):
        assert key not in text


# -- SIGHUP, under load -------------------------------------------------------------------------


def test_sighup_reload_under_load(tmp_path: Path) -> None:
    """A new tenant's key works after SIGHUP (the file is not watched here, so only the
    signal can have done it); a bad file is refused and the old config kept; a stream
    of requests over both protocols sees no failure throughout."""
    a = _start(tmp_path, "--auth-reload-interval", "0")
    try:
        stop = threading.Event()
        failures: list[str] = []
        done = [0]
        lock = threading.Lock()

        def stream(protocol: str) -> None:
            while not stop.is_set():
                reply = call(a, protocol, "acme", "infer", OWN)
                with lock:
                    if reply.status not in (200, "OK"):
                        failures.append(repr(reply))
                    done[0] += 1

        threads = [threading.Thread(target=stream, args=(p,)) for p in ("rest", "rest", "grpc")]
        for t in threads:
            t.start()
        wait_for(lambda: done[0] >= 20, what="the stream to run")

        newco_key = new_key()
        newco = {"name": "newco", "keys": [hash_key(newco_key)], "models": ["shared-*"]}
        bad = _auth_doc(a.keys, [{**newco, "burst": 5}])  # burst without a rate
        _write_config(a.config, bad)
        a.served.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "auth config not reloaded" in a.served.log(), what="the refusal")
        assert "tenant 'newco'" in a.served.log() and "'burst'" in a.served.log()
        newco_reply = _rest(a.served, "GET", f"/v2/models/{SHARED}", newco_key)
        assert newco_reply.status == 401

        _write_config(a.config, _auth_doc(a.keys, [newco]))
        time.sleep(0.2)  # not watched: without the signal the key stays unknown
        assert _rest(a.served, "GET", f"/v2/models/{SHARED}", newco_key).status == 401
        a.served.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: _rest(a.served, "GET", f"/v2/models/{SHARED}", newco_key).status == 200,
            what="the new key to work",
        )
        assert _rest(a.served, "GET", f"/v2/models/{OWN}", newco_key).status == 404
        count = done[0]
        wait_for(lambda: done[0] >= count + 20, what="the stream to go on")
        stop.set()
        for t in threads:
            t.join(30)
        assert failures == []
        assert a.served.proc.poll() is None
    finally:
        a.served.stop()


# -- two gateways over Redis ---------------------------------------------------------------------


def test_same_key_on_two_gateways(tmp_path: Path, redis_server) -> None:
    repo = tmp_path / "models"
    write_sized(repo, OWN, 4096)
    keys = {name: new_key() for name in ("acme", "beta", "ops")}
    config = tmp_path / "auth.yaml"
    _write_config(config, _auth_doc(keys))
    worker = start_worker(repo, redis_server.url, tmp_path / "w1.log", "w1")
    gateways: list[Served] = []
    try:
        for name in ("a", "b"):
            gateways.append(
                start_gateway(
                    repo, redis_server.url, tmp_path / f"{name}.log", "--auth-config", str(config)
                )
            )
        for g in gateways:
            a = Authed(g, keys, tmp_path / "none", config)
            wait_for(
                lambda a=a: call(a, "rest", "ops", "status", "").body.get("workers"),
                what="the worker in the view",
            )
            for protocol in ("rest", "grpc"):
                ok = call(a, protocol, "acme", "infer", OWN)
                assert ok.status in (200, "OK"), ok
                for caller in ("wrong", "none"):
                    refused = call(a, protocol, caller, "infer", OWN)
                    assert refused.status in (401, "UNAUTHENTICATED"), refused
                assert call(a, protocol, "beta", "infer", OWN).status in (404, "NOT_FOUND")
    finally:
        for g in gateways:
            g.stop()
        worker.stop()


def test_status_command_takes_an_admin_key(authed: Authed) -> None:
    def status(*args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "MODELPOOL_KEY"}
        if key is not None:
            env["MODELPOOL_KEY"] = key
        cmd = [sys.executable, "-m", "modelpool.gateway.cli", "status", "--json",
               "--url", f"http://{authed.served.http_url}", *args]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)

    ok = status(key=authed.keys["ops"])
    assert ok.returncode == 0, ok
    assert "workers" in json.loads(ok.stdout)
    ok = status(f"--key={authed.keys['ops']}")
    assert ok.returncode == 0, ok
    refused = status()
    assert refused.returncode == 1, refused
    assert "401" in refused.stdout and "--key" in refused.stdout, refused
    tenant = status(key=authed.keys["acme"])
    assert tenant.returncode == 1 and "403" in tenant.stdout, tenant
