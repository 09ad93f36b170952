"""The auth config, key hashing, model globs and reloads (gateway/tenants.py), the audit
log, and the CLI around them (``modelpool keys new``, the bind check)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from modelpool.gateway import tenants as tenants_mod
from modelpool.gateway.audit import AuditEvent, AuditLog
from modelpool.gateway.config import GatewayConfig, is_loopback
from modelpool.gateway.tenants import (
    AuthConfigError,
    Authenticator,
    Role,
    Tenant,
    hash_key,
    load_auth_config,
    new_key,
    parse_auth_config,
)
from modelpool.placement.errors import Unauthenticated
from tests.conftest import ROOT

ACME_KEY = "acme-key-0123456789"
OPS_KEY = "ops-key-0123456789"
NEW_KEY = "new-key-0123456789"


def _doc(**acme: Any) -> dict[str, Any]:
    tenant = {"name": "acme", "keys": [hash_key(ACME_KEY)], "models": ["acme-*"], **acme}
    return {"tenants": [tenant, {"name": "ops", "role": "admin", "keys": [hash_key(OPS_KEY)]}]}


def _write(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def test_hash_key_is_sha256_hex_of_the_key() -> None:
    assert hash_key("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    key = new_key()
    assert re.fullmatch(r"mpk_[A-Za-z0-9_-]{43}", key)
    assert key != new_key()


def test_full_tenant_is_parsed() -> None:
    config = parse_auth_config(
        _doc(
            models=["acme-*", "shared-*"],
            rate_limit_rps=50,
            burst=80,
            max_concurrency=16,
            device_memory_quota="2GiB",
        )
    )
    acme, ops = config.tenants
    assert acme == Tenant(
        name="acme",
        role=Role.TENANT,
        models=("acme-*", "shared-*"),
        rate_limit_rps=50.0,
        burst=80.0,
        max_concurrency=16,
        device_memory_quota=2 << 30,
    )
    assert ops.role is Role.ADMIN and ops.is_admin and ops.rate_limit_rps is None
    assert config.tenant_for(ACME_KEY) is acme
    assert config.tenant_for(OPS_KEY) is ops
    assert config.tenant_for("nope") is None


@pytest.mark.parametrize(
    ("rate", "burst", "want"),
    [(50, None, 50.0), (0.5, None, 1.0), (2, 10, 10.0), (None, None, None)],
)
def test_burst_defaults_to_the_rate(rate, burst, want) -> None:
    fields = {k: v for k, v in (("rate_limit_rps", rate), ("burst", burst)) if v is not None}
    assert parse_auth_config(_doc(**fields)).tenants[0].burst == want


def test_quota_in_bytes() -> None:
    assert parse_auth_config(_doc(device_memory_quota=1024)).tenants[0].device_memory_quota == 1024
    assert parse_auth_config(_doc(device_memory_quota="1.5GB")).tenants[0].device_memory_quota == (
        1_500_000_000
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"role": "root"}, "role"),
        ({"keys": []}, "keys"),
        ({"keys": "sha256:" + "0" * 64}, "keys"),
        ({"keys": ["sha256:" + "0" * 63]}, "keys"),
        ({"keys": ["sha256:" + "A" * 64]}, "keys"),
        ({"keys": [hash_key("x"), hash_key("x")]}, "keys"),
        ({"models": "acme-*"}, "models"),
        ({"models": ["acme-*", 3]}, "models"),
        ({"models": [""]}, "models"),
        ({"role": "admin"}, "models"),  # an admin sees everything: models makes no sense
        ({"rate_limit_rps": -1}, "rate_limit_rps"),
        ({"rate_limit_rps": 0}, "rate_limit_rps"),
        ({"rate_limit_rps": True}, "rate_limit_rps"),
        ({"rate_limit_rps": "fast"}, "rate_limit_rps"),
        ({"rate_limit_rps": float("inf")}, "rate_limit_rps"),
        ({"burst": 5}, "burst"),  # without a rate
        ({"rate_limit_rps": 5, "burst": 0.5}, "burst"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": 1.5}, "max_concurrency"),
        ({"max_concurrency": "many"}, "max_concurrency"),
        ({"device_memory_quota": "2 parsecs"}, "device_memory_quota"),
        ({"device_memory_quota": -1}, "device_memory_quota"),
        ({"device_memory_quota": [1]}, "device_memory_quota"),
    ],
)
def test_bad_field_is_named_with_its_tenant(change: dict[str, Any], field: str) -> None:
    with pytest.raises(AuthConfigError) as e:
        parse_auth_config(_doc(**change), "auth.yaml")
    message = str(e.value)
    assert "auth config auth.yaml" in message
    assert "tenant 'acme'" in message
    assert field in message


def test_plain_key_in_keys_is_refused_without_echoing_it() -> None:
    secret = "s3cr3t-plain-key-pasted-by-mistake"
    with pytest.raises(AuthConfigError) as e:
        parse_auth_config(_doc(keys=[secret]))
    assert secret not in str(e.value)
    assert "field 'keys'" in str(e.value) and "modelpool keys new" in str(e.value)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (None, ["tenants"]),
        ([], ["tenants"]),
        ({"tenants": {"acme": {}}}, ["tenants", "list"]),
        ({"tenants": [], "admins": []}, ["admins"]),
        ({"tenants": ["acme"]}, ["tenants[0]"]),
        ({"tenants": [{"keys": [hash_key("x")]}]}, ["tenants[0]", "field 'name'"]),
        ({"tenants": [{"name": "a b", "keys": [hash_key("x")]}]}, ["field 'name'"]),
    ],
)
def test_bad_document(doc: Any, words: list[str]) -> None:
    with pytest.raises(AuthConfigError) as e:
        parse_auth_config(doc)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_tenant_listed_twice_and_key_shared() -> None:
    doc = _doc()
    doc["tenants"].append(dict(doc["tenants"][0]))
    with pytest.raises(AuthConfigError, match="tenant 'acme' is listed twice"):
        parse_auth_config(doc)
    doc = _doc()
    doc["tenants"][1]["keys"] = [hash_key(ACME_KEY)]
    with pytest.raises(AuthConfigError, match=r"tenant 'ops'.*also a key of tenant 'acme'"):
        parse_auth_config(doc)


def test_unreadable_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(AuthConfigError, match="cannot read"):
        load_auth_config(tmp_path / "missing.yaml")
    with pytest.raises(AuthConfigError, match="not valid YAML"):
        load_auth_config(_write(tmp_path / "a.yaml", "tenants: [\n"))


@pytest.mark.parametrize(
    ("globs", "yes", "no"),
    [
        (["acme-*"], ["acme-a", "acme-", "acme-x.y"], ["Acme-a", "acme", "xacme-a", "shared-a"]),
        (["acme-*", "shared-?"], ["acme-1", "shared-1"], ["shared-12", "beta-1"]),
        (["[ab]x"], ["ax", "bx"], ["cx", "abx"]),
        (["exact"], ["exact"], ["exact2", "exac"]),
        ([], [], ["anything", "acme-a"]),
    ],
)
def test_globs(globs: list[str], yes: list[str], no: list[str]) -> None:
    tenant = Tenant("acme", models=tuple(globs))
    assert all(tenant.sees(m) for m in yes)
    assert not any(tenant.sees(m) for m in no)


def test_admin_sees_every_model() -> None:
    assert Tenant("ops", role=Role.ADMIN).sees("anything")


def test_authenticate() -> None:
    assert Authenticator().authenticate(None) is None  # auth off
    assert Authenticator().authenticate("Bearer whatever") is None
    auth = Authenticator()
    auth.config = parse_auth_config(_doc())
    acme = auth.config.tenants[0]
    assert auth.authenticate(f"Bearer {ACME_KEY}") is acme
    assert auth.authenticate(f"bearer  {ACME_KEY} ") is acme
    for value in (None, "", "Bearer", "Bearer ", f"Basic {ACME_KEY}", ACME_KEY, "Bearer \udcff"):
        with pytest.raises(Unauthenticated) as e:
            auth.authenticate(value)
        assert ACME_KEY not in e.value.message
    with pytest.raises(Unauthenticated, match="unknown key") as e:
        auth.authenticate("Bearer wrong-key-xyz")
    assert "wrong-key-xyz" not in e.value.message


def test_every_key_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a match on the first key costs as many compares as a miss."""
    config = parse_auth_config(_doc())
    calls: list[int] = []
    real = tenants_mod.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(tenants_mod.hmac, "compare_digest", counting)
    for key in (ACME_KEY, OPS_KEY, "nope"):
        calls.clear()
        config.tenant_for(key)
        assert len(calls) == len(config.keys) == 2


def _add_newco(doc: dict[str, Any]) -> dict[str, Any]:
    doc["tenants"].append({"name": "newco", "keys": [hash_key(NEW_KEY)], "models": ["new-*"]})
    return doc


def test_reload_takes_a_good_file_and_keeps_the_old_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _write(tmp_path / "auth.yaml", _doc())
    auth = Authenticator(str(path))
    seen: list[int] = []
    auth.listeners.append(lambda c: seen.append(len(c.tenants)))
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {NEW_KEY}")

    _write(path, _add_newco(_doc()))
    assert auth.reload()
    assert auth.authenticate(f"Bearer {NEW_KEY}").name == "newco"  # type: ignore[union-attr]
    assert seen == [3]

    bad = _add_newco(_doc())
    bad["tenants"][2]["max_concurrency"] = -2
    bad["tenants"][0]["keys"] = [hash_key("rotated-away")]
    _write(path, bad)
    with caplog.at_level(logging.ERROR, logger="modelpool.gateway.tenants"):
        assert not auth.reload()
    assert "tenant 'newco'" in caplog.text and "max_concurrency" in caplog.text
    # The old config is intact: the old key still works, the half-edited one does not.
    assert auth.authenticate(f"Bearer {ACME_KEY}").name == "acme"  # type: ignore[union-attr]
    assert auth.authenticate(f"Bearer {NEW_KEY}").name == "newco"  # type: ignore[union-attr]
    assert seen == [3]

    _write(path, "tenants: [\n")
    assert not auth.reload()
    path.unlink()
    assert not auth.reload()
    assert auth.authenticate(f"Bearer {ACME_KEY}").name == "acme"  # type: ignore[union-attr]


def test_bad_file_at_start_fails(tmp_path: Path) -> None:
    doc = _doc(burst=3)
    with pytest.raises(AuthConfigError, match=r"tenant 'acme'.*'burst'"):
        Authenticator(str(_write(tmp_path / "auth.yaml", doc)))


async def test_watch_reloads_on_change(tmp_path: Path) -> None:
    path = _write(tmp_path / "auth.yaml", _doc())
    auth = Authenticator(str(path))
    task = asyncio.create_task(auth.watch(0.02))
    try:

        async def until_works(key: str) -> None:
            deadline = time.monotonic() + 10
            while True:
                try:
                    auth.authenticate(f"Bearer {key}")
                    return
                except Unauthenticated:
                    assert time.monotonic() < deadline, "the change was not picked up"
                    await asyncio.sleep(0.02)

        # Rewritten in place...
        _write(path, _add_newco(_doc()))
        await until_works(NEW_KEY)
        # ...and replaced atomically (a new inode), as docs/security.md recommends.
        doc = _add_newco(_doc())
        doc["tenants"][0]["keys"].append(hash_key("second-acme-key"))
        tmp = _write(tmp_path / "auth.yaml.tmp", doc)
        os.replace(tmp, path)
        await until_works("second-acme-key")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_audit_log_appends_json_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for i in range(2):  # two opens (two gateways, or a restart) append to one file
        log = AuditLog(str(path))
        log.record(AuditEvent("ops", "load", f"m{i}", "ok", 200, "127.0.0.1"))
        log.close()
    AuditLog(None).record(AuditEvent(None, "load", None, "ok", 200, ""))  # records nothing
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["model"] for x in lines] == ["m0", "m1"]
    assert set(lines[0]) == {"ts", "tenant", "action", "model", "outcome", "status", "source"}
    with pytest.raises(ValueError, match="--audit-log"):
        AuditLog(str(tmp_path / "no-such-dir" / "audit.jsonl"))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("", False), ("10.1.2.3", False), ("myhost", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_open_server_only_on_loopback(tmp_path: Path) -> None:
    GatewayConfig(str(tmp_path))  # the default: 127.0.0.1
    with pytest.raises(ValueError, match=r"--auth-config.*--insecure"):
        GatewayConfig(str(tmp_path), host="0.0.0.0")
    GatewayConfig(str(tmp_path), host="0.0.0.0", insecure=True)
    GatewayConfig(str(tmp_path), host="0.0.0.0", auth_config="auth.yaml")


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modelpool.gateway.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env=dict(os.environ, MODELPOOL_FORCE_CPU="1"),
    )


def test_keys_new_output() -> None:
    out = _cli("keys", "new", "--tenant", "acme")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3
    assert lines[0] == "tenant: acme"
    m = re.fullmatch(r"key: (mpk_[A-Za-z0-9_-]{43})", lines[1])
    assert m, lines[1]
    assert lines[2] == f"hash: {hash_key(m[1])}"
    assert yaml.safe_load(out.stdout) == {"tenant": "acme", "key": m[1], "hash": hash_key(m[1])}
    assert "auth config" in out.stderr and m[1] not in out.stderr
    again = _cli("keys", "new", "--tenant", "acme")
    assert again.stdout.splitlines()[1] != lines[1]

    bad = _cli("keys", "new", "--tenant", "no spaces")
    assert bad.returncode == 2 and "tenant name" in bad.stderr


@pytest.mark.parametrize("command", ["serve", "gateway"])
def test_open_bind_elsewhere_needs_insecure(command: str, tmp_path: Path) -> None:
    args = [command, "--model-repository", str(tmp_path), "--host", "0.0.0.0"]
    if command == "gateway":
        args += ["--redis-url", "redis://127.0.0.1:1/0"]
    out = _cli(*args)
    assert out.returncode == 2
    assert "--host 0.0.0.0 without --auth-config" in out.stderr
    assert "--insecure" in out.stderr and "--auth-config FILE" in out.stderr


def test_bad_auth_config_at_start_exits(tmp_path: Path) -> None:
    path = _write(tmp_path / "auth.yaml", _doc(max_concurrency=0))
    out = _cli("serve", "--model-repository", str(tmp_path), "--auth-config", str(path))
    assert out.returncode == 2
    assert "tenant 'acme'" in out.stderr and "max_concurrency" in out.stderr
